"""Generation: the KV-cache engine, and the naive full-recompute loop it is tested against.

The engine prefills the prompt once, then feeds one token per step through the cache, batching
`num_samples` samples together. Sampling: temperature (0 = greedy), top-k, top-p, repetition penalty,
a seeded generator; a sample stops at end-of-text, at a stop string, or at max_new_tokens. When the
context fills, the engine keeps the last 3/4 of the window and prefills again (learned positions cannot
be shifted inside the cache), so long generations cost one prefill per block_size / 4 tokens.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pocketlm import checkpoint as ckpt
from pocketlm import tokenizer as toklib
from pocketlm.errors import PocketLMError
from pocketlm.model import GPT, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eot: bool = True

    def validate(self) -> SamplingParams:
        if self.max_new_tokens < 0:
            raise PocketLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PocketLMError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PocketLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not self.repetition_penalty > 0 or not math.isfinite(self.temperature):
            raise PocketLMError("top_k must be >= 0, repetition_penalty > 0 and temperature finite")
        if any(not x for x in self.stop):
            raise PocketLMError("stop strings must not be empty")
        return self


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"


def next_token(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
               gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) of the last position -> next token ids (B,)."""
    logits = logits.float()
    if seen is not None and p.repetition_penalty != 1.0:  # CTRL / HF semantics
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > p.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def load_model(path: str | Path, device: str | torch.device) -> tuple[torch.nn.Module, Path]:
    """pocketlm's GPT for the folders pocketlm writes; any other causal LM through transformers, behind the
    same interface with its own KV cache (pocketlm.finetune.hf)."""
    folder = ckpt.resolve(path)
    if ckpt.is_pocketlm(folder):
        return ckpt.load_model(folder, device)
    from pocketlm.finetune.hf import load_folder

    return load_folder(folder, device), folder


GRAPH_MIN_TOKENS = 16  # shorter generations are not worth a capture (a few ms)


