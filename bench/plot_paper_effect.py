"""Tables and box plot of ``bench/paper_effect.py``'s results (GitHub issue #5, item 4).

    python bench/plot_paper_effect.py                     # reads bench/results/paper_effect.jsonl
    python bench/plot_paper_effect.py --md /tmp/paper_effect_tables.md --png docs/paper_effect.png

Prints Markdown: for every study tag (grid, main, probe...) and setting (task, training-set size,
epochs, lr, p) the dev metrics per method as mean +- sample std over seeds (n = seeds), the paired
difference to vanilla (same seed, same data), and the wall seconds per run. The box plot shows the
``--tag`` study (default ``main``): one panel per task (accuracy; MRPC also F1), one box per method,
every seed as a dot.

    python bench/plot_paper_effect.py --selection lr-grid --lr-png docs/paper_effect_lr.png

``--selection GRID_TAG`` prints the per-method study instead (issue #20, docs/paper_effect.md): the
lr x p grid with each method's choice by mean held-out accuracy over the seeds every configuration
finished (dev is never used to choose), collapsed and failed runs, each method at its choice
against vanilla at its own (paired, t-test; more seeds from ``--extra-tags``), the second training
size (``--size-tag``), and the dev-accuracy-vs-lr plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

from ctscale.storage import atomic

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
    with atomic.replacing(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


# -- the per-method selection study (issue #20): lr-grid, best-vs-best, robustness, size ---------
FAMILY_LABEL = {"vanilla": "vanilla", "ct-f": "CT-F", "ct-d": "CT-D"}
COLLAPSE_SHARE = 0.95  # a run "collapses" when >= 95 % of its dev predictions are one class
FAILED_ACC = 0.60  # a run "fails to learn" below 60 % dev accuracy (majority class: 50.9 %)


def config(r: dict) -> tuple:
    """(method, p, lr): what the selection chooses per method family."""
    return (r["method"], r["p"], r["lr"])


def lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")  # 0.0001 -> 1e-4


def config_name(c: tuple) -> str:
    method, p, lr = c
    return f"{FAMILY_LABEL[method]}{'' if p is None else f' p {p:g}'}, lr {lr_label(lr)}"


def collapsed(r: dict) -> bool:
    return max(r["dev"]["pred_share"]) >= COLLAPSE_SHARE


def failed(r: dict) -> bool:
    return r["dev"]["accuracy"] < FAILED_ACC


def cells(rows: list[dict], tags: set[str], n: int) -> dict[tuple, dict[int, dict]]:
    """(method, p, lr) -> seed -> run, for runs of ``tags`` with ``n`` training examples."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if r["tag"] in tags and r["train_samples"] == n:
            out[config(r)][r["seed"]] = r
    return out


def complete_seeds(grid: dict[tuple, dict[int, dict]]) -> list[int]:
    """The seeds every configuration of the grid finished (a cut-short grid stays balanced)."""
    seeds = set.intersection(*(set(runs) for runs in grid.values())) if grid else set()
    return sorted(seeds)


def select(grid: dict[tuple, dict[int, dict]], seeds: list[int]) -> dict[str, tuple]:
    """Per method family, the (method, p, lr) of the best mean held-out accuracy over ``seeds``
    (dev is never looked at)."""
    chosen = {}
    for family in METHODS:
        options = [c for c in grid if c[0] == family]
        if options:
            chosen[family] = max(
                options, key=lambda c: statistics.mean(grid[c][s]["heldout"]["accuracy"] for s in seeds)
            )
    return chosen


