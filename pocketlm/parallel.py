"""Data parallelism for the training loop: DDP or FSDP wrapping, gradient-sync control, full state dicts, and
row shards of a micro-batch across the CPU threads of one process.

Checkpoints always hold full (gathered) tensors keyed by parameter name, whichever strategy wrote them,
so a run saved by 8 FSDP ranks resumes in 1 process and the other way round. The state-dict helpers come
from torch.distributed.checkpoint and work on plain, DDP and FSDP models alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
import torch.distributed as dist

from pocketlm.device import Runtime
from pocketlm.errors import PocketLMError

STRATEGIES = ("ddp", "fsdp")
# torch.distributed.checkpoint is imported where used: it costs ~0.8 s at start-up


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: torch.nn.Module, rt: Runtime, strategy: str) -> None:
    """FSDP shards parameters in place and must come before the optimizer is built; DDP wraps later."""
    if strategy not in STRATEGIES:
        raise PocketLMError(f"unknown train.strategy {strategy!r}: use 'ddp' or 'fsdp'")
    if strategy == "fsdp" and rt.distributed:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:  # one all-gather per block keeps peak memory to a block
            fully_shard(block)
        fully_shard(model)


def wrap(model: torch.nn.Module, rt: Runtime, strategy: str) -> torch.nn.Module:
    """The module the loop calls forward on (the bare model is what gets saved)."""
    if rt.distributed and strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


@contextlib.contextmanager
def grad_sync(fwd: torch.nn.Module, model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps; only the last one synchronises."""
    if enabled:
        yield
    elif hasattr(fwd, "no_sync"):  # DDP
        with fwd.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _plain(model: torch.nn.Module) -> bool:
    """One process with ordinary tensors: state dicts need no gathering, and torch.distributed.checkpoint
    (47 MB resident once imported) stays unloaded."""
    return not (dist.is_available() and dist.is_initialized()) and \
        not any(hasattr(p, "full_tensor") for p in model.parameters())


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gathered CPU tensors (a collective under FSDP: every rank calls it, rank 0 uses it)."""
    if _plain(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def _names(model: torch.nn.Module, optimizer: Any) -> list[str]:
    """Parameter name of each optimizer index (state_dict numbers the groups' params in order)."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, as torch.distributed.checkpoint's full state dict."""
    if _plain(model):
        names, sd = _names(model, optimizer), optimizer.state_dict()
        return {"state": {names[i]: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                     for k, v in st.items()} for i, st in sd["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_state(model: torch.nn.Module, optimizer: Any | None,
                    model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None) -> None:
    if _plain(model):
        model.load_state_dict(model_state)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)  # groups in order; names key the state
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP's DTensors
    opts = StateDictOptions(full_state_dict=sharded)  # full tensors in, each rank keeps its shard
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)


def all_agree(flag: bool, rt: Runtime) -> bool:
    """True on every rank when any rank says so (stopping must be unanimous, or collectives hang)."""
    if not rt.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def total_norm(gnorm: torch.Tensor) -> float:
    return float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)


# Threads inside one process, each running whole shards of the micro-batch with one torch thread. A small model's
# ops are too small to split well between threads: nanoGPT's CPU configuration steps only 1.4x faster on 2 threads
# than on 1 (bf16), while two shards of 6 rows run side by side in the time of one. Measured on a 2-core EPYC
# (docs/benchmarks.md): 1.2-1.5x per step at 128 wide, 1.05-1.2x at 384 wide, no clear gain at 768.
SHARD_MAX_EXTRA = 50_000_000  # each extra thread holds a copy of the gradients: at most this many values by default


def pick_thread_shards(requested: int, device: torch.device, distributed: bool, compiled: bool, batch_size: int,
                       can_split: bool, model: torch.nn.Module, ours: bool) -> tuple[int, str]:
    """How many row shards each micro-batch runs as (1 = the plain step) and why. Explicit values are checked;
    auto (0) shards pocketlm's own models on a multi-threaded CPU when nothing makes the run nondeterministic
    (dropout draws from one generator that the threads would share) and the extra threads' copies of the
    gradients stay small (2 threads: up to 50M trainable parameters; 8 threads: up to 7M)."""
    threads = torch.get_num_threads()
    if requested == 1:
        return 1, ""
    why_not = ("CUDA and MPS run one batch on all their cores" if device.type != "cpu" else
               "each process under torchrun is already a data-parallel worker" if distributed else
               "a compiled model is one graph per thread" if compiled else
               "this kind of training has no row-wise loss to split" if not can_split else "")
    if requested:
        if why_not:
            raise PocketLMError(f"--train.thread_shards {requested}: {why_not}; leave it at 0 (auto) or 1")
        if requested > batch_size:
            raise PocketLMError(f"--train.thread_shards {requested} is more than the {batch_size} rows of a "
                                "micro-batch: lower it or raise --train.batch_size")
        return requested, f"{requested} thread shards per micro-batch (requested)"
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    n_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = min(threads, batch_size)
    if why_not or n < 2 or not ours or dropout or (n - 1) * n_grad > SHARD_MAX_EXTRA:
        return 1, ""
    return n, f"{n} thread shards per micro-batch"


class ThreadShards:
    """Data parallelism across the CPU threads of one process: a micro-batch's row shards run forward and backward
    at once, shard 0 on the calling thread (its gradients accumulate into .grad as usual) and the others on worker
    threads that return theirs. Every thread runs torch ops with one thread; the gradients are added in shard order,
    so a run is as deterministic as the plain one. Autocast and grad mode are per thread: the loss function enters
    autocast itself."""

    def __init__(self, n: int) -> None:
        self.n, self.threads, self.holding = n, torch.get_num_threads(), False
        self.pool: ThreadPoolExecutor | None = None  # started at the first step, stopped by close()

    def backward(self, shards: list[tuple[Any, float]], loss_of: Callable[[Any], torch.Tensor],
                 params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Backward of sum(weight x loss_of(shard)) into params' .grad; returns that sum, detached. Outside
        `one_thread` all threads are given back before it returns."""

        def run(batch: Any, weight: float) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
            loss = loss_of(batch) * weight
            return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

        futures: list[Future] = []
        with self._working(futures):
            futures += [self._submit(run, batch, weight) for batch, weight in shards[1:]]
            batch, weight = shards[0]
            loss = loss_of(batch) * weight
            loss.backward()
            total = loss.detach()
            for future in futures:  # in shard order, whichever finished first
                part, grads = future.result()
                total = total + part
                for p, g in zip(params, grads):
                    if g is not None:
                        if p.grad is None:
                            p.grad = g
                        else:
                            p.grad.add_(g)
            return total

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """[fn(x) for x in items], item i on thread i % n (this one takes the first), one torch thread each:
        what the optimizer runs on the threads (Muon's Newton-Schulz, by halves of each stack)."""
        futures: list[Future] = []
        with self._working(futures):
            futures += [self._submit(fn, x) for i, x in enumerate(items) if i % self.n]
            mine = iter([fn(x) for i, x in enumerate(items) if i % self.n == 0])
            theirs = iter(futures)
            return [next(theirs).result() if i % self.n else next(mine) for i in range(len(items))]

    @contextlib.contextmanager
    def _working(self, futures: list[Future]):
        """This thread's ops at one torch thread while the workers run (one_thread keeps it for a whole step;
        the workers set theirs as they start); on the way out, failures included, every worker has finished
        before the thread count is given back."""
        torch.set_num_threads(1)
        try:
            yield
        finally:
            wait(futures)
            if not self.holding:
                torch.set_num_threads(self.threads)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.n - 1, thread_name_prefix="pocketlm-shard",
                                           initializer=torch.set_num_threads, initargs=(1,))
        return self.pool.submit(fn, *args)

    @contextlib.contextmanager
    def one_thread(self):
        """A whole training step at one torch thread per thread, the optimizer's included: measured, any op run on
        all threads between the shards' passes (the optimizer's) cost more than it saved (23 -> 31 ms per step
        on nanoGPT's CPU configuration). Evaluation, outside it, gets all threads back."""
        torch.set_num_threads(1)
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            torch.set_num_threads(self.threads)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
