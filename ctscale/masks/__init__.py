"""Mask strategies. A new method is one file and one line in ``STRATEGIES``."""

from ctscale.masks.base import GradView, MaskStrategy, NoMask
from ctscale.masks.fisher_d import FixedChildMask
from ctscale.masks.random_f import RandomChildMask

# method name -> strategy class; ct-d needs a selected child network, built in ctscale.child.
STRATEGIES = {"vanilla": NoMask, "ct-f": RandomChildMask, "ct-d": FixedChildMask}

__all__ = ["STRATEGIES", "FixedChildMask", "GradView", "MaskStrategy", "NoMask", "RandomChildMask"]
