"""Continuous batching over the KV cache: one worker thread steps every active sequence together.

Requests join between steps. A new request is prefilled alone into a free row of the cache and copied to one
row per sample; from then on every step feeds one token per active row, each row at its own position. Each
request keeps its own sampling parameters and seeded generator, so what it generates does not depend on which
requests share its steps. A finished or cancelled sequence frees its row at once (active rows are kept at
0..A-1); when a row's window fills, that row alone is prefilled again with the last 3/4 of its context, as
`generate.Engine` does.

The worker touches the model only through a row store's slot-level methods (prefill, copy, move, free,
decode). For pocketlm's GPT (`SharedRows`) the rows are one slotted cache (n_layer, rows, nh, block_size, hs)
and a step is one batched forward that reads a view of the cache, never a gathered copy; it re-implements the
model's forward for one token per row at per-row positions, learned or rotary (the model's own forward takes
one position for the whole batch). A transformers model (`pocketlm.finetune.hf.HFModel`, `OwnRows`) keeps
one transformers cache per row and steps its rows one after another: correct, not batched.
`tests/test_serve_batching.py` checks both against the Engine, which is checked against the naive full
recompute.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pocketlm.errors import PocketLMError
from pocketlm.generate import Engine, SamplingParams, _Sample, next_token
from pocketlm.model import GPT, KVCache, rotate


@dataclass
class Event:
    """What the worker reports about one sample of a request."""

    kind: str  # "delta" (new text), "done" (the sample ended) or "error" (the whole request failed)
    index: int = 0
    text: str = ""
    finish_reason: str | None = None  # with "done": "stop" or "length"
    tokens: int = 0  # with "done": tokens generated for this sample


class Request:
    """n samples of one prompt; `emit` is called from the worker thread with each Event."""

    def __init__(self, ids: list[int], params: SamplingParams, n: int, emit: Callable[[Event], None],
                 tok) -> None:
        self.ids, self.params, self.n, self.emit = list(ids), params.validate(), n, emit
        self.samples = [_Sample(tok, params) for _ in range(n)]
        self.emitted = [0] * n  # characters of each sample already sent
        self.cancelled = False
        self.gen: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # (n, vocab) tokens present, for the repetition penalty
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating (the client went away); the worker frees the rows before its next step."""
        self.cancelled = True


class _Row:
    __slots__ = ("req", "index", "pos", "last", "context", "dead")

    def __init__(self, req: Request, index: int, pos: int) -> None:
        self.req, self.index, self.pos = req, index, pos  # pos: tokens in this row's cache
        self.last = 0  # the token to feed next (sampled, not yet in the cache)
        self.context = list(req.ids)  # prompt + generated ids, for prefilling again when the window fills
        self.dead = False


