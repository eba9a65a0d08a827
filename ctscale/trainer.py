"""The training loop. Reads top to bottom; no branch on the backend's name.

loss = backend.forward_backward(micro_batch)   # per micro-batch; reduced at the boundary
for view in backend.grad_views(): strategy.apply(view, step)   # local shards only
backend.step()                                  # clip, AdamW, schedule
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from ctscale import batching, dist, reporting, rundir
from ctscale.backends import build_backend
from ctscale.backends.base import Backend, NamedParams
from ctscale.config import Config, config_to_dict
from ctscale.errors import ConfigError, DataError
from ctscale.methods.base import MaskStrategy
from ctscale.methods.child_optim import ChildAdamW, ChildMask
from ctscale.methods.ct_d.fisher import FisherAccumulator, fisher_mode
from ctscale.methods.fixed_mask import FixedChildMask
from ctscale.methods.registry import build_strategy, get_method, preflight, run_mask_path
from ctscale.models import load_tokenizer
from ctscale.profiling import StepProfiler, phase
from ctscale.storage import atomic
from ctscale.storage.checkpoint import STATE_FILE, CheckpointManager
from ctscale.storage.config_snapshot import save_config
from ctscale.storage.fingerprint import model_fingerprint
from ctscale.tasks import load_task_data

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def adamw_factory(cfg: Config, child: ChildMask | None = None):
    """AdamW with decoupled weight decay on every entry except biases and norms (as HF).

    With ``child`` (a fixed child network, ``method.child_only_optimizer``): ``ChildAdamW``, the same update with
    state only for the child entries of candidate parameters."""

    def make(named: NamedParams) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in named if p.requires_grad]
        groups: list[dict[str, Any]] = [
            {
                "params": [(n, p) for n, p in named if not n.endswith(NO_DECAY)],
                "weight_decay": cfg.train.weight_decay,
            },
            {"params": [(n, p) for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0},
        ]
        if child is not None:
            return ChildAdamW(groups, child, lr=cfg.train.lr, eps=1e-8)
        groups = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
        return torch.optim.AdamW(groups, lr=cfg.train.lr, eps=1e-8)

    return make


class Trainer:
    """Fine-tunes ``cfg.model`` on ``cfg.data.task`` (GLUE or causal-LM JSONL) with
    ``cfg.method``; see ``run``."""

    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.backend = backend or build_backend(cfg)
        self.out = Path(cfg.train.output_dir)
        self.is_main = self.backend.rank == 0
        self.report_to = [t for t in cfg.train.report_to if t != "tensorboard" or cfg.train.tensorboard]
        self._trackers: list[reporting.Tracker] | None = None  # opened on the first record (rank 0)
        self.micro = batching.micro_batch_size(
            cfg.train.batch_size, cfg.train.grad_accum, self.backend.world_size
        )

    # -- set-up ---------------------------------------------------------------------------
    def prepare(self, mask_out: Path | None = None) -> None:
        """Check where the run writes (``mask_out``: ``ctscale fisher``'s mask; else the run
        directory), then load data and model and set up the backend."""
        cfg = self.cfg
        if mask_out is None:
            self._check_output_dir()  # every rank, before anything heavy loads
        else:
            rundir.verdict(lambda: rundir.check_mask_out(self.out, mask_out, cfg))
        preflight(cfg)  # e.g. the mask file in use is the one the config describes
        reporting.check_installed(self.report_to)  # a missing wandb/mlflow fails before the model loads
        self.tokenizer = load_tokenizer(cfg.model)
        self.data = load_task_data(cfg, self.tokenizer)
        self.steps_per_epoch = batching.steps_per_epoch(self.data.train_size, cfg.train.batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training set ({self.data.train_size} examples) is smaller than one global "
                f"batch (train.batch_size={cfg.train.batch_size})"
            )
        self.total_steps = cfg.train.max_steps or self.steps_per_epoch * cfg.train.epochs
        self.profiler = self.step_profiler()  # a bad window fails before the model loads
        torch.manual_seed(cfg.train.seed)  # a classifier head's (or a random model's) initialisation
        with self.backend.model_init_context():  # ZeRO-3: built already partitioned
            model = self.data.load_model(cfg.model)
        warmup = math.ceil(cfg.train.warmup_ratio * self.total_steps)
        self.backend.setup(
            model,
            adamw_factory(cfg),
            lambda opt: get_linear_schedule_with_warmup(opt, warmup, self.total_steps),
        )
        self.fingerprint = model_fingerprint(self.backend.param_shapes())

    def _start_run_dir(self, resumed: bool) -> None:
        """Write the resolved config; only once the run is known to be able to start, so that
        a bad input never changes a previous run's files. A fresh start first removes the
        earlier run's files (``train.overwrite``, or the same config restarted)."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if resumed:
                rundir.unmark_finished(self.out)
            elif self._previous_run:
                rundir.clear_previous(self.out, keep={Path(self.mask_path)} if self.mask_path else set())
            save_config(self.cfg, self.out / rundir.CONFIG_FILE)
        dist.barrier()

    def _check_output_dir(self) -> None:
        """Refuse a file, an unwritable path, or a directory holding a finished run or another
        config (``ctscale.rundir``). One verdict on every rank: a failure stops all of them."""

        def check() -> None:
            rundir.check_writable(self.out)
            self._previous_run = rundir.check_reuse(self.out, self.cfg)

        rundir.verdict(check)

    def micro_batches(self, step: int, global_batch: int, grad_accum: int):
        """Tokenised micro-batches of this rank for optimizer step ``step`` (global numbering)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch_for(global_batch))
        order = batching.epoch_order(self.data.train_size, self.cfg.train.seed, epoch)
        window = batching.global_batch_indices(order, step_in_epoch, global_batch)
        rank, world = self.backend.rank, self.backend.world_size
        for idx in batching.rank_micro_batches(order, step_in_epoch, global_batch, grad_accum, rank, world):
            yield self.data.train_batch(idx, window, grad_accum * world)

    def steps_per_epoch_for(self, global_batch: int) -> int:
        return batching.steps_per_epoch(self.data.train_size, global_batch)

    # -- CT-D Fisher pass -------------------------------------------------------------------
    def fisher_pass(self, fisher: FisherAccumulator) -> None:
        """Accumulate the Fisher over ``fisher.num_batches`` global batches (default one epoch),
        with dropout off unless ``fisher.dropout`` (see ``fisher_mode``).

        One epoch is its full global batches only: the last ``train_size % batch`` examples are
        not used (the reference's last, partial batch). A partial batch cannot split into
        ``grad_accum x world size`` equal parts, and every backend averages each part's mean
        loss, so an uneven split would weight its examples by the world size (a CT-D mask that
        changes with it). Using them needs per-example loss weights in every backend."""
        cfg = self.cfg
        batch = cfg.fisher.batch_size or cfg.train.batch_size
        batching.micro_batch_size(batch, cfg.train.grad_accum, self.backend.world_size)
        batches = cfg.fisher.num_batches or self.steps_per_epoch_for(batch)
        unused = self.data.train_size - batches * batch
        if cfg.fisher.num_batches is None and unused and self.is_main:
            tqdm.write(
                f"fisher: one pass = {batches} global batches of {batch}; the last {unused} of "
                f"{self.data.train_size} examples do not fill a batch and are not used",
                file=sys.stderr,
            )
        self.backend.train_mode(True)
        with fisher_mode(self.backend.unwrapped_model(), cfg.fisher.dropout) as model_step:
            for b in tqdm(range(batches), desc="fisher", disable=not self.is_main, leave=False):
                micro = list(self.micro_batches(b, batch, cfg.train.grad_accum))
                with model_step():
                    for m, mb in enumerate(micro):
                        self.backend.forward_backward(mb, boundary=m == len(micro) - 1)
                fisher.add(self.backend.grad_views(), examples=batch)
                self.backend.zero_grad()

    # -- training ---------------------------------------------------------------------------
    def run(self) -> dict:
        """Prepare, build the child network (or resume), train, evaluate, save. Final metrics."""
        self.prepare()
        checkpoints = CheckpointManager(self.out, self.cfg.train.keep_checkpoints)
        checkpoints.remove_stale()
        resume_from = checkpoints.latest() if self.cfg.train.resume else None
        started = time.perf_counter()
        seconds: dict[str, float] = {}  # per phase of the child network's set-up
        if resume_from is None:
            strategy = self.child_only(
                build_strategy(self.cfg, self.backend, self.fisher_pass, None, seconds)
            )
            self.mask_path, start_step = run_mask_path(self.cfg), 0
        else:
            # mask first: a child-only optimizer is built from it and must exist before its state loads
            saved_mask = json.loads((resume_from / STATE_FILE).read_text()).get("mask")
            self.mask_path = run_mask_path(self.cfg, saved_mask)
            strategy = self.child_only(build_strategy(self.cfg, self.backend, None, self.mask_path))
            state = checkpoints.load(self.backend, resume_from, {"model_fingerprint": self.fingerprint})
            start_step = state["step"]
        self._start_run_dir(resumed=resume_from is not None)
        if resume_from is not None:
            resumed = {"step": start_step, "from": str(resume_from), "skipped": checkpoints.skipped}
            self.log({"event": "resumed", **resumed})
        self.log(
            {
                "event": "mask_ready",
                "seconds": time.perf_counter() - started,
                **{f"{phase}_seconds": s for phase, s in seconds.items()},
                "mask_state_bytes": strategy.state_bytes(),
                **self._mask_summary(seconds),
            }
        )
        try:
            metrics = self.fit(strategy, start_step, checkpoints)
        finally:
            self._close_trackers()
        if self.cfg.train.save_model:
            self.save_model()
        if self.is_main:  # last: a run directory with this file holds a complete run
            rundir.mark_finished(self.out, {"step": self.total_steps, "final": metrics})
        return metrics

    def _mask_summary(self, seconds: dict[str, float]) -> dict:
        """The child network in one console line (rank 0), with the Fisher pass if one ran,
        and its selected/total candidate entries for the ``mask_ready`` record."""
        describe = get_method(self.cfg.method.name).describe
        if not self.is_main or describe is None:
            return {}
        child = describe(self.cfg, self.mask_path, seconds)
        tqdm.write(f"mask: {child.line}")
        if child.selected is None:
            return {}
        return {"mask_selected": child.selected, "mask_entries": child.total}

    def child_only(self, strategy: MaskStrategy) -> MaskStrategy:
        """``method.child_only_optimizer``: replace the optimizer (built in ``setup``, before the
        mask existed; no state yet) by ``ChildAdamW`` and the fixed bool mask by the child index,
        which masks the gradients from now on (clipping then sees dense CT-D's norm)."""
        if not self.cfg.method.child_only_optimizer:
            return strategy
        child = ChildMask.from_fixed(cast(FixedChildMask, strategy))  # config: child-only needs ct-d
        self.backend.replace_optimizer(adamw_factory(self.cfg, child))
        return child

    def fit(
        self, strategy: MaskStrategy, start_step: int = 0, checkpoints: CheckpointManager | None = None
    ) -> dict:
        """Train from ``start_step`` to ``total_steps``; evaluate each epoch (``eval_every_epoch``),
        every ``eval_every`` steps and at the end. Log steps print one console line (rank 0)."""
        cfg = self.cfg
        metrics: dict = {}
        bar = tqdm(total=self.total_steps, initial=start_step, desc="train", disable=not self.is_main)
        self.backend.train_mode(True)
        train_seconds, steps_timed = 0.0, 0  # since the last log step; eval/checkpoints excluded
        for step in range(start_step, self.total_steps):
            lr = self.backend.lr()
            started = time.perf_counter()
            self.profiler.step_begins(step)
            loss = self.train_step(step, strategy)
            if profiled := self.profiler.step_ends(step):
                self.log({"event": "profile", **profiled})
            train_seconds += time.perf_counter() - started
            steps_timed += 1
            bar.update(1)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == self.total_steps:
                # the global batch's mean loss, the same at any world size: ranks hold equal
                # shares (causal LM: losses normalised by the global token count), so the mean
                # over ranks is it. One scalar all-reduce, on log steps only (every rank logs
                # the same steps); train_step itself adds no collective. The gradient norm is
                # the one the backend's clipping computed (no collective of its own).
                loss = dist.mean_over_ranks(loss)
                norm = self.backend.grad_norm()
                speed = steps_timed * cfg.train.batch_size / max(train_seconds, 1e-9)
                record = {"event": "train", "step": step + 1, "loss": loss}
                record |= {"grad_norm": norm} if norm is not None else {}
                record |= {"lr": lr, "samples_per_s": round(speed, 2), **_gpu_memory()}
                self.log(record)
                train_seconds, steps_timed = 0.0, 0
            if checkpoints and cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
                state = {
                    "model_fingerprint": self.fingerprint,
                    "mask": self.mask_path,
                    "world_size": self.backend.world_size,
                }
                checkpoints.save(self.backend, step + 1, state)
            end_of_epoch = (step + 1) % self.steps_per_epoch == 0
            every = cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
            if (cfg.train.eval_every_epoch and end_of_epoch) or every or step + 1 == self.total_steps:
                metrics = self.evaluate(step + 1)
                self.backend.train_mode(True)
        bar.close()
        return metrics

    def step_profiler(self) -> StepProfiler:
        """``train.profile_from``/``profile_steps``: a window that must end by the last step."""
        t = self.cfg.train
        if t.profile_from is not None and t.profile_from + t.profile_steps > self.total_steps:
            raise ConfigError(
                f"train.profile_from={t.profile_from} with train.profile_steps={t.profile_steps} "
                f"ends after the run's last step ({self.total_steps} steps); profile steps below "
                f"{self.total_steps} or train for more steps"
            )
        return StepProfiler(t.profile_from, t.profile_steps, self.out / "profile", self.backend.rank)

    def train_step(self, step: int, strategy: MaskStrategy) -> float:
        """One optimizer step: micro-batches, mask on local shards, clip + AdamW. Returns this
        rank's mean loss (its share of the global batch; ``fit`` averages it over ranks to log)."""
        cfg = self.cfg
        micro = list(self.micro_batches(step, cfg.train.batch_size, cfg.train.grad_accum))
        if cfg.train.sparse_grad_comm:  # the boundary backward all-reduces this step's survivors only
            self.backend.communicate_survivors(strategy, step)
        with phase("forward_backward"):
            losses = [
                self.backend.forward_backward(mb, boundary=m == len(micro) - 1) for m, mb in enumerate(micro)
            ]
        with phase("mask"):
            for view in self.backend.grad_views():
                strategy.apply(view, step)
        with phase("optimizer_step"):
            self.backend.step()
        return sum(losses) / len(losses)

    def evaluate(self, step: int) -> dict:
        """Metrics of every eval split; each rank predicts a shard. Collective."""
        self.backend.train_mode(False)
        rank, world, size = self.backend.rank, self.backend.world_size, self.cfg.train.eval_batch_size
        results = {
            split: self.data.evaluate(split, self.backend.predict, rank, world, size)
            for split in self.data.eval_splits
        }
        self.log(
            {
                "event": "eval",
                "step": step,
                **{f"{s}/{k}": v for s, m in results.items() for k, v in m.items()},
            }
        )
        return results

    # -- output -----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append one JSON line to ``metrics.jsonl``, feed the trackers (``train.report_to``)
        and print train and eval records on the console. Rank 0 only."""
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record["event"] in ("train", "eval"):
            self._report(record)
            tqdm.write(self._console_line(record))

    def _console_line(self, record: dict) -> str:
        """``step 20/120 | loss 0.6931 | grad_norm 1.234 | lr 3.9e-05 | 45.2 samples/s``; eval
        records as ``eval step 20/120 | validation/accuracy=0.8125 ...``."""
        where = f"step {record['step']}/{self.total_steps}"
        if record["event"] == "eval":
            values = (
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record.items()
                if k not in ("time", "event", "step")
            )
            return f"eval {where} | " + " ".join(values)
        parts = [where, f"loss {record['loss']:.4f}"]
        if "grad_norm" in record:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        parts += [f"lr {record['lr']:.2e}", f"{record['samples_per_s']:.1f} samples/s"]
        if "max_gpu_mem_gib" in record:
            parts.append(f"{record['max_gpu_mem_gib']:.2f} GiB")
        return " | ".join(parts)

    def _report(self, record: dict) -> None:
        """Scalars of a train or eval record to every tracker of ``train.report_to`` (rank 0);
        the trackers open on the first record, once the run directory holds this run."""
        if not self.report_to:
            return
        if self._trackers is None:
            self._trackers = reporting.open_trackers(self.report_to, self.out, config_to_dict(self.cfg))
        values = reporting.scalars(record)
        for tracker in self._trackers:
            tracker.log(values, record["step"])

    def _close_trackers(self) -> None:
        for tracker in self._trackers or []:
            tracker.close()
        self._trackers = None

    def save_model(self) -> Path:
        """Consolidated HF model + tokenizer under ``output_dir/model``, replaced atomically."""
        state = self.backend.consolidated_state_dict()
        final = self.out / "model"
        if self.is_main:
            with atomic.replacing_dir(final) as tmp:
                model: Any = self.backend.unwrapped_model()  # a transformers PreTrainedModel
                model.save_pretrained(tmp, state_dict=state)
                self.tokenizer.save_pretrained(tmp)
        dist.barrier()
        return final


def _gpu_memory() -> dict:
    """Peak GPU memory of this process so far (GiB), on CUDA machines."""
    if not torch.cuda.is_available():
        return {}
    return {"max_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
