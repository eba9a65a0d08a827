"""Tests for ctscale.masktools and `ctscale mask info|overlap|plot`: exact numbers on hand-made masks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from ctscale.cli import main
from ctscale.errors import MaskError
from ctscale.masktools import (
    colour_range,
    density_matrix,
    density_table,
    format_table,
    layer_and_module,
    module_type,
    overlap,
    plot_density,
    short_names,
)
from ctscale.storage import mask_file
from ctscale.storage.mask_file import MaskPiece, read_info, save_mask

nan = math.nan

# A BERT-like model (hidden 2, intermediate 4) plus two non-layer tensors, and per-tensor counts:
# the first `count` flat entries of each tensor are selected (unlisted tensors: none).
BERT_LAYER = {
    "attention.self.query.weight": (2, 2),
    "attention.self.query.bias": (2,),
    "attention.self.key.weight": (2, 2),
    "attention.self.key.bias": (2,),
    "attention.self.value.weight": (2, 2),
    "attention.self.value.bias": (2,),
    "attention.output.dense.weight": (2, 2),
    "attention.output.dense.bias": (2,),
    "attention.output.LayerNorm.weight": (2,),
    "attention.output.LayerNorm.bias": (2,),
    "intermediate.dense.weight": (4, 2),
    "intermediate.dense.bias": (4,),
    "output.dense.weight": (2, 4),
    "output.dense.bias": (2,),
    "output.LayerNorm.weight": (2,),
    "output.LayerNorm.bias": (2,),
}
BERT = {f"bert.encoder.layer.{i}.{k}": s for i in range(2) for k, s in BERT_LAYER.items()}
BERT |= {"bert.embeddings.LayerNorm.weight": (2,), "classifier.weight": (2, 2)}
L0, L1 = "bert.encoder.layer.0.", "bert.encoder.layer.1."
BERT_COUNTS = {
    L0 + "attention.self.query.weight": 4,
    L0 + "attention.self.key.weight": 2,
    L0 + "attention.self.key.bias": 1,
    L0 + "attention.output.dense.weight": 3,
    L0 + "attention.output.LayerNorm.weight": 1,
    L0 + "output.LayerNorm.bias": 1,
    L0 + "intermediate.dense.weight": 6,
    L0 + "output.dense.weight": 2,
    L0 + "output.dense.bias": 1,
    L1 + "attention.self.query.weight": 1,
    L1 + "intermediate.dense.bias": 4,
    L1 + "output.LayerNorm.weight": 2,
    "bert.embeddings.LayerNorm.weight": 1,
}
META = {"method": "ct-d", "reserve_p": 0.25, "task": "rte"}

# A Qwen2-like model (q/k/v biases), 2 layers: 50 entries a layer, N = 100.
LLAMA_LAYER = {
    "self_attn.q_proj.weight": (2, 2),
    "self_attn.q_proj.bias": (2,),
    "self_attn.k_proj.weight": (2, 2),
    "self_attn.k_proj.bias": (2,),
    "self_attn.v_proj.weight": (2, 2),
    "self_attn.v_proj.bias": (2,),
    "self_attn.o_proj.weight": (2, 2),
    "mlp.gate_proj.weight": (4, 2),
    "mlp.up_proj.weight": (4, 2),
    "mlp.down_proj.weight": (2, 4),
    "input_layernorm.weight": (2,),
    "post_attention_layernorm.weight": (2,),
}
LLAMA = {f"model.layers.{i}.{k}": s for i in range(2) for k, s in LLAMA_LAYER.items()}


def pieces_from_flat(shapes: dict, flat: torch.Tensor, split: int | None = None) -> list[MaskPiece]:
    """Cut one global bit vector (tensors in ``shapes`` order) into per-tensor pieces.

    With ``split``, every tensor longer than it is saved as two pieces [0, split), [split, n).
    """
    out, offset = [], 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        bits = flat[offset : offset + n]
        cuts = [0, split, n] if split and n > split else [0, n]
        out += [MaskPiece(name, shape, a, b, bits[a:b].clone()) for a, b in zip(cuts, cuts[1:])]
        offset += n
    assert offset == flat.numel()
    return out


def pieces_from_counts(shapes: dict, counts: dict) -> list[MaskPiece]:
    """One piece per tensor, its first ``counts[name]`` flat entries selected."""
    pieces = []
    for name, shape in shapes.items():
        bits = torch.arange(math.prod(shape)) < counts.get(name, 0)
        pieces.append(MaskPiece(name, shape, 0, bits.numel(), bits))
    return pieces


def bert_mask(path: Path) -> Path:
    save_mask(path, pieces_from_counts(BERT, BERT_COUNTS), META)
    return path


@pytest.fixture
def llama_masks(tmp_path: Path) -> list[Path]:
    """A: i % 2 == 0 (50), B: i % 5 == 0 (20), C: i % 2 == 0 and i < 40 (20), i = global index."""
    i = torch.arange(100)
    a, b, c = i % 2 == 0, i % 5 == 0, (i % 2 == 0) & (i < 40)
    pa, pb, pc = tmp_path / "a.safetensors", tmp_path / "b", tmp_path / "c"
    save_mask(pa, pieces_from_flat(LLAMA, a), META | {"task": "a"})
    # B: two shards, each tensor cut at flat index 3 (not byte aligned)
    pieces = pieces_from_flat(LLAMA, b, split=3)
    halves = [[p for p in pieces if p.start == 0], [p for p in pieces if p.start > 0]]
    meta_b = META | {"task": "b"}
    mask_file._write_index(
        pb, [mask_file._save_shard(pb, h, r, 2, meta_b) for r, h in enumerate(halves)], meta_b
    )
    save_mask(pc, pieces_from_flat(LLAMA, c, split=5), META | {"task": "c"})
    return [pa, pb, pc]


@pytest.mark.parametrize(
    "name, expected, kind",
    [
        ("bert.encoder.layer.3.attention.self.query.weight", (3, "attention.self.query"), "query"),
        ("bert.encoder.layer.3.attention.self.query.bias", (3, "attention.self.query"), "query"),
        ("roberta.encoder.layer.11.attention.self.key.weight", (11, "attention.self.key"), "key"),
        ("bert.encoder.layer.0.attention.self.value.bias", (0, "attention.self.value"), "value"),
        ("bert.encoder.layer.2.attention.output.dense.weight", (2, "attention.output.dense"), "attn_out"),
        ("bert.encoder.layer.2.attention.output.LayerNorm.bias", (2, "attention.output.LayerNorm"), "norm"),
        ("bert.encoder.layer.2.intermediate.dense.weight", (2, "intermediate.dense"), "ffn_in"),
        ("bert.encoder.layer.2.output.dense.bias", (2, "output.dense"), "ffn_out"),
        ("bert.encoder.layer.2.output.LayerNorm.weight", (2, "output.LayerNorm"), "norm"),
        (
            "bert.embeddings.word_embeddings.weight",
            (None, "bert.embeddings.word_embeddings"),
            "word_embeddings",
        ),
        ("bert.embeddings.LayerNorm.weight", (None, "bert.embeddings.LayerNorm"), "norm"),
        ("bert.pooler.dense.weight", (None, "bert.pooler.dense"), "dense"),
        ("classifier.weight", (None, "classifier"), "classifier"),
        ("model.layers.7.self_attn.q_proj.weight", (7, "self_attn.q_proj"), "query"),
        ("model.layers.7.self_attn.q_proj.bias", (7, "self_attn.q_proj"), "query"),
        ("model.layers.7.self_attn.k_proj.weight", (7, "self_attn.k_proj"), "key"),
        ("model.layers.7.self_attn.v_proj.bias", (7, "self_attn.v_proj"), "value"),
        ("model.layers.7.self_attn.o_proj.weight", (7, "self_attn.o_proj"), "attn_out"),
        ("model.layers.7.mlp.gate_proj.weight", (7, "mlp.gate_proj"), "ffn_gate"),
        ("model.layers.7.mlp.up_proj.weight", (7, "mlp.up_proj"), "ffn_in"),
        ("model.layers.7.mlp.down_proj.weight", (7, "mlp.down_proj"), "ffn_out"),
        ("model.layers.7.input_layernorm.weight", (7, "input_layernorm"), "norm"),
        ("model.layers.7.post_attention_layernorm.weight", (7, "post_attention_layernorm"), "norm"),
        ("model.norm.weight", (None, "model.norm"), "norm"),
        ("lm_head.weight", (None, "lm_head"), "lm_head"),
        ("classifier.out_proj.weight", (None, "classifier.out_proj"), "out_proj"),  # RoBERTa head
        ("model.decoder.layers.2.self_attn.out_proj.bias", (2, "self_attn.out_proj"), "attn_out"),  # OPT
        (
            "deberta.encoder.layer.1.attention.self.query_proj.weight",
            (1, "attention.self.query_proj"),
            "query",
        ),
        ("encoder.block.0.layer.1.DenseReluDense.wi.weight", (0, "layer.1.DenseReluDense.wi"), "wi"),  # T5
        ("transformer.h.1.attn.c_attn.weight", (1, "attn.c_attn"), "qkv"),
        ("transformer.h.1.attn.c_proj.bias", (1, "attn.c_proj"), "attn_out"),
        ("transformer.h.1.mlp.c_fc.weight", (1, "mlp.c_fc"), "ffn_in"),
        ("transformer.h.1.mlp.c_proj.weight", (1, "mlp.c_proj"), "ffn_out"),
        ("transformer.h.1.ln_2.weight", (1, "ln_2"), "norm"),
        ("transformer.layer.4.rel_attn.o", (4, "rel_attn.o"), "attn_out"),
        ("transformer.layer.4.ff.layer_2.weight", (4, "ff.layer_2"), "ffn_out"),
        ("vit.blocks.5.mystery.thing.weight", (5, "mystery.thing"), "thing"),
        # PEFT LoRA: the adapter's name ("default") is dropped, the base module kept
        (
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight",
            (3, "self_attn.q_proj.lora_A"),
            "query",
        ),
        (
            "base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight",
            (3, "mlp.up_proj.lora_B"),
            "ffn_in",
        ),
        (
            "base_model.model.model.layers.0.self_attn.o_proj.lora_B.my_task.weight",
            (0, "self_attn.o_proj.lora_B"),
            "attn_out",
        ),
    ],
)
def test_layer_and_module(name: str, expected: tuple, kind: str) -> None:
    """The model's own module names (issue 17: not ctscale's types, not PEFT's "default")."""
    assert layer_and_module(name) == expected
    assert module_type(expected[1]) == kind


