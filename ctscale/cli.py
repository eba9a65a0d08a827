"""``ctscale`` command line.

Usage (one process; the same commands run under torchrun / deepspeed, see launch/):

    ctscale --version
    ctscale config show [--config CONFIG] [--set ...]        # the resolved config, defaults filled in
    ctscale train --config configs/rte_minilm_ctd.yaml [--set train.lr=2e-5 ...] [--mask FILE]
    ctscale train --config CONFIG --dry-run                  # check, resolve, print the plan; no weights
    ctscale fisher --config CONFIG [--set ...] --out runs/rte/mask.safetensors
    ctscale mask info [-v] [--model NAME_OR_PATH [--task TASK]] FILE_OR_DIR
    ctscale mask overlap A B [C ...] [--json]
    ctscale mask plot FILE_OR_DIR --out density.png
    ctscale eval --run runs/x [--data FILE | --split NAME] [--set data.text_column=...]
    ctscale predict --run runs/x --data FILE --out preds.jsonl [--max-new-tokens 64 ...]
    torchrun --nproc_per_node 2 -m ctscale train --config CONFIG --set distributed.backend=ddp
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from pathlib import Path

from ctscale import dist
from ctscale.errors import ConfigError, CtscaleError


def _run_config(args: argparse.Namespace):
    """The resolved config, checked by the engine too: before the trainer (transformers, the
    engine, a process group) is imported or started, so a bad config fails in about a second."""
    from ctscale.backends import check_config
    from ctscale.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "mask", None):
        overrides += [f"method.mask_file={args.mask}", "method.name=ct-d"]
    cfg = load_config(args.config, overrides)
    check_config(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    if args.dry_run:
        from ctscale.plan import build_plan, format_plan

        plan = format_plan(build_plan(cfg))
        if dist.rank_from_env() == 0:  # under a launcher every process plans; one prints
            print("\n".join(plan))
        return 0
    from ctscale.trainer import Trainer

    metrics = Trainer(cfg).run()
    if dist.is_main():
        print(json.dumps({"final": metrics}))
    return 0


def cmd_fisher(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    if cfg.method.mask_file:
        raise ConfigError(
            f"ctscale fisher estimates a new mask, but method.mask_file={cfg.method.mask_file!r} is "
            "set and would be ignored; remove method.mask_file (train with a saved mask via "
            "`ctscale train --mask FILE`)"
        )
    from ctscale.methods.ct_d.pipeline import default_mask_path, estimate_and_save_mask
    from ctscale.trainer import Trainer

    trainer = Trainer(cfg)
    out = Path(args.out) if args.out else default_mask_path(cfg.train.output_dir)
    trainer.prepare(mask_out=out)
    info = estimate_and_save_mask(cfg, trainer.backend, trainer.fisher_pass, out)
    if dist.is_main():
        print(f"wrote {out}: {info.total_selected} of {info.total_entries} candidate entries selected")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """The config a run would use (file + --set + defaults), validated, as YAML on stdout."""
    import yaml

    from ctscale.backends import check_config
    from ctscale.config import config_to_dict, load_config

    cfg = load_config(args.config, list(args.set or []))
    check_config(cfg)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, as pip installed it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ctscale")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed; pip install -e .)"


def cmd_mask_info(args: argparse.Namespace) -> int:
    from ctscale.masktools import check_fits_model, density_table, format_table
    from ctscale.storage.mask_file import verify

    info = verify(args.path)  # a corrupt or truncated file is an error, not a summary
    print(f"mask: {info.path} (format {info.format_version}, {len(info.files)} file(s), checksum ok)")
    if args.model:
        checked = check_fits_model(info, args.model, args.task)
        print(f"  fits model {args.model}: all {checked} mask tensors exist there with the same shape")
    for key, value in sorted(info.metadata.items()):
        print(f"  {key}: {json.dumps(value)}")
    total, chosen = info.total_entries, info.total_selected
    print(
        f"  selected: {chosen} / {total} entries ({chosen / max(total, 1):.4%}) in {len(info.shapes)} tensors"
    )
    if args.verbose:
        for name in sorted(info.shapes):
            n = 1
            for d in info.shapes[name]:
                n *= d
            print(f"    {name} {list(info.shapes[name])} {info.selected[name] / max(n, 1):.4f}")
    print("  density per layer x module type:")
    for line in format_table(density_table(info)):
        print(f"    {line}")
    return 0


def cmd_mask_overlap(args: argparse.Namespace) -> int:
    from ctscale.masktools import overlap

    result = overlap(args.paths)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0

    def num(x: float | None, fmt: str = ".4f") -> str:
        return "n/a" if x is None else format(x, fmt)

    print(f"{len(result['masks'])} masks of {result['total_entries']} candidate entries each:")
    for i, m in enumerate(result["masks"]):
        tag = f"{m['method']} p={m['reserve_p']} task={m['task']}"
        print(f"  [{i}] {m['path']}: {m['selected']} selected ({num(m['density'])}), {tag}")
    for p in result["pairs"]:
        print(
            f"  [{p['a']}] vs [{p['b']}]: {p['differing']} differing entries, intersection "
            f"{p['intersection']}, jaccard {num(p['jaccard'])}, "
            f"overlap ratio {num(p['overlap_ratio'])}, expected by chance "
            f"{p['expected_intersection']:.1f} (lift {num(p['lift'], '.2f')})"
        )
    return 0


def cmd_mask_plot(args: argparse.Namespace) -> int:
    from ctscale.masktools import plot_density
    from ctscale.storage.mask_file import read_info

    matrix = plot_density(read_info(args.path), args.out)
    cols = len(matrix[0]) if matrix else 0
    print(f"wrote {args.out}: density of {len(matrix)} layer(s) x {cols} module(s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ctscale.inference import evaluate_run

    metrics = evaluate_run(args.run, args.data, args.split, args.set or [], args.batch_size)
    print(json.dumps({"eval": metrics}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ctscale.inference import Generation, predict_run

    generation = Generation(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    rows = predict_run(args.run, args.data, args.out, args.set or [], args.batch_size, generation)
    print(f"wrote {args.out}: {rows} predictions")
    return 0


def _add_run_commands(sub) -> None:
    """``eval`` and ``predict``: a finished run's exported model, one process, no engine."""
    ev = sub.add_parser("eval", help="score a trained run's model on its validation data or a file")
    ev.add_argument("--run", required=True, help="the run's train.output_dir (config.yaml + model/)")
    ev.add_argument("--data", help="a file to score (CSV/TSV/JSON/JSONL/Parquet; GLUE: the task's TSV)")
    ev.add_argument("--split", help="a split of the run's data.dataset (or GLUE split, or train)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the run's config")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.set_defaults(func=cmd_eval)
    pr = sub.add_parser("predict", help="write a trained run's predictions for a file as JSONL")
    pr.add_argument("--run", required=True, help="the run's train.output_dir (config.yaml + model/)")
    pr.add_argument("--data", required=True, help="rows to predict (labels not needed)")
    pr.add_argument("--out", required=True, help="JSONL file to write, one object per row")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the run's config")
    pr.add_argument("--batch-size", type=int, default=32, help="classification batch size")
    pr.add_argument("--max-new-tokens", type=int, default=64, help="causal LMs: tokens to generate")
    pr.add_argument("--temperature", type=float, default=0.0, help="causal LMs: 0 = greedy")
    pr.add_argument("--top-p", type=float, default=1.0, help="causal LMs: nucleus sampling")
    pr.add_argument("--seed", type=int, default=0, help="causal LMs: sampling seed")
    pr.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctscale", description="Child-Tuning at distributed scale")
    # the deepspeed launcher passes --local_rank=N to every process; the env has it too
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"ctscale {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML or TOML config file (defaults if omitted)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=2e-5")

    train = sub.add_parser(
        "train", help="fine-tune (method.name: any registered method, e.g. vanilla, ct-f, ct-d)"
    )
    with_config(train)
    train.add_argument("--mask", help="CT-D mask file or directory to train with (skips the Fisher pass)")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="check and resolve the config, read tokenizer and data, print the plan (backend, world "
        "size, batches, steps, mask source, parameters, memory estimate); loads no weights, writes nothing",
    )
    train.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config (file, --set, defaults) as YAML")
    with_config(show)
    show.set_defaults(func=cmd_config_show)

    fisher = sub.add_parser("fisher", help="estimate Fisher information and write a CT-D mask")
    with_config(fisher)
    fisher.add_argument("--out", help="mask path (.safetensors file, or a directory when distributed)")
    fisher.set_defaults(func=cmd_fisher)

    mask = sub.add_parser("mask", help="inspect and compare mask files")
    mask_sub = mask.add_subparsers(dest="mask_command", required=True)
    info = mask_sub.add_parser("info", help="metadata and counts of a mask")
    info.add_argument("path")
    info.add_argument("-v", "--verbose", action="store_true", help="density per tensor")
    info.add_argument("--model", help="check the mask against this model (a model.name_or_path)")
    info.add_argument("--task", help="the task --model is built for (default: the mask's task)")
    info.set_defaults(func=cmd_mask_info)
    over = mask_sub.add_parser("overlap", help="overlap of the child networks of two or more masks")
    over.add_argument("paths", nargs="+", metavar="PATH")
    over.add_argument("--json", action="store_true", help="print the result as JSON")
    over.set_defaults(func=cmd_mask_overlap)
    plot = mask_sub.add_parser("plot", help="PNG heatmap of density per layer x module type")
    plot.add_argument("path")
    plot.add_argument("--out", required=True, help="PNG file to write")
    plot.set_defaults(func=cmd_mask_plot)
    _add_run_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except CtscaleError as err:
        print(f"ctscale: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not dist.lost_peer(err):
            raise
        first = str(err).strip().splitlines()[0][:300]
        print(
            f"ctscale: error: rank {dist.rank()} lost another rank in a collective ({first}); a rank or "
            "its host died and this job cannot go on. With MAX_RESTARTS > 0 (launch/torchrun.sh) the "
            "launcher restarts it, and train.resume=true continues from the newest checkpoint",
            file=sys.stderr,
        )
        return 3
    dist.shutdown()
    return code


def run() -> None:
    """The ``ctscale`` command and ``python -m ctscale`` (what the launchers start): ``main``,
    then the exit. A fatal signal (an abort in C++) prints every thread's Python stack."""
    faulthandler.enable()
    code = main()
    dist.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
