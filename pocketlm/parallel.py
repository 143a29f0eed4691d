"""Data parallelism for the training loop: DDP or FSDP wrapping, gradient-sync control, full state dicts.

Checkpoints always hold full (gathered) tensors keyed by parameter name, whichever strategy wrote them,
so a run saved by 8 FSDP ranks resumes in 1 process and the other way round. The state-dict helpers come
from torch.distributed.checkpoint and work on plain, DDP and FSDP models alike.
"""

from __future__ import annotations

import contextlib
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
