"""Where does the child network live? Density tables, overlap between masks, heatmaps.

Usage:

    ctscale mask info [-v] runs/rte/mask.safetensors      # counts, density per layer x module
    ctscale mask overlap runs/rte/mask.safetensors runs/mrpc/mask [--json]
    ctscale mask plot runs/rte/mask.safetensors --out density.png

Everything here is LOCAL (no communication) and reads GLOBAL masks (all pieces of all files).
``density_table`` and ``plot_density`` read headers only; ``overlap`` streams the payload one
tensor at a time.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctscale.errors import CtscaleError, MaskError
from ctscale.storage import atomic, mask_file
from ctscale.storage.mask_file import MaskInfo

if TYPE_CHECKING:
    from ctscale.config import ModelConfig

# The integer after the first `layer.` / `layers.` / `h.` / `block(s).` component is the layer index.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?:\.|$)")

# Module path (the name after the layer index, without .weight/.bias) -> normalised module type.
# First match wins, so `attention.output.dense` is tested before BERT's FFN `output.dense`.
MODULE_TYPES: list[tuple[str, str]] = [
    (r"(?i)norm|(^|\.)ln(_\w+)?$", "norm"),  # LayerNorm, layer_norm, input_layernorm, ln_1
    (r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv)$", "qkv"),  # fused q/k/v (GPT-2, NeoX, Phi-3)
    (r"(^|\.)(query|q_proj|query_proj|q)$", "query"),  # BERT, Llama/Qwen2, DeBERTa, XLNet
    (r"(^|\.)(key|k_proj|key_proj|k)$", "key"),
    (r"(^|\.)(value|v_proj|value_proj|v)$", "value"),
    (r"attention\.output\.dense$|(attention|attn)\.(dense|c_proj|o|out_proj)$|(^|\.)o_proj$", "attn_out"),
    (r"(^|\.)gate_proj$", "ffn_gate"),
    (r"(^|\.)intermediate\.dense$|(^|\.)(up_proj|c_fc|fc1|dense_h_to_4h|layer_1)$", "ffn_in"),
    (r"(^|\.)output\.dense$|mlp\.c_proj$|(^|\.)(down_proj|fc2|dense_4h_to_h|layer_2)$", "ffn_out"),
]
_MODULE_RES = [(re.compile(p), t) for p, t in MODULE_TYPES]
_ORDER = ["query", "key", "value", "qkv", "attn_out", "ffn_gate", "ffn_in", "ffn_out", "norm"]
DPI = 100  # plot size in pixels: width 240 + 80 per module, height 200 + 40 per layer


# PEFT adapter tensors: `<base module>.lora_A.<adapter name>` (lora_B, lora_embedding_A/B, ...)
_ADAPTER_RE = re.compile(r"\.(lora_[A-Za-z_]+)\.[^.]+$")


def layer_and_module(name: str) -> tuple[int | None, str]:
    """(layer index or None, module path) of a canonical HF parameter name.

    The layer index is the integer after the first ``layer.``/``layers.``/``h.``/``block(s).``
    (None for embeddings, pooler, head). The module path is the model's own name for the
    module: what follows the layer index (the whole name outside layers), without
    ``.weight``/``.bias`` (biases fold into their module) and, for a PEFT adapter tensor,
    without the adapter's name: ``self_attn.q_proj.lora_B.default.weight`` -> ``self_attn.q_proj.lora_B``.
    ``density_table`` shortens these to the shortest unambiguous suffix (``q_proj``, ``up_proj``).
    """
    match = _LAYER_RE.search(name)
    path = name[match.end() :] if match else name
    path = re.sub(r"\.(weight|bias)$", "", path) or name
    path = _ADAPTER_RE.sub(r".\1", path)
    return (int(match.group(1)) if match else None), path


def module_type(path: str) -> str:
    """ctscale's normalised type of a module path (``query``, ``attn_out``, ``ffn_in``, ``norm``,
    ...; the first ``MODULE_TYPES`` match, else the last component): orders the table's columns
    so that every model reads query, key, value, attention output, FFN, norm from left to right."""
    base = re.sub(r"\.lora_[A-Za-z_]+$", "", path)
    for pattern, kind in _MODULE_RES:
        if pattern.search(base):
            return kind
    return base.rsplit(".", 1)[-1]


def short_names(paths: Sequence[str]) -> dict[str, str]:
    """Each distinct module path -> its shortest suffix (whole dotted components) that no other
    path shares at that length, else the path itself: BERT's ``attention.self.query`` ->
    ``query``, but ``attention.output.dense`` and ``output.dense`` stay apart; Llama's
    ``self_attn.q_proj.lora_B`` -> ``q_proj.lora_B``. Distinct paths get distinct labels."""
    split = {p: p.split(".") for p in set(paths)}
    out = {}
    for path, parts in split.items():
        others = [q for other, q in split.items() if other != path]
        for n in range(1, len(parts) + 1):
            if all(q[-n:] != parts[-n:] for q in others):
                out[path] = ".".join(parts[-n:])
                break
        else:
            out[path] = path
    return out


def density(selected: int, total: int) -> float:
    """selected / total, NaN for an empty cell."""
    return selected / total if total else math.nan


def density_table(info: MaskInfo) -> dict[str, Any]:
    """Selected and total entries per layer x module, from the header counts (no payload).

    Modules carry the model's own names (``short_names`` of ``layer_and_module``'s paths), in
    ``_ORDER`` of their ``module_type`` and then by name. Returns ``{"layers": [0, 1, .., None],
    "modules": [...], "cells": {layer: {module: (selected, total)}}, "by_layer": {layer: (s, t)},
    "by_module": {module: (s, t)}, "vector_modules": [modules whose tensors are all 1-D: norms,
    biases], "selected": s, "total": t}``; layer None ("other") sorts last.
    """
    located = {name: layer_and_module(name) for name in info.shapes}
    label = short_names([path for _, path in located.values()])
    cells: dict[int | None, dict[str, tuple[int, int]]] = {}
    by_layer: dict[int | None, tuple[int, int]] = {}
    by_module: dict[str, tuple[int, int]] = {}
    kinds: dict[str, str] = {}
    matrices: set[str] = set()
    for name, shape in info.shapes.items():
        layer, path = located[name]
        module = label[path]
        kinds[module] = module_type(path)
        if len(shape) > 1:
            matrices.add(module)
        s, t = info.selected[name], math.prod(shape)
        row = cells.setdefault(layer, {})
        totals: list[tuple[dict[Any, tuple[int, int]], Any]] = [
            (row, module),
            (by_layer, layer),
            (by_module, module),
        ]
        for sums, key in totals:
            old = sums.get(key, (0, 0))
            sums[key] = (old[0] + s, old[1] + t)
    layers = sorted(cells, key=lambda x: (x is None, x or 0))

    def order(m: str) -> tuple[int, str]:
        return (_ORDER.index(kinds[m]) if kinds[m] in _ORDER else len(_ORDER), m)

    modules = sorted(by_module, key=order)
    vectors = [m for m in modules if m not in matrices]
    table = dict(layers=layers, modules=modules, cells=cells, by_layer=by_layer, by_module=by_module)
    return table | dict(vector_modules=vectors, selected=info.total_selected, total=info.total_entries)


def density_matrix(table: dict[str, Any]) -> list[list[float]]:
    """Rows = ``table["layers"]``, columns = ``table["modules"]``; NaN where a layer lacks a type."""
    return [
        [density(*table["cells"][layer].get(m, (0, 0))) for m in table["modules"]]
        for layer in table["layers"]
    ]


def format_table(table: dict[str, Any]) -> list[str]:
    """Text lines: density per layer x module, an "all" column and row, counts per module."""
    mods = table["modules"]
    widths = [max(7, len(m)) + 1 for m in [*mods, "all"]]  # one width per column: long names stay local

    def cells(values: Sequence[float]) -> str:
        return "".join(("-" if math.isnan(v) else f"{v:.4f}").rjust(w) for v, w in zip(values, widths))

    lines = ["layer".rjust(6) + "".join(m.rjust(w) for m, w in zip([*mods, "all"], widths))]
    for layer, row in zip(table["layers"], density_matrix(table)):
        label = "other" if layer is None else str(layer)
        lines.append(label.rjust(6) + cells([*row, density(*table["by_layer"][layer])]))
    totals = [density(*table["by_module"][m]) for m in mods]
    lines.append("all".rjust(6) + cells([*totals, density(table["selected"], table["total"])]))
    width = max([8, *map(len, mods)]) + 1
    lines.append("per module (selected / total):")
    for m in mods:
        s, t = table["by_module"][m]
        lines.append(f"  {m:<{width}} {s} / {t} ({density(s, t):.4f})")
    return lines


def check_fits_model(info: MaskInfo, name_or_path: str, task: str | None = None) -> int:
    """MaskError unless every tensor of the mask exists, with its shape, in the model that
    ``name_or_path`` (any ``model.name_or_path`` form) builds for ``task`` (default: the mask's
    own task), the same check training does. Built on the meta device: no weights are read.
    Returns the number of mask tensors checked."""
    from ctscale.config import ModelConfig

    shapes = meta_shapes(ModelConfig(name_or_path=name_or_path), task or info.metadata.get("task") or "rte")
    mask_file.check_names(info, shapes)
    return len(info.shapes)


def meta_shapes(cfg: ModelConfig, task: str) -> dict[str, tuple[int, ...]]:
    """``parameter_shapes`` of the model training builds from ``cfg`` for ``task`` (a GLUE task,
    or ``jsonl``: a causal LM), without reading weights (``models.meta_model``)."""
    from ctscale.models import meta_model, parameter_shapes
    from ctscale.tasks import get_task

    return parameter_shapes(meta_model(cfg, None if task == "jsonl" else get_task(task)))


def _same_model(infos: Sequence[MaskInfo]) -> None:
    """MaskError naming the first difference unless every mask has the first one's names/shapes."""
    ref = infos[0]
    for other in infos[1:]:
        for a, b in ((ref, other), (other, ref)):
            extra = sorted(set(a.shapes) - set(b.shapes))
            if extra:
                more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
                raise MaskError(
                    f"masks of different models or candidate scopes: {a.path} has {', '.join(extra[:3])}"
                    f"{more}, {b.path} does not; compare masks of the same model and scope"
                )
        for name in sorted(ref.shapes):
            if ref.shapes[name] != other.shapes[name]:
                raise MaskError(
                    f"masks of different models: {name!r} has shape {list(ref.shapes[name])} in "
                    f"{ref.path} but {list(other.shapes[name])} in {other.path}"
                )


