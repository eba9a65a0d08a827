"""`ctscale eval` and `ctscale predict` on finished runs: own CSV (the README's three commands
with the shipped config), regression, GLUE, chat; models exported by a distributed run; errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_causal_lm import write_tiny_decoder
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from ctscale.cli import main
from ctscale.config import load_config

from conftest import REPO
from dist_harness import run_world

QUIET = ["--set", "train.tensorboard=false"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_csv_to_model_to_predictions_with_the_shipped_config(tiny_bert, tmp_path, capsys, monkeypatch):
    """configs/csv_classification.yaml (a tiny model in place of MiniLM): train, eval, predict."""
    monkeypatch.chdir(REPO)  # the config names examples/data/ relative to the repository
    run = tmp_path / "reviews"
    sets = ["--set", f"model.name_or_path={tiny_bert}", "--set", f"train.output_dir={run}", *QUIET]
    sets += ["--set", "train.epochs=2", "--set", "fisher.num_batches=2"]
    code, out, _ = cli(capsys, "train", "--config", "configs/csv_classification.yaml", *sets)
    assert code == 0
    final = last_json(out)["final"]["validation"]
    assert set(final) == {"accuracy", "macro_f1", "mcc", "main"}

    code, out, _ = cli(capsys, "eval", "--run", run)
    assert code == 0 and last_json(out)["eval"] == pytest.approx(final, abs=1e-9)

    preds = run / "preds.jsonl"
    code, out, _ = cli(
        capsys, "predict", "--run", run, "--data", "examples/data/reviews_new.csv", "--out", preds
    )
    assert code == 0 and f"wrote {preds}: 4 predictions" in out
    rows = read_jsonl(preds)
    assert [r["row"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(r["probabilities"]) == {"negative", "positive"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)

    # predictions and scores agree: accuracy of `predict` on a labelled file == `eval` on it
    whole = "examples/data/reviews.csv"
    code, out, _ = cli(capsys, "eval", "--run", run, "--data", whole)
    accuracy = last_json(out)["eval"]["accuracy"]
    cli(capsys, "predict", "--run", run, "--data", whole, "--out", tmp_path / "all.jsonl")
    gold = [line.rsplit(",", 1)[1] for line in (REPO / whole).read_text().splitlines()[1:]]
    predicted = [r["label"] for r in read_jsonl(tmp_path / "all.jsonl")]
    assert accuracy == pytest.approx(sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold))


def test_unknown_label_and_bad_runs_are_one_error(tiny_bert, tmp_path, capsys):
    train = tmp_path / "t.csv"
    train.write_text("text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(6)))
    run = tmp_path / "run"
    sets = [f"model.name_or_path={tiny_bert}", "data.task=classification", f"data.train_file={train}"]
    sets += [f"train.output_dir={run}", "train.max_steps=1", "train.batch_size=4", "train.tensorboard=false"]
    assert cli(capsys, "train", *[a for s in sets for a in ("--set", s)])[0] == 0
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nfine,pos\nso so,meh\n")
    code, _, err = cli(capsys, "eval", "--run", run, "--data", dev)
    assert code == 2
    assert err.strip().splitlines()[-1] == (  # one line after the loader's progress bar
        f"ctscale: error: {dev}, row 2, column 'label': unknown label 'meh'; the model knows neg, pos "
        "(the classes of its training data)"
    )
    code, _, err = cli(capsys, "eval", "--run", run)
    assert code == 2 and "the run has no validation data; give --data FILE" in err
    code, _, err = cli(capsys, "predict", "--run", tmp_path, "--data", dev, "--out", tmp_path / "p.jsonl")
    assert code == 2 and "no config.yaml there" in err and not (tmp_path / "p.jsonl").exists()
    code, _, err = cli(
        capsys, "predict", "--run", run, "--data", tmp_path / "new.csv", "--out", tmp_path / "p.jsonl"
    )
    assert code == 2 and "--data=" in err and "no such file" in err


def test_regression_run_scores_and_predicts(tiny_bert, tmp_path, capsys):
    headless = tmp_path / "encoder"  # a plain encoder: the regression head is new
    AutoModel.from_pretrained(tiny_bert).save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(headless)
    rows = [{"s": f"{'very ' * (i % 4)}good", "y": float(i % 4)} for i in range(16)]
    train = tmp_path / "r.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    sets = [f"model.name_or_path={headless}", "data.task=regression", f"data.train_file={train}"]
    sets += ["data.text_column=s", "data.label_column=y", "data.validation_fraction=0.25"]
    sets += [f"train.output_dir={run}", "train.max_steps=2", "train.batch_size=4", "train.tensorboard=false"]
    code, out, _ = cli(capsys, "train", *[a for s in sets for a in ("--set", s)])
    final = last_json(out)["final"]["validation"]
    assert code == 0 and set(final) == {"pearson", "spearman", "main"}
    assert last_json(cli(capsys, "eval", "--run", run)[1])["eval"] == pytest.approx(final, abs=1e-9)
    cli(capsys, "predict", "--run", run, "--data", train, "--out", tmp_path / "p.jsonl")
    scores = read_jsonl(tmp_path / "p.jsonl")
    assert len(scores) == 16 and all(set(r) == {"row", "score"} and math.isfinite(r["score"]) for r in scores)


def test_glue_run_eval_on_its_split_and_on_a_tsv(tiny_bert, glue_dir, tmp_path, capsys):
    run = tmp_path / "rte"
    sets = [f"model.name_or_path={tiny_bert}", f"data.data_dir={glue_dir}", "data.task=rte"]
    sets += [f"train.output_dir={run}", "train.max_steps=2", "train.batch_size=8", "train.tensorboard=false"]
    sets += ["data.max_train_samples=32", "data.max_eval_samples=6"]
    code, out, _ = cli(capsys, "train", *[a for s in sets for a in ("--set", s)])
    final = last_json(out)["final"]["validation"]
    assert code == 0
    assert last_json(cli(capsys, "eval", "--run", run)[1])["eval"] == pytest.approx(final, abs=1e-9)
    dev = glue_dir / "RTE" / "dev.tsv"  # the whole file == the run's split without the limit
    whole = last_json(cli(capsys, "eval", "--run", run, "--set", "data.max_eval_samples=null")[1])["eval"]
    assert last_json(cli(capsys, "eval", "--run", run, "--data", dev)[1])["eval"] == whole
    assert whole != final
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}


def test_chat_run_eval_and_greedy_generation(smol_tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    model_dir = write_tiny_decoder(tmp_path / "llama", smol_tokenizer, "llama")
    run = tmp_path / "chat"
    sets = ["--set", f"model.name_or_path={model_dir}", "--set", "model.gguf_file=null"]
    sets += ["--set", f"train.output_dir={run}", "--set", "train.max_steps=2", "--set", "train.batch_size=4"]
    sets += ["--set", "fisher.num_batches=1", *QUIET]
    code, out, _ = cli(capsys, "train", "--config", "configs/chat_smollm2.yaml", *sets)
    final = last_json(out)["final"]["validation"]
    assert code == 0 and set(final) == {"loss", "perplexity"}
    assert last_json(cli(capsys, "eval", "--run", run)[1])["eval"] == pytest.approx(final, rel=1e-6)

    prompts = REPO / "examples" / "data" / "chat_prompts.jsonl"
    code, _, _ = cli(
        capsys,
        "predict",
        "--run",
        run,
        "--data",
        prompts,
        "--out",
        tmp_path / "a.jsonl",
        "--max-new-tokens",
        "5",
    )
    answers = read_jsonl(tmp_path / "a.jsonl")
    assert code == 0 and [a["row"] for a in answers] == [1, 2, 3]
    # row 1 by hand: the chat template's generation prompt, then greedy decoding
    tok = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    messages = json.loads(prompts.read_text().splitlines()[0])["messages"]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    assert answers[0]["generated"] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _train(rank: int, world_size: int, overrides: list[str]) -> dict:
    from ctscale.trainer import Trainer

    return Trainer(load_config(None, overrides)).run()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_eval_reads_a_model_exported_by_a_distributed_run(tiny_bert, tmp_path, capsys, backend):
    """A 2-rank run's export scores exactly what the run scored at its end."""
    train = tmp_path / "t.csv"
    train.write_text("text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(12)))
    engine = {
        "fsdp": ["distributed.backend=fsdp"],
        "zero3": [
            "distributed.backend=deepspeed",
            f"distributed.deepspeed_config={REPO / 'ds_configs' / 'zero3.json'}",
        ],
    }[backend]
    run = tmp_path / "run"
    overrides = [f"model.name_or_path={tiny_bert}", "data.task=classification", f"data.train_file={train}"]
    overrides += ["data.validation_fraction=0.25", f"train.output_dir={run}", "train.max_steps=2"]
    overrides += [
        "train.batch_size=4",
        "train.tensorboard=false",
        "method.name=ct-d",
        "fisher.num_batches=1",
        *engine,
    ]
    final = run_world(_train, 2, overrides)[0]["validation"]
    assert last_json(cli(capsys, "eval", "--run", run)[1])["eval"] == pytest.approx(final, abs=1e-9)


@pytest.mark.parametrize(
    "name", ["csv_classification", "csv_classification_fsdp", "chat_smollm2", "chat_smollm2_zero3"]
)
def test_use_case_configs_load_and_read_their_data(name, tiny_bert, smol_tokenizer, monkeypatch):
    from ctscale.backends import check_config
    from ctscale.tasks import load_task_data

    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    check_config(cfg)  # what `ctscale train` checks before it starts anything
    tok = AutoTokenizer.from_pretrained(smol_tokenizer if cfg.data.task == "chat" else tiny_bert)
    data = load_task_data(cfg, tok)
    assert data.train_size >= 40 and data.eval_splits == ("validation",)


@pytest.mark.slow
def test_smollm2_chat_config_train_eval_predict(tmp_path, capsys, monkeypatch):
    """configs/chat_smollm2.yaml as shipped (the real SmolLM2-135M-Instruct from its GGUF file),
    shortened to 1 step: the README's three commands; eval reproduces the run's last score."""
    monkeypatch.chdir(REPO)
    run = tmp_path / "chat"
    sets = [f"train.output_dir={run}", "train.max_steps=1", "train.batch_size=2", "data.max_train_samples=4"]
    sets += [
        "data.max_eval_samples=2",
        "data.max_length=128",
        "fisher.num_batches=1",
        "train.tensorboard=false",
    ]
    code, out, _ = cli(
        capsys, "train", "--config", "configs/chat_smollm2.yaml", *[a for s in sets for a in ("--set", s)]
    )
    final = last_json(out)["final"]["validation"]
    assert code == 0 and math.isfinite(final["loss"])
    assert last_json(cli(capsys, "eval", "--run", run)[1])["eval"] == pytest.approx(final, rel=1e-5)
    answers = tmp_path / "answers.jsonl"
    prompts = "examples/data/chat_prompts.jsonl"
    code, out, _ = cli(
        capsys, "predict", "--run", run, "--data", prompts, "--out", answers, "--max-new-tokens", "8"
    )
    rows = read_jsonl(answers)
    assert code == 0 and len(rows) == 3 and all(r["generated"].strip() for r in rows)
