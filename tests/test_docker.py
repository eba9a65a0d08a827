"""docker/ keeps its promises, checked without a Docker engine (none runs on these machines).

The Dockerfiles are parsed here (line continuations, comments, exec and shell forms, ARG/ENV
substitution), the compose file with PyYAML, and every path, command, pin and environment
variable they name is compared with the repository: the files COPYed exist and are not
.dockerignored, the base images and pip requirements are pinned, torch's pin is the README's,
every install is held to constraints.txt (the tested versions), the entry commands
exist and parse with ctscale's own CLI, the user is not root, the CPU image is what .ci/run
does, and the multi-node examples (compose and docker/README.md) are consistent.
"""

from __future__ import annotations

import importlib.metadata
import json
import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ctscale.cli import build_parser
from ctscale.config import load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
CUDA, CPU = DOCKER / "Dockerfile.cuda", DOCKER / "Dockerfile.cpu"
COMPOSE = DOCKER / "compose.multinode.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BUILD_TOOLS = {"pip", "setuptools", "wheel"}  # pinned, but not part of the tested environment
LOCK_FILE = "constraints.txt"


def lock_versions() -> dict[str, str]:
    """name -> version of constraints.txt, the versions the suite is tested with."""
    lines = (REPO / LOCK_FILE).read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): next(iter(r.specifier)).version for r in reqs}


# --- a Dockerfile parser -----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the text after the keyword, continuation lines joined
    line: int  # 1-based line of the keyword
    comments: list[str]  # the comment lines directly above

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction; None for the shell form."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)  # "[" but not JSON: Docker would run it as a shell string
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    lines, out, comments, i = text.splitlines(), [], [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("#"):
            assert not re.match(r"#\s*escape\s*=", stripped), "only the default escape character is parsed"
            comments.append(stripped.lstrip("#").strip())
            i += 1
            continue
        if not stripped:
            comments, i = [], i + 1
            continue
        start, text_ = i, ""
        while True:
            line = lines[i]
            i += 1
            cont = re.search(r"\\[ \t]*$", line)
            text_ += line[: cont.start()] if cont else line
            if not cont:
                break
            # comment and empty lines inside a continued instruction are dropped, as Docker does
            while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("#")):
                i += 1
            if i == len(lines):
                break
        keyword, _, args = text_.strip().partition(" ")
        assert "<<" not in args or keyword.upper() not in ("RUN", "COPY", "ADD"), (
            f"line {start + 1}: heredocs are not parsed here"
        )
        out.append(Instruction(keyword.upper(), args.strip(), start + 1, comments))
        comments = []
    return out


_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?::(?P<op>[-+?])(?P<word>[^}]*))?\}|(?P<plain>[A-Za-z_]\w*))"
)


def substitute(text: str, env: dict[str, str | None], strict: bool = True) -> str:
    """Docker's (and compose's) variable substitution: $V, ${V}, ${V:-default}, ${V:+alt}, ${V:?err}."""

    def repl(m: re.Match) -> str:
        name = m["braced"] or m["plain"]
        value = env.get(name)
        if m["op"] == "-":
            return value or m["word"]
        if m["op"] == "+":
            return m["word"] if value else ""
        if m["op"] == "?" and not value:
            raise AssertionError(f"{name} is required: {m['word']}")
        if value is None:
            assert not strict, f"${name} is not defined in {text!r}"
            return m.group(0)
        return value

    return _VAR.sub(repl, text)


@dataclass
class Copy:
    flags: dict[str, str]
    sources: list[str]
    dest: str  # absolute and normalised, in the image
    into_dir: bool  # dest is a directory (a trailing "/", several sources or a directory source)