def test_short_names_are_unique_suffixes() -> None:
    paths = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    paths += ["self_attn.q_proj.lora_A", "self_attn.q_proj.lora_B", "self_attn.v_proj.lora_B", "mlp.up_proj"]
    assert short_names(paths) == {
        "attention.self.query": "query",
        "attention.output.dense": "attention.output.dense",
        "intermediate.dense": "intermediate.dense",
        "output.dense": "output.dense",
        "self_attn.q_proj.lora_A": "lora_A",
        "self_attn.q_proj.lora_B": "q_proj.lora_B",
        "self_attn.v_proj.lora_B": "v_proj.lora_B",
        "mlp.up_proj": "up_proj",
    }


AO, AN, ON, EN = (
    "attention.output.dense",
    "attention.output.LayerNorm",
    "output.LayerNorm",
    "embeddings.LayerNorm",
)
BERT_MODULES = ["query", "key", "value", AO, "intermediate.dense", "output.dense", AN, EN, ON, "classifier"]


def test_density_table_bert(tmp_path: Path) -> None:
    table = density_table(read_info(bert_mask(tmp_path / "bert.safetensors")))
    assert table["layers"] == [0, 1, None]
    assert table["modules"] == BERT_MODULES
    assert table["vector_modules"] == [AN, EN, ON]
    assert table["cells"] == {
        0: {"query": (4, 6), "key": (3, 6), "value": (0, 6), AO: (3, 6), AN: (1, 4), ON: (1, 4)}
        | {"intermediate.dense": (6, 12), "output.dense": (3, 10)},
        1: {"query": (1, 6), "key": (0, 6), "value": (0, 6), AO: (0, 6), AN: (0, 4), ON: (2, 4)}
        | {"intermediate.dense": (4, 12), "output.dense": (0, 10)},
        None: {EN: (1, 2), "classifier": (0, 4)},
    }
    assert table["by_module"] == {"query": (5, 12), "key": (3, 12), "value": (0, 12), AO: (3, 12)} | {
        "intermediate.dense": (10, 24),
        "output.dense": (3, 20),
        AN: (1, 8),
        ON: (3, 8),
        EN: (1, 2),
        "classifier": (0, 4),
    }
    assert table["by_layer"] == {0: (21, 54), 1: (7, 54), None: (1, 6)}
    assert (table["selected"], table["total"]) == (29, 114)


