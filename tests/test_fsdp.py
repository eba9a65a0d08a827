"""FSDP2 backend specifics: shard ranges, accumulation with masking, bf16 mixed precision.

The shared matrix (tests/test_distributed.py, row ``fsdp``) checks whole training runs against
one process; these tests look inside: which flat range each rank holds, what the gradient views
contain, and what mixed precision does to masked entries.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from ctscale.backends.fsdp import repeated_blocks, shard_rows
from ctscale.storage import mask_file

from dist_harness import run_world
from dist_workers import tiny_overrides

GLOBAL_BATCH = 12
CLIP = 0.1  # below the gradient norm of these batches, so clipping is exercised


# -- helpers (run inside the worker processes) ----------------------------------------------
def _load(model_dir):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def _adamw(named):
    return torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.0)


def _constant(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _batch(step: int, size: int = GLOBAL_BATCH, seq: int = 16) -> dict[str, torch.Tensor]:
    """A global batch of random tokens, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(100, 2000, (size, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[size // 2 :, seq - 4 :] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (size,), generator=g)}


def _rows(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in batch.items()}


# -- workers ----------------------------------------------------------------------------------
def grad_views_worker(rank: int, world: int, model_dir) -> dict:
    """One boundary backward on this rank's share of a global batch; views vs one process."""
    from ctscale.backends.fsdp import FSDPBackend

    model = _load(model_dir)
    ref = copy.deepcopy(model)
    backend = FSDPBackend(grad_accum=1, max_grad_norm=0.0)
    backend.setup(model, _adamw, _constant)
    batch, per = _batch(0), GLOBAL_BATCH // world
    backend.forward_backward(_rows(batch, rank * per, (rank + 1) * per), boundary=True)
    ref(**batch).loss.backward()  # the single-process gradient of the global batch
    ref_grads = {n: p.grad.reshape(-1) for n, p in ref.named_parameters()}
    views = list(backend.grad_views())
    params = dict(backend.model.named_parameters())
    return {
        "ranges": [(v.name, v.start, v.end) for v in views],
        "shard_ranges": [(v.name, v.start, v.end) for v in backend.shard_ranges()],
        "shapes": backend.param_shapes(),
        "ref_shapes": {n: tuple(p.shape) for n, p in ref.named_parameters()},
        "max_diff": max(
            (v.grad - ref_grads[v.name][v.start : v.end]).abs().max().item() for v in views if v.numel
        ),
        "scale": max(g.abs().max().item() for g in ref_grads.values()),
        "aliases": all(
            v.grad.untyped_storage().data_ptr() == params[v.name].grad.to_local().untyped_storage().data_ptr()
            for v in views
        ),
    }


def accumulation_worker(rank: int, world: int, model_dir) -> dict:
    """Two optimizer steps of 2 micro-batches each, CT-F masked at the boundary, clipped."""
    from ctscale.backends.fsdp import FSDPBackend
    from ctscale.methods.base import GradView
    from ctscale.methods.ct_f import RandomChildMask

    model = _load(model_dir)
    ref = copy.deepcopy(model)
    backend = FSDPBackend(grad_accum=2, max_grad_norm=CLIP)
    backend.setup(model, _adamw, _constant)
    ref_opt = _adamw(ref.named_parameters())
    strategy = RandomChildMask(0.3, seed=7)
    half, per = GLOBAL_BATCH // 2, GLOBAL_BATCH // 2 // world
    out = {"views_before_boundary": [], "grad_diff": [], "ref_norm": []}
    for step in range(2):
        batch = _batch(step)
        for m in range(2):  # rank r's part of micro-batch m; one process sees all of it
            lo = m * half + rank * per
            backend.forward_backward(_rows(batch, lo, lo + per), boundary=m == 1)
            if m == 0:
                out["views_before_boundary"].append(len(list(backend.grad_views())))
            (ref(**_rows(batch, m * half, (m + 1) * half)).loss / 2).backward()
        views = list(backend.grad_views())
        for v in views:
            strategy.apply(v, step)
        ref_grads = {}
        for n, p in ref.named_parameters():
            strategy.apply(GradView(n, tuple(p.shape), 0, p.numel(), p.grad.view(-1)), step)
            ref_grads[n] = p.grad.reshape(-1)
        out["grad_diff"].append(
            max((v.grad - ref_grads[v.name][v.start : v.end]).abs().max().item() for v in views)
        )
        out["ref_norm"].append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        backend.step()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    state = backend.consolidated_state_dict()
    if state is not None:
        ref_state = ref.state_dict()
        out["weight_diff"] = max((state[k] - ref_state[k]).abs().max().item() for k in state)
        out["moved"] = max(
            (ref_state[k] - v).abs().max().item() for k, v in _load(model_dir).state_dict().items()
        )
    return out


def bf16_ctd_worker(rank: int, world: int, overrides: list[str]) -> dict:
    """CT-D (Fisher pass, mask, 3 steps) through the Trainer with train.bf16=true."""
    from ctscale.config import load_config
    from ctscale.methods.registry import build_strategy
    from ctscale.trainer import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    trainer.prepare()
    strategy = build_strategy(cfg, trainer.backend, trainer.fisher_pass)
    model = trainer.backend.unwrapped_model()
    compute_dtypes: set[torch.dtype] = set()
    query = repeated_blocks(model)[0].attention.self.query
    query.register_forward_pre_hook(lambda mod, _: compute_dtypes.add(mod.weight.dtype))
    grad_dtypes = set()
    apply = strategy.apply

    def recording_apply(view, step):
        grad_dtypes.add(view.grad.dtype)
        apply(view, step)

    strategy.apply = recording_apply
    trainer.backend.train_mode(True)
    losses = [trainer.train_step(step, strategy) for step in range(trainer.total_steps)]
    metrics = trainer.evaluate(trainer.total_steps)  # predict() on every rank
    saved = trainer.save_model()
    state = trainer.backend.consolidated_state_dict()
    return {
        "state": state,
        "saved": saved,
        "accuracy": metrics["validation"]["accuracy"],
        "losses": losses,
        "compute_dtypes": compute_dtypes,
        "grad_dtypes": grad_dtypes,
        "param_dtypes": {p.dtype for p in model.parameters()},
    }


class _Flat(torch.nn.Module):
    """A model without repeated blocks (no ModuleList): FSDP2 shards only the root."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.proj(x)  # a ModelOutput: FSDP2 finds the loss in it to hook backward
        return SequenceClassifierOutput(loss=torch.nn.functional.mse_loss(logits, y), logits=logits)


def flat_model_worker(rank: int, world: int) -> dict:
    """World size 1 (a one-rank group), a model without blocks: log line, full ranges, a step."""
    import logging

    from ctscale.backends.fsdp import FSDPBackend

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("ctscale.backends.fsdp").addHandler(handler)
    model = _Flat()
    before = model.proj.weight.detach().clone()
    backend = FSDPBackend(grad_accum=1, max_grad_norm=1.0)
    backend.setup(model, _adamw, _constant)
    batch = {"x": torch.ones(4, 5), "y": torch.zeros(4, 3)}
    loss = backend.forward_backward(batch, boundary=True)
    views = {v.name: (v.start, v.end, v.grad.numel()) for v in backend.grad_views()}
    backend.step()
    after = backend.consolidated_state_dict()["proj.weight"]
    return {
        "world": backend.world_size,
        "records": records,
        "views": views,
        "loss": loss,
        "moved": (after - before).abs().max().item(),
    }


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "world"), [(r, w) for r in range(0, 12) for w in (1, 2, 3, 4)])
def test_shard_rows_follow_torch_chunk(rows, world):
    sizes = [len(c) for c in torch.arange(rows).chunk(world)] if rows else []
    sizes += [0] * (world - len(sizes))  # torch.chunk may return fewer chunks than ranks
    got = [shard_rows(rows, r, world) for r in range(world)]
    assert [hi - lo for lo, hi in got] == sizes
    assert [lo for lo, _ in got] == [min(sum(sizes[:r]), rows) for r in range(world)]


def test_repeated_blocks_finds_bert_layers(tiny_bert):
    model = _load(tiny_bert)
    assert repeated_blocks(model) == list(model.bert.encoder.layer)
    assert len(repeated_blocks(model)) == 2
    assert (
        repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.ReLU()])))
        == []
    )


@pytest.mark.slow
def test_world1_model_without_blocks_shards_root():
    r = run_world(flat_model_worker, 1)[0]
    assert r["world"] == 1
    assert any("no repeated blocks" in m for m in r["records"]), r["records"]
    assert r["views"] == {"proj.weight": (0, 15, 15), "proj.bias": (0, 3, 3)}
    assert r["loss"] > 0 and r["moved"] > 1e-4


@pytest.mark.slow
def test_grad_views_cover_uneven_shards_once(tiny_bert):
    results = run_world(grad_views_worker, 3, tiny_bert)
    shapes = results[0]["ref_shapes"]
    for r in results:
        assert r["shapes"] == shapes  # global shapes, the same on every rank
        assert r["shard_ranges"] == r["ranges"]
        assert r["aliases"]  # views share the storage the optimizer reads
        # the local views are the single-process gradient's slices (rounding of the reduction only)
        assert r["max_diff"] <= 1e-6 * max(1.0, r["scale"]), r["max_diff"]
    pieces: dict[str, list[tuple[int, int]]] = {}
    for r in results:
        for name, start, end in r["ranges"]:
            pieces.setdefault(name, []).append((start, end))
    assert pieces.keys() == shapes.keys()
    for name, ranges in pieces.items():
        assert len(ranges) == 3, name  # one piece per rank, possibly empty
        covered = sorted(ranges)
        assert covered[0][0] == 0 and covered[-1][1] == math.prod(shapes[name]), (name, covered)
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), (name, covered)  # no gap/overlap
    # the split really is uneven: 2 classifier rows leave rank 2 empty; 128 positions -> 43/43/42
    assert pieces["classifier.weight"][2] == (64, 64)
    pos = pieces["bert.embeddings.position_embeddings.weight"]
    assert [e - s for s, e in pos] == [43 * 32, 43 * 32, 42 * 32]


@pytest.mark.slow
def test_accumulation_with_masking_matches_single_process(tiny_bert):
    results = run_world(accumulation_worker, 2, tiny_bert)
    for r in results:
        assert r["views_before_boundary"] == [0, 0]  # no reduction before the boundary
        assert max(r["grad_diff"]) <= 1e-6, r["grad_diff"]
    assert min(results[0]["ref_norm"]) > CLIP  # clipping was active in both steps
    assert results[0]["moved"] > 1e-4  # training did something
    assert results[0]["weight_diff"] <= 5e-6, results[0]["weight_diff"]


@pytest.mark.slow
def test_bf16_ct_d_keeps_non_child_entries(tiny_bert, glue_dir, tmp_path):
    overrides = tiny_overrides(tiny_bert, glue_dir, tmp_path) + [
        "distributed.backend=fsdp",
        "train.bf16=true",
        "method.name=ct-d",
        "train.max_steps=2",
        "fisher.num_batches=1",
    ]
    results = run_world(bf16_ctd_worker, 2, overrides)
    for r in results:
        assert r["compute_dtypes"] == {torch.bfloat16}  # blocks really ran in bf16
        assert r["grad_dtypes"] == r["param_dtypes"] == {torch.float32}  # fp32 shards and grads
        assert all(math.isfinite(x) for x in r["losses"])
    info = mask_file.read_info(tmp_path / "mask")
    mask = {
        name: bits
        for (name, _), bits in mask_file.load_mask(
            tmp_path / "mask", [(n, s, 0, math.prod(s)) for n, s in info.shapes.items()]
        ).items()
    }
    assert mask and all(".layer." in n for n in mask)
    pretrained, final = load_file(tiny_bert / "model.safetensors"), results[0]["state"]
    moved = kept = 0
    for name, keep in mask.items():
        before, after = pretrained[name].reshape(-1), final[name].reshape(-1)
        assert after.dtype == torch.float32
        assert torch.equal(after[~keep], before[~keep]), f"{name}: a non-child entry changed"
        moved += int((after[keep] != before[keep]).sum())
        kept += int(keep.sum())
    assert kept == round(0.3 * sum(m.numel() for m in mask.values()))
    assert moved > 0.9 * kept
    # evaluation ran sharded on both ranks; the saved HF model is the consolidated fp32 state
    assert 0.0 <= results[0]["accuracy"] <= 1.0
    saved = load_file(results[0]["saved"] / "model.safetensors")
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[k], final[k]) for k in final)
