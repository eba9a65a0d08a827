"""launch/slurm.sbatch runs a 2-process job under fake ``srun``/``scontrol`` (one node, CPU).

The shims stand in for Slurm: ``scontrol show hostnames`` expands the node list, ``srun``
records its options and runs the per-node command once, as task 0 of node 0 with Slurm's
per-task variables. The job must then train to the single-process model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_launch import REPO, launch, single_process_model  # noqa: F401  (a fixture)

from dist_workers import tiny_overrides

pytestmark = pytest.mark.slow

SCONTROL = """#!/usr/bin/env bash
# fake scontrol: "show hostnames LIST" prints one host per line
[[ "$1 $2" == "show hostnames" && "$3" == "$SLURM_JOB_NODELIST" ]] || { echo "scontrol: $*" >&2; exit 1; }
echo localhost
"""
SRUN = r"""#!/usr/bin/env bash
# fake srun: record the arguments (one file per call), then run the command as the only
# task of node 0
printf '%s\0' "$@" >"$(mktemp "$SRUN_CALLS/call.XXXXXX")"
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_GPUS_ON_NODE=2 exec "$@"
"""


def fake_slurm(tmp: Path) -> dict:
    """PATH with the shims first, and the variables sbatch sets for a one-node job."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp / "srun").mkdir()
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SRUN_CALLS": str(tmp / "srun"),
        "SLURM_JOB_NODELIST": "node[001]",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "3",
        "TMPDIR": str(tmp),
    }


def test_sbatch_header_and_usage():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--cpus-per-task=", "--time="):
        assert any(line.startswith(f"#SBATCH {option}") for line in header), option
    assert "#   sbatch launch/slurm.sbatch --config" in text  # the exact command, in the header


@pytest.mark.parametrize(
    "launcher,backend",
    [
        ("torchrun", ["distributed.backend=ddp"]),
        ("deepspeed", ["distributed.backend=deepspeed", "distributed.zero_stage=2"]),
    ],
    ids=["torchrun-ddp", "deepspeed-zero2"],
)
def test_slurm_job_trains_like_one_process(
    launcher,
    backend,
    tiny_bert,
    glue_dir,
    tmp_path,
    single_process_model,  # noqa: F811  (the fixture imported from test_launch)
):
    env = fake_slurm(tmp_path) | {"LAUNCHER": launcher}
    out = tmp_path / "run"
    overrides = (
        tiny_overrides(tiny_bert, glue_dir, out) + backend + ["method.name=ct-d", "train.save_model=true"]
    )
    proc = launch("slurm.sbatch", overrides, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one srun call, one task per node; the per-node command got ctscale's arguments unchanged
    (call,) = (tmp_path / "srun").iterdir()
    args = call.read_text().split("\0")[:-1]
    # every task gets the job's cpus (srun no longer inherits --cpus-per-task); checkpoints on and
    # resume set before the user's arguments, which win
    assert args[:6] == [
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=3",
        "--kill-on-bad-exit=1",
        "bash",
        "-c",
    ]
    checkpoints = ["--set", "train.save_every=500", "--set", "train.resume=true"]
    assert args[7:] == ["ctscale-node", "train", *checkpoints, *(a for o in overrides for a in ("--set", o))]
    saved = load_file(out / "model" / "model.safetensors")
    assert saved.keys() == single_process_model.keys()
    diff = max((saved[k].float() - single_process_model[k].float()).abs().max().item() for k in saved)
    assert diff <= 5e-6
    if launcher == "deepspeed":  # the hostfile built from the node list, NPROC from SLURM_GPUS_ON_NODE
        assert (tmp_path / "ctscale-4242-0.hosts").read_text() == "localhost slots=2\n"


def test_unknown_launcher_is_one_clear_error(tmp_path):
    proc = launch("slurm.sbatch", ["train.max_steps=1"], fake_slurm(tmp_path) | {"LAUNCHER": "mpirun"})
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "slurm.sbatch: unknown LAUNCHER=mpirun; set LAUNCHER=torchrun or LAUNCHER=deepspeed"
    )
    assert not any((tmp_path / "srun").iterdir())
