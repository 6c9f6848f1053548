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


def resolve_precision(precision: str, device: str) -> str:
    """`auto` → bf16 on a GPU (tensor cores; features are stored as float32 anyway), fp32 on
    a CPU (where bf16 is slower and would change the toy's results)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return precision


def resolve_num_workers(num_workers: int | str, *, device: str, threads: int) -> int:
    """`auto` → 0 on a CPU (workers would compete with the model for the job's cores),
    one per thread of the job on a GPU."""
    if num_workers == "auto":
        return max(1, threads) if str(device).startswith("cuda") else 0
    try:
        value = int(num_workers)
    except (TypeError, ValueError):
        raise ValueError(
            f"num_workers must be auto or an integer ≥ 0, got {num_workers!r}"
        ) from None
    if value < 0:
        raise ValueError(f"num_workers must be auto or an integer ≥ 0, got {num_workers!r}")
    return value


def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int = 0,
    precision: str = "auto",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32 N×D) from `model.features` in eval mode, and the labels.

    The device is kept busy: worker processes batch uint8 images into pinned memory while the
    model runs, copies to a GPU are asynchronous, and a GPU computes in channels-last bf16
    (`precision="auto"`); features go back as float32 into one preallocated array.
    """
    # torch is imported here, not at the top: reading features (the probe) needs no torch.
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from robustft.data.datasets import memory_format, to_float

    on_gpu = str(device).startswith("cuda")
    precision = resolve_precision(precision, device)
    model.eval().to(device=device, memory_format=memory_format(device))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=on_gpu,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    count = len(dataset)  # type: ignore[arg-type]
    features: np.ndarray | None = None
    labels = np.empty(count, dtype=np.int64)
    start = 0
    bar = tqdm(
        total=count,
        disable=not progress,
        desc="features",
        unit="img",
        mininterval=2.0,
        ascii=True,
    )
    autocast = torch.autocast(
        device_type="cuda" if on_gpu else "cpu",
        dtype=torch.bfloat16,
        enabled=precision == "bf16",
    )
    with torch.inference_mode(), autocast, bar:
        for images, targets in loader:
            batch = to_float(images.to(device, non_blocking=True))
            out = model.features(batch).float().cpu().numpy()
            if features is None:
                features = np.empty((count, out.shape[1]), dtype=np.float32)
            stop = start + len(out)
            features[start:stop] = out
            labels[start:stop] = targets.numpy()
            start = stop
            bar.update(len(out))
    if features is None:
        raise ValueError("no images to extract features from")
    return features, labels


def write_features(
    path: str | Path, *, features: np.ndarray, labels: np.ndarray, attrs: dict[str, Any]
) -> None:
    """Write `features` (float32 N×D) and `labels` (int64 N) with attributes, atomically."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    try:
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
            handle.create_dataset("features", data=features.astype(np.float32))
            handle.create_dataset("labels", data=labels.astype(np.int64))
            handle.attrs["format"] = FORMAT
            handle.attrs["count"] = len(labels)
            for key, value in attrs.items():
                handle.attrs[key] = value
    except OSError as error:
        # HDF5's errors (disk full, quota, I/O) span several lines and name the temporary
        # file, if any: say which output failed, with the cause's first line.
        cause = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise OSError(f"{path}: writing the feature file failed ({cause})") from error


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
