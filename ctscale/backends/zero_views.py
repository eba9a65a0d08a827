"""ZeRO gradient views: where this rank's reduced gradient partition of each parameter lives
under DeepSpeed ZeRO-1/2/3, as flat ranges and 1-D views of the buffers the optimizer reads.
Local, no communication. Used by the DeepSpeed backend (``ctscale.backends.deepspeed``) and by
the Hugging Face Trainer adapter (``ctscale.backends.hf_views.ZeroShards``).

Private DeepSpeed state, checked against 0.19.8:
- ZeRO-1/2: ``p._hp_mapping`` (``lp_fragment_address`` = this rank's flat range of ``p``) and
  ``p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)`` = the entry of
  ``optimizer.averaged_gradients`` that ``step()`` flattens into the fp32 partition.
- ZeRO-3: ``optimizer._get_fp32_grad_state_partition(p)`` = the partition buffer that
  ``safe_get_local_grad`` copies from and ``step()`` reads; rank r holds
  ``[r * part, (r + 1) * part)`` of the flat tensor, ``part = p.ds_tensor.numel()`` (padded).
- Optimizer offload: DeepSpeed takes each parameter's gradient norm during the offload copy in
  backward, before any mask; ``renorm_offloaded_grads`` replaces them by the masked norms.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.zero.utils import get_norm_dtype

from ctscale.methods.base import GradView

# a Parameter that DeepSpeed has annotated (ds_tensor, ds_numel, ds_shape, _hp_mapping, ...)
ZeroParam = Any


def local_flat_ranges(
    module: torch.nn.Module, stage3: bool, rank: int
) -> list[tuple[str, ZeroParam, int, int]]:
    """(name, parameter, start, end) of each non-empty flat range of a trainable parameter that
    this rank's ZeRO partition holds (ZeRO-1/2: the fragment of the flat partition; ZeRO-3: the
    parameter's partition, padding excluded)."""
    out = []
    p: ZeroParam
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if stage3:
            part = p.ds_tensor.numel()  # partition size, padded so that part * world >= numel
            start, end = rank * part, min((rank + 1) * part, p.ds_numel)
        elif getattr(p, "_hp_mapping", None) is not None:
            address = p._hp_mapping.lp_fragment_address
            start, end = address.start, address.start + address.numel
        else:  # ZeRO-1/2: no element of p in this rank's partition
            continue
        if start < end:
            out.append((name, p, start, end))
    return out


def partition_grad(optimizer: Any, p: ZeroParam, stage3: bool, numel: int) -> torch.Tensor:
    """1-D view (length ``numel``) of the reduced gradient partition the ZeRO optimizer reads."""
    if stage3:
        grad, _ = optimizer._get_fp32_grad_state_partition(p, release_swap_buffers=False)
    else:
        grad = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
    flat = grad.view(-1)  # a view: raises rather than silently copying
    if flat.numel() != numel:  # ZeRO-3 padding; a whole-parameter buffer (bf16 optimizer)
        start = 0 if stage3 else p._hp_mapping.lp_fragment_address.start
        flat = flat.narrow(0, start, numel)
    return flat


def renorm_offloaded_grads(optimizer: Any, params: list[ZeroParam], stage3: bool) -> None:
    """Optimizer offload: DeepSpeed stored each parameter's local gradient norm during
    backward, before the mask; replace them by the norms of the masked local partitions of
    ``params`` (what ``step()`` sums into the clipping norm). Local only, no collective."""
    for p in params:
        if stage3:  # the whole padded partition, as DeepSpeed's safe_set_local_grad
            grad, _ = optimizer._get_fp32_grad_state_partition(p, release_swap_buffers=False)
            norm = optimizer._constant_buffered_norm2(grad)
        else:
            norm = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).to(get_norm_dtype()).norm(2)
        optimizer.norm_for_param_grads[optimizer.get_param_id(p)] = norm


def zero_partition_grad_views(
    module: torch.nn.Module, optimizer: Any, rank: int, with_grads: bool = True
) -> list[GradView]:
    """This rank's reduced gradient partitions under a ZeRO ``optimizer`` that someone else's
    loop drives (``ctscale.hf`` under the Hugging Face Trainer); the gradients are valid inside
    the optimizer's ``step()``, before it reads them (``with_grads=False``: ranges only, any
    time). The same ranges and buffers as ``DeepSpeedBackend``. Local, no communication."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    stage3 = isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)
    views = []
    for name, p, start, end in local_flat_ranges(module, stage3, rank):
        shape = tuple(p.ds_shape) if stage3 else tuple(p.shape)
        grad = partition_grad(optimizer, p, stage3, end - start) if with_grads else None
        views.append(GradView(name, shape, start, end, grad))
    return views
