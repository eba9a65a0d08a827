"""DeepSpeed ZeRO-1/2/3: each rank holds a flat range of every gradient after reduction.

With ``zero_views``, the only modules that import ``deepspeed``. One optimizer step, as the
trainer drives it:

    forward_backward(mb, boundary=False)   # engine.backward scales by 1/GAS; step() off the
    ...                                    # boundary only advances DeepSpeed's micro-step count
    forward_backward(mb, boundary=True)    # reduce-scatter: this rank's partition is ready
    for view in grad_views(): mask(view)   # in place, local partition only, no collective
    step()                                 # engine.step(): grad norm, clip, AdamW, scheduler

Order: mask THEN clip. DeepSpeed computes the global gradient norm inside ``engine.step()``
from the partitions we have just masked, as the local backend clips after masking.

The engine: set-up, step, Fisher-pass ``zero_grad`` and checkpoints. Where each rank's gradient
partitions live (the views the mask writes into) is ``ctscale.backends.zero_views``; the
DeepSpeed JSON is ``ctscale.backends.ds_config``. Private DeepSpeed state, checked against 0.19.8:
- ``zero_grad`` (Fisher pass) repeats what DeepSpeed's own overflow-skip does: drop
  ``optimizer.averaged_gradients`` (ZeRO-1/2 also ``all_grad_tensors``,
  ``_release_preflattened_grad_buffers()``, ``micro_step_id``) and close the window with
  ``engine.micro_steps += 1``, as ``engine.step()`` would.
- Checkpoints: the flat fp32 partitions (``single_partition_of_fp32_groups`` /
  ``fp32_partitioned_groups_flat``) and the wrapped AdamW's state; after loading, the model is
  refreshed as ``step()`` does (``update_lp_params()`` / ``_reassign_or_swap_out_partitioned_
  parameters`` + ``persistent_parameters``).
- Optimizer offload (device "cpu"): the views are slices of the CPU fp32 gradient buffer
  the optimizer reads, but DeepSpeed takes each parameter's gradient norm during the offload
  copy in backward, before any mask. ``step()`` therefore recomputes those norms from the
  masked views (local, no collective), as DeepSpeed's own ``safe_set_local_grad`` does under
  ZeRO-3 offload, so clipping uses the masked norm. NVMe offload and fp16 are refused.
- bf16 masters (``bf16.bf16_master_weights_and_grads``, optionally ``bf16_optimizer_states``):
  the same views, in bf16; the model is built under ``zero.Init`` since there is no fp32 master
  to keep exact. Not with optimizer offload (DeepSpeed then wants its own CPU Adam).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

from ctscale import dist
from ctscale.backends.base import OptimizerFactory, SchedulerFactory
from ctscale.backends.ds_config import build_ds_config, child_only_refusal, get_path
from ctscale.backends.zero_views import ZeroParam, local_flat_ranges, partition_grad, renorm_offloaded_grads
from ctscale.config import Config
from ctscale.errors import ConfigError, CtscaleError
from ctscale.methods.base import GradView

_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def _init_distributed() -> torch.device:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA); one process without one."""
    if "WORLD_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        # python -m ctscale without a launcher: world size 1, same code path (house rule 2, CONTRIBUTING.md)
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    device = dist.default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # the process group comes from ctscale.dist, whose rendezvous survives a torchrun restart
    # (deepspeed.init_distributed's env:// one hangs in gloo's connect after a killed rank);
    # DeepSpeed then adopts the initialised group instead of creating its own
    dist.init_from_env()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return device


