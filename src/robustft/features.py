"""Penultimate features of a frozen backbone, stored as HDF5 (one file per split)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from robustft.io import atomic_path, open_hdf5

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

FORMAT = "robustft-features"


@dataclass(frozen=True)
class FeatureSet:
    features: np.ndarray  # float32 (N, D)
    labels: np.ndarray  # int64 (N,)
    attrs: dict[str, Any]


def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32 N×D) from `model.features` in eval mode, and the labels."""
    # torch is imported here, not at the top: reading features (the probe) needs no torch.
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from robustft.data.datasets import memory_format, to_float

    model.eval().to(device=device, memory_format=memory_format(device))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.startswith("cuda"),
    )
    features, labels = [], []
    bar = tqdm(
        loader, disable=not progress, desc="features", unit="batch", mininterval=2.0, ascii=True
    )
    with torch.inference_mode():
        for images, targets in bar:
            batch = to_float(images.to(device, non_blocking=True))
            features.append(model.features(batch).float().cpu())
            labels.append(targets)
    return torch.cat(features).numpy(), torch.cat(labels).numpy().astype(np.int64)


def write_features(
    path: str | Path, *, features: np.ndarray, labels: np.ndarray, attrs: dict[str, Any]
) -> None:
    """Write `features` (float32 N×D) and `labels` (int64 N) with attributes, atomically."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        handle.create_dataset("labels", data=labels.astype(np.int64))
        handle.attrs["format"] = FORMAT
        handle.attrs["count"] = len(labels)
        for key, value in attrs.items():
            handle.attrs[key] = value


def read_features(path: str | Path, *, num_classes: int | None = None) -> FeatureSet:
    """Read a feature file and check what a probe relies on; errors name the file."""
    path = Path(path)
    with open_hdf5(path, what="feature file") as handle:
        for name in ("features", "labels"):
            if name not in handle:
                raise ValueError(f"{path}: no '{name}' dataset (found: {sorted(handle)})")
        features, labels = handle["features"][...], handle["labels"][...]
        attrs = {key: _plain(value) for key, value in handle.attrs.items()}
    if features.ndim != 2 or features.dtype != np.float32:
        raise ValueError(
            f"{path}: 'features' must be float32 N×D, got {features.dtype} {features.shape}"
        )
    if labels.shape != (len(features),):
        raise ValueError(f"{path}: 'labels' has shape {labels.shape}, expected ({len(features)},)")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{path}: negative label {labels.min()}")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise ValueError(f"{path}: label {labels.max()} out of range for {num_classes} classes")
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: features contain NaN or infinity")
    return FeatureSet(features=features, labels=labels.astype(np.int64), attrs=attrs)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
