"""Child-Tuning for an existing Hugging Face ``transformers.Trainer`` script, in two lines.

    from ctscale.hf import ChildTuningCallback
    trainer.add_callback(ChildTuningCallback("ct-f", reserve_p=0.3))   # or callbacks=[...]

The callback masks the gradient where the engine keeps it, with ctscale's own strategies
(``ctscale.methods``), touching only this rank's local shard, with no collective per step:

- one process and DDP: the whole (all-reduced) ``p.grad`` of every parameter;
- FSDP2 (accelerate ``fsdp_version: 2`` or transformers' ``DistributedConfig(fsdp_size=N)``):
  the rank's ``Shard(0)`` rows, ``p.grad.to_local()``, after the reduce-scatter (the same views
  as ``ctscale.backends.fsdp``);
- DeepSpeed ZeRO-1/2/3 (accelerate): the rank's fp32 gradient partition (the same views as
  ``ctscale.backends.zero_views``), masked inside the ZeRO optimizer's ``step()``.

Order, per engine, each exact:
- one process, DDP, FSDP2: **clip, then mask** (the reference implementation's order: its mask
  lived inside ``AdamW.step``). The Trainer clips in its loop, then calls
  ``on_pre_optimizer_step``, the last hook before ``optimizer.step()``; the mask applies there.
- DeepSpeed: **mask, then clip** (``ctscale train``'s order). The Trainer's backward runs
  ``engine.step()`` itself, and ZeRO clips inside its optimizer's ``step()``; no Trainer hook
  sits between the reduction and the update, so the callback wraps that ``step()`` and masks
  the partitions on entry.
With ``max_grad_norm=0`` every order is the same update.

Masks: CT-F draws ``M ~ Bernoulli(p)`` per entry per optimizer step from ctscale's counter hash
of (seed, step, canonical name, flat index), so it is the same at any world size; the step is
``state.global_step`` (0-based) and the seed ``mask_seed`` or else ``TrainingArguments.seed``.
CT-D uses a fixed child network, from ``mask_file`` (written by ``ctscale fisher`` or a previous
run) or from a Fisher pass run by the callback before the first step over ``fisher_batches``
global batches of the Trainer's own training dataloader (default: one epoch), with ctscale's
estimator (``ctscale.methods.ct_d.fisher``: per-tensor clip of each global batch's reduced gradient, squares
averaged; exact distributed top-p), with dropout off unless ``fisher_dropout`` (as
``fisher.dropout``: otherwise the mask depends on the world size). The mask is saved in
``output_dir`` and a resumed run reloads it.

LoRA (a PEFT model: trainable ``lora_A``/``lora_B`` adapter tensors): CT-D selects within
``lora_B`` only, and every ``lora_A`` entry trains. LoRA initialises B to zero, so at the
Fisher pass the gradient of A (``B^T`` times the output gradient) is exactly zero: a global
top-p over A and B would keep no entry of A and freeze it for the whole run. The default
candidates of a PEFT model are therefore ``lora_B``; candidates that match a ``lora_A`` tensor
are refused with this reason (``ctscale.methods.ct_d.lora_scope``). Any candidate tensor whose Fisher is all zero,
in any model, is reported in one warning (``ctscale.methods.ct_d.fisher.select_child``).

What it reports: at ``on_train_begin`` one console line on rank 0 (the Fisher pass's batches
and seconds, the mask's selected/total entries), and the same numbers as
``child_tuning/*`` keys merged into the Trainer's first log record (``state.log_history``,
``trainer_state.json``, and the callbacks that run after this one, such as the progress bar).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ctscale import dist
from ctscale.backends.hf_views import LocalShards, ZeroShards, zero_optimizer
from ctscale.config import Config
from ctscale.errors import ConfigError, CtscaleError, MaskError
from ctscale.methods import method_names
from ctscale.methods.base import MaskStrategy
from ctscale.methods.ct_d import lora_scope
from ctscale.methods.ct_d.fisher import FisherAccumulator, fisher_mode
from ctscale.methods.registry import MethodSpec, build_strategy, get_method


class ChildTuningCallback(TrainerCallback):
    """CT-F or CT-D in a ``transformers.Trainer``; see the module docstring for the semantics.

    method:        a registered method (``ctscale.methods.method_names()``): "ct-f" (a fresh
                   random child every step, ``grad * M / p``), "ct-d" (a fixed child network
                   chosen by Fisher information, ``grad * M``), or any other registered one.
    reserve_p:     fraction of entries kept, in (0, 1].
    mask_seed:     CT-F seed (default ``TrainingArguments.seed``).
    mask_file:     CT-D: a saved ctscale mask (``ctscale fisher`` or a previous run); skips the
                   Fisher pass. Must fit the model (names and shapes are checked).
    fisher_batches: CT-D Fisher pass length in global batches (default: one epoch).
    fisher_max_grad_norm: per-tensor clip of each batch's gradient before squaring (0: off).
    fisher_dropout: dropout on during the Fisher pass (the reference's estimator; the mask then
                   depends on the world size). Default off, as ``ctscale``'s ``fisher.dropout``.
    candidates, exclude: CT-D scope, regexes searched in parameter names (default the
                   transformer blocks, "layer", as the reference; for a PEFT/LoRA model,
                   ``lora_B`` only: see the module docstring).
    mask_out:      where the Fisher pass saves the mask (default ``output_dir/mask.safetensors``
                   at world size 1, ``output_dir/mask/`` otherwise).
    """

    def __init__(
        self,
        method: str = "ct-f",
        reserve_p: float = 0.3,
        mask_seed: int | None = None,
        mask_file: str | os.PathLike | None = None,
        fisher_batches: int | None = None,
        fisher_max_grad_norm: float = 1.0,
        fisher_dropout: bool = False,
        candidates: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        mask_out: str | os.PathLike | None = None,
    ) -> None:
        if method not in method_names():
            raise ConfigError(
                f"ChildTuningCallback: method={method!r}; use one of {', '.join(map(repr, method_names()))}"
            )
        spec = get_method(method)
        if not 0.0 < reserve_p <= 1.0:
            raise ConfigError(f"ChildTuningCallback: reserve_p={reserve_p} must be in (0, 1]")
        if not spec.reads_mask_file and (mask_file is not None or fisher_batches is not None):
            readers = " or ".join(repr(n) for n in method_names() if get_method(n).reads_mask_file)
            raise ConfigError(
                f"ChildTuningCallback: mask_file and fisher_batches are CT-D options (a saved or "
                f"Fisher-estimated child network); method={method!r} reads neither, use method={readers}"
            )
        if fisher_batches is not None and fisher_batches < 1:
            raise ConfigError(f"ChildTuningCallback: fisher_batches={fisher_batches} must be >= 1")
        self.method = method
        self.spec: MethodSpec = spec
        self.reserve_p = reserve_p
        self.mask_seed = mask_seed
        self.mask_file = None if mask_file is None else str(mask_file)
        self.fisher_batches = fisher_batches
        self.fisher_max_grad_norm = fisher_max_grad_norm
        self.fisher_dropout = fisher_dropout
        self.candidates = None if candidates is None else list(candidates)
        self.exclude = list(exclude)
        self.mask_out = None if mask_out is None else str(mask_out)
        self.strategy: MaskStrategy | None = None
        self.shards: LocalShards | ZeroShards | None = None
        self.masked_steps = 0  # optimizer steps masked so far in this train() call
        self._pending: int | None = None  # the global step masked but not yet ended
        self._unhook = _nothing  # undoes the DeepSpeed step hook
        self.summary: dict[str, float] = {}  # child_tuning/* numbers, see _summarise
        self._summary_logged = False

    # -- set-up ---------------------------------------------------------------------------
    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs
    ):
        if model is None:
            raise CtscaleError("ChildTuningCallback: the Trainer passed no model to on_train_begin")
        zero = zero_optimizer(model, optimizer)
        self.shards = ZeroShards(model, zero) if zero is not None else LocalShards(model)
        self.masked_steps, self._pending = 0, None
        self.summary, self._summary_logged = {"child_tuning/reserve_p": self.reserve_p}, False
        self.strategy = self._build_strategy(args, state, model, train_dataloader, deepspeed=zero is not None)
        if zero is not None:
            self._hook_zero_step(zero, state)
        if dist.is_main():
            tqdm.write(self._describe())

    def _describe(self) -> str:
        """The console line on the child network: ``child-tuning: ct-d, 5,126 of 17,088 ...``."""
        return f"child-tuning: {self._child_line}"

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Merge the ``child_tuning/*`` summary into the first record the Trainer logs (its
        ``log_history`` entry too: the Trainer appended a copy before calling back)."""
        if self._summary_logged or logs is None:
            return
        logs.update(self.summary)
        if state.log_history:
            state.log_history[-1].update(self.summary)
        self._summary_logged = True

    def _config(self, args, model: torch.nn.Module) -> Config:
        """The ctscale config this callback's arguments and the Trainer's stand for (the method,
        CT-D's Fisher settings and scope, the run directory), read by the method's ``build``."""
        assert self.shards is not None
        cfg = Config()
        cfg.method.name, cfg.method.reserve_p = self.method, self.reserve_p
        cfg.method.mask_seed, cfg.method.mask_file = self.mask_seed, self.mask_file
        cfg.train.seed, cfg.train.output_dir = args.seed, str(args.output_dir)
        cfg.model.name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "")
        cfg.data.task = "hf-trainer"
        cfg.fisher.candidates = lora_scope.ctd_scope(
            self.candidates, self.exclude, self.shards.param_shapes()
        )
        cfg.fisher.exclude = list(self.exclude)
        cfg.fisher.max_grad_norm, cfg.fisher.dropout = self.fisher_max_grad_norm, self.fisher_dropout
        return cfg

    def _build_strategy(self, args, state, model, loader, deepspeed: bool) -> MaskStrategy:
        """The method's strategy, built by the method (``ctscale.methods``) as ``ctscale train``
        builds it; the Fisher pass, where the method runs one, is ``_fisher_pass``."""
        if deepspeed and self.spec.fisher_pass and self.mask_file is None:
            raise ConfigError(
                f"ChildTuningCallback: method {self.method!r} makes its child network with a Fisher "
                "pass, and CT-D under DeepSpeed needs mask_file= (the Fisher pass runs outside "
                "DeepSpeed's step); make the mask with `ctscale fisher`, or with this callback in a "
                "1-process/DDP/FSDP2 run of the same model and data"
            )
        cfg = self._config(args, model)
        path, resumed = None, None
        if self.spec.mask_path is not None:
            path = self.mask_file or self.mask_out or self.spec.mask_path(cfg, None)
            assert path is not None  # a method with a mask path names one for every config
            if self.mask_file is None and state.global_step > 0:  # a resumed run keeps its child
                if not Path(path).exists():
                    raise MaskError(
                        f"resuming at step {state.global_step} but the run's mask {path} is missing; "
                        "pass mask_file= (a Fisher pass on trained weights would pick another child)"
                    )
                resumed = path

        def fisher_pass(fisher: FisherAccumulator) -> None:
            self._fisher_pass(args, model, loader, fisher)

        seconds: dict[str, float] = {}
        assert self.shards is not None  # set in on_train_begin, before this
        strategy = build_strategy(cfg, self.shards, fisher_pass, resumed, seconds, self.mask_out)
        if path is not None:
            lora_scope.refuse_frozen_lora_a(path)
        child = self.spec.describe(cfg, path, seconds) if self.spec.describe else None
        self._child_line = child.line if child else self.method
        if child is not None and child.selected is not None and child.total is not None:
            self.summary |= {"child_tuning/selected": child.selected, "child_tuning/total": child.total}
        if child is not None and child.fisher_batches is not None:
            self.summary |= {
                "child_tuning/fisher_batches": child.fisher_batches,
                "child_tuning/fisher_seconds": seconds["fisher"],
            }
        return strategy

    def _hook_zero_step(self, zero: Any, state) -> None:
        """DeepSpeed: the Trainer's backward runs ``engine.step()`` itself, which clips and
        updates inside the ZeRO optimizer's ``step()``; mask the reduced partitions first.
        Instance attribute, removed again in ``on_train_end``."""
        original, shards = zero.step, self.shards
        assert isinstance(shards, ZeroShards)  # on_train_begin chose them for this optimizer

        def step(*a: Any, **kw: Any) -> Any:
            self._apply(state.global_step)
            shards.renorm_if_offloaded()
            return original(*a, **kw)

        zero.step = step

        def unhook() -> None:
            if zero.__dict__.get("step") is step:
                del zero.step

        self._unhook = unhook

    def _fisher_pass(self, args, model: torch.nn.Module, loader, fisher: FisherAccumulator) -> None:
        """CT-D's Fisher pass over global batches of the Trainer's ``loader`` (the method's
        estimator, selection and saving do the rest). Collective."""
        # not ZeroShards: a Fisher pass under DeepSpeed needs mask_file (_build_strategy)
        assert isinstance(self.shards, LocalShards)
        accum = args.gradient_accumulation_steps
        available = len(loader) // accum
        batches = self.fisher_batches or available
        if batches > available:
            raise ConfigError(
                f"ChildTuningCallback: fisher_batches={batches} but one epoch holds {available} "
                f"global batches; lower fisher_batches"
            )
        was_training = model.training
        model.train()  # as ctscale's Fisher pass: training mode, dropout per fisher_dropout
        micro = iter(loader)
        with fisher_mode(model, self.fisher_dropout) as model_step:
            for _ in range(batches):
                for _ in range(accum):
                    batch = next(micro)  # a shuffling loader draws random numbers: not in model_step
                    with model_step():
                        (model(**batch).loss / accum).backward()  # FSDP2: reduce-scattered here
                self.shards.reduce_replicas()  # DDP: the average over ranks, as DDP's backward
                fisher.add(self.shards.grad_views())
                model.zero_grad(set_to_none=True)
        model.train(was_training)

    # -- every optimizer step -------------------------------------------------------------
    def _apply(self, step: int) -> None:
        """Mask this rank's local shards in place for optimizer step ``step``. No communication."""
        if self.strategy is None or self.shards is None:
            raise CtscaleError(
                "ChildTuningCallback: on_train_begin did not run; add the callback before train()"
            )
        for view in self.shards.grad_views():
            self.strategy.apply(view, step)
        self._pending = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """After the Trainer's reduction and clipping, before ``optimizer.step()``. Under
        DeepSpeed the update has already happened (masked in the hooked ZeRO step)."""
        if not isinstance(self.shards, ZeroShards):
            self._apply(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # the step counter has advanced: the update just made must be the one we masked
        if self._pending != state.global_step - 1:
            raise CtscaleError(
                f"ChildTuningCallback: optimizer step {state.global_step - 1} ran without a mask "
                "(on_pre_optimizer_step was not called); this Trainer loop is not supported"
            )
        self.masked_steps += 1
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        self._unhook()
        self._unhook = _nothing


def _nothing() -> None:
    return None