class DeepSpeedBackend:
    """ZeRO stage 1, 2 or 3 through ``deepspeed.initialize`` with the client AdamW and schedule."""

    def __init__(self, cfg: Config) -> None:
        # build_backend has checked the JSON before the process group existed; derived here
        # with the group's size (under mpirun only the group knows it)
        self.device = _init_distributed()
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.ds_config = build_ds_config(cfg, self.world_size)
        self.stage: int = self.ds_config["zero_optimization"]["stage"]
        offload = self.ds_config["zero_optimization"].get("offload_optimizer") or {}
        self._offload = offload.get("device", "none") == "cpu"
        # bf16 masters: the bf16 partitions are the masters; there is no fp32 copy to keep exact
        self._bf16_masters = get_path(self.ds_config, "bf16.bf16_master_weights_and_grads") is True
        self._hf_ds_config: Any = None  # transformers' HfDeepSpeedConfig while building under zero.Init

    @contextlib.contextmanager
    def model_init_context(self) -> Iterator[None]:
        """Build the model inside this for ZeRO-3: Hugging Face ``from_pretrained``/``from_config``
        then run under ``deepspeed.zero.Init`` and no rank materialises a full parameter.

        The switch is an ``HfDeepSpeedConfig`` that transformers holds by weak reference: it is
        alive only inside this context, so models built elsewhere in the process (a reference
        model in a test, a second run) are ordinary ones. Stages 1/2: nothing to do.

        Not with bf16 and fp32 masters: ``zero.Init`` would load the checkpoint straight into bf16
        partitions, so the fp32 masters could no longer be exact and CT-D's non-child entries
        would move. Such a model is therefore built whole (fp32, CPU) and partitioned by
        ``deepspeed.initialize``; it must fit in one rank's host memory. With bf16 masters
        (``bf16.bf16_master_weights_and_grads``) the bf16 partitions are the masters, so
        ``zero.Init`` loses nothing: non-child entries stay the checkpoint's bf16 values.
        """
        if self.stage != 3 or (self.ds_config["bf16"]["enabled"] and not self._bf16_masters):
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        try:
            yield
        finally:
            self._hf_ds_config = None

    def setup(
        self, model: torch.nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        # bf16: DeepSpeed casts the module to bf16 and builds its fp32 masters from that copy.
        # Keep the exact fp32 weights (CPU) to restore the masters, so entries that never get a
        # gradient (CT-D non-child, weight decay 0) stay bit-identical to the checkpoint.
        exact = {}
        if self.ds_config["bf16"]["enabled"] and not self._bf16_masters:
            exact = {
                n: p.detach().to("cpu", copy=True)
                for n, p in model.named_parameters()
                if p.requires_grad and p.dtype == torch.float32 and not hasattr(p, "ds_id")
            }
        _keep_used_weight_conversions(model)  # ZeRO-3 load: export the model's own key names
        optimizer = make_optimizer(model.named_parameters())
        scheduler = make_scheduler(optimizer)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.scheduler = scheduler
        self.module: torch.nn.Module = self.engine.module
        self._ranges = self._local_ranges()
        for name, p, start, end in self._ranges:
            if name in exact:
                self._set_local_master(p, exact[name].view(-1), start, end)

    def _set_local_master(self, p: ZeroParam, full: torch.Tensor, start: int, end: int) -> None:
        """Overwrite this rank's fp32 master entries ``[start, end)`` of ``p`` from its full flat
        value (local copies only, no communication)."""
        if self.stage == 3:  # the local setter wants the padded partition
            local = torch.nn.functional.pad(full[start:end], (0, p.ds_tensor.numel() - (end - start)))
            safe_set_local_fp32_param(p, local.to(self.device))
        else:  # ZeRO-1/2: the "full" setter copies just this rank's fragment
            safe_set_full_fp32_param(p, full.to(self.device))

    def communicate_survivors(self, strategy: object, step: int) -> None:
        raise ConfigError(
            "train.sparse_grad_comm is only supported with distributed.backend 'ddp'; DeepSpeed "
            "reduces through its own collectives (docs/sparse_comm.md)"
        )

    def replace_optimizer(self, make_optimizer: OptimizerFactory) -> None:
        """Refused: ZeRO's optimizer owns the fp32 master partitions and steps them as flat groups
        (``check_section`` refuses ``method.child_only_optimizer`` before a run starts)."""
        raise ConfigError(child_only_refusal())

    # -- gradients -------------------------------------------------------------------------
    def forward_backward(self, batch: dict[str, torch.Tensor], boundary: bool) -> float:
        if boundary != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"micro-batch boundary={boundary} but DeepSpeed expects "
                f"{self.engine.is_gradient_accumulation_boundary()}: the trainer must run exactly "
                f"gradient_accumulation_steps={self.engine.gradient_accumulation_steps()} micro-batches "
                "per step"
            )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.engine(**batch).loss
        self.engine.backward(loss)  # divides by GAS itself; reduces at the boundary
        if not boundary:
            self.engine.step()  # off the boundary: only counts the micro-step, no update
        return float(loss.detach())

    def _local_ranges(self) -> list[tuple[str, torch.nn.Parameter, int, int]]:
        """(canonical name, parameter, start, end) of every local non-empty flat range."""
        return local_flat_ranges(self.module, self.stage == 3, self.rank)

    def _local_grad(self, p: torch.nn.Parameter, numel: int) -> torch.Tensor:
        return partition_grad(self.optimizer, p, self.stage == 3, numel)

    def grad_views(self) -> Iterator[GradView]:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("grad_views() is valid only after the boundary micro-batch's backward")
        for name, p, start, end in self._ranges:
            yield GradView(name, self._shape(p), start, end, self._local_grad(p, end - start))

    def shard_ranges(self) -> list[GradView]:
        return [GradView(name, self._shape(p), start, end) for name, p, start, end in self._ranges]

    def _shape(self, p: ZeroParam) -> tuple[int, ...]:
        return tuple(p.ds_shape) if self.stage == 3 else tuple(p.shape)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: self._shape(p) for n, p in self.module.named_parameters() if p.requires_grad}

    def step(self) -> None:
        if self._offload:
            self._renorm_offloaded_grads()
        self.engine.step()  # global norm of the masked partitions, clip, AdamW, scheduler

    def _renorm_offloaded_grads(self) -> None:
        renorm_offloaded_grads(self.optimizer, [p for _, p, _, _ in self._ranges], self.stage == 3)

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm before clipping (of the masked partitions),
        which ZeRO computes in every step anyway; None before the first step."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def zero_grad(self) -> None:
        """Drop this window's reduced gradients without an update, as DeepSpeed's own
        overflow-skip does, and start the next accumulation window."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)  # ZeRO-3: also resets micro_step_id (next backward copies)
        if self.stage == 3:
            opt.averaged_gradients = {}
        else:
            opt._release_preflattened_grad_buffers()
            for group in opt.averaged_gradients:
                opt.averaged_gradients[group] = None  # bf16: the fp32 buffer it accumulates into
                opt.all_grad_tensors[group] = None
            opt.micro_step_id = -1  # INITIAL_MICRO_STEP_ID, as after step()
        if self._offload:  # the stored pre-mask norms and overflow flag, as after step()
            opt.reset_cpu_buffers()
            if hasattr(opt, "_offload_accumulated_param_ids"):
                opt._offload_accumulated_param_ids = set()
        self.engine.micro_steps += 1  # what engine.step() does at the end of every window

    # -- evaluation and output -------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        return self.engine(**batch).logits.float()  # ZeRO-3: gathers parameters (collective)

    def train_mode(self, training: bool) -> None:
        self.engine.train(training)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 master weights (canonical names, CPU) on rank 0; None elsewhere. Collective:
        one all-reduce (ZeRO-1/2) or all-gather (ZeRO-3) per parameter, in the same order."""
        full: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                value = safe_get_full_fp32_param(p)
            else:  # frozen: no fp32 master; gather the module's own copy
                gather = (
                    deepspeed.zero.GatheredParameters([p]) if self.stage == 3 else contextlib.nullcontext()
                )
                with gather:
                    value = p.data.clone()
            if self.rank == 0:
                full[name] = value.detach().reshape(self._shape(p)).cpu()
        if self.rank != 0:
            return None
        # buffers (and any tied alias) from the module; parameters from the fp32 masters
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items() if k not in full}
        tied = {n for n, _ in self.module.named_parameters(remove_duplicate=False)} - full.keys()
        for alias in tied & state.keys():
            owner = _same_param(self.module, alias)
            state[alias] = full[owner]
        return {**state, **full}

    def unwrapped_model(self) -> torch.nn.Module:
        return self.module

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # -- checkpoints: this rank's fp32 partitions and AdamW state, tensors only ---------------
    # Not engine.save_checkpoint: DeepSpeed's loader unpickles arbitrary objects, and ctscale
    # loads nothing with weights_only=False. Same world size and stage only (partitions are flat).
    def _masters(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partition per group: the params of the wrapped AdamW."""
        opt = self.optimizer
        return opt.fp32_partitioned_groups_flat if self.stage == 3 else opt.single_partition_of_fp32_groups

    @contextlib.contextmanager
    def _adamw_params(self) -> Iterator[None]:
        """ZeRO-3 empties the wrapped AdamW's param groups outside step(); fill them meanwhile,
        as DeepSpeed's own state_dict/load_state_dict do."""
        if self.stage == 3:
            self.optimizer._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            if self.stage == 3:
                self.optimizer._clear_fp32_optimizer_param_groups()

    def save_checkpoint(self, path: Path) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        with self._adamw_params():
            optimizer = self.optimizer.optimizer.state_dict()
        local = {"masters": self._masters(), "optimizer": optimizer, "rng": rng}
        torch.save(local, path / f"deepspeed-rank{self.rank:05d}.pt")
        if self.rank == 0:
            counters = {k: getattr(self.engine, k) for k in _ENGINE_COUNTERS}
            meta = {"world_size": self.world_size, "stage": self.stage, "engine": counters}
            torch.save(meta | {"scheduler": self.scheduler.state_dict()}, path / "deepspeed.pt")

    def load_checkpoint(self, path: Path) -> None:
        if not (path / "deepspeed.pt").is_file():
            raise CtscaleError(f"{path} holds no DeepSpeed checkpoint; resume with the backend that wrote it")
        meta = torch.load(path / "deepspeed.pt", map_location="cpu", weights_only=True)
        if (meta["world_size"], meta["stage"]) != (self.world_size, self.stage):
            raise CtscaleError(
                f"{path} was written by {meta['world_size']} ranks with ZeRO-{meta['stage']}; this run "
                f"has {self.world_size} ranks with ZeRO-{self.stage}. DeepSpeed partitions cannot be "
                "resharded: resume with the same world size and stage, or start a new output_dir"
            )
        local = torch.load(
            path / f"deepspeed-rank{self.rank:05d}.pt", map_location=self.device, weights_only=True
        )
        for master, saved in zip(self._masters(), local["masters"], strict=True):
            master.data.copy_(saved)
        with self._adamw_params():
            self.optimizer.optimizer.load_state_dict(local["optimizer"])
        self._masters_to_model()
        self.scheduler.load_state_dict(meta["scheduler"])
        for key, value in meta["engine"].items():
            setattr(self.engine, key, value)
        torch.set_rng_state(local["rng"]["cpu"])
        if "cuda" in local["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(local["rng"]["cuda"].cpu(), self.device)

    def _masters_to_model(self) -> None:
        """Refresh the model's (bit16 or fp32) parameters from the masters, as step() does."""
        opt = self.optimizer
        if self.stage != 3:
            opt.update_lp_params()  # copy into this rank's partition, then all-gather
            return
        for group in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(group)  # into p.ds_tensor
        if opt.persistent_parameters:  # kept whole on every rank: gather them again
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)


def _keep_used_weight_conversions(model: torch.nn.Module) -> None:
    """Forget checkpoint-key conversions that ``from_pretrained`` tried but never applied.

    transformers 5 records the conversions it used while loading (``_weight_conversions``) and
    ``save_pretrained`` reverts them, so an export has the checkpoint's original key names. Its
    ordinary loader keeps only the conversions that matched a key; its ZeRO-3 loader (under
    ``zero.Init``) keeps every one it tried, BERT's legacy ``LayerNorm.gamma``/``beta`` ->
    ``weight``/``bias`` renaming included, so the export "reverted" 26 LayerNorm tensors that
    were never renamed. Keep the used ones, as the ordinary loader does (seen with 5.24)."""
    for module in model.modules():
        conversions = getattr(module, "_weight_conversions", None)
        if conversions:
            used = [c for c in conversions if getattr(c, "was_used", lambda: True)()]
            module._weight_conversions = used  # type: ignore[assignment]  # transformers' own attribute


def _same_param(module: torch.nn.Module, alias: str) -> str:
    """The canonical (first) name of the parameter that ``alias`` also names (tied weights)."""
    target = module.get_parameter(alias)
    return next(n for n, p in module.named_parameters() if p is target)