def grid_table(grid: dict[tuple, dict[int, dict]], seeds: list[int], chosen: dict[str, tuple]) -> str:
    """One row per (method, p), one column per lr: held-out mean (selection), dev mean ± std (report),
    and how many of the seeds collapsed. The chosen cell of each family is bold."""
    lrs = sorted({c[2] for c in grid})
    rows_mp = sorted({(c[0], c[1]) for c in grid}, key=lambda mp: (METHODS.index(mp[0]), mp[1] or 0))
    out = [
        f"held-out acc (selection) / dev acc mean ± std / collapsed runs, seeds {seeds} (n = {len(seeds)})\n",
        "| method | " + " | ".join(f"lr {lr_label(lr)}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for method, p in rows_mp:
        line = [FAMILY_LABEL[method] + ("" if p is None else f" p {p:g}")]
        for lr in lrs:
            runs = [grid[(method, p, lr)][s] for s in seeds] if (method, p, lr) in grid else []
            if not runs:
                line.append("-")
                continue
            held = statistics.mean(r["heldout"]["accuracy"] for r in runs) * 100
            dev = mstd([r["dev"]["accuracy"] for r in runs])
            cell = f"{held:.1f} / {dev} / {sum(collapsed(r) for r in runs)}"
            line.append(f"**{cell}**" if chosen.get(method) == (method, p, lr) else cell)
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def paired(runs: dict[tuple, dict[int, dict]], chosen: dict[str, tuple], metric: str = "accuracy") -> str:
    """Each family at its chosen setting vs vanilla at its own, on the seeds both finished: mean ±
    std, paired differences, seeds better, and the paired t-test (scipy's ``ttest_rel``)."""
    from scipy.stats import ttest_rel

    van = runs.get(chosen["vanilla"], {})
    out = [
        "| method (chosen setting) | seeds | dev acc | held-out acc | − vanilla, paired | seeds better | p (paired t) |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in METHODS:
        c = chosen.get(family)
        if c is None:
            continue
        mine = runs.get(c, {})
        seeds = sorted(set(mine) & set(van))
        dev = [mine[s]["dev"][metric] for s in seeds]
        held = [mine[s]["heldout"][metric] for s in seeds if "heldout" in mine[s]]
        if family == "vanilla":
            out.append(f"| {config_name(c)} | {len(seeds)} | {mstd(dev)} | {mstd(held)} | | | |")
            continue
        diffs = [mine[s]["dev"][metric] - van[s]["dev"][metric] for s in seeds]
        better = sum(d > 0 for d in diffs)
        pval = (
            ttest_rel(dev, [van[s]["dev"][metric] for s in seeds]).pvalue if len(seeds) > 1 else float("nan")
        )
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs)
        out.append(
            f"| {config_name(c)} | {len(seeds)} | {mstd(dev)} | {mstd(held)} | "
            f"{mstd(diffs, signed=True)} ({per_seed}) | {better}/{len(seeds)} | {pval:.3f} |"
        )
    return "\n".join(out)


def collapse_table(grid: dict[tuple, dict[int, dict]], seeds: list[int]) -> str:
    """Runs collapsing to one class, and runs failing to learn, per method family (all p
    together, then each p): over the whole lr grid, and per lr ("collapsed / failed of runs")."""
    lrs = sorted({c[2] for c in grid})
    out = [
        "| method | all lr | " + " | ".join(f"lr {lr_label(lr)}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for family in METHODS:
        ps = sorted({c[1] for c in grid if c[0] == family and c[1] is not None})
        groups = [(FAMILY_LABEL[family] + (", all p" if ps else ""), None)]
        groups += [(f"{FAMILY_LABEL[family]} p {p:g}", p) for p in ps]
        for name, p in groups:
            configs = [c for c in grid if c[0] == family and (p is None or c[1] == p)]
            if not configs:
                continue
            cols = []
            for lr in [None, *lrs]:
                rs = [grid[c][s] for c in configs if lr is None or c[2] == lr for s in seeds]
                cols.append(f"{sum(map(collapsed, rs))} / {sum(map(failed, rs))} of {len(rs)}" if rs else "-")
            out.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(out)


def lr_plot(
    grid: dict[tuple, dict[int, dict]], seeds: list[int], chosen: dict[str, tuple], png: Path
) -> None:
    """Dev accuracy against lr (log x), one line per method and p: mean over seeds, bars = min-max,
    seeds as faint dots; a ring marks each family's held-out choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vanilla": "#333333", "ct-f": "#1f77b4", "ct-d": "#d62728"}
    styles = {None: ("-", "o"), 0.3: ("-", "s"), 0.1: (":", "^")}
    fig, ax = plt.subplots(figsize=(8.8, 4.6))
    lines = sorted({(c[0], c[1]) for c in grid}, key=lambda mp: (METHODS.index(mp[0]), -(mp[1] or 1)))
    for k, (method, p) in enumerate(lines):
        lrs = sorted(c[2] for c in grid if c[:2] == (method, p))
        shift = 1 + 0.025 * (k - (len(lines) - 1) / 2)  # side by side, so the bars do not overlap
        accs = [[100 * grid[(method, p, lr)][s]["dev"]["accuracy"] for s in seeds] for lr in lrs]
        means = [statistics.mean(a) for a in accs]
        xs = [lr * shift for lr in lrs]
        err = [[m - min(a) for m, a in zip(means, accs)], [max(a) - m for m, a in zip(means, accs)]]
        ls, marker = styles.get(p, ("-", "o"))
        label = FAMILY_LABEL[method] + ("" if p is None else f", p {p:g}")
        ax.errorbar(
            xs, means, yerr=err, color=colors[method], ls=ls, marker=marker, ms=5, capsize=3, label=label
        )
        for x, a in zip(xs, accs):
            ax.scatter([x] * len(a), a, s=8, color=colors[method], alpha=0.35, zorder=3)
        c = chosen.get(method)
        if c and c[:2] == (method, p):
            i = lrs.index(c[2])
            ax.scatter(
                [xs[i]], [means[i]], s=170, facecolors="none", edgecolors=colors[method], lw=1.6, zorder=4
            )
    ax.axhline(100 * MAJORITY[("sst2", "accuracy")], color="k", ls="--", lw=0.8, label="majority class")
    ax.set_xscale("log")
    all_lrs = sorted({c[2] for c in grid})
    ax.set_xticks(all_lrs, [lr_label(lr) for lr in all_lrs])
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    any_r = next(iter(next(iter(grid.values())).values()))
    ax.set_title(
        f"all-MiniLM-L6-v2, SST-2 n={any_r['train_samples']}, {any_r['epochs']} epochs: mean over seeds "
        f"{seeds}, bars min-max, dots seeds;\nring = the setting each method's held-out selection chose",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    with atomic.replacing(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def selection_report(
    rows: list[dict], grid_tag: str, extra_tags: list[str], size_tag: str, png: Path | None
) -> str:
    """The issue-#20 study as Markdown: grid + selection, collapse, best-vs-best, the second size."""
    grid = cells(rows, {grid_tag}, 256)
    if not grid:
        return f"no runs with tag {grid_tag!r}"
    seeds = complete_seeds(grid)
    incomplete = {c: sorted(set(runs) - set(seeds)) for c, runs in grid.items() if set(runs) - set(seeds)}
    chosen = select(grid, seeds)
    out = [
        f"## lr x p grid (`{grid_tag}`, SST-2 n=256) and the held-out choice\n",
        grid_table(grid, seeds, chosen),
    ]
    if incomplete:
        out.append(
            f"\n(left out, seeds that not every configuration finished: {len(incomplete)} configurations)"
        )
    out.append("\nChosen on held-out: " + "; ".join(config_name(c) for c in chosen.values()))
    out += [
        "\n## Collapsed (>= 95 % of dev predictions one class) / failed to learn (dev acc < 60 %) runs\n",
        collapse_table(grid, seeds),
    ]
    best = cells(rows, {grid_tag, *extra_tags}, 256)
    out += ["\n## Best vs best (each method at its chosen setting; seeds both it and vanilla finished)\n"]
    out.append(paired(best, chosen))
    size = [r for r in rows if r["tag"] == size_tag]
    for n in sorted({r["train_samples"] for r in size}):
        sized = cells(size, {size_tag}, n)
        out.append(f"\n## SST-2 n={n} (`{size_tag}`), each method at its n=256 choice\n")
        out.append(paired(sized, chosen))
        others = [c for c in sized if c not in chosen.values()]
        if others:
            rechosen = select(sized, complete_seeds(sized))
            out.append("\nEvery setting run at this size (bold: the held-out choice among them):\n")
            out.append(grid_table(sized, complete_seeds(sized), rechosen))
            out.append(f"\nEach method at its held-out choice among the settings run at n={n}:\n")
            out.append(paired(sized, rechosen))
    if png is not None:
        lr_plot(grid, seeds, chosen, png)
        out.append(f"\nlr plot: {png}")
    return "\n".join(out)


def parse_tags(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "paper_effect.jsonl"))
    ap.add_argument("--tag", default="main", help="study drawn in the box plot")
    ap.add_argument("--png", default=str(REPO / "docs" / "paper_effect.png"))
    ap.add_argument("--md", help="also write the tables to this file")
    ap.add_argument(
        "--selection", metavar="GRID_TAG", help="instead: the per-method selection study of this grid tag"
    )
    ap.add_argument(
        "--extra-tags", default="best", help="(--selection) tags of more seeds at the chosen settings"
    )
    ap.add_argument("--size-tag", default="size1000", help="(--selection) tag of the second training size")
    ap.add_argument("--lr-png", help="(--selection) the dev-accuracy-vs-lr plot")
    args = ap.parse_args()
    if args.selection:
        rows = load(Path(args.results))
        text = selection_report(
            rows,
            args.selection,
            parse_tags(args.extra_tags),
            args.size_tag,
            Path(args.lr_png) if args.lr_png else None,
        )
        print(text)
        if args.md:
            atomic.write_text(args.md, text + "\n")
        return
    rows, notes = balanced(load(Path(args.results)))
    text = tables(rows) + "".join(f"\n- {n}" for n in notes)
    print(text)
    if args.md:
        atomic.write_text(args.md, text + "\n")
    if any(r["tag"] == args.tag for r in rows):
        boxplot(rows, args.tag, Path(args.png))
        print(f"box plot: {args.png}")


if __name__ == "__main__":
    main()
