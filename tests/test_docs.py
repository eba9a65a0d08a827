"""The README and docs/ keep their promises: short README, links and anchors that resolve, every
shipped config documented, commands that parse with their real option names and config keys,
layout blocks that name files that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ctscale.cli import build_parser
from ctscale.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINKED = [*PAGES, *(REPO / name for name in ("CONTRIBUTING.md", "bench/README.md", "docker/README.md"))]

# Pages another branch of the same change writes, linked before they exist; once a page exists
# it is checked like any other (docs/paper_effect.md, the last one, landed with issue 20).
WRITTEN_ELSEWHERE: set[str] = set()

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")


def rel(path: Path) -> str:
    return path.resolve().relative_to(REPO).as_posix()


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and inline code spans (where links are links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", markdown))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    return [target for _, target in LINK.findall(prose(page.read_text()))]


def test_readme_stays_short():
    lines = len(README.read_text().splitlines())
    assert lines < 260, f"README.md has {lines} lines; move detail to a page under docs/ (at most ~250)"


@pytest.mark.parametrize("page", LINKED, ids=rel)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            if rel(dest) not in WRITTEN_ELSEWHERE:
                broken.append(f"{target}: no file {rel(dest)}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_pages_written_elsewhere_leave_the_list_once_they_exist():
    landed = [p for p in WRITTEN_ELSEWHERE if (REPO / p).exists()]
    assert not landed, f"{landed} exist now: remove them from WRITTEN_ELSEWHERE in {rel(Path(__file__))}"


def test_every_page_is_listed_in_the_index_and_reached_from_the_readme():
    index = links(DOCS / "index.md")
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert page.name in index, f"docs/index.md does not link {page.name}"
    assert "docs/index.md" in links(README)


SHIPPED = [
    *sorted((REPO / "configs").glob("*.yaml")),
    *sorted((REPO / "ds_configs").glob("*.json")),
    *sorted((REPO / "launch" / "accelerate").iterdir()),
]


@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_every_shipped_config_is_documented(path):
    text = "\n".join(page.read_text() for page in PAGES)
    assert re.search(rf"(?<![\w.-]){re.escape(path.name)}\b", text), (
        f"{rel(path)} is named in neither README.md nor docs/*.md"
    )


LAUNCHERS = ("launch/torchrun.sh", "launch/deepspeed.sh", "launch/slurm.sbatch")


def shell_commands(markdown: str) -> list[str]:
    """The logical lines of the ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def ctscale_argv(command: str) -> list[str] | None:
    """The arguments `ctscale` gets from a documented command line (directly or through one of
    the launchers), or None when the line is not one, or is a template (`[...]`, `...`, `|`)."""
    if re.search(r"\[|\.\.\.|\||<", command):
        return None
    tokens = [t for t in shlex.split(command) if t != "&"]  # & : started in the background
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value prefixes
        tokens.pop(0)
    if tokens[:1] == ["ctscale"]:
        return tokens[1:]
    while tokens and tokens[0] not in LAUNCHERS:  # sbatch [options], exec NODE env ...
        tokens.pop(0)
    if not tokens:
        return None
    args = tokens[1:]
    return args if args[:1] in (["train"], ["fisher"]) else ["train", *args]


DOCUMENTED = [
    (rel(page), argv) for page in PAGES for c in shell_commands(page.read_text()) if (argv := ctscale_argv(c))
]


def test_the_docs_show_ctscale_commands():
    assert len(DOCUMENTED) >= 20, DOCUMENTED


@pytest.mark.parametrize("page,argv", DOCUMENTED, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in DOCUMENTED])
def test_documented_command_parses_with_real_options_and_keys(page, argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --version and --help exit 0 after printing
        assert exit.code == 0, f"{page}: `ctscale {' '.join(argv)}` does not parse"
        return
    defaults = config_to_dict(load_config())
    for override in getattr(args, "set", None) or []:
        section, _, key = override.partition("=")[0].partition(".")
        assert key in defaults.get(section, {}), f"{page}: --set {override}: no key {section}.{key}"
    config = getattr(args, "config", None)
    if config and config != "CONFIG":
        assert (REPO / config).is_file(), f"{page}: --config {config} does not exist"


def layout_names(block: str) -> set[str]:
    """File and folder names in a layout tree: `name.py`, `name/`."""
    return set(re.findall(r"(?<![\w./])([\w.]+\.(?:py|sh|sbatch|md|txt)\b|[\w.]+/(?=[\s,)]|$))", block, re.M))


def tree_block(page: Path) -> str:
    return re.search(r"^```(?:text)?\n(ctscale/.*?)^```", page.read_text(), re.S | re.M).group(1)


@pytest.mark.parametrize("page", [README, DOCS / "layout.md"], ids=rel)
def test_layout_blocks_name_files_that_exist(page):
    present = {p.name for p in REPO.rglob("*") if ".git" not in p.parts}
    present |= {f"{p.name}/" for p in REPO.rglob("*") if p.is_dir() and ".git" not in p.parts}
    missing = sorted(n for n in layout_names(tree_block(page)) if n not in present)
    assert not missing, f"{rel(page)}'s layout block names {missing}, which do not exist"


def test_layout_page_names_every_module():
    named = layout_names(tree_block(DOCS / "layout.md"))
    package = REPO / "ctscale"
    modules = {p.name for p in package.rglob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.name}/" for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    missing = sorted((modules | folders) - named)
    assert not missing, f"docs/layout.md's tree does not name {missing}; add a line for each"
