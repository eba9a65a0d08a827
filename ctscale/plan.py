"""``ctscale train --dry-run``: what a run would do, without loading weights or writing a file.

    ctscale train --config configs/rte_minilm_ctd.yaml --dry-run
    torchrun --nproc_per_node 2 -m ctscale train --config CONFIG --set distributed.backend=ddp --dry-run

The plan is computed from the resolved config (already checked by the engine's
``check_config``), the tokenizer and the training data (sizes only) and the model built on the
meta device from its config (parameter count). Nothing is written and no process group starts,
so the world size is the launcher's ``WORLD_SIZE``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ctscale import batching, dist, rundir
from ctscale.config import Config
from ctscale.methods.registry import get_method

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def meta_parameter_count(cfg: Config, data: Any) -> int:
    """Trainable parameters of the model ``data.load_model`` would build, counted on the meta
    device from the model's config (no weights read): a classifier for GLUE and table tasks
    (``data.task`` holds the labels), a causal LM otherwise."""
    from ctscale.models import meta_model, parameter_shapes

    task = getattr(data, "task", None)
    shapes = parameter_shapes(meta_model(cfg.model, task if hasattr(task, "num_labels") else None))
    return sum(math.prod(shape) for shape in shapes.values())


def memory_estimate(cfg: Config, params: int, world: int, zero_stage: int | None) -> dict[str, float]:
    """Rough GiB per rank of weights, gradients and AdamW's two fp32 moments; what is sharded
    (ZeRO-1: moments; ZeRO-2: + gradients; ZeRO-3 and FSDP: everything) is divided by the world
    size. Activations, buffers, fp32 master copies and allocator slack are NOT included."""
    width = _DTYPE_BYTES.get(cfg.model.dtype, 4)
    weights, grads, adam = params * width, params * width, params * 8
    backend = cfg.distributed.backend
    sharded = {"weights": False, "grads": False, "adam": False}
    if backend == "fsdp" or (backend == "deepspeed" and (zero_stage or 0) >= 3):
        sharded = dict.fromkeys(sharded, True)
    elif backend == "deepspeed":
        sharded = {"weights": False, "grads": (zero_stage or 0) >= 2, "adam": (zero_stage or 0) >= 1}
    gib = 1024**3
    parts = {"weights": weights, "grads": grads, "adam": adam}
    out = {k: v / (world if sharded[k] else 1) / gib for k, v in parts.items()}
    return out | {"total": sum(out.values())}


def build_plan(cfg: Config) -> dict[str, Any]:
    """The plan of ``ctscale train`` for ``cfg``: reads the tokenizer and the data, never the
    weights. Raises the same errors as training would for bad data or batch sizes."""
    from ctscale.errors import DataError
    from ctscale.methods.registry import preflight
    from ctscale.models import load_tokenizer
    from ctscale.tasks import load_task_data

    t = cfg.train
    world = dist.env_world_size()
    micro = batching.micro_batch_size(t.batch_size, t.grad_accum, world)
    # the run's own refusal of a finished or different run in output_dir (reads only; the
    # writability probe, which creates a file, is left to the run)
    previous = rundir.check_reuse(Path(t.output_dir), cfg)
    preflight(cfg)
    data = load_task_data(cfg, load_tokenizer(cfg.model))
    per_epoch = batching.steps_per_epoch(data.train_size, t.batch_size)
    if per_epoch == 0:
        raise DataError(
            f"the training set ({data.train_size} examples) is smaller than one global "
            f"batch (train.batch_size={t.batch_size})"
        )
    steps = t.max_steps or per_epoch * t.epochs
    zero_stage = None
    if cfg.distributed.backend == "deepspeed":
        from ctscale.backends.ds_config import build_ds_config

        zero_stage = int(build_ds_config(cfg, world)["zero_optimization"].get("stage", 0))
    params = meta_parameter_count(cfg, data)
    return {
        "backend": cfg.distributed.backend + ("" if zero_stage is None else f" (ZeRO-{zero_stage})"),
        "world_size": world,
        "global_batch": t.batch_size,
        "micro_batch": micro,
        "grad_accum": t.grad_accum,
        "train_examples": data.train_size,
        "steps_per_epoch": per_epoch,
        "steps": steps,
        "warmup_steps": math.ceil(t.warmup_ratio * steps),
        "mask": mask_source(cfg, data.train_size),
        "parameters": params,
        "memory_gib_per_rank": memory_estimate(cfg, params, world, zero_stage),
        "output_dir": t.output_dir
        + ("" if not previous else " (resumes the run there)" if t.resume else " (replaces the run there)"),
    }


def mask_source(cfg: Config, train_size: int) -> str:
    """Where the run's child network comes from, in words (the method's ``plan``)."""
    return get_method(cfg.method.name).plan(cfg, train_size)


def format_plan(plan: dict[str, Any]) -> list[str]:
    """Text lines of ``build_plan``'s result."""
    mem = plan["memory_gib_per_rank"]
    return [
        "dry run: nothing loaded beyond tokenizer and data, nothing written",
        f"  backend: {plan['backend']}, world size {plan['world_size']} (launcher WORLD_SIZE)",
        f"  batch: global {plan['global_batch']} = micro {plan['micro_batch']} x grad_accum "
        f"{plan['grad_accum']} x world {plan['world_size']}",
        f"  data: {plan['train_examples']} training examples, {plan['steps_per_epoch']} steps per epoch",
        f"  steps: {plan['steps']} optimizer steps ({plan['warmup_steps']} warm-up)",
        f"  mask: {plan['mask']}",
        f"  parameters: {plan['parameters']:,} trainable",
        f"  memory per rank (estimate: weights {mem['weights']:.3f} + grads {mem['grads']:.3f} + "
        f"AdamW {mem['adam']:.3f} GiB; no activations): {mem['total']:.3f} GiB",
        f"  output_dir: {plan['output_dir']}",
    ]
