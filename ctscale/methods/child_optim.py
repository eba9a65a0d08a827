"""Child-only AdamW for CT-D: optimizer state only for the child network (memory ~ p).

With a fixed CT-D mask, dense AdamW on masked gradients keeps fp32 ``exp_avg`` and ``exp_avg_sq``
for every entry, yet an entry outside the child network always sees a zero gradient: its moments
stay exactly 0 and its Adam update is exactly ``0 / (0 + eps) = 0``. So for each local piece of a
candidate parameter this module keeps only

- ``ChildMask``: the sorted int32 positions of the child entries in the piece (4 bytes per child
  entry; it replaces ``FixedChildMask``'s bool per candidate entry and is also the strategy that
  masks the gradients, so that clipping sees the same norm as dense CT-D);
- ``ChildAdamW`` state: packed fp32 ``exp_avg``, ``exp_avg_sq`` (and an fp32 ``master`` copy for
  bf16/fp16 parameters), one entry per child entry, in index order.

Everything here is **local**: a piece is this rank's flat range of a parameter (the whole tensor
under local/DDP, a dim-0 shard under FSDP2); gradients are read after reduction; no collective.

Equal to dense CT-D (``torch.optim.AdamW`` on masked gradients), entry for entry, at any weight
decay: child entries get the same AdamW arithmetic on gathered values; every entry of the piece,
child or not, gets the decoupled decay ``w *= 1 - lr * wd`` as dense AdamW gives it (stateless);
non-candidate parameters (embeddings, head: always fully trained) keep ordinary per-entry state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ctscale.dist import local_shard
from ctscale.errors import CtscaleError, MaskError
from ctscale.methods.base import GradView
from ctscale.methods.fixed_mask import FixedChildMask


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state tensors (local shards only)."""
    tensors = (t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return sum(local_shard(t).numel() * t.element_size() for t in tensors)


class ChildMask:
    """CT-D child network of this rank: per candidate parameter, ``(start, numel, index)`` of its
    local flat piece, ``index`` the sorted positions of child entries within the piece.

    Also a ``MaskStrategy``: zeroes the non-child gradient entries by gather, zero, scatter (the
    same result as ``masked_fill``, ~5x faster on CPU at p = 0.1 and no bool mask kept).
    """

    def __init__(self, pieces: dict[str, tuple[int, int, torch.Tensor]]) -> None:
        self.pieces = pieces

    @classmethod
    def from_fixed(cls, fixed: FixedChildMask) -> ChildMask:
        """From the bool masks of a loaded CT-D strategy (which can then be dropped)."""
        pieces: dict[str, tuple[int, int, torch.Tensor]] = {}
        for (name, start), keep in fixed.local_masks.items():
            if name in pieces:  # ZeRO-1/2 fragments would do this; local, DDP and FSDP2 never do
                raise MaskError(
                    f"{name} has several local pieces on this rank; child-only AdamW needs one "
                    "contiguous range per parameter per rank (backends local, ddp, fsdp)"
                )
            dtype = torch.int32 if keep.numel() < 2**31 else torch.int64
            pieces[name] = (start, keep.numel(), keep.reshape(-1).nonzero().view(-1).to(dtype))
        return cls(pieces)

    def index(self, name: str, device: torch.device | None = None) -> torch.Tensor | None:
        """Child positions in ``name``'s local piece; None for a non-candidate (fully trained)."""
        piece = self.pieces.get(name)
        if piece is None:
            return None
        start, numel, idx = piece
        if device is not None and idx.device != device:  # moved once, on first use
            idx = idx.to(device)
            self.pieces[name] = (start, numel, idx)
        return idx

    def apply(self, view: GradView, step: int) -> None:
        piece = self.pieces.get(view.name)
        if piece is None or view.numel == 0:
            return
        if (piece[0], piece[1]) != (view.start, view.numel):
            raise MaskError(
                f"the child network of {view.name} covers [{piece[0]}, {piece[0] + piece[1]}) on "
                f"this rank, the gradient [{view.start}, {view.end}); rebuild it from the mask file"
            )
        assert view.grad is not None  # grad_views() always carries the gradient
        idx = self.index(view.name, view.grad.device)
        assert idx is not None  # a piece was found above
        child = view.grad.index_select(0, idx)
        view.grad.zero_()
        view.grad.index_put_((idx,), child)

    survivors_fixed = True  # the same child network at every step

    def survivors(self, view: GradView, step: int) -> torch.Tensor | None:
        """Bool over ``view``'s local entries: True for child entries; None for a non-candidate
        (every entry kept). Read by the sparse DDP communication hook."""
        piece = self.pieces.get(view.name)
        if piece is None:
            return None
        if (piece[0], piece[1]) != (view.start, view.numel):
            raise MaskError(
                f"the child network of {view.name} covers [{piece[0]}, {piece[0] + piece[1]}) on "
                f"this rank, the gradient [{view.start}, {view.end}); rebuild it from the mask file"
            )
        idx = self.index(view.name)
        assert idx is not None  # a piece was found above
        keep = torch.zeros(view.numel, dtype=torch.bool, device=idx.device)
        keep[idx.long()] = True
        return keep

    def state_bytes(self) -> int:
        return sum(idx.numel() * idx.element_size() for _, _, idx in self.pieces.values())

    def child_entries(self) -> int:
        """Child entries held by this rank."""
        return sum(idx.numel() for _, _, idx in self.pieces.values())


class ChildAdamW(torch.optim.Optimizer):
    """AdamW (decoupled decay, as ``torch.optim.AdamW``) whose state covers only the child entries
    of CT-D candidate parameters, and every entry of the others.

    ``params``: parameter groups of ``(canonical name, parameter)`` pairs; names key the mask.
    Parameters may be DTensors (FSDP2): only their local shard is read or written.
    State (per parameter, local): ``step``; fp32 ``exp_avg``, ``exp_avg_sq`` of length
    ``len(index)`` (candidates) or the local numel (others); fp32 ``master`` when the parameter is
    bf16/fp16. ``state_dict()`` holds this rank's packed buffers; sharded backends call
    ``save_sharded_state``/``load_sharded_state`` (``ShardedStateOptimizer``) instead, which
    write them with ``ctscale.storage.child_optim_state`` (global offsets, loadable at any world size).
    """

    def __init__(
        self,
        params: Any,
        child: ChildMask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.child = child
        for group in self.param_groups:
            if group["params"] and "param_names" not in group:
                raise TypeError("ChildAdamW needs (name, parameter) pairs: the child mask is keyed by name")
        for name, p in self.named_params():
            piece = child.pieces.get(name)
            if piece is not None and piece[1] != local_shard(p).numel():
                raise MaskError(
                    f"the child network of {name} has {piece[1]} local entries, the parameter "
                    f"{local_shard(p).numel()} on this rank; rebuild it from the mask file"
                )

    def named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, parameter) in the optimizer's index order."""
        for group in self.param_groups:
            yield from zip(group.get("param_names", []), group["params"])

    def piece_length(self, name: str, p: torch.Tensor) -> int:
        """Entries of ``p``'s state on this rank: its child entries (candidates) or its local numel."""
        idx = self.child.index(name)
        return local_shard(p).numel() if idx is None else idx.numel()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for name, p in zip(group.get("param_names", []), group["params"]):
                if p.grad is not None:  # as torch's AdamW: no gradient, no step (and no decay)
                    self._update(p, self.child.index(name, local_shard(p).device), group)
        return loss

    def _update(self, p: torch.Tensor, idx: torch.Tensor | None, group: dict) -> None:
        """One AdamW step of this rank's piece of ``p``; ``idx``: child positions or None (all)."""
        lr, wd, eps, (beta1, beta2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
        w = local_shard(p).view(-1)  # a view: writes land in the parameter (shard)
        assert p.grad is not None  # step() updates only parameters with a gradient
        grad = local_shard(p.grad).view(-1)
        state = self.state[p]
        if not state:
            n = w.numel() if idx is None else idx.numel()
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=w.device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=w.device)
            if w.dtype != torch.float32:  # mixed precision: fp32 master of the trained entries only
                state["master"] = (w if idx is None else w.index_select(0, idx)).float()
        state["step"] += 1
        step = state["step"].item()
        if wd:
            # every entry, child or not, exactly as dense AdamW decays it: no state needed
            w.mul_(1 - lr * wd)
        g = (grad if idx is None else grad.index_select(0, idx)).float()
        m, v, master = state["exp_avg"], state["exp_avg_sq"], state.get("master")
        # torch.optim.AdamW's single-tensor arithmetic, op for op, on the packed buffers
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        if master is not None:
            if wd:
                master.mul_(1 - lr * wd)
            new = master
        else:
            new = w if idx is None else w.index_select(0, idx)  # dense fp32: update in place
        new.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
        if idx is not None:
            w.index_put_((idx,), new.to(w.dtype))
        elif master is not None:
            w.copy_(master)

    def save_sharded_state(self, path: Path) -> None:
        """Collective: this rank's packed buffers with their global offsets, into ``path``."""
        from ctscale.storage.child_optim_state import save_child_state  # it imports this module

        save_child_state(self, path)

    def load_sharded_state(self, path: Path) -> None:
        """Collective: this rank's piece of what ``save_sharded_state`` wrote, at any world size."""
        from ctscale.storage.child_optim_state import load_child_state  # it imports this module

        load_child_state(self, path)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but packed fp32 buffers are not cast to the parameter dtype, and their
        sizes are checked against this rank's child network."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # groups: lr, betas, decay, names
        named = list(self.named_params())
        for i, s in saved.items():
            name, p = named[int(i)]
            n = self.piece_length(name, p)
            if s["exp_avg"].numel() != n:
                raise CtscaleError(
                    f"child-only AdamW state of {name} holds {s['exp_avg'].numel()} entries, this "
                    f"rank's piece of the child network {n}: the checkpoint was written with another "
                    "mask or sharding; resume with the same mask and world size"
                )
            device = local_shard(p).device
            self.state[p] = {k: v if k == "step" else v.to(device) for k, v in s.items()}
