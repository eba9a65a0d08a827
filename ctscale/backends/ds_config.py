"""The DeepSpeed JSON a run uses: the user's file (or a built-in default) with ctscale's values
filled in, and every contradiction refused. Pure JSON work: no ``deepspeed`` import, so a bad
config fails in about a second, before any process group or DeepSpeed op build.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctscale import batching
from ctscale.config import Config
from ctscale.errors import ConfigError

# Used when distributed.deepspeed_config is not set (distributed.zero_stage picks the stage).
DEFAULT_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": 2}}


def check_section(cfg: Config, where: str = "") -> None:
    """The DeepSpeed backend's rules on the config alone (no file read): run by config validation
    (``ctscale.backends.check_section``) when ``distributed.backend`` is ``deepspeed``.
    ``where``: `` in FILE`` for the message, or empty."""
    d = cfg.distributed
    if not (d.deepspeed_config or d.zero_stage is not None):
        raise ConfigError(
            f"distributed.backend 'deepspeed' needs a DeepSpeed setup{where}; set "
            "distributed.deepspeed_config to a DeepSpeed JSON file or "
            "distributed.zero_stage to 0..3"
        )
    if cfg.method.child_only_optimizer:
        raise ConfigError(child_only_refusal(where))


def child_only_refusal(where: str = "") -> str:
    """Why ZeRO cannot take a child-only optimizer (config validation and ``replace_optimizer``)."""
    return (
        f"method.child_only_optimizer is not supported with distributed.backend 'deepspeed'"
        f"{where}: ZeRO's optimizer owns the fp32 master partitions and steps them as flat "
        "groups, so it keeps state for every entry; use distributed.backend fsdp, ddp or local, "
        "or set method.child_only_optimizer=false"
    )


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` at ``world_size``: JSON (or default) + ctscale values.

    "auto" or missing batch/accumulation/clipping/bf16 values are filled from ``cfg.train``;
    a value that contradicts it raises ConfigError naming both and the fix.
    """
    d, t = cfg.distributed, cfg.train
    src = d.deepspeed_config or "the built-in DeepSpeed config"
    ds = _load_json(d.deepspeed_config) if d.deepspeed_config else json.loads(json.dumps(DEFAULT_CONFIG))
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{src}: zero_optimization must be a JSON object, got {zero!r}")
    stage = d.zero_stage if d.zero_stage is not None else zero.get("stage", 0)
    if stage not in (1, 2, 3) or isinstance(stage, bool):
        hint = "; stage 0 is plain data parallelism: use distributed.backend=ddp" if stage == 0 else ""
        raise ConfigError(
            f"{src}: ZeRO stage {stage!r} is not supported by the deepspeed backend; set "
            f"zero_optimization.stage (or distributed.zero_stage) to 1, 2 or 3{hint}"
        )
    zero["stage"] = stage
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{src}: remove the '{section}' section; ctscale builds AdamW and the linear warmup "
                "schedule itself from train.lr, train.weight_decay and train.warmup_ratio"
            )
    if get_path(ds, "fp16.enabled") == "auto":  # common in Hugging Face style configs
        _set(ds, "fp16.enabled", False)
    if get_path(ds, "fp16.enabled") is True:
        # dynamic loss scaling silently skips optimizer steps on overflow (fewer updates than
        # train.max_steps, lost CT-F draws) and ctscale has no fp16 reference path to test against
        raise ConfigError(
            f"{src}: fp16 is not supported (DeepSpeed's loss scaler skips overflowing steps, so the run "
            "would silently train fewer steps than configured); remove the fp16 section and set "
            "train.bf16=true (ds_configs/zero2_bf16.json, zero3_bf16.json)"
        )
    offload = {}
    for key in ("offload_optimizer", "offload_param"):
        device = str((zero.get(key) or {}).get("device", "none"))
        if device not in ("none", "cpu"):
            # NVMe (DeepSpeed's async_io op, needs libaio) runs on CPU, but the fp32 gradient
            # partitions are swapped out to disk at the boundary: a mask on a swapped-in view
            # would need a write-back plus renorm per sub-group (not implemented, not tested)
            raise ConfigError(
                f'{src}: zero_optimization.{key}.device="{device}" is not supported (ctscale masks '
                'gradients in memory; NVMe swapping is untested with masks); use "cpu" '
                '(ds_configs/zero3_offload.json) or "none"'
            )
        offload[key] = device == "cpu"
    if offload["offload_optimizer"]:
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError(
                f"{src}: zero_force_ds_cpu_optimizer=true would reject ctscale's own AdamW under optimizer "
                "offload; set it to false or remove it"
            )
        if get_path(ds, "bf16.bf16_master_weights_and_grads") is True:
            raise ConfigError(
                f"{src}: bf16.bf16_master_weights_and_grads with offload_optimizer needs DeepSpeed's CPU "
                "Adam, which ctscale's own AdamW replaces; remove the offload_optimizer section "
                "(bf16 masters and bf16 optimizer states already fit in 8 bytes per parameter)"
            )
        ds["zero_force_ds_cpu_optimizer"] = False  # the client torch AdamW steps the CPU partitions
    micro = batching.micro_batch_size(t.batch_size, t.grad_accum, world_size)
    derived = {  # DeepSpeed key -> (value from ctscale, the ctscale key it comes from)
        "train_batch_size": (t.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "train_micro_batch_size_per_gpu": (
            micro,
            f"train.batch_size / (train.grad_accum x world size {world_size})",
        ),
        "gradient_clipping": (t.max_grad_norm, "train.max_grad_norm"),
        "bf16.enabled": (t.bf16, "train.bf16"),
    }
    for key, (value, origin) in derived.items():
        given = get_path(ds, key)
        if given is None or given == "auto":
            _set(ds, key, value)
        elif given != value or isinstance(given, bool) != isinstance(value, bool):
            raise ConfigError(
                f'{src}: {key}={given!r} contradicts {origin}={value!r}; set {key} to "auto" '
                f"(or {value!r}) in the DeepSpeed JSON, or change {origin}"
            )
    _check_bf16_masters(ds, src, t.bf16)
    for path in _autos(ds):
        raise ConfigError(
            f'{src}: {path}="auto" is not resolved by ctscale (only {", ".join(derived)} are); '
            "set a number or remove the key to use DeepSpeed's default"
        )
    ds.setdefault("zero_allow_untested_optimizer", True)  # the client torch AdamW
    ds.setdefault("steps_per_print", 2**31 - 1)  # ctscale logs progress itself
    return ds


def _check_bf16_masters(ds: dict[str, Any], src: str, train_bf16: bool) -> None:
    """bf16 master weights (and optimizer states): the low-memory ZeRO mode, 8 B per parameter
    with AdamW. Refused where DeepSpeed would fail later or silently keep fp32 states."""
    masters = get_path(ds, "bf16.bf16_master_weights_and_grads")
    states = get_path(ds, "bf16.bf16_optimizer_states")
    if states is True and masters is not True:
        raise ConfigError(
            f"{src}: bf16.bf16_optimizer_states=true needs bf16.bf16_master_weights_and_grads=true; "
            "set both (ds_configs/zero3_bf16_masters.json) or remove bf16_optimizer_states"
        )
    if masters is True and not train_bf16:
        raise ConfigError(
            f"{src}: bf16.bf16_master_weights_and_grads=true needs bf16 training; set train.bf16=true"
        )


def _load_json(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"distributed.deepspeed_config: file not found: {path}; check the path, or unset it "
            "and set distributed.zero_stage to use the built-in config"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"invalid JSON in DeepSpeed config {path} at line {err.lineno}, column {err.colno}: "
            f"{err.msg}; fix the syntax there (double-quoted keys, no trailing commas)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {err}; make it readable UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object, got {type(data).__name__}")
    return data


def get_path(ds: dict, dotted: str) -> Any:
    """The value at ``a.b.c`` in a nested dict, or None where a level is missing."""
    node: Any = ds
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(ds: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        ds = ds.setdefault(part, {})
    ds[last] = value


def _autos(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _autos(v, f"{prefix}{k}.")
    elif node == "auto":
        yield prefix[:-1]
