"""DeepSpeed-specific checks beyond the shared matrix (tests/test_distributed.py).

Fast: the DeepSpeed JSON is merged with the ctscale config, and every mistake a user can make
is one ConfigError. Slow (CPU processes, gloo): gradient accumulation with masking at the
boundary, ZeRO-3 padding at 3 ranks, bf16 CT-D keeping non-child entries bit-identical.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ctscale.config import load_config
from ctscale.errors import ConfigError, CtscaleError
from ctscale.storage import mask_file

from dist_harness import run_world
from dist_workers import tiny_overrides

pytest.importorskip("deepspeed")
from ctscale.backends.deepspeed import DeepSpeedBackend  # noqa: E402
from ctscale.backends.ds_config import build_ds_config  # noqa: E402

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
LR = 1e-2


def _cfg(tmp_path: Path, ds: dict | None = None, *extra: str):
    sets = ["distributed.backend=deepspeed", "train.batch_size=16", "train.grad_accum=2", *extra]
    if ds is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        sets.append(f"distributed.deepspeed_config={path}")
    elif not any(s.startswith("distributed.") for s in extra):
        sets.append("distributed.zero_stage=2")
    return load_config(None, sets)


# -- config merge (no processes) -------------------------------------------------------------
SHIPPED = sorted(DS_CONFIGS.glob("*.json"))


def _bf16_masters(path: Path) -> bool:
    return json.loads(path.read_text()).get("bf16", {}).get("bf16_master_weights_and_grads") is True


def _fixed_bf16(path: Path) -> bool:
    """A bf16 variant: the JSON says bf16.enabled=true itself instead of "auto"."""
    return json.loads(path.read_text()).get("bf16", {}).get("enabled") is True


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_fill_auto_values(path, bf16):
    raw = json.loads(path.read_text())
    cfg = load_config(
        None,
        [
            "distributed.backend=deepspeed",
            f"distributed.deepspeed_config={path}",
            "train.batch_size=12",
            "train.grad_accum=2",
            "train.max_grad_norm=0.5",
            f"train.bf16={str(bf16).lower()}",
        ],
    )
    if _fixed_bf16(path) and not bf16:  # the JSON contradicts the ctscale config
        with pytest.raises(ConfigError, match=r"bf16\.enabled=True contradicts train\.bf16=False"):
            build_ds_config(cfg, world_size=3)
        return
    ds = build_ds_config(cfg, world_size=3)
    assert ds["train_batch_size"] == 12
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 2  # 12 / (2 x 3)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is bf16
    assert ds["zero_optimization"]["stage"] == int(re.match(r"zero(\d)", path.stem)[1])
    assert "auto" not in json.dumps(ds)
    # everything else is the file's own setting, untouched (offload devices, thresholds, ...)
    assert ds["zero_optimization"] == raw["zero_optimization"]
    if "offload" in path.stem:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is False  # ctscale's AdamW steps the CPU partitions


def test_zero_stage_overrides_json(tmp_path):
    ds = build_ds_config(_cfg(tmp_path, {"zero_optimization": {"stage": 1}}, "distributed.zero_stage=3"), 2)
    assert ds["zero_optimization"]["stage"] == 3
    assert build_ds_config(_cfg(tmp_path), 4)["train_micro_batch_size_per_gpu"] == 2  # built-in dict


def test_matching_explicit_values_are_accepted(tmp_path):
    given = {"train_batch_size": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}
    hf_style = {"fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    ds = build_ds_config(_cfg(tmp_path, given | hf_style), 2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["fp16"]["enabled"] is False  # ctscale trains in fp32 or bf16


@pytest.mark.parametrize(
    "ds, words",
    [
        ({"train_batch_size": 32}, ["train_batch_size=32", "train.batch_size=16", '"auto"']),
        ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "train.grad_accum=2"]),
        ({"train_micro_batch_size_per_gpu": 2}, ["train_micro_batch_size_per_gpu=2", "=4"]),
        ({"gradient_clipping": 5.0}, ["gradient_clipping=5.0", "train.max_grad_norm=1.0"]),
        ({"bf16": {"enabled": True}}, ["bf16.enabled=True", "train.bf16=False"]),
        ({"bf16": {"enabled": 1}}, ["bf16.enabled=1"]),
        ({"zero_optimization": {"stage": 5}}, ["stage 5", "1, 2 or 3"]),
        ({"zero_optimization": {"stage": 0}}, ["stage 0", "distributed.backend=ddp"]),
        ({}, ["stage 0"]),  # DeepSpeed's default stage is 0: say which stage to set
        ({"optimizer": {"type": "AdamW"}}, ["remove the 'optimizer' section"]),
        ({"scheduler": {"type": "WarmupLR"}}, ["remove the 'scheduler' section"]),
        ({"fp16": {"enabled": True}}, ["fp16", "skips overflowing steps", "train.bf16=true"]),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
            ['offload_optimizer.device="nvme"', '"cpu"'],
        ),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, ["offload_param"]),
        (
            {
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "zero_force_ds_cpu_optimizer": True,
            },
            ["zero_force_ds_cpu_optimizer=true", "set it to false"],
        ),
        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, ["reduce_bucket_size"]),
        (
            {"bf16": {"enabled": "auto", "bf16_optimizer_states": True}},
            ["bf16_optimizer_states=true needs bf16.bf16_master_weights_and_grads=true"],
        ),
        ({"bf16": {"bf16_master_weights_and_grads": True}}, ["needs bf16 training", "train.bf16=true"]),
        ({"zero_optimization": []}, ["zero_optimization must be a JSON object"]),
    ],
)
def test_contradicting_or_unsupported_json_is_a_config_error(tmp_path, ds, words):
    ds = {"zero_optimization": {"stage": 2}} | ds if "zero_optimization" not in ds and ds else ds
    with pytest.raises(ConfigError) as err:
        build_ds_config(_cfg(tmp_path, ds), world_size=2)
    assert str(tmp_path / "ds.json") in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_bf16_masters_with_optimizer_offload_is_a_config_error(tmp_path):
    ds = {
        "bf16": {"enabled": True, "bf16_master_weights_and_grads": True},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
    }
    with pytest.raises(ConfigError, match="needs DeepSpeed's CPU Adam.*remove the offload_optimizer"):
        build_ds_config(_cfg(tmp_path, ds, "train.bf16=true"), world_size=2)


def test_missing_and_malformed_json(tmp_path):
    cfg = _cfg(tmp_path, None, f"distributed.deepspeed_config={tmp_path / 'nope.json'}")
    with pytest.raises(ConfigError, match=r"file not found: .*nope\.json"):
        build_ds_config(cfg, 2)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 16,\n}\n')
    cfg = _cfg(tmp_path, None, f"distributed.deepspeed_config={bad}")
    with pytest.raises(ConfigError, match=r"invalid JSON .*bad\.json at line 3, column 1"):
        build_ds_config(cfg, 2)
    (tmp_path / "list.json").write_text("[1, 2]")
    cfg = _cfg(tmp_path, None, f"distributed.deepspeed_config={tmp_path / 'list.json'}")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        build_ds_config(cfg, 2)


def test_world_size_that_does_not_split_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="not divisible by grad_accum x world size = 2 x 3"):
        build_ds_config(_cfg(tmp_path), world_size=3)


def _accumulation(rank: int, world: int, model_dir: Path, glue_dir: Path, out: Path) -> dict:
    """Per ZeRO stage, GAS 2: a dropped window (Fisher-style ``zero_grad``), then a window whose
    local views are compared with the reference gradient, masked in place (keep flat index
    % 3 == 0) and stepped. Rank 0 also reports what the step did to the full weights."""
    import torch.distributed as tdist

    from ctscale.models import load_classifier
    from ctscale.trainer import Trainer

    results = {}
    for stage in (1, 2, 3):
        overrides = tiny_overrides(model_dir, glue_dir, out / f"z{stage}") + [
            "distributed.backend=deepspeed",
            f"distributed.deepspeed_config={DS_CONFIGS / f'zero{stage}.json'}",
            f"train.lr={LR}",
        ]
        trainer = Trainer(load_config(None, overrides))
        trainer.prepare()
        backend, batch, gas = trainer.backend, trainer.cfg.train.batch_size, trainer.cfg.train.grad_accum
        torch.manual_seed(trainer.cfg.train.seed)  # the same classifier head as prepare()
        ref = load_classifier(trainer.cfg.model, trainer.data.task)
        first = list(trainer.micro_batches(0, batch, gas))
        backend.train_mode(False)  # eval forward (ZeRO-3: gathers parameters) = the plain model's
        with torch.no_grad():
            want = ref(**{k: v for k, v in first[0].items() if k != "labels"}).logits
        predict_err = (backend.predict(first[0]) - want).abs().max().item()
        backend.train_mode(True)

        try:  # the trainer and DeepSpeed must agree on where the window ends
            backend.forward_backward(first[0], boundary=True)
            wrong_boundary_accepted = True
        except RuntimeError:
            wrong_boundary_accepted = False
        for m, mb in enumerate(first):
            backend.forward_backward(mb, boundary=m == gas - 1)
        backend.zero_grad()  # window 0 must not leak into window 1

        for m, mb in enumerate(trainer.micro_batches(1, batch, gas)):
            backend.forward_backward(mb, boundary=m == gas - 1)
            (ref(**mb).loss / gas).backward()
        grads = {n: p.grad.view(-1) for n, p in ref.named_parameters()}
        for g in grads.values():
            tdist.all_reduce(g)
            g.div_(world)

        grad_err = 0.0
        for view in backend.grad_views():
            want = grads[view.name][view.start : view.end]
            grad_err = max(grad_err, (view.grad - want).abs().max().item())
            keep = torch.arange(view.start, view.end) % 3 == 0
            view.grad.masked_fill_(~keep, 0)
        before = backend.consolidated_state_dict()
        lr = backend.lr()
        backend.step()
        after = backend.consolidated_state_dict()
        scale = max(g.abs().max().item() for g in grads.values())
        result = {
            "grad_err": grad_err / scale,  # relative to the largest gradient entry
            "wrong_boundary_accepted": wrong_boundary_accepted,
            "predict_err": predict_err,
            "ranges": [(v.name, v.start, v.end) for v in backend.shard_ranges()],
        }
        if rank == 0:
            result["numel"] = {n: math.prod(s) for n, s in backend.param_shapes().items()}
            keep = {n: torch.arange(g.numel()) % 3 == 0 for n, g in grads.items()}
            # DeepSpeed clips by the norm of the MASKED gradient, then AdamW's first step moves
            # each entry by -lr * g / (|g| + eps)
            norm = math.sqrt(sum(g[keep[n]].double().square().sum().item() for n, g in grads.items()))
            clip = min(1.0, trainer.cfg.train.max_grad_norm / (norm + 1e-6))
            frozen_moved, step_err, kept = 0, 0.0, 0
            for name, g in grads.items():
                delta = (after[name] - before[name]).view(-1).double()
                frozen_moved += int((delta[~keep[name]] != 0).sum())
                g = g[keep[name]].double() * clip
                step_err = max(step_err, (delta[keep[name]] + lr * g / (g.abs() + 1e-8)).abs().max().item())
                kept += int((g != 0).sum())
            result |= {"frozen_moved": frozen_moved, "step_err": step_err, "kept": kept}
        results[stage] = result
    return results


def test_checkpoint_from_another_world_size_or_backend_is_a_clear_error(tmp_path):
    here = SimpleNamespace(world_size=2, stage=2)  # load_checkpoint checks before any tensor moves
    with pytest.raises(CtscaleError, match="holds no DeepSpeed checkpoint"):
        DeepSpeedBackend.load_checkpoint(here, tmp_path)
    torch.save({"world_size": 3, "stage": 2, "engine": {}, "scheduler": {}}, tmp_path / "deepspeed.pt")
    with pytest.raises(CtscaleError, match="written by 3 ranks with ZeRO-2; this run has 2 ranks"):
        DeepSpeedBackend.load_checkpoint(here, tmp_path)


# -- multi-process: one 3-rank world (uneven shards, ZeRO-3 padding) serves every slow test ---
def suite_worker(rank: int, world: int, model_dir: Path, glue_dir: Path, out: Path) -> dict:
    """Process start-up and DeepSpeed's first initialisation dominate on 2 cores: one world."""
    bf16 = {stage: _bf16_ct_d(stage, model_dir, glue_dir, out) for stage in (2, 3)}
    return {
        "accum": _accumulation(rank, world, model_dir, glue_dir, out),
        "bf16": bf16,
        "zero_init": _zero_init(rank, world, model_dir, glue_dir, out),  # last: sets HF's ZeRO-3 flag
    }


