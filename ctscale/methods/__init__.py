"""Fine-tuning methods, one module or folder each, and the registry that lists them.

Each method module registers a ``MethodSpec`` (``ctscale.methods.registry``) when imported;
importing this package imports them all. Adding a method: a new module here and its import
line below (CONTRIBUTING.md, "Adding a method").
"""

# isort: off
# each registers itself; the order is the one configs and errors list them in
from ctscale.methods import vanilla  # noqa: F401
from ctscale.methods import ct_f  # noqa: F401
from ctscale.methods import ct_d  # noqa: F401
from ctscale.methods import ct_r  # noqa: F401

# isort: on
from ctscale.methods.base import GradView, MaskStrategy
from ctscale.methods.registry import MethodContext, MethodSpec, get_method, method_names, register_method

__all__ = [
    "GradView",
    "MaskStrategy",
    "MethodContext",
    "MethodSpec",
    "get_method",
    "method_names",
    "register_method",
]
