"""CT-D on LoRA adapters (PEFT): why the child network is chosen within ``lora_B`` only.

LoRA initialises ``lora_B`` to zero, so at a Fisher pass on a fresh adapter the gradient of
``lora_A`` (``B^T`` times the output gradient) is exactly zero, and so is its Fisher. A global
top-p over A and B then keeps no entry of A: A would be frozen for the whole run. So for a
model with LoRA adapters the CT-D candidates default to the ``lora_B`` tensors (A trains fully),
candidates that match a ``lora_A`` tensor are refused, and so is a saved mask that keeps no
entry of one. Used by ``ctscale.hf.ChildTuningCallback``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ctscale.errors import ConfigError, MaskError
from ctscale.methods.ct_d.fisher import candidate_filter
from ctscale.storage import mask_file

# PEFT's adapter tensors: `<base module>.lora_A.<adapter>.weight`, `...lora_embedding_A.<adapter>`
LORA_B_CANDIDATES = (r"\.lora_(B|embedding_B)\.",)
_LORA_A = re.compile(r"\.lora_(A|embedding_A)\.")


def is_lora_a(name: str) -> bool:
    """A LoRA down-projection (``lora_A`` / ``lora_embedding_A``) parameter name."""
    return bool(_LORA_A.search(name))


def ctd_scope(
    candidates: Sequence[str] | None, exclude: Sequence[str], shapes: dict[str, tuple[int, ...]]
) -> list[str]:
    """The CT-D candidate patterns for a model with trainable ``shapes``: ``candidates`` as given,
    or the default (``lora_B`` in a model with LoRA adapters, else "layer", the reference's
    transformer blocks). ConfigError when the candidates match a ``lora_A`` tensor."""
    lora_a = [n for n in shapes if is_lora_a(n)]
    if candidates is None:
        return list(LORA_B_CANDIDATES) if lora_a else ["layer"]
    is_candidate = candidate_filter(candidates, exclude)
    picked = [n for n in lora_a if is_candidate(n)]
    if picked:
        more = f" (and {len(picked) - 1} more)" if len(picked) > 1 else ""
        raise ConfigError(
            f"ChildTuningCallback: CT-D candidates {list(candidates)} include the LoRA tensor "
            f"{picked[0]}{more}. LoRA starts lora_B at zero, so lora_A's gradient and Fisher are "
            "exactly zero at the Fisher pass and top-p would freeze every lora_A entry for the "
            "whole run. Leave candidates unset (a PEFT model then selects within lora_B and "
            "trains lora_A fully), or add exclude=[r'\\.lora_A\\.']"
        )
    return list(candidates)


def refuse_frozen_lora_a(path: str | Path) -> None:
    """MaskError for a mask that keeps no entry of a LoRA ``lora_A`` tensor (a top-p over A and
    B of a fresh adapter, where A's Fisher is zero): training with it would freeze A."""
    info = mask_file.read_info(path)
    frozen = sorted(n for n in info.shapes if is_lora_a(n) and info.selected[n] == 0)
    if frozen:
        more = f" (and {len(frozen) - 1} more)" if len(frozen) > 1 else ""
        raise MaskError(
            f"{path} keeps no entry of the LoRA tensor {frozen[0]}{more}: training with it would "
            "freeze lora_A (its Fisher was zero because lora_B starts at zero). Make a new mask "
            "with this callback's default candidates (lora_B only; lora_A trains fully)"
        )