@dataclass
class Image:
    """One single-stage Dockerfile, its instructions evaluated as the builder would."""

    path: Path
    instructions: list[Instruction]
    base: str = ""
    args: dict[str, str | None] = field(default_factory=dict)  # ARGs in the stage
    env: dict[str, str] = field(default_factory=dict)  # ENV, in order
    env_comments: dict[str, list[str]] = field(default_factory=dict)
    workdir: str = "/"
    users: list[tuple[int, str]] = field(default_factory=list)  # (instruction index, USER)
    copies: list[Copy] = field(default_factory=list)
    runs: list[tuple[int, str]] = field(default_factory=list)  # (index, substituted command)

    @classmethod
    def load(cls, path: Path) -> Image:
        img = cls(path, parse_dockerfile(path.read_text()))
        global_args: dict[str, str | None] = {}
        for n, ins in enumerate(img.instructions):
            kw, scope = ins.keyword, {**img.args, **img.env}
            if kw == "ARG":
                for token in shlex.split(ins.args):
                    name, eq, default = token.partition("=")
                    if not img.base:
                        global_args[name] = substitute(default, global_args) if eq else None
                    else:  # a bare ARG inside the stage inherits the global default
                        img.args[name] = substitute(default, scope) if eq else global_args.get(name)
            elif kw == "FROM":
                assert not img.base, f"{path.name}: one stage expected (line {ins.line})"
                tokens = [t for t in ins.args.split() if not t.startswith("--")]
                img.base = substitute(tokens[0], global_args)
            elif kw == "ENV":
                tokens = shlex.split(ins.args)
                if "=" in tokens[0]:
                    pairs = [t.partition("=")[::2] for t in tokens]
                else:  # the legacy form: ENV NAME value with spaces
                    pairs = [(tokens[0], " ".join(tokens[1:]))]
                for name, value in pairs:
                    img.env[name] = substitute(value, {**img.args, **img.env}, strict=False)
                    img.env_comments[name] = ins.comments
            elif kw == "WORKDIR":
                img.workdir = posixpath.normpath(posixpath.join(img.workdir, substitute(ins.args, scope)))
            elif kw == "USER":
                img.users.append((n, substitute(ins.args, scope)))
            elif kw in ("COPY", "ADD"):
                tokens = ins.exec_form() or shlex.split(ins.args)
                flags = dict(t[2:].partition("=")[::2] for t in tokens if t.startswith("--"))
                *sources, dest = [substitute(t, scope) for t in tokens if not t.startswith("--")]
                into_dir = dest.endswith(("/", ".")) or len(sources) > 1
                dest = posixpath.normpath(posixpath.join(img.workdir, dest))
                img.copies.append(Copy(flags, sources, dest, into_dir))
            elif kw == "RUN":
                img.runs.append((n, substitute(ins.args, scope, strict=False)))
        assert img.base, f"{path.name}: no FROM"
        return img

    def pip_installs(self) -> Iterator[PipInstall]:
        for _, run in self.runs:
            yield from pip_installs(run)

    def pins(self) -> dict[str, str]:
        """name -> version of every `pip install name==version`."""
        return {
            canonicalize_name(r.name): s.version
            for p in self.pip_installs()
            for r in map(Requirement, p.requirements)
            for s in r.specifier
            if s.operator == "=="
        }

    def python(self) -> str:
        """The image's Python, major.minor: a python:X.Y image or a `python3.X -m venv`."""
        m = re.match(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)", self.base)
        if m:
            return m[1]
        venvs = [m[1] for _, run in self.runs for m in re.finditer(r"\bpython(3\.\d+) -m venv\b", run)]
        assert len(venvs) == 1, f"{self.path.name}: cannot tell the image's Python"
        return venvs[0]

    def in_repo(self, container_path: str) -> Path | None:
        """The repository file that the image has at ``container_path`` (via WORKDIR + COPY)."""
        path = posixpath.normpath(posixpath.join(self.workdir, container_path))
        for copy in reversed(self.copies):  # a later COPY wins
            for src in copy.sources:
                source = (REPO / src).resolve()
                # a directory's contents go into dest; a file goes into dest/ or becomes dest
                where = (
                    posixpath.join(copy.dest, source.name)
                    if copy.into_dir and source.is_file()
                    else copy.dest
                )
                if path != where and not path.startswith(where.rstrip("/") + "/"):
                    continue
                candidate = source / path[len(where) :].lstrip("/")
                if candidate.exists() and not dockerignored(candidate.relative_to(REPO).as_posix()):
                    return candidate
        return None

    def argv(self) -> list[str]:
        """ENTRYPOINT + CMD, both exec form (JSON): the process gets signals, no shell between."""
        argv = []
        for keyword in ("ENTRYPOINT", "CMD"):
            found = [i for i in self.instructions if i.keyword == keyword]
            if found:
                form = found[-1].exec_form()
                assert form is not None, f"{self.path.name}: {keyword} must be exec form (JSON)"
                argv += form
        return argv


