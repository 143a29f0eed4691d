"""The one training loop: pretraining today; fine-tuning, SFT and preference tuning plug in as Tasks.

A `Task` says what differs between kinds of training: where batches come from, how the loss is computed,
which parameters train. The loop owns everything else: schedule, accumulation, clipping, DDP, evaluation,
checkpoints, metrics and progress. Callbacks observe it (`on_log`, `on_eval`, `on_test`, `on_checkpoint`,
`on_end`); `--log tensorboard,wandb` adds the tracking callbacks of track.py. Evaluation uses evaluate.py's
Meter, so val/loss, val/ppl, val/acc, val/top10_acc and val/bpb mean what `pocketlm eval` reports.

Batches are a pure function of (seed, step, micro-step, rank): nothing about the data position needs
saving, resume is exact, and the global batch (micro x accumulation x world) is the same set of samples
whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pocketlm import atomic
from pocketlm import checkpoint as ckpt
from pocketlm import config as configlib
from pocketlm import evaluate as evallib
from pocketlm import optim, parallel
from pocketlm import tokenizer as toklib
from pocketlm import track
from pocketlm.config import Config
from pocketlm.data.prepare import Dataset
from pocketlm.device import Runtime, cpu_dtype, setup, teardown
from pocketlm.errors import PocketLMError
from pocketlm.model import GPT, GPTConfig
from pocketlm.optim import param_groups  # noqa: F401 - re-exported for the stages that build their own
from pocketlm.progress import Progress, fmt_duration

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def lr_at(step: int, cfg: configlib.TrainConfig, time_fraction: float | None = None) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps, or, with a time budget, at the end of the
    budget (`time_fraction` = share of it spent): the schedule follows the wall clock, not a step count."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if time_fraction is not None:
        progress = min(1.0, time_fraction)
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class Task(Protocol):
    """What a kind of training supplies to the loop (LMTask is pretraining; SFT and preference tuning add theirs).

    Optional hooks, found with hasattr: `metrics(split) -> dict` adds the task's own metrics to each "train"
    log line and "val" evaluation (preference tuning: rewards, margins, accuracy); `split(batch, n)` cuts a
    batch into up to n row shards with weights whose weighted losses add up to the batch's, which lets the loop
    run the shards on parallel CPU threads (parallel.ThreadShards).
    """

    dataset: Dataset | None

    def batch(self, split: str, step: int, micro: int, batch_size: int, grad_accum: int, rt: Runtime,
              seed: int, device: torch.device) -> Any:
        """The micro-batch of this rank: a pure function of its arguments, so resume is exact."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar loss of a batch (the loop scales it for accumulation)."""

    # optional: `logits(model, batch) -> (logits (B, T, V), targets (B, T) with -100 = not scored)` lets
    # evaluation report per-token metrics (acc, top-k, bits per byte); without it only the loss is reported


class ModelSource(Protocol):
    """Where the model comes from and how its checkpoints are written (Scratch: pretraining; fine-tuning
    starts from a pretrained model through its own source)."""

    def build(self) -> torch.nn.Module:
        """The model to train, on the CPU; the loop moves it to the device."""

    def save(self, model: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor],
             generation: dict[str, Any]) -> None:
        """Write a standard model folder (weights, config, tokenizer) from the full `state` dict."""

    def load_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """The full state dict of a saved checkpoint, keyed like the built model (for --resume)."""


class Scratch:
    """Pretraining: a fresh GPT shaped by cfg.model; checkpoints carry the dataset's tokenizer."""

    def __init__(self, cfg: Config, dataset: Dataset | None) -> None:
        self.cfg, self.dataset = cfg, dataset

    def build(self) -> torch.nn.Module:
        return GPT(GPTConfig(**vars(self.cfg.model)))

    def save(self, model: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor],
             generation: dict[str, Any]) -> None:
        eot = self.dataset.manifest["tokenizer"]["eot_id"] if self.dataset else None
        ckpt.save_model(model, folder, self.dataset.path if self.dataset else None, eot, generation, state)

    def load_state(self, folder: Path) -> dict[str, torch.Tensor]:
        return ckpt.load_model(folder, "cpu")[0].state_dict()


