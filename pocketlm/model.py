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

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_THETA = 10000.0  # rotary base, as Llama's default (written to the HF config as rope_theta)
NORM_EPS = 1e-5
SQRT1_2 = 1 / math.sqrt(2)


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, 1, T, T) bool, True where a query may see a key, replaces the causal mask (packed rows)."""
        B, T, C = x.shape
        qkv = self.c_attn(x)
        # Under bf16 autocast on CPU the matmuls gain ~2x, but the CPU flash kernel's bf16 backward is ~2.7x
        # slower than its fp32 one (scores as bf16 matmuls with an fp32 softmax were no faster either), so
        # attention runs in fp32 there: one cast of q, k, v together, and c_proj's autocast casts y back.
        fp32_attention = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if fp32_attention:
            qkv = qkv.float()
        q, k, v = qkv.split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        causal = mask is None
        if cache is not None:
            p = cache.pos
            cache.k[layer, :B, :, p:p + T] = k
            cache.v[layer, :B, :, p:p + T] = v
            k, v = cache.k[layer, :B, :, :p + T], cache.v[layer, :B, :, :p + T]
            if p > 0:  # queries sit at positions p..p+T-1 and may see every key up to their own position
                causal = False
                if T > 1:
                    mask = torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(diagonal=p)
        with torch.autocast("cpu", enabled=False) if fp32_attention else contextlib.nullcontext():
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
                cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer, mask)  # pre-norm residual blocks, as in GPT-2
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
        last_only: bool = False, position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy when targets are given.

        With a cache, positions continue from `cache.pos` and the cache advances by T. `last_only` returns
        logits for the final position only (B, 1, vocab): generation needs nothing else. `position_ids`
        (B, T) are for rows packed with several examples, as transformers reads them: positions restart at
        each example, and a position sees only the earlier ones of its own example.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        mask = None
        if position_ids is None:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
            rope = self._rope(start, T)
        elif cache is not None:
            raise ValueError("position_ids are for packed training rows, not for decoding with a cache")
        else:
            pos = position_ids
            example = (pos.diff(dim=1, prepend=pos[:, :1] - 1) != 1).cumsum(1)  # a new one where positions jump
            mask = (example[:, :, None] == example[:, None, :]).tril()[:, None]  # (B, 1, T, T)
            rope = None
            if self.config.pos_emb == "rotary":  # (B, 1, T, hs): each row its own angles, broadcast over heads
                rope = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, i, mask)
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

    def decode_plan(self) -> tuple:
        """The weights `decode` reads, gathered once per generation: a flat tuple per layer, each matrix as
        its (in, out) transpose so that one `mm`/`addmm` computes x @ W^T + b without `F.linear`'s checks.
        Built per call of `Engine.steps`, never stored, so it cannot go stale when weights are replaced."""
        tf = self.transformer
        t = lambda lin: lin.weight.t()  # noqa: E731 - a view, no copy
        layers = tuple(
            (b.ln_1.weight, getattr(b.ln_1, "bias", None), t(b.attn.c_attn), b.attn.c_attn.bias,
             t(b.attn.c_proj), b.attn.c_proj.bias, b.ln_2.weight, getattr(b.ln_2, "bias", None),
             t(b.mlp.c_fc), b.mlp.c_fc.bias, t(b.mlp.c_proj), b.mlp.c_proj.bias)
            for b in tf.h)
        wpe = tf.wpe.weight if "wpe" in tf else None
        return tf.wte.weight, wpe, layers, tf.ln_f.weight, getattr(tf.ln_f, "bias", None), t(self.lm_head)

    @torch.inference_mode()
    def decode(self, idx: torch.Tensor, cache: KVCache, plan: tuple | None = None,
               at: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per sequence: idx (B, 1) -> logits (B, vocab), the cache advanced by one.

        Computes what `forward(idx, cache=cache, last_only=True)` computes, on (B, C) rows with direct
        `mm`/`addmm`/`layer_norm` calls instead of module calls, masks and copies: small models spend most
        of a generated token in per-op overhead, and this makes it the fewest ops. Needs `decodable()` and a
        cache made for exactly B sequences; pass `decode_plan()` when calling it in a loop.

        `at` (a one-element long tensor on the model's device, = cache.pos) makes every shape fixed, as a
        CUDA graph needs (`generate.GraphStep`): the new key is written at `at`, attention reads the whole
        cache under a mask of positions <= `at`, and `cache.pos` is left for the caller to advance.
        """
        c, p = self.config, cache.pos
        if p + 1 > c.block_size:
            raise ValueError(f"sequence of {p + 1} tokens exceeds block_size {c.block_size}")
        wte, wpe, layers, lnf_w, lnf_b, head_t = plan or self.decode_plan()
        B, nh, C = idx.size(0), c.n_head, c.n_embd
        hs, shape, eps = C // nh, (C,), NORM_EPS
        rms, swiglu = c.norm == "rmsnorm", c.mlp == "swiglu"
        mm, addmm, sdpa = torch.mm, torch.addmm, F.scaled_dot_product_attention

        def norm(x, w, b):
            return torch.rms_norm(x, shape, w, eps) if rms else torch.layer_norm(x, shape, w, b, eps, False)

        x = F.embedding(idx.view(B), wte)  # (B, C)
        if at is None:
            rope = self._rope(p, 1)
            if wpe is not None:
                x += wpe[p]
        else:
            seen = (torch.arange(cache.k.size(3), device=idx.device) <= at)[None]  # (1, max_len): keys <= at
            if c.pos_emb == "rotary":
                rope = self.rope_cos.index_select(0, at), self.rope_sin.index_select(0, at)
            else:
                rope = None
                x += wpe.index_select(0, at)
        caches = zip(cache.k.unbind(0), cache.v.unbind(0))  # (B, nh, max_len, hs) per layer
        for (w1, b1, wa, ba, wp, bp, w2, b2, wf, bf, wo, bo), (keys, values) in zip(layers, caches):
            h = norm(x, w1, b1)
            qkv = (mm(h, wa) if ba is None else addmm(ba, h, wa)).view(B, 3, nh, 1, hs)
            q, k, v = qkv.unbind(1)  # (B, nh, 1, hs) each, views
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            if at is None:
                keys.narrow(2, p, 1).copy_(k)
                values.narrow(2, p, 1).copy_(v)
                y = sdpa(q, keys.narrow(2, 0, p + 1), values.narrow(2, 0, p + 1)).view(B, C)
            else:
                keys.index_copy_(2, at, k)
                values.index_copy_(2, at, v)
                y = sdpa(q, keys, values, attn_mask=seen).view(B, C)
            x.addmm_(y, wp)  # x += y @ Wp^T
            if bp is not None:
                x += bp
            h = norm(x, w2, b2)
            h = mm(h, wf) if bf is None else addmm(bf, h, wf)
            if swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate).mul_(up)
            else:  # exact GELU = HF "gelu", as x/2 (1 + erf(x/sqrt 2)) in place: on one row this is ~2x
                h = torch.mul(h, SQRT1_2).erf_().add_(1.0).mul_(h).mul_(0.5)  # faster than F.gelu's kernel
            x.addmm_(h, wo)
            if bo is not None:
                x += bo
        if at is None:
            cache.pos += 1
        return mm(norm(x, lnf_w, lnf_b), head_t)

    def stream_layout(self) -> GPT:
        """Store each matrix with more rows than columns (QKV, MLP up, the tied embedding/head) transposed
        in memory, same shape and values. A batch-1 decode step streams every weight from RAM once per
        token, and MKL reads x @ W^T at about 1.6x the bandwidth when W^T is contiguous (GPT-2-small:
        lm_head 12.0 -> 7.5 ms per token on the 2-core benchmark machine). For inference-only models:
        `Engine.load` calls it; a model being trained keeps the row-major layout its optimizer state has."""
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2 and p.size(0) > p.size(1) and p.is_contiguous():
                    p.data = p.data.t().contiguous().t()
        return self

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd
