"""The GPT: a decoder-only transformer, readable top to bottom.

Config -> CausalSelfAttention -> MLP -> Block -> GPT. The default is the GPT-2 layout (learned positions,
LayerNorm, GELU); three config fields switch to the Llama layout (rotary positions, RMSNorm, SwiGLU).
Parameter names are the Hugging Face GPT-2 keys (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...)
in both layouts, so `checkpoint.py` maps to `GPT2LMHeadModel` or `LlamaForCausalLM` with transposes and
splits and nothing else. No I/O, optimizer or CLI in here. Generation state lives in `KVCache`, which the
attention fills in place; `GPT.decode` is the one-token step of generation without the module calls, and
the sampling loop is in `generate.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_THETA = 10000.0  # rotary base, as Llama's default (written to the HF config as rope_theta)
NORM_EPS = 1e-5


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rotary" (Llama)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    mlp: str = "gelu"  # "gelu" (GPT-2: 4 x n_embd hidden) or "swiglu" (Llama: gated, ~8/3 x n_embd hidden)

    @property
    def ffn_hidden(self) -> int:
        """MLP hidden width: 4 C for GELU; for SwiGLU 8/3 C rounded up to a multiple of 32 (about the same
        parameter count with three matrices instead of two)."""
        return 4 * self.n_embd if self.mlp == "gelu" else -(-8 * self.n_embd // 3 // 32) * 32


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, nh, max_len, hs), filled up to `pos`."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype) -> None:
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached; the next forward writes at [pos, pos + T)

    def reset(self) -> None:
        self.pos = 0


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (B, nh, T, hs) with cos/sin (T, hs), in HF Llama's rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def norm_layer(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(cfg.n_embd, eps=NORM_EPS, bias=cfg.bias)


def normalize(x: torch.Tensor, ln: nn.Module) -> torch.Tensor:
    """`ln(x)` without the module call (the decode step's hot path)."""
    if isinstance(ln, nn.RMSNorm):
        return F.rms_norm(x, ln.normalized_shape, ln.weight, ln.eps)
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        mask, causal = None, True
        if cache is not None:
            p = cache.pos
            cache.k[layer, :B, :, p:p + T] = k
            cache.v[layer, :B, :, p:p + T] = v
            k, v = cache.k[layer, :B, :, :p + T], cache.v[layer, :B, :, :p + T]
            if p > 0:  # queries sit at positions p..p+T-1 and may see every key up to their own position
                causal = False
                if T > 1:
                    mask = torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(diagonal=p)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.ffn_hidden
        # SwiGLU's gate and up projections are one matmul: c_fc's output is [gate | up]
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up  # HF Llama: down(silu(gate(x)) * up(x))
        return F.gelu(h)  # exact GELU = HF "gelu"


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = norm_layer(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm_layer(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)  # pre-norm residual blocks, as in GPT-2
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        parts = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.pos_emb == "learned":
            parts["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        parts.update(drop=nn.Dropout(cfg.dropout), h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                     ln_f=norm_layer(cfg))
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings, as GPT-2
        if cfg.pos_emb == "rotary":  # cos/sin tables (block_size, hs), computed as HF Llama does, not saved
            hs = cfg.n_embd // cfg.n_head
            inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs)
            freqs = torch.outer(torch.arange(cfg.block_size).float(), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("rope_cos", emb.cos(), persistent=False)
            self.register_buffer("rope_sin", emb.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.pos_emb != "rotary":
            return None
        return self.rope_cos[start:start + T], self.rope_sin[start:start + T]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy when targets are given.

        With a cache, positions continue from `cache.pos` and the cache advances by T. `last_only` returns
        logits for the final position only (B, 1, vocab): generation needs nothing else.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        rope = self._rope(start, T)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None
        logits = self.lm_head(x)
        # ignore_index -100 masks positions out of the loss (prompt tokens in SFT, padding)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def decodable(self) -> bool:
        """True when `decode` may read the weights directly: every layer is the plain torch module (a LoRA
        or quantised wrapper has its own forward, which only the module path runs)."""
        plain = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.Dropout, nn.ModuleList, nn.ModuleDict,
                 Block, CausalSelfAttention, MLP, GPT)
        return all(type(m) in plain for m in self.modules())

    @torch.inference_mode()
    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence: idx (B, 1) -> logits (B, vocab), the cache advanced by one.

        Computes what `forward(idx, cache=cache, last_only=True)` computes, with functional calls instead
        of module calls and no masks or copies: small models spend most of a generated token in per-op
        overhead, and this halves the ops. Needs `decodable()` and a cache made for exactly B sequences.
        """
        c, tf, p = self.config, self.transformer, cache.pos
        if p + 1 > c.block_size:
            raise ValueError(f"sequence of {p + 1} tokens exceeds block_size {c.block_size}")
        B, nh, hs = idx.size(0), c.n_head, c.n_embd // c.n_head
        x = F.embedding(idx, tf.wte.weight)  # (B, 1, C)
        if c.pos_emb == "learned":
            x += tf.wpe.weight[p]
        rope = self._rope(p, 1)
        for i, block in enumerate(tf.h):
            attn, mlp = block.attn, block.mlp
            qkv = F.linear(normalize(x, block.ln_1), attn.c_attn.weight, attn.c_attn.bias)
            q, k, v = qkv.view(B, 3, nh, 1, hs).unbind(1)  # (B, nh, 1, hs) each: T = 1 makes it a view
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            keys, values = cache.k[i], cache.v[i]  # (B, nh, max_len, hs)
            keys.narrow(2, p, 1).copy_(k)
            values.narrow(2, p, 1).copy_(v)
            y = F.scaled_dot_product_attention(q, keys.narrow(2, 0, p + 1), values.narrow(2, 0, p + 1))
            x += F.linear(y.view(B, 1, c.n_embd), attn.c_proj.weight, attn.c_proj.bias)
            h = F.linear(normalize(x, block.ln_2), mlp.c_fc.weight, mlp.c_fc.bias)
            x += F.linear(mlp.act(h), mlp.c_proj.weight, mlp.c_proj.bias)
        cache.pos += 1
        return F.linear(normalize(x, tf.ln_f), self.lm_head.weight).view(B, -1)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd
