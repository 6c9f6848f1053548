"""The prepared-image cache: each split decoded and resized once, read by every run.

A split's transform (`datasets.transform_steps`) is a deterministic part, then a random part.
The cache stores, per split and transform, the output of the deterministic part as uint8 CHW
arrays in one HDF5 file; a job that reads it runs only the random part:

- resize, resize_center_crop (evaluation; CIFAR→STL and FMoW training): the whole transform
  is deterministic, so a cached image is exactly the image the uncached path gives;
- resize_random_crop (DomainNet training): the squash to (s/crop_pct)² is cached, and the
  random crop and flip run on it, drawing the same random numbers as the uncached path, so
  the training images are exactly those of the uncached path too;
- random_resized_crop (ImageNet, BREEDS training): nothing of it is deterministic. The cache
  holds each image with its shorter side at most `shorter_side` (aspect kept, smaller images
  as they are), and RandomResizedCrop + flip run on that: the one transform whose images
  differ from the uncached path's (docs/prepared-cache.md says how).

File layout (`FORMAT`, version `VERSION`): images of one size are `images` (N, 3, H, W),
one chunk per image; images of varying size (random_resized_crop) are one flat `pixels`
array (chunks of `FLAT_CHUNK` bytes) with `offsets` (N + 1) and `shapes` (N, 3). `labels`
(N) int64 beside them. The attributes record what the images were made from: the data
fingerprint, the split's digest (its labels and file names), the transform, the
preprocessing it depends on, and the torch and torchvision versions whose resize made them.
A reader (`open_prepared`) refuses a file whose record differs from what its job expects,
in one line naming the file, the attribute and both values.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from robustft import provenance
from robustft.data.datasets import preprocess_settings, split_images, transform_steps
from robustft.io import atomic_path

FORMAT = "robustft-prepared-images"
VERSION = 1
FLAT_CHUNK = 1 << 18  # bytes per chunk of the flat layout: about one 256×341 RGB image
COMPRESSIONS = ("none", "lzf")
RERUN = "prepare_images"
# Cropped images are cached at this multiple of the input size at most (256 for 224): the
# size the evaluation transform resizes to before its centre crop at crop_pct 0.875.
DEFAULT_SHORTER_SIDE_FACTOR = 1 / 0.875


def default_shorter_side(input_size: int) -> int:
    """The shorter side random_resized_crop images are cached at by default (256 for 224)."""
    return math.ceil(input_size * DEFAULT_SHORTER_SIDE_FACTOR)


class ShorterSideAtMost(torch.nn.Module):
    """Resize a uint8 CHW image so that its shorter side is `side` if it is longer (aspect
    kept, as torchvision's Resize(int) does); smaller images pass through untouched."""

    def __init__(self, side: int, *, interpolation: str) -> None:
        from torchvision.transforms import InterpolationMode, v2

        super().__init__()
        self.side = side
        self.resize = v2.Resize(
            side, interpolation=InterpolationMode(interpolation), antialias=True
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.resize(image) if min(image.shape[-2:]) > self.side else image


@dataclass(frozen=True)
class CachePlan:
    """What the cache stores for one transform at one preprocessing, and what runs after."""

    transform: str
    input_size: int
    crop_pct: float
    interpolation: str
    shorter_side: int | None  # random_resized_crop only: the cap on the cached shorter side

    def steps(self) -> tuple[list[Callable], list[Callable]]:
        return transform_steps(
            self.transform,
            size=self.input_size,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )

    def stored(self) -> Callable:
        """PIL image or uint8 CHW tensor → the cached uint8 CHW tensor."""
        from torchvision.transforms import v2

        fixed, _ = self.steps()
        if self.shorter_side is not None:
            fixed = [*fixed, ShorterSideAtMost(self.shorter_side, interpolation=self.interpolation)]
        return v2.Compose([v2.PILToTensor(), *fixed, v2.ToDtype(torch.uint8)])

    def remaining(self) -> Callable | None:
        """The random steps, run on every read of a cached image (None: nothing to run)."""
        from torchvision.transforms import v2

        _, random = self.steps()
        return v2.Compose([*random, v2.ToDtype(torch.uint8)]) if random else None

    def attrs(self) -> dict[str, Any]:
        return {
            "transform": self.transform,
            "input_size": self.input_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "shorter_side": self.shorter_side or 0,
        }

    def describe(self) -> str:
        size = self.input_size
        scaled = int(size / self.crop_pct)
        how = f"{self.interpolation}, antialiased"
        return {
            "resize": f"squashed to {size}×{size} ({how})",
            "resize_center_crop": f"shorter side to {scaled}, centre crop {size}×{size} ({how})",
            "resize_random_crop": f"squashed to {scaled}×{scaled} ({how}); random crop "
            f"{size} and flip on read",
            "random_resized_crop": f"shorter side at most {self.shorter_side} ({how}); "
            f"RandomResizedCrop {size} and flip on read",
        }[self.transform]


def cache_plan(transform: str, *, preprocess: Any, shorter_side: int | None = None) -> CachePlan:
    """The cache of `transform` at the backbone's `preprocess` (input size, crop_pct,
    interpolation). `shorter_side`: random_resized_crop's cap (None = `default_shorter_side`);
    ignored by the other transforms, whose cached size their own steps fix."""
    size, crop_pct, interpolation = preprocess_settings(preprocess)
    transform_steps(transform, size=size)  # an unknown name is an error here
    side = None
    if transform == "random_resized_crop":
        side = int(shorter_side) if shorter_side else default_shorter_side(size)
        if side < size:
            raise ValueError(
                f"prepared_cache.shorter_side: {side} is below the input size {size}; "
                f"use at least {size} (null = {default_shorter_side(size)})"
            )
    return CachePlan(
        transform=transform,
        input_size=size,
        crop_pct=crop_pct,
        interpolation=interpolation,
        shorter_side=side,
    )


def split_digest(split: Any) -> str:
    """SHA-256 of what a split is, apart from the data fingerprint: its labels, and its file
    names relative to their common folder (moving the data keeps it) with the border cropped
    off, or its in-memory pixels. Another split carving or file order gives another digest."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    if hasattr(split, "images"):
        digest.update(repr(split.images.shape).encode())
        digest.update(np.ascontiguousarray(split.images).tobytes())
    else:
        paths = list(split.paths)
        common = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
        digest.update(f"border={split.border}\n".encode())
        digest.update("\n".join(os.path.relpath(p, common) for p in paths).encode())
    return digest.hexdigest()


def _as_list(batch: list[Any]) -> list[Any]:
    return batch  # images of varying size: no stacking


def prepare_split(
    *,
    split: Any,
    out_path: str | Path,
    plan: CachePlan,
    data_fingerprint: str | None,
    compression: str = "none",
    num_workers: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode every image of `split`, apply `plan`'s deterministic steps, and write them to
    `out_path` (atomically: a failure leaves no file). `num_workers` DataLoader processes
    decode; `attrs` are recorded too (dataset, split). Returns a summary (count, bytes)."""
    import h5py
    from tqdm import tqdm

    if compression not in COMPRESSIONS:
        raise ValueError(
            f"prepared_cache.compression: {compression!r} is not one of {COMPRESSIONS}"
        )
    filters = {"compression": "lzf"} if compression == "lzf" else {}
    count = len(split.labels)
    loader = DataLoader(
        split_images(split, plan.stored()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    fixed = plan.shorter_side is None  # every deterministic transform ends at one size
    written = 0
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("labels", data=np.asarray(split.labels, dtype=np.int64))
        images = pixels = None
        offsets = np.zeros(count + 1, dtype=np.int64)
        shapes = np.zeros((count, 3), dtype=np.int32)
        bar = tqdm(total=count, disable=not progress, desc="prepare", unit="img", ascii=True)
        for batch in loader:
            arrays = [image.numpy() for image, _ in batch]
            if fixed:
                if images is None:
                    shape = arrays[0].shape
                    images = handle.create_dataset(
                        "images",
                        shape=(count, *shape),
                        dtype=np.uint8,
                        chunks=(1, *shape),
                        **filters,
                    )
                images[written : written + len(arrays)] = np.stack(arrays)
            else:
                flat = np.concatenate([array.reshape(-1) for array in arrays])
                if pixels is None:
                    pixels = handle.create_dataset(
                        "pixels",
                        shape=(0,),
                        maxshape=(None,),
                        dtype=np.uint8,
                        chunks=(FLAT_CHUNK,),
                        **filters,
                    )
                start = offsets[written]
                pixels.resize((start + flat.size,))
                pixels[start:] = flat
                for k, array in enumerate(arrays):
                    shapes[written + k] = array.shape
                    offsets[written + k + 1] = offsets[written + k] + array.size
            written += len(arrays)
            bar.update(len(arrays))
        bar.close()
        if fixed and images is None:  # an empty split
            handle.create_dataset("images", shape=(0, 3, 0, 0), dtype=np.uint8)
        if not fixed:
            if pixels is None:
                handle.create_dataset("pixels", shape=(0,), dtype=np.uint8)
            handle.create_dataset("offsets", data=offsets)
            handle.create_dataset("shapes", data=shapes)
        handle.attrs.update(
            {
                "format": FORMAT,
                "version": VERSION,
                "layout": "fixed" if fixed else "flat",
                "count": count,
                "compression": compression,
                "cached": plan.describe(),
                **plan.attrs(),
                provenance.DATA_FINGERPRINT: data_fingerprint or provenance.UNKNOWN,
                "split_sha256": split_digest(split),
                **library_versions(),
                **dict(attrs or {}),
            }
        )
    size = Path(out_path).stat().st_size
    return {"images": count, "bytes": size, "layout": "fixed" if fixed else "flat"}


def library_versions() -> dict[str, str]:
    """The versions whose resize kernels made the cached pixels."""
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


class PreparedImages(Dataset):
    """The images of a prepared-cache file, (uint8 CHW tensor, label), the random steps of the
    transform (if any) run on each read. The file is opened in each process that reads it
    (DataLoader workers included), never shared across a fork."""

    def __init__(
        self,
        path: str | Path,
        *,
        labels: np.ndarray,
        remaining: Callable | None,
        layout: str,
    ) -> None:
        self.path = str(path)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.remaining = remaining
        self.layout = layout
        self._handle: Any = None
        self._pid: int | None = None
        self._images: Any = None  # the h5py dataset of `images` or `pixels`
        self._offsets: np.ndarray | None = None
        self._shapes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": None, "_images": None}

    def _open(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            import h5py

            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
            if self.layout == "flat":
                self._images = self._handle["pixels"]
                self._offsets = self._handle["offsets"][...]
                self._shapes = self._handle["shapes"][...]
            else:
                self._images = self._handle["images"]
        return self._images

    def image(self, index: int) -> torch.Tensor:
        """The cached image `index` as stored (before the random steps)."""
        images = self._open()
        if self.layout == "fixed":
            return torch.from_numpy(images[index])
        start, stop = self._offsets[index], self._offsets[index + 1]
        return torch.from_numpy(images[start:stop].reshape(self._shapes[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image(index)
        if self.remaining is not None:
            image = self.remaining(image)
        return image, self.labels[index]


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a prepared-cache file (a missing or unreadable file: one line)."""
    from robustft.io import open_hdf5

    with open_hdf5(path, what="prepared-image cache") as handle:
        return {key: _plain(value) for key, value in handle.attrs.items()}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def open_prepared(
    path: str | Path,
    *,
    split: Any,
    transform: str,
    preprocess: Any,
    data_fingerprint: str | None,
) -> PreparedImages:
    """The cached images of `split` under `transform`, after checking that the file was made
    from this data (`data_fingerprint`, the split's digest), for this transform at this
    preprocessing, by these torch and torchvision versions; anything else is refused in one
    line naming the file and what differs. `class_subset` and `class_groups` ride along."""
    recorded = read_attrs(path)
    if recorded.get("format") != FORMAT or recorded.get("version") != VERSION:
        raise ValueError(
            f"{path}: not a prepared-image cache of version {VERSION} "
            f"(format {recorded.get('format')!r}, version {recorded.get('version')!r}); "
            f"rebuild it: snakemake --forcerun {RERUN}"
        )
    provenance.check(
        path=path,
        recorded=recorded,
        name=provenance.DATA_FINGERPRINT,
        expected=data_fingerprint,
        source="this job's data manifest",
        rerun=RERUN,
    )
    size, crop_pct, interpolation = preprocess_settings(preprocess)
    expected: dict[str, Any] = {
        "transform": transform,
        "input_size": size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "count": len(split.labels),
        "split_sha256": split_digest(split),
        **library_versions(),
    }
    for name, value in expected.items():
        found = recorded.get(name)
        if found != value:
            raise ValueError(
                f"{path}: {name} {provenance.short(found)} differs from "
                f"{provenance.short(value)} that this job expects; rebuild it: "
                f"snakemake --forcerun {RERUN}"
            )
    plan = cache_plan(transform, preprocess=preprocess, shorter_side=recorded["shorter_side"])
    dataset = PreparedImages(
        path, labels=split.labels, remaining=plan.remaining(), layout=recorded["layout"]
    )
    dataset.class_subset = getattr(split, "class_subset", None)
    dataset.class_groups = getattr(split, "class_groups", None)
    return dataset
