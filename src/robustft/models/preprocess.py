"""What a backbone's inputs look like, and config overrides of it.

A backbone's `Preprocess` starts as its own pretrained config (timm's, recorded in meta.json);
`merge_preprocess` lays config overrides over it: `backbone_options.<b>.preprocess`, then
`dataset_settings.<d>.preprocess` (the workflow merges those two; null keys inherit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

PREPROCESS_KEYS = ("input_size", "interpolation", "crop_pct", "mean", "std")
# The modes torchvision's Resize takes for both PIL images (files) and uint8 tensors (arrays).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects: input size, resize/crop, and the normalisation it was trained with.

    Datasets deliver uint8 images of `input_size` (resized so that the centre crop of
    `crop_pct` is `input_size`, with `interpolation`); `ImageClassifier` normalises them.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["mean"] = tuple(float(x) for x in values["mean"])
        values["std"] = tuple(float(x) for x in values["std"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, not tuples): for meta.json, config.json, HDF5 attrs."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data


def timm_preprocess(model: nn.Module) -> Preprocess:
    """The preprocessing in a timm model's own pretrained config."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"non-square input size {height}×{width} is not supported")
    return Preprocess(
        input_size=int(height),
        mean=tuple(float(x) for x in config["mean"]),
        std=tuple(float(x) for x in config["std"]),
        crop_pct=float(config.get("crop_pct") or 1.0),
        interpolation=str(config.get("interpolation") or "bilinear"),
    )


def merge_preprocess(
    base: Preprocess, overrides: Mapping[str, Any] | None, *, key: str = "preprocess"
) -> Preprocess:
    """`base` with the non-null values of `overrides` laid over it, each checked.

    Keys: input_size (int ≥ 1), interpolation (one of INTERPOLATIONS), crop_pct (0 < x ≤ 1),
    mean (3 numbers), std (3 numbers > 0). Errors are one line naming `key`.<name>, so a
    caller passes the config key the overrides came from.
    """
    overrides = {name: value for name, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(overrides) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; known: {', '.join(PREPROCESS_KEYS)}")
    values = asdict(base)
    for name, value in overrides.items():
        values[name] = _checked(name, value, key=f"{key}.{name}")
    return Preprocess(**values)


def _checked(name: str, value: Any, *, key: str) -> Any:
    if name == "input_size":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}: expected an integer ≥ 1 (pixels), got {value!r}")
        return value
    if name == "interpolation":
        if value not in INTERPOLATIONS:
            raise ValueError(f"{key}: expected one of {', '.join(INTERPOLATIONS)}, got {value!r}")
        return value
    if name == "crop_pct":
        number = _number(value)
        if number is None or not 0 < number <= 1:
            raise ValueError(f"{key}: expected a number in (0, 1], got {value!r}")
        return number
    # mean, std
    numbers = (
        [_number(x) for x in value] if isinstance(value, list | tuple) and len(value) == 3 else []
    )
    if len(numbers) != 3 or any(x is None for x in numbers):
        raise ValueError(f"{key}: expected 3 numbers (R, G, B), got {value!r}")
    if name == "std" and any(x <= 0 for x in numbers):  # type: ignore[operator]
        raise ValueError(f"{key}: expected 3 numbers > 0 (R, G, B), got {value!r}")
    return tuple(numbers)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
