"""Child-Tuning for an existing Hugging Face ``transformers.Trainer`` script, in two lines.

    from ctscale.hf import ChildTuningCallback
    trainer.add_callback(ChildTuningCallback("ct-f", reserve_p=0.3))   # or callbacks=[...]

The callback masks the gradient where the engine keeps it, with ctscale's own strategies
(``ctscale.masks``), touching only this rank's local shard, with no collective per step:

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
estimator (``ctscale.fisher``: per-tensor clip of each global batch's reduced gradient, squares
averaged; exact distributed top-p), with dropout off unless ``fisher_dropout`` (as
``fisher.dropout``: otherwise the mask depends on the world size). The mask is saved in
``output_dir`` and a resumed run reloads it.

LoRA (a PEFT model: trainable ``lora_A``/``lora_B`` adapter tensors): CT-D selects within
``lora_B`` only, and every ``lora_A`` entry trains. LoRA initialises B to zero, so at the
Fisher pass the gradient of A (``B^T`` times the output gradient) is exactly zero: a global
top-p over A and B would keep no entry of A and freeze it for the whole run. The default
candidates of a PEFT model are therefore ``lora_B``; candidates that match a ``lora_A`` tensor
are refused with this reason (``ctscale.lora``). Any candidate tensor whose Fisher is all zero,
in any model, is reported in one warning (``ctscale.fisher.select_child``).

What it reports: at ``on_train_begin`` one console line on rank 0 (the Fisher pass's batches
and seconds, the mask's selected/total entries), and the same numbers as
``child_tuning/*`` keys merged into the Trainer's first log record (``state.log_history``,
``trainer_state.json``, and the callbacks that run after this one, such as the progress bar).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ctscale import dist, lora, store
from ctscale.backends.hf_views import LocalShards, ZeroShards, zero_optimizer
from ctscale.child import default_mask_path, describe_child, load_fixed_mask, save_child_network
from ctscale.errors import ConfigError, CtscaleError, MaskError
from ctscale.fisher import FisherAccumulator, candidate_filter, fisher_mode
from ctscale.masks import MaskStrategy, RandomChildMask


class ChildTuningCallback(TrainerCallback):
    """CT-F or CT-D in a ``transformers.Trainer``; see the module docstring for the semantics.

    method:        "ct-f" (a fresh random child every step, ``grad * M / p``) or "ct-d" (a fixed
                   child network chosen by Fisher information, ``grad * M``).
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
        if method not in ("ct-f", "ct-d"):
            raise ConfigError(f"ChildTuningCallback: method={method!r}; use 'ct-f' or 'ct-d'")
        if not 0.0 < reserve_p <= 1.0:
            raise ConfigError(f"ChildTuningCallback: reserve_p={reserve_p} must be in (0, 1]")
        if method == "ct-f" and (mask_file is not None or fisher_batches is not None):
            raise ConfigError(
                "ChildTuningCallback: mask_file and fisher_batches are CT-D options; use method='ct-d'"
            )
        if fisher_batches is not None and fisher_batches < 1:
            raise ConfigError(f"ChildTuningCallback: fisher_batches={fisher_batches} must be >= 1")
        self.method = method
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
        s = self.summary
        if self.method == "ct-f":
            return f"child-tuning: {describe_child('ct-f', self.reserve_p)}"
        fisher = None
        if "child_tuning/fisher_batches" in s:
            fisher = (int(s["child_tuning/fisher_batches"]), s["child_tuning/fisher_seconds"])
        selected, total = int(s["child_tuning/selected"]), int(s["child_tuning/total"])
        return f"child-tuning: {describe_child('ct-d', self.reserve_p, selected, total, fisher=fisher)}"

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Merge the ``child_tuning/*`` summary into the first record the Trainer logs (its
        ``log_history`` entry too: the Trainer appended a copy before calling back)."""
        if self._summary_logged or logs is None:
            return
        logs.update(self.summary)
        if state.log_history:
            state.log_history[-1].update(self.summary)
        self._summary_logged = True

    def _build_strategy(self, args, state, model, loader, deepspeed: bool) -> MaskStrategy:
        if self.method == "ct-f":
            seed = args.seed if self.mask_seed is None else self.mask_seed
            return RandomChildMask(self.reserve_p, seed)
        path = self.mask_file
        if path is None and deepspeed:
            raise ConfigError(
                "ChildTuningCallback: CT-D under DeepSpeed needs mask_file= (the Fisher pass runs "
                "outside DeepSpeed's step); make the mask with `ctscale fisher`, or with this callback "
                "in a 1-process/DDP/FSDP2 run of the same model and data"
            )
        if path is None:
            path = self.mask_out or str(default_mask_path(args.output_dir))
            if state.global_step == 0:  # a resumed run keeps the child network it started with
                self._estimate_and_save(args, model, loader, Path(path))
            elif not Path(path).exists():
                raise MaskError(
                    f"resuming at step {state.global_step} but the run's CT-D mask {path} is missing; "
                    "pass mask_file= (a Fisher pass on trained weights would pick another child)"
                )
        assert self.shards is not None  # set in on_train_begin, before this
        strategy = load_fixed_mask(path, self.shards)  # checks names and shapes
        info = store.read_info(path)
        self.summary |= {
            "child_tuning/selected": info.total_selected,
            "child_tuning/total": info.total_entries,
        }
        if not any(strategy.is_candidate(n) for n in self.shards.param_shapes()):
            raise MaskError(f"{path}: the mask matches no parameter of this model; use a mask made for it")
        lora.refuse_frozen_lora_a(path)
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

    def _estimate_and_save(self, args, model: torch.nn.Module, loader, path: Path) -> None:
        """CT-D Fisher pass over global batches of ``loader``, exact top-p, mask saved. Collective."""
        # not ZeroShards: CT-D under DeepSpeed needs mask_file (_build_strategy)
        assert isinstance(self.shards, LocalShards)
        shapes = self.shards.param_shapes()
        scope = lora.ctd_scope(self.candidates, self.exclude, shapes)
        is_candidate = candidate_filter(scope, self.exclude)
        candidates = {n: s for n, s in shapes.items() if is_candidate(n)}
        fisher = FisherAccumulator(candidates, self.fisher_max_grad_norm)  # raises if none match
        accum = args.gradient_accumulation_steps
        available = len(loader) // accum
        batches = self.fisher_batches or available
        if batches > available:
            raise ConfigError(
                f"ChildTuningCallback: fisher_batches={batches} but one epoch holds {available} "
                f"global batches; lower fisher_batches"
            )
        was_training, started = model.training, time.perf_counter()
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
        self.summary |= {
            "child_tuning/fisher_batches": batches,
            "child_tuning/fisher_seconds": round(time.perf_counter() - started, 3),
        }
        provenance = {
            "seed": args.seed,
            "scope": {"candidates": scope, "exclude": self.exclude},
            "model": getattr(getattr(model, "config", None), "_name_or_path", ""),
            "task": "hf-trainer",
            "fisher_dropout": self.fisher_dropout,
        }
        save_child_network(path, fisher, self.reserve_p, shapes, provenance)

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