def test_density_table_lora(tmp_path: Path) -> None:
    """A PEFT model's mask: columns are the adapter tensors of each base module, not "default"."""
    base = "base_model.model.model.layers"
    shapes = {
        f"{base}.{i}.self_attn.{m}.lora_{ab}.default.weight": (2, 4) if ab == "A" else (4, 2)
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    counts = {n: 8 if "lora_B" in n and "q_proj" in n else 0 for n in shapes}
    path = tmp_path / "lora.safetensors"
    save_mask(path, pieces_from_counts(shapes, counts), META)
    table = density_table(read_info(path))
    assert table["modules"] == ["q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"]
    assert table["cells"][0] == {
        "q_proj.lora_A": (0, 8),
        "q_proj.lora_B": (8, 8),
        "v_proj.lora_A": (0, 8),
        "v_proj.lora_B": (0, 8),
    }
    assert "default" not in "".join(format_table(table))


def test_density_table_llama(llama_masks: list[Path]) -> None:
    """Mask C (even i < 40) covers layer 0's first 40 entries, in LLAMA_LAYER order."""
    table = density_table(read_info(llama_masks[2]))
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert table["modules"] == [*mods, "input_layernorm", "post_attention_layernorm"]
    counts = [(3, 6), (3, 6), (3, 6), (2, 4), (4, 8), (4, 8), (1, 8), (0, 2), (0, 2)]
    assert table["cells"][0] == dict(zip(table["modules"], counts))
    assert table["vector_modules"] == ["input_layernorm", "post_attention_layernorm"]
    assert all(s == 0 for s, _ in table["cells"][1].values())
    assert table["by_layer"] == {0: (20, 50), 1: (0, 50)}


EXPECTED_PAIRS = [  # (a, b, |A∩B|, |A∪B|, jaccard, overlap ratio, expected |A||B|/N, lift)
    (0, 1, 10, 60, 1 / 6, 0.5, 10.0, 1.0),
    (0, 2, 20, 50, 0.4, 1.0, 10.0, 2.0),
    (1, 2, 4, 36, 1 / 9, 0.2, 4.0, 1.0),
]


def test_overlap_exact(llama_masks: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    verified: list[str] = []
    real_verify = mask_file._verify
    monkeypatch.setattr(mask_file, "_verify", lambda f, c: (verified.append(f.name), real_verify(f, c)))
    result = overlap(llama_masks)
    assert sorted(verified) == sorted(  # each file's checksum checked once, not once per tensor
        ["a.safetensors", "mask-00000-of-00002.safetensors", "mask-00001-of-00002.safetensors"]
        + ["mask-00000-of-00001.safetensors"]
    )
    assert result["total_entries"] == 100
    assert [(m["selected"], m["density"], m["task"]) for m in result["masks"]] == [
        (50, 0.5, "a"),
        (20, 0.2, "b"),
        (20, 0.2, "c"),
    ]
    got = [
        (p["a"], p["b"], p["intersection"], p["union"], p["jaccard"], p["overlap_ratio"])
        + (p["expected_intersection"], p["lift"])
        for p in result["pairs"]
    ]
    assert len(got) == len(EXPECTED_PAIRS)
    for pair, want in zip(got, EXPECTED_PAIRS):
        assert pair == pytest.approx(want, abs=1e-12)
    assert overlap(llama_masks[:2])["pairs"][0]["intersection"] == 10


def test_overlap_of_empty_masks_is_undefined_not_an_error(tmp_path: Path) -> None:
    zero = torch.zeros(100, dtype=torch.bool)
    paths = [tmp_path / "x.safetensors", tmp_path / "y.safetensors"]
    for p in paths:
        save_mask(p, pieces_from_flat(LLAMA, zero), META)
    (pair,) = overlap(paths)["pairs"]
    assert [pair[k] for k in ("intersection", "jaccard", "overlap_ratio", "lift")] == [0, None, None, None]


def test_overlap_rejects_other_models(tmp_path: Path, llama_masks: list[Path]) -> None:
    with pytest.raises(
        MaskError, match=r"a.safetensors has model.layers.0.input_layernorm.weight, .*21 more"
    ):
        overlap([llama_masks[0], bert_mask(tmp_path / "bert.safetensors")])
    extra = dict(LLAMA) | {"lm_head.weight": (2,)}  # one tensor more: the message names it
    save_mask(tmp_path / "e.safetensors", pieces_from_flat(extra, torch.ones(102, dtype=torch.bool)), META)
    with pytest.raises(MaskError, match=r"e.safetensors has lm_head.weight, .*b does not"):
        overlap([llama_masks[1], tmp_path / "e.safetensors"])
    other = dict(LLAMA) | {"model.layers.1.mlp.down_proj.weight": (4, 2)}  # same names, one shape differs
    save_mask(tmp_path / "d.safetensors", pieces_from_flat(other, torch.ones(100, dtype=torch.bool)), META)
    with pytest.raises(MaskError, match=r"down_proj.weight.*shape \[2, 4\].*\[4, 2\]"):
        overlap([llama_masks[0], tmp_path / "d.safetensors"])
    with pytest.raises(MaskError, match="two or more"):
        overlap(llama_masks[:1])


def test_overlap_detects_corrupt_payload(llama_masks: list[Path]) -> None:
    data = bytearray(llama_masks[0].read_bytes())
    data[-1] ^= 0xFF
    llama_masks[0].write_bytes(bytes(data))
    with pytest.raises(MaskError, match="checksum"):
        overlap(llama_masks)


def _red_pixels(image) -> int:
    """Pixels of the p mark (pure red; viridis has none)."""
    rgb = image[..., :3]
    return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)).sum())