def _bf16_ct_d(stage: int, model_dir: Path, glue_dir: Path, out: Path) -> dict | None:
    """CT-D with a Fisher pass, then 2 steps in bf16; the consolidated fp32 state (rank 0)."""
    from ctscale.methods.registry import build_strategy
    from ctscale.trainer import Trainer

    overrides = tiny_overrides(model_dir, glue_dir, out / f"bf16-z{stage}") + [
        "distributed.backend=deepspeed",
        f"distributed.deepspeed_config={DS_CONFIGS / f'zero{stage}.json'}",
        "train.bf16=true",
        "train.max_steps=2",
        "method.name=ct-d",
    ]
    trainer = Trainer(load_config(None, overrides))
    trainer.prepare()
    strategy = build_strategy(trainer.cfg, trainer.backend, trainer.fisher_pass)
    trainer.backend.train_mode(True)
    for step in range(trainer.total_steps):
        trainer.train_step(step, strategy)
    return trainer.backend.consolidated_state_dict()


def _zero_init(rank: int, world: int, model_dir: Path, glue_dir: Path, out: Path) -> dict:
    """``model_init_context``: the HF model is built partitioned and holds the checkpoint."""
    import gc

    from ctscale.backends.deepspeed import DeepSpeedBackend
    from ctscale.models import load_classifier
    from ctscale.tasks import get_task
    from ctscale.trainer import adamw_factory

    cfg = load_config(
        None,
        tiny_overrides(model_dir, glue_dir, out / "zinit")
        + ["distributed.backend=deepspeed", f"distributed.deepspeed_config={DS_CONFIGS / 'zero3.json'}"],
    )
    backend = DeepSpeedBackend(cfg)
    torch.manual_seed(cfg.train.seed)
    with backend.model_init_context():
        model = load_classifier(cfg.model, get_task("rte"))
    local = {n: (p.numel(), p.ds_tensor.numel()) for n, p in model.named_parameters()}
    backend.setup(model, adamw_factory(cfg), lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1))
    state = backend.consolidated_state_dict()
    del backend, model
    gc.collect()  # drops the HfDeepSpeedConfig: later HF loads in this process are plain again
    return {"local": local, "state": state}