# --- pip, .dockerignore, the README and .ci/run ------------------------------------------------

PIP_OPTIONS_WITH_VALUE = {
    *("-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url"),
    *("--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root"),
    *("--platform", "--python-version", "--implementation", "--abi", "--upgrade-strategy"),
    *("--progress-bar", "--src", "-C", "--config-settings", "--cache-dir", "--log", "--timeout"),
    *("--retries", "--trusted-host", "--proxy", "--only-binary", "--no-binary", "--report"),
    *("--root-user-action", "--global-option", "--python"),
}


@dataclass
class PipInstall:
    options: dict[str, list[str]]
    flags: set[str]
    requirements: list[str]  # name==version
    local: list[str]  # ".", ".[test]", -e paths


def pip_installs(command_line: str) -> Iterator[PipInstall]:
    """The `pip install` commands in a shell command line (&&, ||, ; and newlines split it)."""
    for command in re.split(r"&&|\|\||;|\n", command_line):
        tokens = shlex.split(command)
        for k in range(len(tokens) - 1):  # pip install, pip3 install, python -m pip install
            if re.fullmatch(r"(.*/)?pip3?(\.\d+)?", tokens[k]) and tokens[k + 1] == "install":
                break
        else:
            continue
        p, rest = PipInstall({}, set(), [], []), iter(tokens[k + 2 :])
        for token in rest:
            name, eq, value = token.partition("=")
            if token.startswith("-") and (name in PIP_OPTIONS_WITH_VALUE):
                value = value if eq else next(rest)
                p.options.setdefault(name, []).append(value)
                if name in ("-e", "--editable"):
                    p.local.append(value)
            elif token.startswith("-"):
                p.flags.add(token)
            elif token.startswith((".", "/")):
                p.local.append(token)
            else:
                p.requirements.append(token)
        yield p


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    path = REPO / ".dockerignore"
    patterns = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, line = line.startswith("!"), line.lstrip("!").strip().lstrip("/")
        rx, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                rx, i = rx + ".*", i + 2
            else:
                rx += {"*": "[^/]*", "?": "[^/]"}.get(line[i], re.escape(line[i]))
                i += 1
        patterns.append((negate, re.compile(rx + "$")))
    return patterns


def dockerignored(rel: str) -> bool:
    """Whether Docker leaves ``rel`` (relative to the context root) out of the context."""
    parts, excluded = [p for p in rel.split("/") if p not in ("", ".")], False
    for negate, rx in dockerignore_patterns():
        if any(rx.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def readme_test_command() -> str:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return next(line for line in block.splitlines() if "pytest" in line and not line.startswith("#"))


def ci_lines() -> list[str]:
    return [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip()[:1] != "#"]


def bash_commands(markdown: str) -> list[str]:
    """The logical command lines of the ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def launcher_variables(script: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_]+)[:}]", (REPO / "launch" / script).read_text()))


def read_by_ctscale(name: str) -> bool:
    return any(f'"{name}"' in p.read_text() for p in (REPO / "ctscale").rglob("*.py"))


def parses_as_ctscale(argv: list[str]) -> None:
    """``ctscale ARGV`` parses (``--help`` exits 0)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, f"ctscale {shlex.join(argv)}: exit {exit_.code}"


def check_overrides(config: str | None, overrides: list[str], image: Image) -> None:
    """A --config (a path inside ``image``) and --set overrides load with ctscale's loader."""
    path = None
    if config is not None:
        path = image.in_repo(config)
        assert path is not None and path.is_file(), f"--config {config}: not in {image.path.name}'s image"
    cfg = load_config(path, overrides)
    if cfg.distributed.deepspeed_config:
        ds = image.in_repo(cfg.distributed.deepspeed_config)
        assert ds is not None, f"{cfg.distributed.deepspeed_config}: not in {image.path.name}'s image"
        assert isinstance(json.loads(ds.read_text()), dict)


IMAGES = {"cuda": CUDA, "cpu": CPU}


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request) -> Image:
    return Image.load(IMAGES[request.param])