class NextTokenTask:
    """Loss and logits of (inputs, targets) batches, targets -100 where not scored: what pretraining and SFT
    share (they differ only in how a batch is drawn)."""

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    def logits(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, y = batch
        return model(x)[0], y

    def split(self, batch: tuple[torch.Tensor, ...], n: int) -> list[tuple[tuple[torch.Tensor, ...], float]]:
        """Up to n row shards, each weighted by its share of the scored targets (the loss is their mean), so the
        weighted shard losses add up to the batch's loss; shards with nothing to score are left out."""
        parts = list(zip(*(t.tensor_split(n) for t in batch)))
        counts = [int((part[1] != -100).sum()) for part in parts]
        total = sum(counts)
        if not total:  # nothing scored: the batch's loss is what the plain step computes
            return [(batch, 1.0)]
        return [(part, c / total) for part, c in zip(parts, counts) if c]


class LMTask(NextTokenTask):
    """Next-token prediction on a prepared dataset: random windows of block_size + 1 tokens."""

    def __init__(self, dataset: Dataset, block_size: int) -> None:
        self.dataset = dataset
        self.block_size = block_size
        # the test split is opened only when asked for: training never reads it
        self.splits = {name: dataset.split(name) for name in ("train", "val")}
        for name in ("train", "val"):
            n = len(self.splits[name])
            if n < block_size + 1:
                fix = ("lower --model.block_size" if n > 1 else "give more text or a held-out --val file")
                raise PocketLMError(f"the {name} split has {n} tokens, fewer than block_size + 1 = "
                                    f"{block_size + 1}: {fix}")
        self.arange = np.arange(block_size + 1)

    def batch(self, split: str, step: int, micro: int, batch_size: int, grad_accum: int, rt: Runtime,
              seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self.splits:
            self.splits[split] = self.dataset.split(split)
        data = self.splits[split]
        per_step = batch_size * grad_accum * rt.world_size
        rng = np.random.default_rng([seed, SPLIT_CODE[split], step])
        offsets = rng.integers(0, len(data) - self.block_size, size=per_step)
        start = (micro * rt.world_size + rt.rank) * batch_size  # this rank's disjoint slice of the step
        rows = data[offsets[start:start + batch_size, None] + self.arange].astype(np.int64)
        t = torch.from_numpy(rows)
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
        return t[:, :-1], t[:, 1:]


@dataclass
class State:
    step: int = 0
    tokens: int = 0
    best_val: float = float("inf")
    elapsed: float = 0.0  # training seconds across resumes (steps only)
    wall: float = 0.0  # seconds since the start across resumes, evaluations and checkpoints included
    interrupted: bool = False  # stopped early by Ctrl-C (last/ holds the state to resume from)
    history: list[dict[str, Any]] = field(default_factory=list)


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn last line (killed mid-write) sorts after everything."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """metrics.jsonl: one JSON object per line with `step`; on resume, later lines are dropped."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        if keep_until is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if _step_of(ln) <= keep_until]
            atomic.atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        elif keep_until is None:
            atomic.atomic_write_text(path, "")
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, write: bool) -> None:
    """Refuse to clobber a run (checked on every rank, so all fail alike); rank 0 (`write`) clears it."""
    if out.exists() and not out.is_dir():
        raise PocketLMError(f"--out {out} is a file, not a run folder")
    if resume:
        if write:
            atomic.recover(out / "last")
        if not (out / "last" / "trainer_state.json").is_file() and not (out / ".last.old").is_dir():
            raise PocketLMError(f"nothing to resume in {out} (no last/ checkpoint); drop --resume to start fresh")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PocketLMError(f"run folder {out} already exists: pass --resume to continue it or --overwrite "
                                "to start over")
        if write:
            for sub in ("best", "last", ".best.old", ".last.old", "metrics.jsonl", "config.yaml"):
                p = out / sub
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if write:
        out.mkdir(parents=True, exist_ok=True)


def check_resume_compatible(saved: dict[str, Any], cfg: Config) -> None:
    old = configlib.from_dict(saved)
    diffs = [f"model.{k}" for k, v in vars(old.model).items() if getattr(cfg.model, k) != v and k != "dropout"]
    if diffs:
        raise PocketLMError(f"--resume with a different model shape ({', '.join(diffs)}): the checkpoint cannot "
                            "continue; use the run's own config or start a new run with --out")


def check_resume_tokenizer(dataset: Dataset, folder: Path) -> None:
    """Resuming on other data is allowed (more text, say), but not on other token ids: a retrained tokenizer
    of the same size would silently give every embedding row another meaning. The run's tokenizer may hold
    more (special tokens a fine-tune added); every token of the data's must keep its id."""
    if not (folder / "tokenizer.json").is_file():
        return
    ours = toklib.load(folder).tk.get_vocab(with_added_tokens=True)
    if any(ours.get(t) != i for t, i in dataset.tokenizer().tk.get_vocab(with_added_tokens=True).items()):
        raise PocketLMError(f"--resume on data whose tokenizer is not the run's ({dataset.path} was prepared "
                            f"with another vocabulary): prepare it with `--tokenizer {folder}`, or start a new "
                            "run from these weights with --init-from")


class Trainer:
    def __init__(self, cfg: Config, task: Task | None = None, resume: bool = False, overwrite: bool = False,
                 callbacks: list[Any] | None = None, verbose: bool = True, source: ModelSource | None = None) -> None:
        self.cfg, self.resume, self.callbacks = cfg, resume, callbacks or []
        t = cfg.train
        if not t.out:
            raise PocketLMError("no run folder given: pass --out RUN_DIR")
        self.out = Path(t.out)
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (self.out / "last").is_dir():
            resume = self.resume = True  # torchrun restarted the workers: continue from the last checkpoint
        self.rt = setup(t.device, t.dtype, t.threads)
        self.verbose = verbose and self.rt.is_main
        self.dataset = Dataset(cfg.data.path) if task is None else getattr(task, "dataset", None)
        if cfg.model.vocab_size == 0 and self.dataset is not None:
            cfg.model.vocab_size = self.dataset.vocab_size
        if self.dataset is not None and cfg.model.vocab_size < self.dataset.vocab_size:
            raise PocketLMError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                                f"{self.dataset.vocab_size}; leave it at 0 to take the tokenizer's")
        self.task = task or LMTask(self.dataset, cfg.model.block_size)
        track.parse_loggers(t.log)  # a typo fails before the run folder is touched
        self.token_bytes = None  # bytes per token id, for val/bpb
        if self.dataset is not None:
            table = evallib.token_byte_lengths(self.dataset.tokenizer())
            table = np.pad(table, (0, max(0, cfg.model.vocab_size - len(table))))
            self.token_bytes = torch.from_numpy(table).to(self.rt.device)
        # the config states the global batch (batch_size x grad_accum); processes share the accumulation
        if t.grad_accum % self.rt.world_size:
            raise PocketLMError(f"train.grad_accum ({t.grad_accum}) must be a multiple of the number of processes "
                                f"({self.rt.world_size}) so the global batch stays batch_size x grad_accum")
        self.accum = t.grad_accum // self.rt.world_size
        torch.manual_seed(t.seed)
        self.source = source or Scratch(cfg, self.dataset)
        self.model = self.source.build().to(self.rt.device)
        if t.dtype == "auto" and self.rt.device.type == "cpu" and isinstance(self.model, GPT):
            # measured on pocketlm's model (attention stays fp32 there); a transformers model keeps fp32
            self._pick_cpu_dtype(self.model.config.n_embd)
        parallel.shard(self.model, self.rt, t.strategy)
        self.optimizer = optim.build(self.model, t, low_precision=self.rt.dtype == torch.bfloat16)
        # only now, with everything built and checked, is an old run cleared (--overwrite)
        prepare_run_dir(self.out, resume, overwrite, write=self.rt.is_main)
        self._barrier()
        self.state = State()
        if resume:
            self._load_last()
        self.fwd = parallel.wrap(self.model, self.rt, t.strategy)
        if t.compile:
            self.fwd = torch.compile(self.fwd)  # the uncompiled self.model is what gets saved
        self.scaler = torch.amp.GradScaler(enabled=self.rt.dtype == torch.float16)
        n_shards, why = parallel.pick_thread_shards(
            t.thread_shards, self.rt.device, self.rt.distributed, t.compile, t.batch_size,
            hasattr(self.task, "split"), self.model, isinstance(self.model, GPT))
        self.shards = parallel.ThreadShards(n_shards) if n_shards > 1 else None
        if self.shards and hasattr(self.optimizer, "shards"):
            self.optimizer.shards = self.shards  # Muon's Newton-Schulz on the same threads
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if why:
            self.rt.dtype_reason += f"; {why}"
        if self.rt.is_main:
            configlib.save_yaml(cfg, self.out / "config.yaml")
        self.log = MetricsLog(self.out / "metrics.jsonl", self.state.step if resume else None) \
            if self.rt.is_main else None
        if self.rt.is_main:
            self.callbacks += track.loggers(t.log, self.out, t.wandb_project, cfg.to_dict(), resume)
        self.stop_requested = False

    # -- state --------------------------------------------------------------------------------------
    def _load_last(self) -> None:
        folder = self.out / "last"
        meta, opt_state, rng = ckpt.load_trainer_state(folder)
        check_resume_compatible(meta["config"], self.cfg)
        if self.dataset is not None:
            check_resume_tokenizer(self.dataset, folder)
        parallel.load_full_state(self.model, self.optimizer, self.source.load_state(folder), opt_state)
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        self.state = State(step=meta["step"], tokens=meta["tokens"], best_val=meta["best_val"],
                           elapsed=meta.get("elapsed", 0.0), wall=meta.get("wall", meta.get("elapsed", 0.0)))

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if self.rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return rng

    def save(self, name: str, with_optimizer: bool) -> Path:
        """Write a checkpoint folder atomically (rank 0 only)."""
        dst = self.out / name
        # gathering is collective under FSDP: every rank takes part, rank 0 writes
        model_state = parallel.full_model_state(self.model)
        opt_state = parallel.full_optimizer_state(self.model, self.optimizer) if with_optimizer else None
        if self.rt.is_main:
            tmp = self.out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            s = self.cfg.sample
            gen = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                   "max_new_tokens": s.max_new_tokens, "repetition_penalty": s.repetition_penalty}
            self.source.save(self.model, tmp, model_state, gen)
            meta = {"step": self.state.step, "tokens": self.state.tokens, "best_val": self.state.best_val,
                    "elapsed": self.state.elapsed, "wall": self.state.wall, "config": self.cfg.to_dict()}
            ckpt.save_trainer_state(tmp, meta, opt_state, self._rng_state())
            atomic.replace_dir(tmp, dst)
            for cb in self.callbacks:
                getattr(cb, "on_checkpoint", lambda *a: None)(self.state.step, dst)
        self._barrier()
        return dst

    def _pick_cpu_dtype(self, n_embd: int) -> None:
        dtype, why = cpu_dtype(n_embd)
        if self.rt.distributed:  # every rank must autocast alike: bf16 only where every rank measured the gain
            flag = torch.tensor([int(dtype == torch.bfloat16)])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if dtype == torch.bfloat16 and not flag.item():
                dtype, why = torch.float32, "float32: not every process measured a bf16 matmul gain"
        self.rt.dtype, self.rt.dtype_reason = dtype, why

    def _barrier(self) -> None:
        if self.rt.distributed:
            dist.barrier()

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        """loss, ppl, acc, top-k acc, bpb over eval_steps fixed batches (the same batches at every evaluation)."""
        t = self.cfg.train
        self.model.eval()
        meter, spare = evallib.Meter(t.eval_top_k, self.token_bytes), evallib.Meter(t.eval_top_k, self.token_bytes)
        rounds = -(-t.eval_steps // self.rt.world_size)
        for j in range(rounds):  # batches sharded across ranks; every rank runs the same number of forwards
            i = j * self.rt.world_size + self.rt.rank
            batch = self.task.batch(split, 10**9 + i, 0, t.batch_size, 1, _single(self.rt), t.seed, self.rt.device)
            with self.rt.autocast():  # a surplus batch (i >= eval_steps) only keeps FSDP's collectives in step
                (meter if i < t.eval_steps else spare).add_task_batch(self.task, self.model, batch)
        if self.rt.distributed:
            meter.all_reduce(self.rt.device)
        self.model.train()
        return meter.metrics()

    def test_at_end(self) -> None:
        """The whole test split, once, with the best checkpoint (rank 0; only when a test split exists)."""
        ds = self.dataset
        if ds is None or not self.rt.is_main or not isinstance(self.task, LMTask) \
                or not ds.manifest.get("splits", {}).get("test", {}).get("tokens"):
            return
        lm = evallib.load_lm(self.out / "best", str(self.rt.device))
        t0 = time.perf_counter()
        meter = evallib.evaluate_stream(lm, evallib.stream_of(ds.split("test"), lm.tok.eot_id),
                                        self.cfg.train.eval_top_k, self.cfg.train.batch_size)
        record = {"step": self.state.step, **{f"test/{k}": v for k, v in meter.metrics().items()},
                  "test/tokens": meter.tokens, "eval_s": round(time.perf_counter() - t0, 2)}
        self._emit("on_test", record)
        if self.verbose:
            print(f"test (best checkpoint, {meter.tokens:,} tokens): loss {record['test/loss']:.4f}"
                  + (f", {record['test/bpb']:.4f} bits/byte" if "test/bpb" in record else ""), file=sys.stderr)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> State:
        t, st, rt = self.cfg.train, self.state, self.rt
        accum = self.accum
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.model.block_size
        flops_per_token = self.model.flops_per_token()
        budget = configlib.seconds(t.time_budget)  # 0 = run max_steps
        peak, _ = track.peak_flops(rt.device, rt.dtype, t.peak_tflops)
        peak *= rt.world_size
        start_step = st.step
        if self.verbose:
            print(f"pocketlm: {self.model.num_params() / 1e6:.2f}M parameters | {rt.reason}", file=sys.stderr)
            length = f"{fmt_duration(budget)} time budget" if budget else f"{t.max_steps} steps"
            print(f"pocketlm: {length} x {tokens_per_step:,} tokens/step -> {self.out} | matmul peak "
                  f"{peak / 1e12:.3g} TFLOP/s", file=sys.stderr)
        bar = Progress("train", None if budget else t.max_steps, " steps", enabled=self.verbose)
        bar.done = st.step
        old_handler = self._install_sigint()
        self.model.train()
        window_s, window_tokens, shown = 0.0, 0, ""
        wall0 = time.perf_counter() - st.wall

        def spent() -> bool:  # with a budget every rank must agree, or the collectives hang
            return parallel.all_agree(time.perf_counter() - wall0 >= budget, rt) if budget else st.step >= t.max_steps

        ending = spent()
        try:
            while not ending and not parallel.all_agree(self.stop_requested, rt):
                step_t0 = time.perf_counter()
                lr = lr_at(st.step, t, (step_t0 - wall0) / budget if budget else None)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices run at their own rate
                with self.shards.one_thread() if self.shards else contextlib.nullcontext():
                    loss_sum = torch.zeros((), device=rt.device)
                    for micro in range(accum):
                        batch = self.task.batch("train", st.step, micro, t.batch_size, accum, rt, t.seed,
                                                rt.device)
                        loss_sum += self._backward(batch, accum, micro == accum - 1)
                    self.scaler.unscale_(self.optimizer)
                    gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0
                                                           else float("inf"))
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                st.step += 1
                st.tokens += tokens_per_step
                step_s = time.perf_counter() - step_t0
                st.elapsed += step_s
                window_s += step_s
                window_tokens += tokens_per_step
                st.wall = time.perf_counter() - wall0
                ending = spent()
                if st.step % t.log_interval == 0 or ending:
                    if rt.distributed:
                        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                    tps = window_tokens / window_s  # step time only: evaluation and saving excluded
                    window_s, window_tokens = 0.0, 0
                    loss_value = loss_sum.item()
                    self._emit("on_log", {"step": st.step, "train/loss": loss_value, "lr": lr,
                                          "grad_norm": parallel.total_norm(gnorm), "tokens": st.tokens,
                                          "tokens_per_s": round(tps),
                                          "tflops": round(tps * flops_per_token / 1e12, 4),
                                          "mfu": round(tps * flops_per_token / peak, 5),
                                          "peak_mem_mb": round(track.peak_memory_mb(rt.device), 1),
                                          "elapsed_s": round(st.elapsed, 2), "wall_s": round(st.wall, 2),
                                          **self._task_metrics("train")})
                    shown = f"loss {loss_value:.4f} | {tps:,.0f} tok/s"
                    if peak:
                        shown += f" | MFU {tps * flops_per_token / peak:.0%}"
                    if budget:
                        shown += f" | {fmt_duration(budget - st.wall)} left"
                bar.update(1, shown)
                if st.step % t.eval_interval == 0 or ending:
                    self._eval_and_save()
            if ending and st.step > start_step:
                self.test_at_end()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if self.shards:
                self.shards.close()
            if self.log:
                self.log.close()
            for cb in self.callbacks:
                getattr(cb, "on_end", lambda *a: None)(st.step, {})
        if not ending:  # every rank agreed to stop early
            st.interrupted = True
            self.save("last", with_optimizer=True)
            if self.verbose:
                print(f"\ninterrupted at step {st.step}: saved {self.out / 'last'}; continue with --resume",
                      file=sys.stderr)
        if not st.interrupted:
            bar.close(f"done in {fmt_duration(st.elapsed)}")
        teardown()
        return st

    def _backward(self, batch: Any, accum: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch, as row shards on parallel threads where the run uses them;
        returns its loss / accum, detached."""
        if self.shards is None:
            with parallel.grad_sync(self.fwd, self.model, last), self.rt.autocast():
                loss = self.task.loss(self.fwd, batch) / accum
            self.scaler.scale(loss).backward()
            return loss.detach()

        def loss_of(shard: Any) -> torch.Tensor:  # called on each shard's thread: autocast is per thread
            with self.rt.autocast():
                return self.task.loss(self.fwd, shard) / accum
        return self.shards.backward(self.task.split(batch, self.shards.n), loss_of, self.trainable)

    def _eval_and_save(self) -> None:
        st = self.state
        t0 = time.perf_counter()
        metrics = self.evaluate("val")
        val = metrics["loss"]
        record = {"step": st.step, **{f"val/{k}": v for k, v in metrics.items()}, "tokens": st.tokens,
                  "eval_s": round(time.perf_counter() - t0, 2)}
        improved = val < st.best_val
        if improved:
            st.best_val = val
        record["val/best_loss"] = st.best_val
        record.update(self._task_metrics("val"))
        self._emit("on_eval", record)
        if self.verbose:
            tag = " (best)" if improved else ""
            print(f"\rstep {st.step}: val loss {val:.4f}{tag}\033[K" if sys.stderr.isatty()
                  else f"step {st.step}: val loss {val:.4f}{tag}", file=sys.stderr)
        if improved:
            self.save("best", with_optimizer=False)
        self.save("last", with_optimizer=True)

    def _task_metrics(self, split: str) -> dict[str, float]:
        """A task's own metrics since it was last asked (preference tuning: rewards, margins, accuracy)."""
        return self.task.metrics(split) if hasattr(self.task, "metrics") else {}

    def _emit(self, hook: str, record: dict[str, Any]) -> None:
        st = self.state
        st.history.append(record)
        if self.log:
            self.log.write(record)
        for cb in self.callbacks:
            getattr(cb, hook, lambda *a: None)(st.step, record)

    def _install_sigint(self) -> Callable | None:
        """First Ctrl-C: finish the step, save last/, exit cleanly. Second: stop at once."""
        if not _is_main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            if self.verbose:
                print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

        return signal.signal(signal.SIGINT, handler)


def _single(rt: Runtime) -> Runtime:
    return Runtime(rt.device, rt.dtype)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: Config, resume: bool = False, overwrite: bool = False, task: Task | None = None,
          callbacks: list[Any] | None = None, verbose: bool = True) -> State:
    """Train a model as `cfg` says; returns the final state (step, best val loss, metric history).

    With finetune.init_from set, the run starts from that pretrained model (pocketlm.finetune)."""
    if cfg.finetune.init_from:
        from pocketlm.finetune.run import finetune

        return finetune(cfg, resume=resume, overwrite=overwrite, task=task, callbacks=callbacks, verbose=verbose)
    trainer = Trainer(cfg, task, resume, overwrite, callbacks, verbose)
    return trainer.fit()