@pytest.fixture(scope="module")
def suite(tiny_bert, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    return run_world(suite_worker, 3, tiny_bert, glue_dir, out) + [out]


@pytest.mark.slow
def test_accumulation_masking_and_zero3_padding_at_three_ranks(suite):
    ranks = [r["accum"] for r in suite[:-1]]
    for stage in (1, 2, 3):
        numel = ranks[0][stage]["numel"]
        # 3 ranks: LayerNorm (32) and classifier (64, 2) do not split evenly; ZeRO-3 pads
        assert any(n % 3 for n in numel.values())
        covered = {name: torch.zeros(n, dtype=torch.int32) for name, n in numel.items()}
        for r in ranks:
            got = r[stage]
            assert not got["wrong_boundary_accepted"], stage
            assert got["predict_err"] < 1e-5, (stage, got["predict_err"])
            # the boundary view holds the mean gradient over the 12-example global batch
            # (GAS-scaled once, accumulated over 2 micro-batches, nothing from window 0)
            assert got["grad_err"] < 1e-5, (stage, got["grad_err"])
            for name, start, end in got["ranges"]:
                assert 0 <= start < end <= numel[name]
                covered[name][start:end] += 1
        # every entry of every parameter lives on exactly one rank (no padding in the views)
        assert all(bool((c == 1).all()) for c in covered.values()), stage
        main = ranks[0][stage]
        assert main["frozen_moved"] == 0, stage  # masked entries: no update (weight decay 0)
        assert main["kept"] > 1000 and main["step_err"] < 2e-6, (stage, main)
    z3_bias = [r[3]["ranges"] for r in ranks]
    # classifier.bias (2 entries, partition 1): rank 2 holds only padding, so no view there
    assert [any(n == "classifier.bias" for n, _, _ in rr) for rr in z3_bias] == [True, True, False]


def _mask_bits(path: Path) -> dict[str, torch.Tensor]:
    info = mask_file.read_info(path)
    wanted = [(n, s, 0, math.prod(s)) for n, s in info.shapes.items()]
    return {name: bits for (name, _), bits in mask_file.load_mask(path, wanted).items()}


@pytest.mark.slow
def test_bf16_ct_d_keeps_non_child_entries_bit_identical(suite, tiny_bert):
    results, out = suite[0]["bf16"], suite[-1]
    pretrained = load_file(tiny_bert / "model.safetensors")
    for stage, final in results.items():
        mask = _mask_bits(out / f"bf16-z{stage}" / "mask")
        assert all(v.dtype == torch.float32 for v in final.values())  # the fp32 masters
        moved = 0
        for name, keep in mask.items():
            before, after = pretrained[name].float().reshape(-1), final[name].reshape(-1)
            assert torch.equal(after[~keep], before[~keep]), f"zero{stage} {name}: non-child entry moved"
            moved += int((after[keep] != before[keep]).sum())
        selected = sum(int(m.sum()) for m in mask.values())
        assert selected > 1000 and moved > 0.9 * selected, (stage, moved, selected)
        # non-candidate tensors (embeddings, head) train fully
        head = final["classifier.weight"] != pretrained["classifier.weight"]
        assert head.float().mean() > 0.9


@pytest.mark.slow
def test_model_init_context_builds_zero3_partitions(suite, tiny_bert):
    for r in suite[:-1]:
        local = r["zero_init"]["local"]
        # every parameter is created partitioned: no rank materialises a full tensor
        assert all(numel == 0 for numel, _ in local.values())
        word = local["bert.embeddings.word_embeddings.weight"][1]
        assert word == -(-30522 * 32 // 3)
    state = suite[0]["zero_init"]["state"]
    pretrained = load_file(tiny_bert / "model.safetensors")
    assert pretrained.keys() <= state.keys()
    assert all(torch.equal(state[k], v.float()) for k, v in pretrained.items())


# -- every shipped config runs CT-D on CPU: 2 ranks against the single-process reference ------
# All of ds_configs/*.json run here: fp16 (DeepSpeed's CPU accelerator cannot run it, and the
# backend refuses it: see the ConfigError cases above) and NVMe offload (refused) are not shipped.
ATOL = 5e-6  # as tests/test_distributed.py: reduction-order rounding after 4 AdamW steps


def shipped_worker(rank: int, world: int, model_dir: Path, glue_dir: Path, out: Path) -> dict:
    """Per shipped config and method: CT-F / CT-D (Fisher pass with GAS 2, exact selection), 4
    steps clipped at 0.1. Per step, the norm of the masked local views (all-reduced here, in the
    test) and the norm DeepSpeed clipped by; the final fp32 state (rank 0). Then CT-F with
    zero2_offload once more without the post-mask renorm, to show that the norm check can fail."""
    import torch.distributed as tdist

    from ctscale.methods.registry import build_strategy
    from ctscale.trainer import Trainer

    def run(path: Path, method: str, name: str, renorm: bool = True) -> dict:
        overrides = tiny_overrides(model_dir, glue_dir, out / name) + [
            "distributed.backend=deepspeed",
            f"distributed.deepspeed_config={path}",
            f"method.name={method}",
            f"train.bf16={str(_fixed_bf16(path)).lower()}",
        ]
        trainer = Trainer(load_config(None, overrides))
        trainer.prepare()
        strategy = build_strategy(trainer.cfg, trainer.backend, trainer.fisher_pass)
        backend, norms = trainer.backend, []
        if not renorm:
            backend._renorm_offloaded_grads = lambda: None
        engine_step = backend.step

        def step():  # after the mask: what DeepSpeed should clip by
            sq = sum(v.grad.double().square().sum() for v in backend.grad_views())
            tdist.all_reduce(sq)
            engine_step()
            norms.append((sq.sqrt().item(), float(backend.engine.get_global_grad_norm())))

        backend.step = step
        backend.train_mode(True)
        for s in range(trainer.total_steps):
            trainer.train_step(s, strategy)
        return {"norms": norms, "state": backend.consolidated_state_dict()}

    results = {(p.name, m): run(p, m, f"{p.stem}-{m}") for p in SHIPPED for m in ("ct-f", "ct-d")}
    results["no-renorm"] = run(DS_CONFIGS / "zero2_offload.json", "ct-f", "no-renorm", renorm=False)
    return results


@pytest.fixture(scope="module")
def shipped(tiny_bert, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shipped")
    return run_world(shipped_worker, 2, tiny_bert, glue_dir, out) + [out]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ct-f", "ct-d"])
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_trains_like_one_process(shipped, reference, tiny_bert, path, method):
    main, out = shipped[0][(path.name, method)], shipped[-1]
    for rank in shipped[:-1]:
        for masked, clipped_by in rank[(path.name, method)]["norms"]:
            # mask, then clip: DeepSpeed's global norm is that of the masked gradient (offload too)
            assert clipped_by == pytest.approx(masked, rel=1e-5), (masked, clipped_by)
    want = reference[method]["state"]
    assert main["state"].keys() >= want.keys()
    if not _fixed_bf16(path):
        diff = max((main["state"][k] - want[k]).abs().max().item() for k in want)
        assert diff <= ATOL, f"max |w - w_1proc| = {diff:.3g}"
        return
    # bf16: forward/backward in bf16 cannot equal the fp32 run, but the update must point where
    # the fp32 run's does, and (CT-D) the fp32 masters keep every non-child entry bit-identical;
    # bf16 masters keep them at the checkpoint's bf16 values (zero.Init casts them once)
    pretrained = {k: v.float().reshape(-1) for k, v in load_file(tiny_bert / "model.safetensors").items()}
    ref = torch.cat([want[k].reshape(-1) - v for k, v in pretrained.items()])
    if _bf16_masters(path):
        pretrained = {k: v.bfloat16().float() for k, v in pretrained.items()}
    got = torch.cat([main["state"][k].reshape(-1) - v for k, v in pretrained.items()])
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
    assert cosine > 0.9, cosine
    if method == "ct-d":
        moved, selected = 0, 0
        for name, keep in _mask_bits(out / f"{path.stem}-{method}" / "mask").items():
            after = main["state"][name].reshape(-1)
            assert torch.equal(after[~keep], pretrained[name][~keep]), f"{name}: non-child entry moved"
            moved += int((after[keep] != pretrained[name][keep]).sum())
            selected += int(keep.sum())
        assert selected > 1000 and moved > 0.9 * selected, (moved, selected)


@pytest.mark.slow
def test_offload_norm_check_fails_without_the_post_mask_renorm(shipped):
    # without _renorm_offloaded_grads DeepSpeed clips by the pre-mask norm; CT-F's rescaled
    # mask (p = 0.3) makes the masked norm larger than the unmasked one
    masked, clipped_by = zip(*shipped[0]["no-renorm"]["norms"])
    assert all(m > c * 1.2 for m, c in zip(masked, clipped_by)), (masked, clipped_by)


def test_shipped_zero3_configs_keep_torch_linear():
    """DeepSpeed's memory_efficient_linear (default true) replaces F.linear process-wide with a
    function that rounds differently; it doubled the world-size difference of the MiniLM Fisher
    (README, "One child network at any world size"). Every shipped ZeRO-3 config turns it off."""
    accelerate = DS_CONFIGS.parent / "launch" / "accelerate"
    paths = [*DS_CONFIGS.glob("*.json"), *accelerate.glob("*.json")]
    zero3 = [p for p in paths if json.loads(p.read_text())["zero_optimization"]["stage"] == 3]
    assert len(zero3) == 6
    for path in zero3:
        assert json.loads(path.read_text())["zero_optimization"]["memory_efficient_linear"] is False, path
