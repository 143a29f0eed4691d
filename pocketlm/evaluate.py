"""Evaluation: how good a causal LM is on a split of a prepared dataset, and how good its samples are.

Metrics over target tokens: cross-entropy (nats/token), perplexity, next-token accuracy, top-k accuracy and
bits per byte. The training loop's validation and `pocketlm eval` share `Meter`, so `val/bpb` during
training and `eval` afterwards mean the same thing.

Bits per byte = total cross-entropy in bits / UTF-8 bytes of the predicted text. Bytes are counted per
target token (a table: token id -> bytes it decodes to, 0 for special tokens), so any set of windows is
scored over exactly the bytes its targets cover, and consecutive windows add up to the bytes of the whole
stream. A full split is read as non-overlapping windows over end-of-text + the split, so every token of
the split, its first one included, is a target exactly once: two tokenizations of the same text then
cover the same bytes, and a model that gives the text the same probability under both scores the same
bits per byte (tests/test_evaluate.py checks exactly that with an oracle model).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pocketlm import tokenizer as toklib
from pocketlm.errors import PocketLMError

IGNORE = -100  # targets with this id are not scored (prompt tokens in SFT, padding)
ROWS_PER_CHUNK_ELEMS = 1 << 24  # logits elements handled at once: bounds the (rows, vocab) temporaries


# ---- per-token statistics -------------------------------------------------------------------------------

def batch_sums(logits: torch.Tensor, targets: torch.Tensor, k: int, token_bytes: torch.Tensor | None) -> torch.Tensor:
    """Sums over the scored targets of a batch: (nll nats, tokens, correct, top-k correct, bytes), float64 CPU.

    A target is "correct" when no logit is strictly larger than its own, and in the top k when fewer than
    k are. Ties are measure-zero in fp32, but bf16/fp16 logits (autocast) round many apart values
    together, so for those a tie counts as its expected hit under a random tie-break: the share of the tied
    places that fall inside the cut. logits (..., V), targets (...) with IGNORE for unscored.
    """
    low_precision = logits.dtype in (torch.bfloat16, torch.float16)
    V = logits.size(-1)
    logits, targets = logits.reshape(-1, V), targets.reshape(-1)
    keep = targets != IGNORE
    if not bool(keep.all()):  # copying the logits only when some targets are masked out
        logits, targets = logits[keep], targets[keep]
    sums = torch.zeros(5, dtype=torch.float64)
    rows = max(1, ROWS_PER_CHUNK_ELEMS // V)
    for s in range(0, targets.numel(), rows):
        lg = logits[s:s + rows].float()
        tg = targets[s:s + rows]
        nll = F.cross_entropy(lg, tg, reduction="sum")
        # logits that beat the target's; an int32 sum is ~6x faster than the default int64 one on CPU
        own = lg.gather(1, tg[:, None])
        above = (lg > own).sum(1, dtype=torch.int32)
        if low_precision:
            tied = (lg == own).sum(1, dtype=torch.int32).double()  # the target itself included
            hits = [((cut - above).clamp(min=0) / tied).clamp(max=1).sum() for cut in (1, k)]
        else:
            hits = (above == 0).sum().double(), (above < k).sum().double()
        part = torch.stack([nll.double(), torch.tensor(tg.numel(), dtype=torch.float64, device=lg.device), *hits,
                            token_bytes[tg].sum().double() if token_bytes is not None else
                            torch.zeros((), dtype=torch.float64, device=lg.device)])
        sums += part.cpu()
    return sums


@dataclass
class Meter:
    """Accumulates `batch_sums`; `metrics()` turns them into loss, ppl, acc, top-k acc and bpb."""

    k: int = 10
    token_bytes: torch.Tensor | None = None  # (vocab,) bytes per token id, on the logits' device
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))
    loss_only: float = 0.0  # summed batch losses of tasks that give no logits (preference tuning)
    loss_batches: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.sums += batch_sums(logits, targets, self.k, self.token_bytes)

    def add_task_batch(self, task: Any, model: torch.nn.Module, batch: Any) -> None:
        """One batch of a training Task: per-token metrics when it can give logits, else its loss."""
        if hasattr(task, "logits"):
            logits, targets = task.logits(model, batch)
            self.add(logits, targets)
        else:
            self.loss_only += float(task.loss(model, batch))
            self.loss_batches += 1

    def all_reduce(self, device: torch.device) -> None:
        import torch.distributed as dist

        t = torch.cat([self.sums, torch.tensor([self.loss_only, self.loss_batches], dtype=torch.float64)])
        t = t.to(device)
        dist.all_reduce(t)
        t = t.cpu()
        self.sums, self.loss_only, self.loss_batches = t[:5], float(t[5]), int(t[6])

    def metrics(self) -> dict[str, float]:
        nll, n, correct, topk, nbytes = self.sums.tolist()
        if n == 0:
            if self.loss_batches:
                return {"loss": self.loss_only / self.loss_batches}
            raise PocketLMError("nothing was evaluated: the split has no tokens to predict")
        loss = nll / n
        out = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf"), "acc": correct / n,
               f"top{self.k}_acc": topk / n}
        if nbytes > 0:
            out["bpb"] = nll / math.log(2) / nbytes
        return out

    @property
    def tokens(self) -> int:
        return int(self.sums[1])

    @property
    def bytes(self) -> int:
        return int(self.sums[4])


# ---- bytes per token ------------------------------------------------------------------------------------

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {t for d in decoder.get("decoders", []) for t in _decoder_types(d)}
    return {decoder.get("type")}


def token_byte_lengths(tok: toklib.Tok) -> np.ndarray:
    """UTF-8 bytes that each token id stands for in decoded text; 0 for special tokens (end-of-text)."""
    tk = tok.tk
    vocab_size = tk.get_vocab_size(with_added_tokens=True)
    out = np.zeros(vocab_size, dtype=np.int64)
    added = tk.get_added_tokens_decoder()
    spec = json.loads(tk.to_str())
    types = _decoder_types(spec.get("decoder"))
    unk = (spec.get("model") or {}).get("unk_token")
    byte_level = "ByteLevel" in types
    anchor = next((i for i in range(vocab_size) if i not in added and tk.id_to_token(i) is not None), None)
    base = len(tk.decode([anchor]).encode("utf-8")) if anchor is not None else 0
    for i in range(vocab_size):
        piece = tk.id_to_token(i)
        if piece is None:
            continue
        if piece == unk:
            out[i] = 1  # stands for a character the vocabulary lacks: its width is lost, count one byte
        elif i in added:
            out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif byte_level:
            out[i] = len(piece)  # the ByteLevel alphabet spells every byte as one character
        elif "ByteFallback" in types and _BYTE_TOKEN.match(piece):
            out[i] = 1
        else:
            # decoded after another token, so decoders that strip a leading space (Metaspace) keep it
            out[i] = len(tk.decode([anchor, i]).encode("utf-8")) - base
    return out


# ---- models ---------------------------------------------------------------------------------------------

@dataclass
class LM:
    """A causal LM to evaluate: a pocketlm GPT, or any Hugging Face causal LM behind the same interface
    (`pocketlm.generate.load_model`'s HFModel), with its tokenizer."""

    model: torch.nn.Module
    tok: toklib.Tok
    block_size: int
    folder: Path
    kind: str  # "pocketlm" or "transformers"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def load_lm(path: str | Path, device: str = "auto") -> LM:
    """A run folder (its best/), a pocketlm checkpoint, or any Hugging Face causal LM folder."""
    from pocketlm import checkpoint as ckpt
    from pocketlm.device import pick_device
    from pocketlm.generate import load_model

    dev, _ = pick_device(device)
    folder = ckpt.resolve(path)
    ckpt.read_hf_config(folder)  # a one-line error for a folder that holds no model
    tok = load_tokenizer(folder)
    kind = "pocketlm" if ckpt.is_pocketlm(folder) else "transformers"
    model, folder = load_model(folder, dev)  # the loader `pocketlm generate` uses: the same model, the same engine
    return LM(model.eval(), tok, int(model.config.block_size), folder, kind)


def load_tokenizer(folder: Path) -> toklib.Tok:
    if (folder / "tokenizer.json").is_file():
        return toklib.load(folder)
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        hf = None
    if hf is None or not getattr(hf, "is_fast", False):
        raise PocketLMError(f"{folder} has no tokenizer.json (a fast tokenizer): pocketlm needs one to read text")
    return toklib.Tok(hf.backend_tokenizer, hf.eos_token)


def same_tokenizer(a: toklib.Tok, b: toklib.Tok) -> bool:
    """Same vocabulary, merges, pre-tokenizer and decoder (padding and truncation settings aside)."""
    def core(t: toklib.Tok) -> dict:
        d = json.loads(t.tk.to_str())
        return {k: v for k, v in d.items() if k not in ("truncation", "padding", "version")}

    return core(a) == core(b)


# ---- a split, end to end --------------------------------------------------------------------------------

def _documents(tokens: np.ndarray, eot_id: int | None) -> list[np.ndarray]:
    if eot_id is None:
        return [tokens]
    cuts = np.flatnonzero(tokens == eot_id)
    return [d for d in np.split(tokens, cuts + 1) if len(d)]


def reencode(tokens: np.ndarray, src: toklib.Tok, dst: toklib.Tok, docs_per_batch: int = 512) -> np.ndarray:
    """Decode a token stream with its own tokenizer and encode the text with another, document by document."""
    out: list[np.ndarray] = []
    docs = _documents(np.asarray(tokens), src.eot_id)
    for s in range(0, len(docs), docs_per_batch):
        chunk = docs[s:s + docs_per_batch]
        ends = [len(d) > 0 and d[-1] == src.eot_id for d in chunk]
        texts = src.tk.decode_batch([d.tolist() for d in chunk], skip_special_tokens=True)
        for ids, ended in zip(dst.encode_batch(texts), ends):
            out.append(np.asarray(ids, dtype=np.int64))
            if ended and dst.eot_id is not None:
                out.append(np.array([dst.eot_id], dtype=np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def stream_of(tokens: np.ndarray, eot_id: int | None) -> np.ndarray:
    """end-of-text + the split, so the split's first token is predicted like every other."""
    tokens = np.asarray(tokens)
    if eot_id is not None and (len(tokens) == 0 or tokens[0] != eot_id):
        return np.concatenate([np.array([eot_id], dtype=np.int64), tokens.astype(np.int64)])
    return tokens.astype(np.int64)


@torch.inference_mode()
def evaluate_stream(lm: LM, stream: np.ndarray, k: int = 10, batch_size: int = 8, block_size: int | None = None,
                    verbose: bool = False) -> Meter:
    """Score every token after the first, in non-overlapping windows of block_size."""
    from pocketlm.progress import Progress

    T = min(block_size or lm.block_size, lm.block_size)
    dev = lm.device
    table = token_byte_lengths(lm.tok)
    vocab = lm.model.config.vocab_size
    if len(table) < vocab:
        table = np.pad(table, (0, vocab - len(table)))
    meter = Meter(k, torch.from_numpy(table).to(dev))
    n_targets = len(stream) - 1
    if n_targets <= 0:
        return meter
    starts = list(range(0, n_targets, T))
    bar = Progress("eval", n_targets, " tok", enabled=verbose)
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    for s in range(0, len(starts), batch_size):
        group = starts[s:s + batch_size]
        full = [p for p in group if p + T <= n_targets]
        for rows in (full, [p for p in group if p + T > n_targets]):
            if not rows:
                continue
            width = min(T, n_targets - rows[0])
            idx = np.array(rows)[:, None] + np.arange(width + 1)
            w = torch.from_numpy(stream[idx]).to(dev)
            with torch.autocast(dev.type, dtype=dtype) if dtype else _null():
                logits = lm.logits(w[:, :-1])
            meter.add(logits, w[:, 1:])
            bar.update(len(rows) * width, f"loss {meter.sums[0] / max(1, meter.sums[1]):.4f}")
    bar.close()
    return meter


def _null():
    import contextlib

    return contextlib.nullcontext()


def evaluate_split(lm: LM, data: str | Path, split: str = "test", k: int = 10, batch_size: int = 8,
                   max_tokens: int = 0, verbose: bool = False) -> dict[str, Any]:
    """Metrics of a model on a split of a prepared dataset, as a JSON-ready dict (`metrics`, `notes`, counts)."""
    from pocketlm.data.prepare import SPLITS, Dataset

    if k < 1:
        raise PocketLMError(f"--top-k must be at least 1, got {k}")
    if split not in SPLITS:
        raise PocketLMError(f"unknown split {split!r}: use train, val or test")
    ds = Dataset(data)
    tokens = ds.split(split)
    if len(tokens) == 0:
        fix = {"test": "evaluate --split val, or prepare the dataset with --data.test_fraction 0.1 or --test FILE",
               "val": "prepare the dataset with --data.val_fraction 0.1 or --val FILE"}.get(split, "give more text")
        raise PocketLMError(f"the {split} split of {ds.path} is empty (0 tokens): {fix}")
    if max_tokens:
        tokens = tokens[:max_tokens]
    ds_tok = ds.tokenizer()
    notes: list[str] = []
    same = same_tokenizer(ds_tok, lm.tok)
    if same:
        stream = stream_of(tokens, lm.tok.eot_id)
    else:
        stream = stream_of(reencode(tokens, ds_tok, lm.tok), lm.tok.eot_id)
        notes.append(f"the dataset's tokenizer differs from the model's: its text was decoded and re-encoded "
                     f"with the model's tokenizer ({len(tokens):,} -> {len(stream) - 1:,} tokens); only bits "
                     "per byte compares across tokenizers")
    if int(stream.max(initial=0)) >= lm.model.config.vocab_size:
        raise PocketLMError(f"{ds.path} holds token ids up to {int(stream.max())}, beyond the model's vocabulary of "
                            f"{lm.model.config.vocab_size}: evaluate with the dataset the model was trained on")
    t0 = time.perf_counter()
    meter = evaluate_stream(lm, stream, k, batch_size, verbose=verbose)
    seconds = time.perf_counter() - t0
    metrics = meter.metrics()
    if not same:
        metrics = {key: v for key, v in metrics.items() if key == "bpb"}
    if meter.bytes == 0:
        notes.append("the tokenizer maps no token to text bytes, so bits per byte is not defined")
    return {"model": str(lm.folder), "data": str(ds.path), "split": split, "metrics": metrics,
            "tokens": meter.tokens, "bytes": meter.bytes, "top_k": k, "block_size": lm.block_size,
            "seconds": round(seconds, 2), "tokens_per_s": round(meter.tokens / seconds) if seconds else None,
            "notes": notes}


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of an evaluation result."""
    names = {"loss": "cross-entropy (nats/token)", "ppl": "perplexity", "acc": "next-token accuracy",
             f"top{result['top_k']}_acc": f"top-{result['top_k']} accuracy", "bpb": "bits per byte"}
    lines = [f"{result['model']} on {result['data']} ({result['split']}, {result['tokens']:,} tokens, "
             f"{result['bytes']:,} bytes)", "", "| metric | value |", "| --- | --- |"]
    for key, v in result["metrics"].items():
        lines.append(f"| {names.get(key, key)} | {v:.4f} |")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def print_note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


# ---- samples: quality and memorisation --------------------------------------------------------------------

def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def generate_samples(lm: LM, prompts: list[str], k: int, params: Any) -> list[dict[str, Any]]:
    """k samples spread round-robin over the prompts: [{"prompt", "text", "tokens"}].

    Every model kind goes through `pocketlm.generate.Engine`, as `pocketlm generate` does (its window
    handling included: past the context it keeps the last 3/4 and prefills again), so the samples of a
    prompt equal `pocketlm generate` with the same settings and seed (prompt i samples with seed + i)."""
    from pocketlm.generate import Engine
    from pocketlm.model import GPT

    if k < 1:
        raise PocketLMError(f"--samples must be at least 1, got {k}")
    if isinstance(lm.model, GPT):
        lm.model.stream_layout()  # Engine.load's decoding layout: the same values, the same arithmetic
    engine = Engine(lm.model, lm.tok)
    prompts = prompts or [""]
    counts = [k // len(prompts) + (i < k % len(prompts)) for i in range(len(prompts))]
    out: list[dict[str, Any]] = []
    for i, (prompt, n) in enumerate(zip(prompts, counts)):
        if n == 0:
            continue
        p = type(params)(**{**vars(params), "seed": None if params.seed is None else params.seed + i})
        out += [{"prompt": prompt, "text": c.text, "tokens": len(c.token_ids)} for c in engine.generate(prompt, p, n)]
    return out


def score_samples(samples: list[dict[str, Any]], index: Any | None, n: int = 8, rep_n: int = 4) -> dict[str, Any]:
    """Sample quality (distinct-1/2, repetition, length) and memorisation against a TextIndex.

    distinct-n: unique word n-grams / all word n-grams, over all samples together. Repetition rate: the
    share of a sample's word `rep_n`-grams that repeat an earlier one in the same sample, averaged.
    Memorised: the share of generated word n-grams that occur verbatim in the training text; the longest
    verbatim span is the longest run of generated words found there.
    """
    if n < 1 or rep_n < 1:
        raise PocketLMError(f"--ngram must be at least 1, got {n}")
    all1, all2, reps = [], [], []
    total_ngrams = memorised = 0
    longest: dict[str, Any] = {"words": 0, "sample": None, "text": ""}
    for i, s in enumerate(samples, 1):
        words = s["text"].split()
        g1, g2, gr = _ngrams(words, 1), _ngrams(words, 2), _ngrams(words, rep_n)
        all1 += g1
        all2 += g2
        s["words"] = len(words)
        s["distinct1"] = len(set(g1)) / len(g1) if g1 else None
        s["distinct2"] = len(set(g2)) / len(g2) if g2 else None
        s["repetition"] = (len(gr) - len(set(gr))) / len(gr) if gr else None
        if gr:
            reps.append(s["repetition"])
        if index is not None:
            match = index.longest_matches(words) if words else []
            grams = max(0, len(words) - n + 1)
            hits = sum(1 for L in match[:grams] if L >= n)
            s["ngrams"], s["memorised"] = grams, hits
            best = max(range(len(match)), key=lambda j: match[j], default=None)
            s["longest"] = match[best] if best is not None else 0
            s["longest_text"] = " ".join(words[best:best + match[best]]) if best is not None else ""
            total_ngrams += grams
            memorised += hits
            if s["longest"] > longest["words"]:
                longest = {"words": s["longest"], "sample": i, "text": s["longest_text"]}
    summary: dict[str, Any] = {
        "samples": len(samples),
        "mean_words": sum(s["words"] for s in samples) / len(samples) if samples else 0.0,
        "mean_tokens": sum(s["tokens"] for s in samples) / len(samples) if samples else 0.0,
        "distinct1": len(set(all1)) / len(all1) if all1 else None,
        "distinct2": len(set(all2)) / len(all2) if all2 else None,
        f"repetition{rep_n}": sum(reps) / len(reps) if reps else None,
    }
    if index is not None:
        summary.update({"ngram": n, "ngrams": total_ngrams, "memorised": memorised,
                        "memorised_share": memorised / total_ngrams if total_ngrams else None, "longest": longest})
    return summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def samples_markdown(title: str, samples: list[dict[str, Any]], summary: dict[str, Any], about: list[str]) -> str:
    """The report: a summary table, then every sample with its scores."""
    rep_key = next(k for k in summary if k.startswith("repetition"))
    lines = [f"# {title}", "", *[f"- {a}" for a in about], "", "## Summary", "", "| metric | value |", "| --- | --- |",
             f"| samples | {summary['samples']} |", f"| mean length | {summary['mean_words']:.1f} words, "
             f"{summary['mean_tokens']:.1f} tokens |", f"| distinct-1 | {_num(summary['distinct1'])} |",
             f"| distinct-2 | {_num(summary['distinct2'])} |",
             f"| repetition rate (repeated word {rep_key[10:]}-grams) | {_pct(summary[rep_key])} |"]
    if "ngram" in summary:
        lg = summary["longest"]
        lines += [f"| memorised word {summary['ngram']}-grams | {_pct(summary['memorised_share'])} "
                  f"({summary['memorised']} of {summary['ngrams']}) |",
                  f"| longest verbatim span from the training text | {lg['words']} words"
                  + (f" (sample {lg['sample']})" if lg["sample"] else "") + " |"]
    for i, s in enumerate(samples, 1):
        fence = "````text" if "```" in s["prompt"] + s["text"] else "```text"
        lines += ["", f"## Sample {i}", "", f"prompt: `{s['prompt']!r}` · {s['words']} words, {s['tokens']} tokens · "
                  f"distinct-1 {_num(s['distinct1'])} · distinct-2 {_num(s['distinct2'])} · "
                  f"repetition {_pct(s['repetition'])}"
                  + (f" · memorised {s['memorised']}/{s['ngrams']} {summary['ngram']}-grams · longest copy "
                     f"{s['longest']} words" if "ngrams" in s else ""), "", fence, s["prompt"] + s["text"], fence[:-4]]
        if s.get("longest_text") and s["longest"] >= summary.get("ngram", 1):
            lines += ["", f"longest copied span: “{s['longest_text']}”"]
    return "\n".join(lines) + "\n"