def test_plot_density(tmp_path: Path) -> None:
    info = read_info(bert_mask(tmp_path / "bert.safetensors"))
    png = tmp_path / "plots" / "density.png"
    matrix = plot_density(info, png)
    expected = [  # columns: BERT_MODULES
        [4 / 6, 3 / 6, 0.0, 3 / 6, 6 / 12, 3 / 10, 1 / 4, nan, 1 / 4, nan],
        [1 / 6, 0.0, 0.0, 0.0, 4 / 12, 0.0, 0.0, nan, 2 / 4, nan],
        [nan, nan, nan, nan, nan, nan, nan, 1 / 2, nan, 0.0],
    ]
    assert len(matrix) == len(expected)
    for row, want in zip(matrix, expected):
        assert row == pytest.approx(want, nan_ok=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape == (200 + 40 * 3, 240 + 80 * 10, 4)  # 3 layers (0, 1, other) x 10 modules
    assert image[..., :3].std() > 0.05  # something was drawn
    assert _red_pixels(image) > 5  # p = 0.25 is marked on the colour bar
    assert [p.name for p in png.parent.iterdir()] == ["density.png"]  # no temp file left


def test_plot_colour_scale_ignores_norm_columns(tmp_path: Path) -> None:
    """Norms fully selected (density 1) and matrices sparse: the scale is set by the matrices
    (and p), so the matrix cells are not all squeezed into the bottom colour."""
    counts = {n: math.prod(s) if "layernorm" in n else 1 for n, s in LLAMA.items()}
    path = tmp_path / "norms.safetensors"
    save_mask(path, pieces_from_counts(LLAMA, counts), META | {"reserve_p": 0.1})
    table = density_table(read_info(path))
    matrix = density_matrix(table)
    assert max(v for row in matrix for v in row) == 1.0  # the norm columns
    assert colour_range(table, matrix, 0.1) == pytest.approx(2 / 6)  # q_proj: weight 1 + bias 1 of 6
    assert colour_range(table, matrix, 0.5) == 0.5  # p is always on the bar
    plot_density(read_info(path), tmp_path / "norms.png")
    assert _red_pixels(matplotlib.image.imread(tmp_path / "norms.png")) > 5


def test_cli_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = bert_mask(tmp_path / "bert.safetensors")
    assert main(["mask", "info", "-v", str(path)]) == 0
    out = capsys.readouterr().out
    assert "selected: 29 / 114 entries (25.4386%) in 34 tensors" in out
    assert 'task: "rte"' in out
    assert f"{L0}attention.self.query.weight [2, 2] 1.0000" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["layer", *BERT_MODULES, "all"] in lines
    assert "0 0.6667 0.5000 0.0000 0.5000 0.5000 0.3000 0.2500 - 0.2500 - 0.3889".split() in lines
    assert "1 0.1667 0.0000 0.0000 0.0000 0.3333 0.0000 0.0000 - 0.5000 - 0.1296".split() in lines
    assert "other - - - - - - - 0.5000 - 0.0000 0.1667".split() in lines
    assert "all 0.4167 0.2500 0.0000 0.2500 0.4167 0.1500 0.1250 0.5000 0.3750 0.0000 0.2544".split() in lines
    assert ["intermediate.dense", "10", "/", "24", "(0.4167)"] in lines


def test_cli_overlap(llama_masks: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(p) for p in llama_masks]
    assert main(["mask", "overlap", *paths]) == 0
    out = capsys.readouterr().out
    assert "3 masks of 100 candidate entries each:" in out
    pair_12 = (
        "32 differing entries, intersection 4, jaccard 0.1111, overlap ratio 0.2000, expected by chance 4.0"
    )
    assert f"[1] vs [2]: {pair_12}" in out
    pair_02 = "intersection 20, jaccard 0.4000, overlap ratio 1.0000, expected by chance 10.0 (lift 2.00)"
    assert f"[0] vs [2]: 30 differing entries, {pair_02}" in out
    assert main(["mask", "overlap", *paths, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["intersection"] for p in result["pairs"]] == [10, 20, 4]
    assert [p["differing"] for p in result["pairs"]] == [50, 30, 32]
    assert result["pairs"][0]["jaccard"] == pytest.approx(1 / 6)
    assert main(["mask", "overlap", paths[0], str(bert_mask(tmp_path / "bert.safetensors"))]) == 2
    assert "ctscale: error: masks of different models" in capsys.readouterr().err


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "density.png"
    assert main(["mask", "plot", str(bert_mask(tmp_path / "bert.safetensors")), "--out", str(png)]) == 0
    assert f"wrote {png}: density of 3 layer(s) x 10 module(s)" in capsys.readouterr().out
    assert matplotlib.image.imread(png).shape == (320, 1040, 4)


def test_cli_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry fails like a missing package
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "density.png"
    assert main(["mask", "plot", str(bert_mask(tmp_path / "bert.safetensors")), "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "ctscale[plot]"' in err and "matplotlib" in err
    assert not png.exists()


def test_overlap_counts_the_entries_that_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Masks 4 entries apart out of 100,000 selected: Jaccard rounds to 1.0000, the count does not."""
    shapes = {"model.layers.0.mlp.up_proj.weight": (500, 400)}
    a = torch.arange(200_000) % 2 == 0
    b = a.clone()
    b[[0, 2]] = False  # two entries leave the child network
    b[[1, 3]] = True  # two others join it
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path, bits in zip(paths, (a, b)):
        save_mask(path, pieces_from_flat(shapes, bits), META)
    (pair,) = overlap(paths)["pairs"]
    assert (pair["differing"], pair["intersection"], pair["union"]) == (4, 99_998, 100_002)
    assert main(["mask", "overlap", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "[0] vs [1]: 4 differing entries, intersection 99998, jaccard 1.0000" in out


def test_cli_info_verifies_the_checksum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = bert_mask(tmp_path / "bert.safetensors")
    assert main(["mask", "info", str(path)]) == 0
    assert "checksum ok" in capsys.readouterr().out
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one payload bit: the header (and so the summary) is intact
    path.write_bytes(bytes(data))
    assert main(["mask", "info", str(path)]) == 2
    captured = capsys.readouterr()
    assert "ctscale: error:" in captured.err and "checksum mismatch" in captured.err
    assert captured.out == ""  # no summary of a corrupt mask


def test_cli_info_checks_a_mask_against_a_model(
    tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model``: every mask tensor must exist in that model with its shape (no weights read)."""
    from ctscale.config import ModelConfig
    from ctscale.masktools import meta_shapes

    from conftest import write_tiny_bert

    layers = {n: s for n, s in meta_shapes(ModelConfig(str(tiny_bert)), "rte").items() if "layer" in n}
    pieces = [
        MaskPiece(n, s, 0, math.prod(s), torch.ones(math.prod(s), dtype=torch.bool))
        for n, s in layers.items()
    ]
    path = tmp_path / "fits.safetensors"
    save_mask(path, pieces, META)
    assert main(["mask", "info", str(path), "--model", str(tiny_bert)]) == 0
    assert f"fits model {tiny_bert}: all {len(layers)} mask tensors" in capsys.readouterr().out
    wider = write_tiny_bert(tmp_path / "hidden48", hidden=48)
    capsys.readouterr()
    assert main(["mask", "info", str(path), "--model", str(wider)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctscale: error:") and "shape" in err and "Traceback" not in err
    llama = tmp_path / "llama.safetensors"
    save_mask(llama, pieces_from_flat(LLAMA, torch.ones(100, dtype=torch.bool)), META)
    assert main(["mask", "info", str(llama), "--model", str(tiny_bert)]) == 2
    assert "which this model lacks" in capsys.readouterr().err
