"""Linear heads on disk: `head.safetensors` with a (K, D) `weight`, a (K,) `bias` and, as the
file's safetensors metadata, the provenance of what the head was fitted on.

`save_head` is the one writer (the probe writes numpy arrays, the zero-shot step torch
tensors; each kind goes through safetensors' writer of that kind, which give the same bytes
for the same values), `load_head` the one reader (torch tensors and the metadata, with
one-line errors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robustft.io import atomic_path

if TYPE_CHECKING:
    import torch

HEAD_FILE = "head.safetensors"
METADATA_KEY = "robustft"


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    metadata: dict[str, str]  # the safetensors metadata ({} when the file has none)


def save_head(
    path: str | Path,
    *,
    weight: Any,
    bias: Any,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `weight` and `bias` (both numpy arrays, or both torch tensors) to `path`
    atomically, with `metadata` (strings) as the file's safetensors metadata."""
    if isinstance(weight, np.ndarray) and isinstance(bias, np.ndarray):
        from safetensors.numpy import save_file
    elif isinstance(weight, np.ndarray) or isinstance(bias, np.ndarray):
        raise TypeError("save_head: weight and bias must both be numpy arrays or torch tensors")
    else:
        from safetensors.torch import save_file
    # One metadata entry holding sorted JSON: safetensors writes several entries in an order
    # that changes from run to run, and a head's SHA-256 is part of its runs' provenance.
    packed = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file({"weight": weight, "bias": bias}, str(tmp), metadata=packed)


def load_head(path: str | Path, *, what: str = "head") -> Head:
    """The head in `path`, as torch tensors, with its metadata. A missing file, one that is
    not safetensors, or one without a 2-d `weight` and a `bias` is a one-line error (`what`
    names the head in the first)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if METADATA_KEY in metadata:
                metadata = dict(json.loads(metadata.pop(METADATA_KEY)), **metadata)
            state = handle.get_tensors()
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        raise ValueError(f"{path}: expected a 2-d 'weight' and a 'bias', found {shapes}")
    return Head(weight=state["weight"], bias=state["bias"], metadata=metadata)