class Batcher:
    """The model worker: `submit(Request)` from any thread; events come back through each request's `emit`."""

    def __init__(self, engine: Engine, max_rows: int = 16) -> None:
        if max_rows < 1:
            raise PocketLMError(f"--max-batch must be at least 1, got {max_rows}")
        self.engine, self.model, self.tok = engine, engine.model, engine.tok
        self.T, self.max_rows, self.device = self.model.config.block_size, max_rows, engine.device
        store = SharedRows if isinstance(self.model, GPT) else OwnRows
        self.store: SharedRows | OwnRows = store(self.model, max_rows, self.device)
        self.rows: list[_Row] = []
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self.pending: deque[Request] = deque()
        self.wake = threading.Event()
        self.closing = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # batched decode steps taken
        self.tokens = 0  # tokens generated
        self.row_steps = 0  # sum over steps of active rows (mean batch = row_steps / steps)

    # ---- the public side ---------------------------------------------------------------------------
    def start(self) -> Batcher:
        self.thread = threading.Thread(target=self._loop, name="pocketlm-batcher", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.closing = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def submit(self, req: Request) -> None:
        if req.n > self.max_rows:
            raise PocketLMError(f"n={req.n} samples exceed the server's {self.max_rows} batch rows")
        if self.thread is None or not self.thread.is_alive():
            raise PocketLMError("the model worker is not running")
        self.inbox.put(req)
        self.wake.set()

    def stats(self) -> dict[str, float]:
        return {"active_rows": len(self.rows), "queued": len(self.pending) + self.inbox.qsize(),
                "steps": self.steps, "tokens": self.tokens,
                "mean_batch": round(self.row_steps / self.steps, 2) if self.steps else 0.0}

    # ---- the worker --------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self.closing:
                self.wake.clear()
                self._admit()
                for row in self.rows:
                    row.dead = row.dead or row.req.cancelled
                self._compact()
                if not self.rows:
                    self.wake.wait(timeout=1.0)
                    continue
                try:
                    self._step()
                except Exception as e:  # a bug or out-of-memory: fail the requests in flight, keep serving
                    for req in {id(r.req): r.req for r in self.rows}.values():
                        _send(req, Event("error", text=f"generation failed: {e}"))
                    for slot in range(len(self.rows)):
                        self.store.free(slot)
                    self.rows.clear()
        for req in [*{id(r.req): r.req for r in self.rows}.values(), *self.pending]:
            _send(req, Event("error", text="the server is shutting down"))

    def _admit(self) -> None:
        while True:
            try:
                self.pending.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        while self.pending and (self.pending[0].cancelled or len(self.rows) + self.pending[0].n <= self.max_rows):
            req = self.pending.popleft()
            if req.cancelled:
                continue
            try:
                self._start(req)
            except Exception as e:
                _send(req, Event("error", text=f"generation failed: {e}"))
                for row in self.rows:
                    row.dead = row.dead or row.req is req

    def _start(self, req: Request) -> None:
        """Prefill a new request into n free rows and sample its first tokens."""
        p = req.params
        if p.max_new_tokens == 0:
            for i in range(req.n):
                req.samples[i].finish = "length"
                _send(req, Event("done", i, finish_reason="length"))
            return
        if p.seed is not None:
            req.gen = torch.Generator(device=self.device).manual_seed(p.seed)
        if p.repetition_penalty != 1.0:
            req.seen = torch.zeros((req.n, self.model.config.vocab_size), dtype=torch.bool, device=self.device)
            req.seen[:, req.ids] = True
        first = len(self.rows)
        logits = self.store.prefill(first, req.ids)
        for slot in range(first + 1, first + req.n):  # every sample starts from the same cached prompt
            self.store.copy(first, slot, min(len(req.ids), self.T))
        rows = [_Row(req, i, min(len(req.ids), self.T)) for i in range(req.n)]
        self.rows.extend(rows)
        self._sample(rows, logits.expand(req.n, -1))

    def _step(self) -> None:
        """One token for every active row: a batched decode, plus a fresh prefill for rows whose window is full."""
        rows = self.rows
        A = len(rows)
        logits = torch.empty((A, self.model.config.vocab_size), device=self.device)
        full = {i for i, r in enumerate(rows) if r.pos >= self.T}
        for i in full:  # keep the last 3/4 of the context (the new token included) and prefill again
            rows[i].context = rows[i].context[-(self.T - self.T // 4):]
            logits[i] = self.store.prefill(i, rows[i].context)
            rows[i].pos = len(rows[i].context)
        idx = [i for i in range(A) if i not in full]
        if idx:
            tok = torch.tensor([rows[i].last for i in idx], device=self.device)
            pos = torch.tensor([rows[i].pos for i in idx], device=self.device)
            sel = slice(0, A) if len(idx) == A else torch.tensor(idx, device=self.device)
            logits[idx] = self.store.decode(sel, tok, pos).float()
            for i in idx:
                rows[i].pos += 1
        self.steps += 1
        self.row_steps += A
        self._sample(rows, logits)
        self._compact()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Next token of each row, per request (its own parameters and generator), then text to the client."""
        groups: dict[int, list[int]] = {}
        for j, row in enumerate(rows):
            groups.setdefault(id(row.req), []).append(j)
        for js in groups.values():
            req = rows[js[0]].req
            seen = req.seen[[rows[j].index for j in js]] if req.seen is not None else None
            toks = next_token(logits[js], req.params, seen, req.gen).tolist()
            for j, t in zip(js, toks):
                row = rows[j]
                row.last = t
                row.context.append(t)
                if req.seen is not None:
                    req.seen[row.index, t] = True
                self._push(row, t)

    def _push(self, row: _Row, t: int) -> None:
        req, i = row.req, row.index
        s = req.samples[i]
        s.push(t)
        self.tokens += 1
        text = s.text()
        if s.finish:
            safe = s.cut if s.cut is not None else len(text)
        else:  # hold back a possible stop-string prefix and an incomplete UTF-8 character
            safe = len(text) - s.holdback
            while safe > req.emitted[i] and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > req.emitted[i]:
            _send(req, Event("delta", i, text[req.emitted[i]:safe]))
            req.emitted[i] = safe
        if s.finish:
            row.dead = True
            _send(req, Event("done", i, finish_reason=s.finish, tokens=len(s.ids)))

    def _compact(self) -> None:
        """Drop dead rows, moving the last live row into each hole so active rows stay 0..A-1."""
        r = 0
        while r < len(self.rows):
            if not self.rows[r].dead:
                r += 1
                continue
            last = len(self.rows) - 1
            if r != last:
                self.store.move(last, r, self.rows[last].pos)
                self.rows[r] = self.rows[last]
            self.store.free(last)
            self.rows.pop()


class SharedRows:
    """pocketlm's GPT: every row in one slotted cache, one batched forward per step."""

    def __init__(self, model: GPT, rows: int, device: torch.device) -> None:
        cfg = self.config = model.config
        self.model, self.device, self.T = model, device, cfg.block_size
        dtype = next(model.parameters()).dtype
        shape = (cfg.n_layer, rows, cfg.n_head, self.T, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def copy(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    move = copy  # the source row is dropped right after; its stale values are overwritten before being read

    def free(self, slot: int) -> None:
        pass  # preallocated: a freed row is simply overwritten by the next prefill

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run the (last block_size) ids through the model, caching straight into `slot`; -> logits (vocab,)."""
        cache = KVCache.__new__(KVCache)  # a view of this slot: the model writes the row in place
        cache.k, cache.v, cache.pos = self.k[:, slot:slot + 1], self.v[:, slot:slot + 1], 0
        x = torch.tensor([ids[-self.T:]], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, cache=cache, last_only=True)
        return logits[0, -1].float()

    def decode(self, rows: slice | torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row at its own position: tok, pos (B,) -> logits (B, vocab). Mirrors GPT.forward."""
        model, tr = self.model, self.model.transformer
        B, C, nh = tok.size(0), self.config.n_embd, self.config.n_head
        hs = C // nh
        x = tr.wte(tok)  # (B, C)
        if "wpe" in tr:
            x = x + tr.wpe(pos)
        x = x[:, None]  # (B, 1, C)
        rope = None
        if self.config.pos_emb == "rotary":  # each row's own angles, broadcast over heads: (B, 1, 1, hs)
            rope = model.rope_cos[pos][:, None, None], model.rope_sin[pos][:, None, None]
        L = int(pos.max()) + 1
        # each row sees its own cached keys and itself: positions 0..pos
        mask = (torch.arange(L, device=self.device)[None] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
        rows_t = torch.arange(B, device=self.device) if isinstance(rows, slice) else rows
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q = q.view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
            k = k.view(B, 1, nh, hs).transpose(1, 2)
            if rope is not None:
                q, k = rotate(q, *rope), rotate(k, *rope)
            self.k[i, rows_t, :, pos] = k[:, :, 0]  # (B, nh, hs) at each row's own position
            self.v[i, rows_t, :, pos] = v.view(B, nh, hs)
            keys, values = self.k[i, rows, :, :L], self.v[i, rows, :, :L]  # (B, nh, L, hs)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, 1, hs)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
            x = x + block.mlp(block.ln_2(x))
        return model.lm_head(tr.ln_f(x))[:, 0]


class OwnRows:
    """A transformers model (HFModel): one HFCache per row, rows stepped one after another."""

    def __init__(self, model: torch.nn.Module, rows: int, device: torch.device) -> None:
        self.model, self.device, self.T = model, device, model.config.block_size
        self.caches: list = [None] * rows  # HFCache per slot, None when free

    def copy(self, src: int, dst: int, length: int) -> None:
        # an independent copy, so the samples of one request can diverge; the worker runs under
        # inference_mode, where the cached tensors are leaves that deepcopy clones
        self.caches[dst] = copy.deepcopy(self.caches[src])

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches[dst], self.caches[src] = self.caches[src], None

    def free(self, slot: int) -> None:
        self.caches[slot] = None

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        cache = self.caches[slot] = self.model.new_cache()
        x = torch.tensor([ids[-self.T:]], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, cache=cache, last_only=True)
        return logits[0, -1].float()

    def decode(self, rows: slice | torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        slots = range(tok.size(0)) if isinstance(rows, slice) else rows.tolist()
        out = []
        for j, slot in enumerate(slots):  # each cache knows its own length: pos is implied
            logits, _ = self.model(tok[j:j + 1, None], cache=self.caches[slot], last_only=True)
            out.append(logits[0, -1])
        return torch.stack(out)


def _send(req: Request, ev: Event) -> None:
    try:
        req.emit(ev)
    except Exception:  # the client's event loop is gone: nobody is listening any more
        req.cancel()
