"""Where this rank's gradients live in a model that a Hugging Face ``Trainer`` trains: the engine
adapters of ``ctscale.hf.ChildTuningCallback``. Each gives the same views as the matching
backend (``ShardViews`` in ``ctscale.backends.base``): whole gradients (one process, DDP),
FSDP2 ``Shard(0)`` rows (``ctscale.backends.fsdp``), ZeRO partitions
(``ctscale.backends.zero_views``). Local, no communication (except DDP's Fisher-pass reduction).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from ctscale import dist
from ctscale.backends.fsdp import shard0_flat_range, shard0_grad_view
from ctscale.errors import ConfigError
from ctscale.methods.base import GradView

# prefixes that wrappers insert into parameter names; masks are keyed by the HF model's names
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """The parameter name in the unwrapped Hugging Face model."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class LocalShards:
    """Where this rank's gradients live in a model the Trainer is training (not DeepSpeed).

    Duck-types what ``ctscale.methods.ct_d.pipeline.load_fixed_mask`` needs from a backend (``param_shapes``,
    ``shard_ranges``). Ranges are computed once; gradients are read per step.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # flat parameters: neither the canonical names nor the flat ranges are visible
            raise ConfigError(
                "ChildTuningCallback supports FSDP2 (fully_shard), not FSDP1; set fsdp_version: 2 "
                "in the accelerate config (or fsdp_config={'version': 2} in TrainingArguments)"
            )
        self.params: list[tuple[str, torch.nn.Parameter, int, int]] = []
        self.sharded = False
        for raw, p in model.named_parameters():
            if not p.requires_grad:
                continue
            name = canonical_name(raw)
            if isinstance(p, DTensor):  # FSDP2: this rank's dim-0 rows
                mesh = p.device_mesh
                if mesh.ndim != 1:
                    raise ConfigError(
                        f"{name} is sharded on a {mesh.ndim}-D device mesh; ChildTuningCallback "
                        "supports FSDP2 on a 1-D mesh (plain fully_shard), not HSDP or TP"
                    )
                start, end = shard0_flat_range(name, p, mesh.get_local_rank(), mesh.size())
                self.sharded = True
            else:
                start, end = 0, p.numel()
            self.params.append((name, p, start, end))
        if not self.params:
            raise ConfigError("the model has no trainable parameter: Child-Tuning has nothing to mask")
        if self.sharded and not all(isinstance(p, DTensor) for _, p, _, _ in self.params):
            raise ConfigError("some parameters are DTensors and some are not: unsupported sharding")

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p, _, _ in self.params}  # DTensor shape is global

    def shard_ranges(self) -> list[GradView]:
        return [GradView(n, tuple(p.shape), s, e) for n, p, s, e in self.params]

    def grad_views(self) -> Iterator[GradView]:
        """This rank's reduced gradient pieces, flat views of the storage the optimizer reads."""
        for name, p, start, end in self.params:
            if p.grad is None:
                continue
            if self.sharded:
                yield shard0_grad_view(name, p, start, end)
            else:
                yield GradView(name, tuple(p.shape), start, end, p.grad.view(-1))

    def reduce_replicas(self) -> None:
        """DDP's reduction (divide by the world size, then sum) for a backward run outside the
        DDP wrapper (the Fisher pass sees only the unwrapped model). Fisher pass only."""
        if self.sharded or dist.world_size() == 1:
            return  # FSDP2's own backward has reduce-scattered already
        for _, p, _, _ in self.params:
            if p.grad is not None:
                p.grad.div_(dist.world_size())
                dist.all_reduce_sum_(p.grad)


class ZeroShards:
    """This rank's reduced partitions under DeepSpeed ZeRO-1/2/3 (the Trainer through accelerate).

    The views come from ``ctscale.backends.zero_views`` (which imports deepspeed, so only when
    DeepSpeed runs) and are valid inside the ZeRO optimizer's ``step()``, where the callback applies the mask.
    """

    def __init__(self, model: torch.nn.Module, zero: Any) -> None:
        from ctscale.backends.zero_views import (
            local_flat_ranges,
            renorm_offloaded_grads,
            zero_partition_grad_views,
        )

        self._views, self._ranges, self._renorm = (
            zero_partition_grad_views,
            local_flat_ranges,
            renorm_offloaded_grads,
        )
        self.model, self.zero, self.rank = model, zero, dist.rank()
        self.sharded = True
        self.stage3 = type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3"
        self.offloaded = bool(
            getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)
        )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            n: tuple(getattr(p, "ds_shape", p.shape))
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }

    def shard_ranges(self) -> list[GradView]:
        return self._views(self.model, self.zero, self.rank, with_grads=False)

    def grad_views(self) -> Iterator[GradView]:
        yield from self._views(self.model, self.zero, self.rank)

    def renorm_if_offloaded(self) -> None:
        """Optimizer offload: DeepSpeed took each partition's gradient norm during the offload
        copy, before the mask; put the masked norms in their place, so clipping sees them."""
        if self.offloaded:
            params = [p for _, p, _, _ in self._ranges(self.model, self.stage3, self.rank)]
            self._renorm(self.zero, params, self.stage3)


_ZERO_OPTIMIZERS = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3")


def zero_optimizer(model: torch.nn.Module, optimizer: Any) -> Any | None:
    """The ZeRO optimizer when the Trainer runs DeepSpeed, else None; errors for DeepSpeed
    set-ups where the reduced gradient is never visible before it is used."""
    if type(optimizer).__name__ != "DeepSpeedOptimizerWrapper" and not any(
        hasattr(p, "ds_id") for p in model.parameters()
    ):
        return None
    zero = getattr(optimizer, "optimizer", None)
    if type(zero).__name__ not in _ZERO_OPTIMIZERS:
        raise ConfigError(
            f"ChildTuningCallback supports DeepSpeed ZeRO stages 1-3, not {type(zero).__name__} "
            "(ZeRO stage 0 or a DeepSpeed optimizer); set zero_optimization.stage to 1, 2 or 3, or use DDP"
        )
    if getattr(zero, "swap_optimizer", False) or getattr(zero, "params_in_nvme_and_cpu", False):
        raise ConfigError(
            "ChildTuningCallback: NVMe offload is not supported (the gradient partitions are on disk "
            'when the mask would apply); use "device": "cpu" in offload_optimizer / offload_param'
        )
    return zero