@pytest.fixture(scope="module")
def cuda() -> Image:
    return Image.load(CUDA)


@pytest.fixture(scope="module")
def cpu() -> Image:
    return Image.load(CPU)


# --- both Dockerfiles --------------------------------------------------------------------------


def test_parser_handles_continuations_comments_and_both_forms():
    text = (
        "# top\nARG BASE=debian:12.5-slim\nFROM ${BASE}\n"
        "ENV A=1 \\\n    # a comment inside\n    B=$A-2\n"
        'RUN echo "x" \\\n  && pip install "foo==1.0" bar==2.0\n'
        '# why\nCMD ["a", "b"]\nENTRYPOINT a b\n'
    )
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["ARG", "FROM", "ENV", "RUN", "CMD", "ENTRYPOINT"]
    assert ins[0].comments == ["top"] and ins[4].comments == ["why"]
    assert ins[2].args.split() == ["A=1", "B=$A-2"] and ins[3].line == 7
    assert ins[4].exec_form() == ["a", "b"] and ins[5].exec_form() is None
    (p,) = pip_installs(ins[3].args)
    assert p.requirements == ["foo==1.0", "bar==2.0"]
    assert substitute("${X:-d}/${Y}", {"Y": "y"}) == "d/y"


def test_from_is_pinned_by_version_tag_or_digest(image):
    ref = image.base
    name, _, tag = ref.split("@")[0].rpartition(":")
    assert name and "/" not in tag, f"{image.path.name}: FROM {ref}: no tag"
    assert "@sha256:" in ref or re.search(r"\d+\.\d+\.\d+", tag), (
        f"{image.path.name}: FROM {ref}: pin a full X.Y.Z version tag (or a digest), not a moving tag"
    )
    assert tag != "latest"


def test_copy_sources_exist_in_the_context_and_are_not_dockerignored(image):
    assert image.copies, image.path.name
    for copy in image.copies:
        assert "from" not in copy.flags, "multi-stage COPY --from is not checked here"
        for src in copy.sources:
            assert not re.match(r"\w+://", src), f"{image.path.name}: remote source {src} is not pinned"
            matches = [REPO] if src in (".", "./") else sorted(REPO.glob(src.rstrip("/")))
            assert matches, f"{image.path.name}: COPY {src}: not in the build context (the repo root)"
            for m in matches:
                rel = m.relative_to(REPO).as_posix()
                assert not dockerignored(rel), f"{image.path.name}: COPY {src}: .dockerignore excludes it"


def test_dockerignore_keeps_local_state_out():
    for rel in (".git", "runs/x/model.safetensors", "ctscale/__pycache__/a.pyc", "ctscale.egg-info"):
        assert dockerignored(rel), rel
    for rel in ("ctscale/cli.py", "launch/torchrun.sh", ".ci/run", "tests/test_docker.py"):
        assert not dockerignored(rel), rel


def _is_torch_from_its_index(p: PipInstall) -> bool:
    return "--index-url" in p.options and [Requirement(r).name for r in p.requirements] == ["torch"]


def test_every_install_is_held_to_the_lock_file(image):
    """Each pip install but torch's own (from the PyTorch index, pinned below) runs with
    ``-c constraints.txt``, the file that the image COPYs from the repo: the image gets the
    versions CI tested, transitive ones included."""
    installs = list(image.pip_installs())
    assert installs, image.path.name
    lock = lock_versions()
    for p in installs:
        assert not ({"-r", "--requirement"} & p.options.keys()), p
        for local in p.local:
            assert re.fullmatch(r"\.(\[[\w,-]+\])?", local), f"{image.path.name}: local install {local}"
        if _is_torch_from_its_index(p):
            continue
        (constraint,) = p.options.get("-c", []) + p.options.get("--constraint", [])
        assert image.in_repo(constraint) == REPO / LOCK_FILE, (
            f"{image.path.name}: pip install {p.requirements}: -c {constraint} is not the repo's {LOCK_FILE}"
        )
        for req in map(Requirement, p.requirements):
            name = canonicalize_name(req.name)
            assert name in lock or name in BUILD_TOOLS, (
                f"{image.path.name}: {req.name} is not in {LOCK_FILE}; add it to pyproject.toml and run .ci/lock"
            )


