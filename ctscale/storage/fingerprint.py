"""The architecture a mask or checkpoint was made for, as a short hash."""

from __future__ import annotations

import hashlib
import json


def model_fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
    """SHA-256 of the sorted (name, shape) list: identifies a model architecture, not weights."""
    text = json.dumps(sorted((n, list(s)) for n, s in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
