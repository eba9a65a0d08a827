"""The one list of fine-tuning methods: config validation, the trainer, the plan and the HF
callback all read it, and none of them names a method.

A method is one module (or folder) under ``ctscale/methods/`` that calls ``register_method``
with a ``MethodSpec``, plus its import line in ``ctscale/methods/__init__.py``; see
CONTRIBUTING.md ("Adding a method").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ctscale.errors import ConfigError

if TYPE_CHECKING:  # no run-time import: ctscale.config reads this registry
    from ctscale.backends.base import ShardViews
    from ctscale.config import Config
    from ctscale.methods.base import MaskStrategy
    from ctscale.methods.ct_d.fisher import FisherAccumulator


@dataclass
class MethodContext:
    """Everything a method's ``build`` may use.

    cfg:         the run's config (the HF callback fills one from its arguments).
    shards:      the engine's view of the parameters (global shapes, this rank's ranges).
    fisher_pass: runs a Fisher pass into an accumulator (collective); None where none can run.
    resumed_mask: the mask file a resumed run started with (reloaded, never re-estimated).
    mask_out:    where a freshly made mask is saved (None: the method's default in the run dir).
    seconds:     per set-up phase, filled by the builder (``fisher``, ``select``, ``load_mask``).
    """

    cfg: Config
    shards: ShardViews
    fisher_pass: Callable[[FisherAccumulator], None] | None = None
    resumed_mask: str | None = None
    mask_out: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ChildSummary:
    """The child network in one console line, and the numbers that go with it in the logs."""

    line: str
    selected: int | None = None  # child entries of the candidate parameters (global)
    total: int | None = None  # candidate entries (global)
    fisher_batches: int | None = None  # global batches of the Fisher pass, when one ran now


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method.

    name:        ``method.name`` in configs (and the HF callback's ``method=``).
    summary:     one line for ``--help`` and the docs.
    build:       the mask strategy of a run (called once, before the first step; collective).
    describe:    the child network in words, once the strategy exists: ``(cfg, mask path,
                 seconds of the set-up phases) -> ChildSummary``; None: nothing to say (vanilla).
    plan:        where the child network will come from, in words (``ctscale train --dry-run``):
                 ``(cfg, training examples) -> str``.
    fixed_child: one child network for the whole run, built as a ``FixedChildMask``: the
                 child-only AdamW (``method.child_only_optimizer``) can serve it.
    mask_path:   the mask file the run keeps (it is recorded in checkpoints and reloaded on
                 resume): ``(cfg, resumed path) -> path``; None: the method keeps no file.
    reads_mask_file: accepts ``method.mask_file`` (a saved child network).
    fisher_pass: without a mask file, ``build`` runs the Fisher pass it is given (engines that
                 cannot run one, such as the HF callback under DeepSpeed, need the mask file).
    check:       extra config checks, ``(cfg, where) -> None``, raising ConfigError.
    preflight:   checks that may read files (a saved mask's header), before any model loads.
    """

    name: str
    summary: str
    build: Callable[[MethodContext], MaskStrategy]
    plan: Callable[[Config, int], str]
    describe: Callable[[Config, str | None, dict[str, float]], ChildSummary] | None = None
    fixed_child: bool = False
    mask_path: Callable[[Config, str | None], str | None] | None = None
    reads_mask_file: bool = False
    fisher_pass: bool = False
    check: Callable[[Config, str], None] | None = None
    preflight: Callable[[Config], None] | None = None


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (once per name); returns it."""
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _METHODS[spec.name] = spec
    return spec


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; ConfigError naming the registered methods otherwise."""
    if name not in _METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def build_strategy(
    cfg: Config,
    shards: ShardViews,
    fisher_pass: Callable[[FisherAccumulator], None] | None,
    resumed_mask: str | None = None,
    seconds: dict[str, float] | None = None,
    mask_out: str | None = None,
) -> MaskStrategy:
    """The mask strategy ``cfg.method`` asks for (collective where the method's set-up is); the
    fields of ``MethodContext`` say what each argument is. ``seconds`` is filled in place."""
    ctx = MethodContext(cfg, shards, fisher_pass, resumed_mask, mask_out, {} if seconds is None else seconds)
    return get_method(cfg.method.name).build(ctx)


def run_mask_path(cfg: Config, resumed: str | None = None) -> str | None:
    """The mask file this run keeps (``resumed``: a resumed run's own), None if its method keeps none."""
    spec = get_method(cfg.method.name)
    return spec.mask_path(cfg, resumed) if spec.mask_path else None


def preflight(cfg: Config) -> None:
    """The method's checks before any model loads (``MethodSpec.preflight``)."""
    spec = get_method(cfg.method.name)
    if spec.preflight is not None:
        spec.preflight(cfg)


def check_method_config(cfg: Config, where: str) -> None:
    """The method's own config rules, and the child-only optimizer's need for a fixed child."""
    spec = get_method(cfg.method.name)
    if cfg.method.child_only_optimizer and not spec.fixed_child:
        fixed = " or ".join(repr(s.name) for s in _METHODS.values() if s.fixed_child)
        raise ConfigError(
            f"method.child_only_optimizer needs a fixed child network (method.name {fixed}), got "
            f"method.name {cfg.method.name!r}{where}; set method.name to one of them or "
            "method.child_only_optimizer=false"
        )
    if cfg.method.mask_file and not spec.reads_mask_file:
        readers = " or ".join(repr(s.name) for s in _METHODS.values() if s.reads_mask_file)
        raise ConfigError(
            f"method.mask_file is read only by method.name {readers}, got method.name "
            f"{cfg.method.name!r}{where}; remove method.mask_file or change method.name"
        )
    if spec.check is not None:
        spec.check(cfg, where)