def test_torch_pin_is_the_readme_ci_and_lock_pin(image):
    readme_pin = re.search(r"torch==([\w.]+)", readme_test_command())[1]
    assert f"torch=={readme_pin}" in (REPO / ".ci" / "run").read_text()
    assert image.pins()["torch"] == readme_pin == lock_versions()["torch"]
    (torch_install,) = [p for p in image.pip_installs() if p.options.get("--index-url")]
    assert [Requirement(r).name for r in torch_install.requirements] == ["torch"], (
        "only torch comes from the PyTorch index"
    )
    assert torch_install.options["--index-url"] == [image.args["TORCH_INDEX_URL"]]


def test_pins_are_the_lock_file_versions(image):
    """An explicit ``==`` in a Dockerfile says the same as constraints.txt (not what happens to
    be installed where the tests run: a new release on PyPI must not fail this test)."""
    lock = lock_versions()
    for name, pin in image.pins().items():
        if name in BUILD_TOOLS:
            continue
        assert lock.get(name) == pin, (
            f"{image.path.name} pins {name}=={pin}, {LOCK_FILE} has {lock.get(name)}: "
            "drop the pin (the lock file decides) or make them equal"
        )


def test_build_tools_satisfy_the_build_system(cuda):
    pins = cuda.pins()
    for req in map(Requirement, PYPROJECT["build-system"]["requires"]):
        assert req.name in pins and req.specifier.contains(pins[req.name]), req


def test_entry_commands_are_exec_form_and_exist(image):
    argv = image.argv()
    assert argv, f"{image.path.name}: no ENTRYPOINT or CMD"
    if argv[0] == "ctscale":  # the console script, then its arguments parse
        assert PYPROJECT["project"]["scripts"]["ctscale"] == "ctscale.cli:run"
        parses_as_ctscale(argv[1:])
    elif argv[:2] == ["bash", "-c"]:  # each `python -m MODULE` it runs is installed
        for module in re.findall(r"python -m (\w+)", argv[2]):
            assert installed_version(module), f"{image.path.name}: CMD runs {module}, not installed"
    else:
        script = image.in_repo(argv[0])
        assert script is not None and script.stat().st_mode & 0o111, f"{image.path.name}: {argv[0]}"


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "launch").glob("*.sh")))
def test_launch_scripts_are_executable(script):
    assert (REPO / "launch" / script).stat().st_mode & 0o111


def test_runs_as_a_non_root_user_created_in_the_image(image):
    created = {}  # user name -> (instruction index, uid), from the `useradd`s of the RUNs
    for n, run in image.runs:
        for command in re.split(r"&&|;|\n", run):
            tokens = shlex.split(command)
            if tokens[:1] == ["useradd"]:
                uid = next(tokens[k + 1] for k, t in enumerate(tokens) if t in ("--uid", "-u"))
                created[tokens[-1]] = (n, uid)
    assert image.users, f"{image.path.name}: no USER"
    n_user, user = image.users[-1]
    who = user.split(":")[0]
    (name,) = [u for u, (_, uid) in created.items() if who in (u, uid)] or [None]
    assert name, f"{image.path.name}: USER {user} is not a user created in the image"
    n_created, uid = created[name]
    assert uid == "1000" and n_created < n_user, (name, uid)
    firsts = [n for n, i in enumerate(image.instructions) if i.keyword in ("ENTRYPOINT", "CMD")]
    assert n_user < min(firsts), "USER must come before ENTRYPOINT/CMD"
    for n, ins in enumerate(image.instructions):  # COPY --chown=NAME needs NAME to exist by then
        chown = re.search(r"--chown=([\w-]+)", ins.args) if ins.keyword in ("COPY", "ADD") else None
        assert not chown or (chown[1] in (name, uid) and n > n_created), ins
    assert image.workdir == "/workspace"
    assert any(re.search(rf"chown [^&;]*{name}\S* [^&;]*/workspace\b", run) for _, run in image.runs), (
        "the user must own /workspace"
    )


