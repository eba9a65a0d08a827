"""Tables and box plot of ``bench/paper_effect.py``'s results (GitHub issue #5, item 4).

    python bench/plot_paper_effect.py                     # reads bench/results/paper_effect.jsonl
    python bench/plot_paper_effect.py --md /tmp/paper_effect_tables.md --png docs/paper_effect.png

Prints Markdown: for every study tag (grid, main, probe...) and setting (task, training-set size,
epochs, lr, p) the dev metrics per method as mean +- sample std over seeds (n = seeds), the paired
difference to vanilla (same seed, same data), and the wall seconds per run. The box plot shows the
``--tag`` study (default ``main``): one panel per task (accuracy; MRPC also F1), one box per method,
every seed as a dot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["vanilla", "ct-f", "ct-d"]
TASK_NAMES = {"rte": "RTE", "mrpc": "MRPC", "sst2": "SST-2"}
# predicting the majority class on the dev split (from the shared GLUE TSVs: RTE 146/277
# not_entailment, MRPC 279/408 paraphrase, SST-2 444/872 positive); MRPC F1 = all "paraphrase"
MAJORITY = {
    ("rte", "accuracy"): 0.527,
    ("mrpc", "accuracy"): 0.684,
    ("mrpc", "f1"): 0.812,
    ("sst2", "accuracy"): 0.509,
}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mstd(xs: list[float], scale: float = 100.0, signed: bool = False) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs) * scale
    if len(xs) == 1:
        return f"{m:+.1f}" if signed else f"{m:.1f}"
    s = statistics.stdev(xs) * scale
    return f"{m:+.1f} ± {s:.1f}" if signed else f"{m:.1f} ± {s:.1f}"


def metrics_of(task: str) -> list[str]:
    return ["accuracy", "f1"] if task == "mrpc" else ["accuracy"]


def balanced(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Keep, per setting, only the seeds that every method of that setting finished (a study cut
    short in the middle of a seed would otherwise compare different seeds); say what was dropped."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[setting(r)].append(r)
    kept, notes = [], []
    for key, rs in groups.items():
        methods = {(r["method"], r["p"]) for r in rs}
        seeds = {r["seed"] for r in rs}
        full = {
            s
            for s in seeds
            if all(any(r["seed"] == s and (r["method"], r["p"]) == m for r in rs) for m in methods)
        }
        kept += [r for r in rs if r["seed"] in full]
        if full != seeds:
            dropped = len([r for r in rs if r["seed"] not in full])
            notes.append(
                f"{key[0]} {key[1]}: {dropped} run(s) of unfinished seeds {sorted(seeds - full)} left out"
            )
    return kept, notes


def setting(r: dict) -> tuple:
    return (r["tag"], r["task"], r["train_samples"], r["epochs"], r["lr"], r["max_length"])


def tables(rows: list[dict]) -> str:
    out = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[setting(r)].append(r)
    for tag in dict.fromkeys(r["tag"] for r in rows):
        keys = [k for k in groups if k[0] == tag]
        out.append(f"### `{tag}`\n")
        header = "| task | train n | epochs | lr | method | p | seeds | " + " | ".join(
            [
                "dev acc (mean ± std)",
                "Δ acc vs vanilla, paired",
                "dev F1 (MRPC)",
                "Δ F1 vs vanilla",
                "wall s/run",
            ]
        )
        out += [header + " |", "|" + "---|" * 12]
        for key in keys:
            _, task, n, epochs, lr, _ = key
            rs = groups[key]
            by_method: dict[tuple, dict[int, dict]] = defaultdict(dict)
            for r in rs:
                by_method[(r["method"], r["p"])][r["seed"]] = r
            van = next((v for (m, _), v in by_method.items() if m == "vanilla"), {})
            order = sorted(by_method, key=lambda mp: (METHODS.index(mp[0]), mp[1] or 0))
            for method, p in order:
                seeds = by_method[(method, p)]
                cells = []
                for metric in ["accuracy", "f1"]:
                    if metric not in metrics_of(task):
                        cells += ["", ""]
                        continue
                    xs = [s["dev"][metric] for s in seeds.values()]
                    cells.append(mstd(xs))
                    common = sorted(set(seeds) & set(van))
                    diffs = [seeds[s]["dev"][metric] - van[s]["dev"][metric] for s in common]
                    if method == "vanilla" or not diffs:
                        cells.append("")
                    else:
                        cells.append(f"{mstd(diffs, signed=True)} (n={len(diffs)})")
                walls = [s["wall_s"] for s in seeds.values()]
                out.append(
                    f"| {TASK_NAMES.get(task, task)} | {n} | {epochs} | {lr:g} | {method} | "
                    f"{'' if p is None else p} | {len(seeds)} | {cells[0]} | {cells[1]} | {cells[2]} | "
                    f"{cells[3]} | {statistics.median(walls):.0f} |"
                )
        out.append("")
    return "\n".join(out)


def boxplot(rows: list[dict], tag: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["tag"] == tag]
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rs)]
    panels = [(t, m) for t in tasks for m in metrics_of(t)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.9), squeeze=False)
    colors = {"vanilla": "#888888", "ct-f": "#1f77b4", "ct-d": "#d62728"}
    for ax, (task, metric) in zip(axes[0], panels, strict=True):
        methods = [m for m in METHODS if any(r["task"] == task and r["method"] == m for r in rs)]
        data = [
            [100 * r["dev"][metric] for r in rs if r["task"] == task and r["method"] == m] for m in methods
        ]
        bp = ax.boxplot(data, widths=0.55, patch_artist=True, showmeans=True, showfliers=False)
        for patch, m in zip(bp["boxes"], methods, strict=True):
            patch.set_facecolor(colors[m])
            patch.set_alpha(0.35)
        for i, (m, ys) in enumerate(zip(methods, data, strict=True), start=1):
            xs = [i + 0.12 * ((j % 5) - 2) / 2 for j in range(len(ys))]
            ax.scatter(xs, ys, s=14, color=colors[m], zorder=3)
        majority = 100 * MAJORITY[(task, metric)]
        if majority > min(min(d) for d in data) - 5:
            ax.axhline(majority, color="k", ls="--", lw=0.8, label="majority class")
            ax.legend(loc="lower right", fontsize=7, frameon=False)
        else:  # far below every run: a line would flatten the boxes
            ax.text(
                0.98,
                0.02,
                f"majority class {majority:.1f} (off scale)",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(1, len(methods) + 1), methods)
        any_r = next(r for r in rs if r["task"] == task)
        k = len({r["seed"] for r in rs if r["task"] == task})
        ax.set_title(
            f"{TASK_NAMES[task]} dev {metric}\n(train n={any_r['train_samples']}, {k} seeds)", fontsize=9
        )
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(axis="y", alpha=0.3)
    first = rs[0]
    p = next((r["p"] for r in rs if r["p"] is not None), None)
    title = (
        f"all-MiniLM-L6-v2 ({tag}): vanilla vs CT-F vs CT-D, same lr {first['lr']:g}, p {p}, "
        f"{first['epochs']} epochs, batch {first['batch_size']}; dots = seeds, triangle = mean"
    )
    fig.suptitle(textwrap.fill(title, 45 * len(panels)), fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "paper_effect.jsonl"))
    ap.add_argument("--tag", default="main", help="study drawn in the box plot")
    ap.add_argument("--png", default=str(REPO / "docs" / "paper_effect.png"))
    ap.add_argument("--md", help="also write the tables to this file")
    args = ap.parse_args()
    rows, notes = balanced(load(Path(args.results)))
    text = tables(rows) + "".join(f"\n- {n}" for n in notes)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if any(r["tag"] == args.tag for r in rows):
        boxplot(rows, args.tag, Path(args.png))
        print(f"box plot: {args.png}")


if __name__ == "__main__":
    main()
