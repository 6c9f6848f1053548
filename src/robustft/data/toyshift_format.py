"""The toyshift file format: the HDF5 files that `toyshift` generates, written and read back.

One file per pool (pretrain.h5, task.h5): file attributes (format, format_version, seed,
image_size, domains, class_names, generator_params; task: id_domain), one group per split (task:
train, val, test, one per OOD domain, optionally `BASELINE_SPLIT` last) with
`images` (uint8 N×H×W×3), `labels` and `domains` (int64), its count and the sha256 of the three.
Reading verifies every split against its checksum.

The registry reads the task file through this module; it never imports the generator.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from robustft.io import atomic_path, open_hdf5

DOMAINS: tuple[str, ...] = ("real", "clipart", "sketch", "painting")
FORMAT = "robustft-toyshift"
FORMAT_VERSION = 1
# The task file's optional pool of extra ID-domain training images for the baseline models of
# effective robustness (generator key `baseline_per_class`); nothing else reads it.
BASELINE_SPLIT = "baseline_train"
_DATASETS = ("images", "labels", "domains")


@dataclass(frozen=True)
class ImageSplit:
    """Images (uint8 N×H×W×3), class labels and domain indices (into DOMAINS), both int64."""

    images: np.ndarray
    labels: np.ndarray
    domains: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _digest(images: np.ndarray, labels: np.ndarray, domains: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(domains, dtype="<i8").tobytes())
    return h.hexdigest()


def write_splits(*, path: Path, splits: Mapping[str, ImageSplit], attrs: Mapping[str, Any]) -> None:
    """Write one file: `attrs` as its file attributes, one checksummed group per split."""
    # The HDF5 file closes before atomic_path renames it; track_order keeps the splits in the
    # order written (train, val, test, then the OOD domains).
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, split in splits.items():
            group = f.create_group(name)
            n = len(split)
            options: dict[str, Any] = {}
            if n:
                options = {
                    "chunks": (min(n, 256), *split.images.shape[1:]),
                    "compression": "gzip",
                    "compression_opts": 1,
                }
            group.create_dataset("images", data=split.images, **options)
            # Labels and domains stay contiguous and uncompressed: small, and easy to audit.
            group.create_dataset("labels", data=split.labels.astype("<i8"))
            group.create_dataset("domains", data=split.domains.astype("<i8"))
            group.attrs["sha256"] = _digest(split.images, split.labels, split.domains)
            group.attrs["count"] = n


def _strings(value: Any) -> list[str]:
    items = [value] if isinstance(value, str | bytes) else list(value)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in items]


def _attr(f: h5py.File, key: str) -> Any:
    if key not in f.attrs:
        raise ValueError(f"{f.filename}: file attribute {key!r} is missing")
    value = f.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def _groups(f: h5py.File) -> list[str]:
    return [name for name, item in f.items() if isinstance(item, h5py.Group)]


def _open(path: str | Path) -> h5py.File:
    f = open_hdf5(path)
    fmt = f.attrs.get("format")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    version = f.attrs.get("format_version")
    if fmt != FORMAT or version is None or int(version) != FORMAT_VERSION:
        f.close()
        raise ValueError(
            f"{path}: not a {FORMAT} version {FORMAT_VERSION} file "
            f"(format={fmt!r}, format_version={version!r})"
        )
    return f


def list_splits(path: str | Path) -> list[str]:
    """Split names in the order they were written."""
    with _open(path) as f:
        return _groups(f)


def class_names(path: str | Path) -> list[str]:
    """Class names; label i is class_names(path)[i]."""
    with _open(path) as f:
        return _strings(_attr(f, "class_names"))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """File attributes (format, seed, image_size, domains, class_names, id_domain) and splits."""
    with _open(path) as f:
        meta: dict[str, Any] = {}
        for key, value in f.attrs.items():
            if key in ("domains", "class_names"):
                meta[key] = _strings(value)
            elif isinstance(value, bytes | str):
                meta[key] = value.decode() if isinstance(value, bytes) else value
            else:
                meta[key] = value.item() if hasattr(value, "item") else value
        if "generator_params" in meta:
            meta["generator_params"] = json.loads(meta["generator_params"])
        meta["splits"] = {name: int(f[name].attrs.get("count", -1)) for name in _groups(f)}
        return meta


def read_split(path: str | Path, split: str) -> ImageSplit:
    """Read and verify one split; any mismatch raises ValueError naming the file and split."""
    path = Path(path)
    with _open(path) as f:
        where = f"{path} [{split}]"
        if not isinstance(f.get(split), h5py.Group):
            available = ", ".join(_groups(f)) or "none"
            raise ValueError(f"{path}: no split {split!r}; available: {available}")
        group = f[split]
        missing = [name for name in _DATASETS if name not in group]
        if missing:
            raise ValueError(
                f"{where}: missing dataset(s) {missing}; available: {sorted(group.keys())}"
            )
        try:
            images = group["images"][()]
            labels = group["labels"][()]
            domains = group["domains"][()]
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{where}: unreadable data ({error})") from None
        size = int(_attr(f, "image_size"))
        n_classes = len(_strings(_attr(f, "class_names")))
        n_domains = len(_strings(_attr(f, "domains")))
        stored_sha = group.attrs.get("sha256")
        stored_sha = stored_sha.decode() if isinstance(stored_sha, bytes) else stored_sha
        stored_count = group.attrs.get("count")

    n = labels.shape[0] if labels.ndim == 1 else -1
    problems = []
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3) or images.ndim != 4:
        problems.append(
            f"images are {images.dtype}{images.shape}, expected uint8 (N, {size}, {size}, 3)"
        )
    if labels.dtype != np.int64 or labels.ndim != 1:
        problems.append(f"labels are {labels.dtype}{labels.shape}, expected int64 (N,)")
    if domains.dtype != np.int64 or domains.shape != (n,):
        problems.append(f"domains are {domains.dtype}{domains.shape}, expected int64 ({n},)")
    if images.shape[:1] != (n,):
        problems.append(f"images {images.shape} do not match {n} labels")
    if stored_count is None or int(stored_count) != n:
        problems.append(f"count attribute {stored_count!r} != {n}")
    if not problems:
        if n and (labels.min() < 0 or labels.max() >= n_classes):
            problems.append(f"labels outside 0..{n_classes - 1}")
        if n and (domains.min() < 0 or domains.max() >= n_domains):
            problems.append(f"domain indices outside 0..{n_domains - 1}")
        if _digest(images, labels, domains) != stored_sha:
            problems.append("sha256 does not match the stored checksum")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return ImageSplit(images=images, labels=labels, domains=domains)