# --- the CUDA image ----------------------------------------------------------------------------


def test_cuda_image_installs_every_dependency_at_a_locked_version_for_its_python(cuda):
    py = cuda.python()
    environment = {"python_version": py, "python_full_version": f"{py}.0", "platform_system": "Linux"}
    environment |= {"sys_platform": "linux", "platform_machine": "x86_64", "os_name": "posix"}
    lock = lock_versions()
    installed_by_name = {
        canonicalize_name(Requirement(r).name) for p in cuda.pip_installs() for r in p.requirements
    }
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(py)
    for req in map(Requirement, PYPROJECT["project"]["dependencies"]):
        if req.marker and not Marker(str(req.marker)).evaluate(environment):
            continue
        name = canonicalize_name(req.name)
        assert name in installed_by_name, (
            f"Dockerfile.cuda installs ctscale --no-deps: install {req.name} too"
        )
        assert req.specifier.contains(lock[name], prereleases=True), (req, lock[name])
    for name in installed_by_name - BUILD_TOOLS:  # each locked release supports the image's Python
        # Requires-Python is read from the installed distribution, which is the locked one where
        # the suite runs as CI runs it (installed with -c constraints.txt)
        have = installed_version(name)
        assert have is not None and Version(have).public == lock[name], (
            f"{name}: installed {have}, {LOCK_FILE} has {lock[name]}; install with -c {LOCK_FILE} "
            "(the README's test command) to check the lock's releases"
        )
        requires = importlib.metadata.metadata(name).get("Requires-Python") or ""
        assert SpecifierSet(requires).contains(py), f"{name}=={lock[name]} needs Python {requires}"
    # ctscale itself goes in without resolving anything
    (own,) = [p for p in cuda.pip_installs() if p.local]
    assert own.local == ["."] and "--no-deps" in own.flags and not own.requirements


def test_cuda_torch_index_matches_the_base_image_cuda(cuda):
    base = re.match(
        r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?$", cuda.base
    )
    assert base, f"{cuda.base}: expected an nvidia/cuda X.Y.Z-cudnn-devel image (nvcc for DeepSpeed)"
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", cuda.args["TORCH_INDEX_URL"])
    assert index and (index[1], index[2]) == (base[1], base[2]), (cuda.base, cuda.args["TORCH_INDEX_URL"])


def test_cuda_runtime_defaults_are_set_and_explained(cuda):
    wanted = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "1"}
    for name, value in wanted.items():
        assert cuda.env.get(name) == value, name
    runtime = [n for n in cuda.env if n.startswith(("NCCL", "TORCH", "OMP", "TOKENIZERS", "PYTHON"))]
    for name in runtime:
        assert cuda.env_comments[name], f"Dockerfile.cuda: say why ENV {name} is set (a comment above it)"
    assert "NCCL_ASYNC_ERROR_HANDLING" not in cuda.env  # deprecated: torch warns, use TORCH_NCCL_...
    assert cuda.env["PATH"].startswith("/opt/venv/bin:")
    assert cuda.argv() == ["ctscale", "--help"]


# --- the CPU image = CI ------------------------------------------------------------------------


def test_cpu_image_sets_what_ci_exports(cpu):
    exports = [line for line in ci_lines() if line.startswith("export ")]
    assert exports
    for line in exports:
        for pair in shlex.split(line)[1:]:
            name, _, value = pair.partition("=")
            assert cpu.env.get(name) == value, f"Dockerfile.cpu: ENV {name}={value} (as .ci/run)"
    assert cpu.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_cpu_image_installs_what_the_readme_test_command_installs(cpu):
    ours = list(cpu.pip_installs())
    for theirs in pip_installs(readme_test_command()):
        names = sorted(canonicalize_name(Requirement(r).name) for r in theirs.requirements)
        match = [
            p for p in ours if sorted(canonicalize_name(Requirement(r).name) for r in p.requirements) == names
        ]
        match = [p for p in match if p.local == theirs.local and theirs.flags <= p.flags]
        match = [p for p in match if p.options.get("-c") == theirs.options.get("-c")]
        assert match, f"Dockerfile.cpu does not run the README's `pip install {theirs}`"
        for req in map(Requirement, theirs.requirements):
            if req.specifier:
                assert cpu.pins()[canonicalize_name(req.name)] == next(iter(req.specifier)).version