class GraphStep:
    """`GPT.decode` replayed from a CUDA graph. A small model's token is dozens of tiny kernels, each
    launched from Python; a replay launches them all at once. The step's shapes are fixed (`decode(at=)`),
    its inputs are copied into static tensors before each replay, and the graph holds the addresses of the
    weights and of this cache, so it is captured per generation, before the prefill: the capture's warm-up
    writes position 0, which the prefill overwrites. Off CUDA it runs the same fixed-shape step eagerly."""

    def __init__(self, model: GPT, cache: KVCache, plan: tuple) -> None:
        self.model, self.cache, self.plan = model, cache, plan
        device = cache.k.device
        self.tok = torch.zeros((cache.k.size(1), 1), dtype=torch.long, device=device)
        self.at = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        if device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm up outside the capture: lazy inits, cuBLAS workspaces
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()

    def _run(self) -> torch.Tensor:
        return self.model.decode(self.tok, self.cache, self.plan, at=self.at)

    def __call__(self, tok: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self.tok.copy_(tok)
        self.at.fill_(cache.pos)
        if self.graph is None:
            logits = self._run()
        else:
            self.graph.replay()
            logits = self.logits.clone()  # the graph's output buffer is overwritten by the next replay
        cache.pos += 1
        return logits


class Engine:
    """A model and its tokenizer, ready to generate. `Engine.load(run_or_checkpoint)`."""

    def __init__(self, model: torch.nn.Module, tok: toklib.Tok) -> None:
        self.model = model.eval()
        self.tok = tok
        self.device = next(model.parameters()).device
        # decode steps from a CUDA graph (`GraphStep`): None = on CUDA; True elsewhere runs the same
        # fixed-shape step without capturing it, which is how the CPU tests check what the graph computes
        self.cuda_graphs: bool | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Engine:
        from pocketlm.device import pick_device

        dev, _ = pick_device(device)
        model, folder = load_model(path, dev)
        if isinstance(model, GPT):
            model.stream_layout()  # this engine owns the model: lay its weights out for decoding
        return cls(model, toklib.load(folder))

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:  # an empty prompt starts from end-of-text: "the beginning of a document"
            if self.tok.eot_id is None:
                raise PocketLMError("empty prompt and the tokenizer has no end-of-text token to start from")
            ids = [self.tok.eot_id]
        return ids

    @torch.inference_mode()
    def steps(self, prompt: str | list[int], p: SamplingParams, n: int = 1) -> Iterator[torch.Tensor]:
        """Yield the next token of each of the n samples, (n,), once per step; stopping is the caller's."""
        p.validate()
        if n < 1:
            raise PocketLMError(f"the number of samples must be at least 1, got {n}")
        ids = self.encode_prompt(prompt)
        T = self.block_size
        total = len(ids) + p.max_new_tokens
        context = torch.empty((n, total), dtype=torch.long, device=self.device)
        context[:, :len(ids)] = torch.tensor(ids, device=self.device)
        length = len(ids)
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(p.seed)
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros((n, self.model.config.vocab_size), dtype=torch.bool, device=self.device)
            seen[:, context[0, :length]] = True
        dtype = next(self.model.parameters()).dtype
        if isinstance(self.model, GPT):
            cache = KVCache(self.model.config, n, T, self.device, dtype)
        else:  # a transformers model keeps its own cache
            cache = self.model.new_cache()
        if isinstance(self.model, GPT) and self.model.decodable():
            plan = self.model.decode_plan()
            graphs = self.cuda_graphs if self.cuda_graphs is not None else self.device.type == "cuda"
            step = (lambda tok, cache: self.model.decode(tok, cache, plan))
            if graphs and p.max_new_tokens >= GRAPH_MIN_TOKENS:
                try:
                    step = GraphStep(self.model, cache, plan)  # captured before the prefill fills the cache
                except RuntimeError as e:  # a driver or build that cannot capture still generates, eagerly
                    warnings.warn(f"decoding without CUDA graphs: capturing the decode step failed ({e})",
                                  stacklevel=2)
                    self.cuda_graphs = False
        else:
            step = (lambda tok, cache: self.model(tok, cache=cache, last_only=True)[0][:, -1])
        logits = self._prefill(context[:, max(0, length - T):length], cache)
        for _ in range(p.max_new_tokens):
            tok = next_token(logits, p, seen, gen)
            yield tok
            context[:, length] = tok
            length += 1
            if seen is not None:
                seen[torch.arange(n, device=self.device), tok] = True
            if cache.pos < T:
                logits = step(tok[:, None], cache)
            else:  # window full: keep the last 3/4 and prefill again
                cache.reset()
                logits = self._prefill(context[:, length - (T - T // 4):length], cache)

    def _prefill(self, context: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run (n, T) context through the model into the cache -> last logits (n, vocab). The samples of a
        batch share their context until they are sampled apart: compute it once and copy the cache rows."""
        n = context.size(0)
        if n > 1 and isinstance(cache, KVCache) and bool((context == context[:1]).all()):
            logits, _ = self.model(context[:1], cache=cache, last_only=True)
            cache.k[:, 1:] = cache.k[:, :1]
            cache.v[:, 1:] = cache.v[:, :1]
            return logits[:, -1].expand(n, -1)
        return self.model(context, cache=cache, last_only=True)[0][:, -1]

    def generate(self, prompt: str | list[int], p: SamplingParams, n: int = 1) -> list[Completion]:
        """n completions of the prompt (batched), each ending at end-of-text, a stop string or the length."""
        runs = [_Sample(self.tok, p) for _ in range(n)]
        for tok in self.steps(prompt, p, n):
            for run, t in zip(runs, tok.tolist()):
                run.push(t)
            if all(r.finish for r in runs):
                break
        return [r.result() for r in runs]

    def stream(self, prompt: str | list[int], p: SamplingParams) -> Iterator[str]:
        """One sample as text pieces, as tokens arrive (stop strings never leak into the pieces)."""
        run = _Sample(self.tok, p)
        emitted = 0
        for tok in self.steps(prompt, p, 1):
            run.push(int(tok[0]))
            text = run.text()
            # hold back a possible stop-string prefix and an incomplete UTF-8 character
            if run.finish:
                safe = run.cut if run.cut is not None else len(text)
            else:
                safe = len(text) - run.holdback
            while safe > emitted and text[safe - 1] == "\ufffd" and not run.finish:
                safe -= 1
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if run.finish:
                break
        text = run.result().text
        if len(text) > emitted:
            yield text[emitted:]


class _Sample:
    """One sample's tokens and when it stopped."""

    def __init__(self, tok: toklib.Tok, p: SamplingParams) -> None:
        self.tok, self.p = tok, p
        self.ids: list[int] = []
        self.finish: str | None = None
        self.cut: int | None = None  # character index where a stop string begins
        self.holdback = max((len(s) for s in p.stop), default=1) - 1 if p.stop else 0

    def push(self, t: int) -> None:
        if self.finish:
            return
        if self.p.stop_at_eot and t == self.tok.eot_id:
            self.finish = "stop"
            return
        self.ids.append(t)
        if self.p.stop:
            text = self.text()
            window = text[-(self.holdback + 64):]  # only the tail can hold a new match
            hits = [window.find(s) for s in self.p.stop if s in window]
            if hits:
                self.cut = len(text) - len(window) + min(hits)
                self.finish = "stop"
                return
        if len(self.ids) >= self.p.max_new_tokens:
            self.finish = "length"

    def text(self) -> str:
        return self.tok.decode(self.ids)

    def result(self) -> Completion:
        text = self.text()
        if self.cut is not None:
            text = text[:self.cut]
        return Completion(text, list(self.ids), self.finish or "length")


@torch.inference_mode()
def naive_generate(model: GPT, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation over the last block_size tokens: the reference for the engine."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits, _ = model(x[:, -model.config.block_size:])
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()
