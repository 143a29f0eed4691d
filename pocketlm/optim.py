"""Optimizers for the training loop: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Both are one `torch.optim.Optimizer`, so the loop, gradient scaling, clipping and the checkpoint code
(optimizer state keyed by parameter name) treat them alike. The loop sets each group's learning rate to the
schedule's value times the group's `lr_scale`: Muon's matrices run at `muon_lr`, the rest at `lr`.
"""

from __future__ import annotations

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


def build(model: torch.nn.Module, t: Any, on_cuda: bool) -> torch.optim.Optimizer:
    """The optimizer `t` (the train config) asks for."""
    if t.optimizer == "adamw":
        # fused kernels on CUDA; elsewhere the multi-tensor path (torch defaults CPU to one tensor at a time)
        return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                 fused=on_cuda or None, foreach=None if on_cuda else True)
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
    return Muon([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), momentum=t.muon_momentum)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (or to each matrix of a stack (k, m, n)), approximately:
    Newton-Schulz with the quintic coefficients of the Muon reference (Keller Jordan, 2024), which trade
    exactness (singular values land in ~[0.7, 1.2]) for speed. On CUDA it runs in bf16; on CPU without bf16
    units fp32 is faster."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (momentum, then the update orthogonalised) for groups with `muon=True`; AdamW for the others.

    Muon: m = momentum * m + (1 - momentum) * g; u = orthogonalize(g + momentum * (m - g)) (Nesterov),
    scaled by sqrt(max(1, rows / cols)); p -= lr * (u + weight_decay * p). AdamW as torch's, decoupled decay.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 momentum: float = 0.95, eps: float = 1e-8) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0,
                                      muon=False, lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
                continue
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                beta1, beta2 = group["betas"]
                state["step"] += 1
                n = state["step"].item()
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** n)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** n))

    def _muon(self, group: dict[str, Any]) -> None:
        """One Muon step for a group. Matrices of the same shape (the same layer in every block) are
        orthogonalised as one stack: a small model's Newton-Schulz is dozens of tiny matmuls per matrix, and
        batching them cuts the op count by the number of blocks."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[torch.Size, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_shape.setdefault(p.shape, []).append(p)
        for shape, params in by_shape.items():
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(self.state[p]["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - mom)
            nesterov = torch.stack(torch._foreach_lerp(grads, bufs, mom))  # g + mom * (m - g)
            update = orthogonalize(nesterov) * max(1.0, shape[0] / shape[1]) ** 0.5
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr)
