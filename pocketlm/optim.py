"""Optimizers for the training loop: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Both present torch.optim's interface (`param_groups`, `state`, `step`, `zero_grad`, `state_dict`,
`load_state_dict`), so the loop, gradient scaling, clipping and the checkpoint code (optimizer state keyed
by parameter name) treat them alike. The loop sets each group's learning rate to the schedule's value times
the group's `lr_scale`: Muon's matrices run at `muon_lr`, the rest at `lr`.

On CPU they do not run `torch.optim.Optimizer`'s code: its `add_param_group` imports torch._dynamo on first
use, 70 MB resident and ~1.5 s of start-up, a fifth of a small model's whole training peak. AdamW's update
is torch's fused kernel (`torch._fused_adamw_`, what `torch.optim.AdamW(fused=True)` runs) on every device.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from pocketlm.errors import PocketLMError

OPTIMIZERS = ("adamw", "muon")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear weights, embeddings); never biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build(model: torch.nn.Module, t: Any, low_precision: bool = False) -> Optimizer:
    """The optimizer `t` (the train config) asks for. `low_precision`: the run's matmuls are bf16 (autocast), so
    Muon's Newton-Schulz iterations are too (they are ~2x faster where bf16 units exist); else they run in bf16
    on CUDA and in fp32 elsewhere."""
    if t.optimizer == "adamw":
        return AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    if t.optimizer != "muon":
        raise PocketLMError(f"unknown train.optimizer {t.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
    # Muon for the 2-D weights inside the blocks; embeddings (tied to the output head), biases and norm
    # gains keep AdamW, as in the Muon reference recipe
    hidden, embed, flat = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (hidden if p.dim() == 2 and ".h." in f".{name}" else embed if p.dim() >= 2 else flat).append(p)
    groups = [
        {"params": hidden, "muon": True, "lr_scale": t.muon_lr / t.lr, "weight_decay": t.weight_decay},
        {"params": embed, "muon": False, "lr_scale": 1.0, "weight_decay": t.weight_decay},
        {"params": flat, "muon": False, "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    return Muon([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), momentum=t.muon_momentum,
                ns_dtype=torch.bfloat16 if low_precision else None)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (or to each matrix of a stack (k, m, n)), approximately:
    Newton-Schulz with the quintic coefficients of the Muon reference (Keller Jordan, 2024), which trade
    exactness (singular values land in ~[0.7, 1.2]) for speed. The reference runs them in bf16; on a CPU
    without bf16 units fp32 is faster (`dtype`)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class Optimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer without its import of torch._dynamo (see the module docstring): a subclass, so
    isinstance checks (torch.distributed.checkpoint, GradScaler) hold, that never runs the base class's
    `__init__` or its dynamo-wrapped methods. `state_dict` / `load_state_dict` use torch's layout (state keyed
    by parameter index, groups listing indices)."""

    def __init__(self, groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
        # deliberately no super().__init__() (see the class docstring)
        self.defaults = defaults
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            self.param_groups.append({**defaults, **g, "params": list(g["params"])})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        index, groups = {}, []
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                ids.append(index.setdefault(p, len(index)))
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        return {"state": {index[p]: dict(st) for p, st in self.state.items() if p in index},
                "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's: saved groups are matched to ours in order, and their `params` entries (indices, or the
        parameter names torch.distributed.checkpoint writes) name the state's keys."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or \
                any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, self.param_groups)):
            raise PocketLMError("the saved optimizer state does not match this model's parameters; "
                                "start a new run with --overwrite")
        key_to_param = {k: p for a, b in zip(saved, self.param_groups) for k, p in zip(a["params"], b["params"])}
        for g, s in zip(self.param_groups, saved):
            g.update({k: v for k, v in s.items() if k != "params"})
        self.state = defaultdict(dict)
        for key, st in state_dict["state"].items():
            p = key_to_param[key]
            self.state[p] = {k: (v.to(p.device) if k == "step" else v.to(p.device, p.dtype))
                             if isinstance(v, torch.Tensor) else v for k, v in st.items()}

    def _adamw(self, group: dict[str, Any]) -> None:
        """torch.optim.AdamW's step (decoupled weight decay, bias-corrected moments) through torch's fused
        kernel: on CPU the multi-tensor (foreach) ops loop over tensors, ~8 ops per parameter, while the fused
        kernel updates each parameter in one pass (the same figures as `torch.optim.AdamW(fused=True)`)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:  # one fused call per device and dtype, as torch.optim.AdamW groups them
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for ps in by_kind.values():
            states = [self.state[p] for p in ps]
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(ps, [p.grad for p in ps], [st["exp_avg"] for st in states],
                                [st["exp_avg_sq"] for st in states], [], steps, amsgrad=False, lr=group["lr"],
                                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                maximize=False)


class AdamW(Optimizer):
    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            self._adamw(group)


class Muon(Optimizer):
    """Muon (momentum, then the update orthogonalised) for groups with `muon=True`; AdamW for the others.

    Muon: m = momentum * m + (1 - momentum) * g; u = orthogonalize(g + momentum * (m - g)) (Nesterov),
    scaled by sqrt(max(1, rows / cols)); p -= lr * (u + weight_decay * p). AdamW as torch's, decoupled decay.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 momentum: float = 0.95, eps: float = 1e-8, ns_dtype: torch.dtype | None = None) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0,
                                      muon=False, lr_scale=1.0))
        self.ns_dtype = ns_dtype  # None: bf16 on CUDA, fp32 elsewhere
        # the training loop's parallel.ThreadShards when it shards batches across CPU threads: Newton-Schulz
        # then runs as halves of each stack side by side, one torch thread each (a whole stack on the one
        # thread the step holds would take twice as long)
        self.shards: Any = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)

    def _muon(self, group: dict[str, Any]) -> None:
        """One Muon step for a group. Matrices of the same shape (the same layer in every block) are
        orthogonalised as one stack (batched matmuls): the op count shrinks by the number of blocks, which
        counts on GPUs where each op is a kernel launch; on CPU the Newton-Schulz FLOPs dominate either way."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[torch.Size, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_shape.setdefault(p.shape, []).append(p)
        stacks = []
        for params in by_shape.values():
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(self.state[p]["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - mom)
            stacks.append(torch.stack(torch._foreach_lerp(grads, bufs, mom)))  # g + mom * (m - g)
        if not stacks:
            return
        dtype = self.ns_dtype or (torch.bfloat16 if stacks[0].is_cuda else torch.float32)
        if self.shards is None:
            updates = [orthogonalize(s, dtype=dtype) for s in stacks]
        else:  # each stack in halves (thirds, ...), one per thread, put back together in order
            ways = self.shards.n
            parts = [part for s in stacks for part in s.tensor_split(ways)]
            done = iter(self.shards.map(lambda x: orthogonalize(x, dtype=dtype), parts))
            updates = [torch.cat([next(done) for _ in range(ways)]) for _ in stacks]
        for (shape, params), update in zip(by_shape.items(), updates):
            update = update * max(1.0, shape[0] / shape[1]) ** 0.5
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr)