def overlap(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Pairwise overlap of two or more masks of the same model, streamed tensor by tensor.

    Per pair (i < j): intersection |A∩B|, union, ``differing`` = |A△B| (entries in exactly one
    mask: exact, where a rounded Jaccard of 1.0000 can hide a few), Jaccard |A∩B|/|A∪B|, overlap ratio
    |A∩B|/min(|A|,|B|), the intersection expected for independent random masks of the same
    densities |A||B|/N, and ``lift`` = intersection / expected (> 1: more shared than chance).
    Undefined ratios (0/0) are None.
    """
    if len(paths) < 2:
        raise MaskError(f"overlap needs two or more masks, got {len(paths)}")
    infos = [mask_file.read_info(p) for p in paths]
    _same_model(infos)
    names = sorted(infos[0].shapes)
    k, total = len(paths), infos[0].total_entries
    inter = dict.fromkeys(itertools.combinations(range(k), 2), 0)
    for bits in zip(*(mask_file.iter_full_tensors(p, info, names) for p, info in zip(paths, infos))):
        for i, j in inter:
            inter[i, j] += int(torch.count_nonzero(bits[i] & bits[j]))

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    masks: list[dict[str, Any]] = [
        dict(path=str(p), selected=info.total_selected, density=ratio(info.total_selected, total))
        | {key: info.metadata.get(key) for key in ("method", "reserve_p", "task")}
        for p, info in zip(paths, infos)
    ]
    pairs = []
    for (i, j), n in inter.items():
        a, b = masks[i]["selected"], masks[j]["selected"]
        union, expected = a + b - n, (a * b / total if total else 0.0)
        stats = dict(intersection=n, union=union, differing=union - n, jaccard=ratio(n, union))
        stats |= dict(overlap_ratio=ratio(n, min(a, b)))
        pairs.append(dict(a=i, b=j) | stats | dict(expected_intersection=expected, lift=ratio(n, expected)))
    return dict(total_entries=total, masks=masks, pairs=pairs)


def colour_range(table: dict[str, Any], matrix: list[list[float]], reserve_p: float | None) -> float:
    """Top of the plot's colour scale: the largest density of a weight-matrix column, and at
    least ``p`` (so the mark for p sits on the bar). Norm and bias columns (all tensors 1-D:
    few entries, high Fisher per entry, often density 1) are left out, or they would squeeze
    every matrix cell into the bottom of the scale; their cells show their value as text and
    saturate the colour. Only vector columns: their own maximum."""
    vectors = set(table["vector_modules"])
    keep = [c for c, m in enumerate(table["modules"]) if m not in vectors] or range(len(table["modules"]))
    finite = [row[c] for row in matrix for c in keep if not math.isnan(row[c])]
    top = max([*finite, reserve_p or 0.0], default=0.0)
    return top or 1.0


def plot_density(info: MaskInfo, png_path: str | Path) -> list[list[float]]:
    """Write a heatmap of density per layer (y) x module (x, the model's own names); return the
    plotted matrix. The colour scale is ``colour_range`` (matrices, not norms), and the
    colour bar marks the mask's ``p`` (its expected density).

    Agg canvas (no pyplot, no global backend switch); written atomically (temp file + replace).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:  # an optional extra: the rest of ctscale needs no plotting
        raise CtscaleError(
            'ctscale mask plot needs matplotlib, which is not installed; pip install "ctscale[plot]"'
        ) from None

    table = density_table(info)
    matrix = density_matrix(table)
    meta = info.metadata
    p = meta.get("reserve_p")
    p = float(p) if isinstance(p, int | float) else None
    rows, cols = len(table["layers"]), len(table["modules"])
    fig = Figure(figsize=((240 + 80 * cols) / DPI, (200 + 40 * rows) / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = colour_range(table, matrix, p)
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    for r, row in enumerate(matrix):
        for c, v in enumerate(row):
            if not math.isnan(v):
                color = "black" if v > 0.6 * vmax else "white"
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(cols), table["modules"], rotation=45, ha="right")
    ax.set_yticks(range(rows), ["other" if x is None else str(x) for x in table["layers"]])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(
        f"child-network density: {meta.get('method', '?')} p={meta.get('reserve_p', '?')} "
        f"task={meta.get('task', '?')}\n{table['selected']} / {table['total']} entries",
        fontsize=9,
    )
    extend = "max" if any(v > vmax for row in matrix for v in row if not math.isnan(v)) else "neither"
    bar = fig.colorbar(image, ax=ax, label="selected / total", extend=extend)
    if p is not None:  # the mask's expected density: a red line and a tick on the colour bar
        bar.ax.axhline(p, color="red", linewidth=3)
        ticks = {0.0: "0", vmax: f"{vmax:.2f}"} | {p: f"p={p:g}"}
        bar.set_ticks(sorted(ticks), labels=[ticks[t] for t in sorted(ticks)])
    with atomic.replacing(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return matrix
