"""The optimizers `conf/optimizer/` builds, each from the model: nanoGPT's AdamW, and Muon + AdamW.

`muon` gives Lightning one optimizer, `MuonAdamW`, that holds two: Muon on the 2D matrices of the
transformer blocks, AdamW on everything else (embeddings, an untied output layer, norms, biases). Its
`param_groups` are the very group dicts of the two, Muon's first: the LR schedule (which takes its max_lr
from `param_groups[0]`, and scales every group's own initial lr by the same factor) and gradient clipping
reach both. Its state dict holds both optimizers' state dicts.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from torch import nn
from torch.optim._muon import _adjust_lr

__all__ = ["BatchedMuon", "MuonAdamW", "adamw", "muon", "muon_split"]


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over nanoGPT's decay/no-decay groups, with the fused kernel (all devices we target have one)."""
    return torch.optim.AdamW(model.optimizer_groups(weight_decay), lr=lr, betas=tuple(betas), fused=True)


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's) trainable parameters: Muon takes the 2D matrices inside the transformer blocks
    (`transformer.h.*`), AdamW the rest. A tied embedding/output matrix is one parameter, listed once."""
    hidden, rest = [], []
    for name, p in model.named_parameters():  # each parameter once, tied ones too
        if p.requires_grad:
            (hidden if name.startswith("transformer.h.") and p.dim() == 2 else rest).append(p)
    return hidden, rest


def muon(model: nn.Module, lr: float = 0.02, adamw_lr: float = 3e-3, weight_decay: float = 0.0,
         adamw_weight_decay: float = 0.0, momentum: float = 0.95,
         betas: tuple[float, float] = (0.9, 0.99), adjust_lr_fn: str | None = None, ns_steps: int = 5) -> MuonAdamW:
    """Muon (`lr`, `weight_decay`, `momentum`) on the block matrices, AdamW (`adamw_lr`, `betas`) on the rest,
    with `adamw_weight_decay` on its 2D tensors (embeddings, an untied lm_head) and none on norms and biases.

    `adjust_lr_fn` is torch's: None (Keller Jordan's sqrt(max(1, rows/cols)) scale, as in the Muon post and
    modded-nanogpt) keeps `lr` on Muon's own scale (~0.02); "match_rms_adamw" would make it an AdamW-like lr.
    `ns_steps`: Newton-Schulz iterations per update (torch's default 5; fewer are cheaper and rougher).
    """
    hidden, rest = muon_split(model)
    inner_muon = BatchedMuon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                             adjust_lr_fn=adjust_lr_fn, ns_steps=ns_steps)
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": adamw_weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    inner_adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=adamw_lr, betas=tuple(betas), fused=True)
    return MuonAdamW(inner_muon, inner_adamw)


class _JointState(MutableMapping):
    """The state of both inner optimizers as one mapping (parameter -> its state), as Lightning reads and
    writes `optimizer.state` (e.g. to move it to a device); each parameter's state stays in its owner's."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def _owner(self, p) -> torch.optim.Optimizer:
        for optimizer in self.optimizers:
            if p in optimizer.state or any(p is q for g in optimizer.param_groups for q in g["params"]):
                return optimizer
        raise KeyError(p)

    def __getitem__(self, p):
        return self._owner(p).state[p]

    def __setitem__(self, p, value):
        self._owner(p).state[p] = value

    def __delitem__(self, p):
        del self._owner(p).state[p]

    def __iter__(self) -> Iterator:
        for optimizer in self.optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self.optimizers)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer for Lightning over two: Muon, then AdamW. `step(closure)` runs the closure (forward and
    backward) once, then steps both; parameters without a gradient are left as they are, state included."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        # the inner optimizers' own group dicts (add_param_group keeps them): an lr set here is set there
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self.state = _JointState(muon, adamw)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this optimizer state is not Muon + AdamW's (was it saved with another optimizer?)")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # loading gives the inner optimizers new group dicts: share them again, in the same list object
        # (the LR scheduler and Lightning's optimizer wrapper hold it)
        self.param_groups[:] = [*self.muon.param_groups, *self.adamw.param_groups]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.muon!r}, {self.adamw!r})"


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon's update (same arguments and state), with the Newton-Schulz iterations of all the
    matrices of one shape run together, in bfloat16 as torch's: one batched matmul per step and shape
    instead of one per matrix (about 1.7x faster on a 2-core CPU for nanoGPT's small model)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            updates = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
            lr = group["lr"].item() if torch.is_tensor(group["lr"]) else group["lr"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for p, update in zip(params, updates):
                p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def orthogonalize(matrices: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> list[torch.Tensor]:
    """torch's Newton-Schulz orthogonalization (`torch.optim._muon._zeropower_via_newtonschulz`) of each
    matrix, in bfloat16, batched over the matrices of the same (wide) shape; returns bfloat16 matrices."""
    a, b, c = coefficients
    batches: dict[tuple, list[int]] = {}
    wide = [m.mT if m.size(0) > m.size(1) else m for m in matrices]  # as torch: iterate on X X^T, the smaller
    for i, w in enumerate(wide):
        batches.setdefault((tuple(w.shape), w.device), []).append(i)
    out: list[torch.Tensor] = [None] * len(matrices)
    for indices in batches.values():
        x = torch.stack([wide[i].bfloat16() for i in indices])
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, m in zip(indices, x.unbind()):
            out[i] = m.mT if matrices[i].size(0) > matrices[i].size(1) else m
    return out