def test_cpu_image_runs_what_ci_runs(cpu):
    argv = cpu.argv()
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3
    checks = [line for line in ci_lines() if line.startswith(("python -m ruff ", "python -m mypy"))]
    assert any(line.startswith("python -m mypy") for line in checks)
    pytest_command = readme_test_command().split("&&")[-1].strip()
    assert [s.strip() for s in argv[2].split("&&")] == [*checks, pytest_command]
    assert cpu.python() == "3.11"


# --- the multi-node examples -------------------------------------------------------------------


def compose_services(variables: dict[str, str]) -> tuple[dict[str, dict], dict]:
    """The services with compose's variable interpolation done, and the whole document."""
    doc = yaml.safe_load(COMPOSE.read_text())
    env = {"MASTER_ADDR": "10.0.0.1", **variables}  # MASTER_ADDR is required; the rest have defaults

    def interpolate(value):
        if isinstance(value, str):
            return substitute(value, env)
        if isinstance(value, list):
            return [interpolate(v) for v in value]
        if isinstance(value, dict):
            return {k: interpolate(v) for k, v in value.items()}
        return value

    return {name: interpolate(s) for name, s in doc["services"].items()}, doc


@pytest.mark.parametrize(
    "variables",  # as docker/README.md documents them
    [{}, {"CTSCALE_BACKEND": "deepspeed", "CTSCALE_ZERO_STAGE": "3"}, {"CTSCALE_BACKEND": "fsdp"}],
    ids=["ddp", "zero3", "fsdp"],
)
def test_compose_two_nodes_run_the_torchrun_launcher(cuda, variables):
    services, doc = compose_services(variables)
    assert sorted(services) == ["node0", "node1"]
    ranks, masters = set(), set()
    for name, s in services.items():
        build = s["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO and (context / build["dockerfile"]).resolve() == CUDA, name
        assert s["network_mode"] == "host" and s["init"] is True, name
        assert re.fullmatch(r"\d+g[b]?", s["shm_size"]) and int(re.match(r"\d+", s["shm_size"])[0]) >= 8
        (gpu,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"], name
        assert "working_dir" not in s and "user" not in s  # the image's /workspace and non-root user

        (entry,) = s["entrypoint"]
        script = cuda.in_repo(entry)
        assert script is not None and script.parent.name == "launch", entry
        assert script.stat().st_mode & 0o111, entry
        command = s["command"]
        parses_as_ctscale(["train", *command])  # launch/torchrun.sh runs `ctscale train "$@"`
        sets = [command[k + 1] for k, a in enumerate(command) if a == "--set"]
        check_overrides(command[command.index("--config") + 1], sets, cuda)

        env = s["environment"]
        for var in env:
            assert var in launcher_variables(script.name) or read_by_ctscale(var), (
                f"{name}: {var} is read neither by {script.name} nor by ctscale"
            )
        assert env["NNODES"] == "2"
        ranks.add(env["NODE_RANK"])
        masters.add(env["MASTER_ADDR"])

        mounts = {}
        for volume in s["volumes"]:
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode)
            if not source.startswith((".", "/")):
                assert source in (doc.get("volumes") or {}), f"{name}: named volume {source} not declared"
        assert mounts[str(Path(env["CTSCALE_GLUE_DIR"]).parent)][1] == ["ro"]
        output_dir = next(o.split("=", 1)[1] for o in sets if o.startswith("train.output_dir="))
        writable = [t for t, (_, mode) in mounts.items() if "ro" not in mode]
        assert any(output_dir.startswith(t + "/") for t in writable), (name, output_dir)
        assert cuda.env["TORCH_EXTENSIONS_DIR"] in mounts
    assert ranks == {"0", "1"} and len(masters) == 1


def test_docker_readme_commands_and_paths_exist(cuda, cpu):
    text = (DOCKER / "README.md").read_text()
    for path in set(
        re.findall(r"(?<![\w.-])(?:/workspace/)?((?:launch|configs|docker)/[\w.-]+(?:/[\w.-]+)*)", text)
    ):
        assert (REPO / path).exists(), f"docker/README.md names {path}, which does not exist"

    tags: dict[str, Image] = {}
    torchrun_nodes = []
    for line in bash_commands(text):
        tokens = shlex.split(line)
        if tokens[:2] == ["docker", "build"]:
            dockerfile = tokens[tokens.index("-f") + 1]
            assert tokens[-1] == "." and (REPO / dockerfile).is_file(), line
            tags[tokens[tokens.index("-t") + 1]] = cuda if dockerfile.endswith("cuda") else cpu
        if tokens[:2] != ["docker", "run"]:
            continue
        options: list[tuple[str, str | None]] = []
        rest = iter(tokens[2:])
        for token in rest:
            if not token.startswith("-"):
                image_tag = token
                break
            with_value = {"-e", "-v", "--entrypoint", "--ulimit", "--shm-size", "--network", "--gpus"}
            assert token in with_value | {"--rm", "--init"}, f"unexpected docker run option {token}"
            options.append((token, next(rest) if token in with_value else None))
        args = list(rest)
        assert image_tag in tags, f"docker run {image_tag}: no `docker build -t {image_tag}` above it"
        image = tags[image_tag]
        if image is cpu:
            assert not args, "the CI image runs its CMD"
            continue
        entry = dict(options).get("--entrypoint") or image.argv()[0]
        envs = dict(v.split("=", 1) for o, v in options if o == "-e")
        for var in envs:
            ok = read_by_ctscale(var) or var.startswith(("NCCL_", "GLOO_"))
            assert ok or any(var in launcher_variables(s.name) for s in (REPO / "launch").glob("*.sh")), var
        mounts = {v.split(":")[1]: v.split(":")[2:] for o, v in options if o == "-v"}
        if entry == "ctscale":
            parses_as_ctscale(args)
        elif entry == "deepspeed":
            from deepspeed.launcher.runner import parse_args as deepspeed_args

            split = args.index("--module")
            ds = deepspeed_args(args)  # the flags exist in the pinned DeepSpeed
            assert ds.no_ssh and ds.node_rank == 0 and ds.master_addr and ds.user_script == "ctscale"
            assert ds.hostfile in mounts, "mount the hostfile"
            args = args[split + 2 :]
            parses_as_ctscale(args)
        else:
            script = image.in_repo(entry)
            assert script is not None and script.parent.name == "launch", entry
            parses_as_ctscale(["train", *args])
            if envs.get("NNODES") == "2":
                torchrun_nodes.append((envs, options, args))
        sets = [args[k + 1] for k, a in enumerate(args) if a == "--set"]
        config = args[args.index("--config") + 1] if "--config" in args else None
        check_overrides(config, sets, image)
        for o in sets:
            if o.startswith("train.output_dir="):
                target = o.split("=", 1)[1]
                assert any(target.startswith(t + "/") and "ro" not in m for t, m in mounts.items()), o
    assert {"ctscale:cuda", "ctscale:cpu"} <= set(tags)

    # the two `docker run` nodes differ only in NODE_RANK
    assert sorted(envs["NODE_RANK"] for envs, _, _ in torchrun_nodes) == ["0", "1"]
    (_, a_opts, a_args), (_, b_opts, b_args) = torchrun_nodes
    strip = [(o, v) for o, v in a_opts if not (v or "").startswith("NODE_RANK=")]
    assert strip == [(o, v) for o, v in b_opts if not (v or "").startswith("NODE_RANK=")]
    assert a_args == b_args


def test_hostfile_example_is_a_deepspeed_hostfile():
    lines = [ln for ln in (DOCKER / "hostfile.example").read_text().splitlines() if ln and ln[0] != "#"]
    hosts = [re.fullmatch(r"(\S+)\s+slots=(\d+)", ln) for ln in lines]
    assert len(hosts) == 2 and all(hosts) and len({h[1] for h in hosts}) == 2
