"""Torch datasets over images in memory or in files, CPU transforms, batch augmentation.

Images stay uint8 until a whole batch is on the training device; cropping, flipping and the
conversion to float happen there, once per batch (cheap on a CPU, free on a GPU).

Image files are decoded to 8-bit RGB by `decode_image`. 16-bit and 32-bit integer images
(PIL modes I;16, I;16B, I;16L, I: 16-bit PNG/TIFF) and float images (mode F: 32-bit float TIFF)
are rescaled by each image's own range, (x - min) / (max - min) · 255 (a constant image → 0),
before the conversion to RGB: PIL's own conversion clips them at 255, which turns a 12-bit
microscopy or X-ray image almost all white. An image above PIL's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 Mpixels by default; PIL only warns up to twice that) is an
error, as are truncated and undecodable files: one line naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from PIL import Image as PILImage

BatchTransform = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
# A batch transform used by several data-parallel processes also takes `share=(rank, world)`:
# its batch is rows rank·n … (rank+1)·n − 1 of a global batch of world·n images, and it draws
# the randomness of the whole global batch (as one process would) and applies its own rows.


class ArrayImageDataset(Dataset):
    """uint8 images (N, H, W, 3) and int64 labels, served as (uint8 CHW tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def memory_format(device: str) -> torch.memory_format:
    """Channels-last on GPUs (faster convolutions); the default layout on the CPU."""
    return torch.channels_last if str(device).startswith("cuda") else torch.contiguous_format


def to_float(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    share: tuple[int, int] | None = None,
) -> torch.Tensor:
    """uint8 [0, 255] → float32 [0, 1]; float input passes through. Draws nothing (`share`
    changes nothing).

    On a GPU the batch goes channels-last, the layout cuDNN convolutions are fastest in. Not
    on the CPU: oneDNN's channels-last backward crashed (SIGSEGV) on 1×1 feature maps here.
    """
    images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if images.is_cuda:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    padding: int = 4,
    share: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-image random crop from a reflect-padded copy, and a random horizontal flip.

    The usual CIFAR augmentation, done for a whole batch with one gather. With `share`
    (rank, world), the crops and flips of a global batch of world × len(images) images are
    drawn and this rank's rows of them applied (see `BatchTransform`).
    """
    images = to_float(images)
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), mode="reflect")
    device = images.device
    rank, world = share or (0, 1)
    rows = slice(rank * n, (rank + 1) * n)
    drawn = world * n
    offset_y = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator)[rows].to(device)
    offset_x = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator)[rows].to(device)
    flip = (torch.rand(drawn, generator=generator) < 0.5)[rows].to(device)
    rows = offset_y[:, None] + torch.arange(height, device=device)  # (N, H)
    columns = torch.arange(width, device=device).expand(n, width)
    columns = torch.where(flip[:, None], columns.flip(1), columns) + offset_x[:, None]  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indexing moves the channel axis last: (N, H, W, C) → back to NCHW.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], columns[:, None, :]]
    out = out.permute(0, 3, 1, 2)
    return out if out.is_cuda else out.contiguous()  # (N, H, W, C) memory is channels-last


def train_transform(*, augment: bool) -> BatchTransform:
    return random_crop_flip if augment else to_float


class TransformedArrayDataset(ArrayImageDataset):
    """In-memory images resized/cropped per item on the CPU (e.g. CIFAR at 224×224)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        super().__init__(images, labels)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class FileImageDataset(Dataset):
    """Image files decoded with PIL on access (in DataLoader workers), then transformed."""

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray, transform: Callable, *, border: int = 0
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.transform = transform
        self.border = border

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(self.paths[index])
        if self.border:
            width, height = image.size
            image = image.crop(
                (self.border, self.border, width - self.border, height - self.border)
            )
        return self.transform(image), self.labels[index]


HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _rescale_to_8bit(image: PILImage.Image) -> PILImage.Image:
    """A 16/32-bit integer or float single-channel image → 8-bit grayscale, by its own range."""
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        if high > low:
            values = np.clip(np.nan_to_num(values, nan=low, posinf=high, neginf=low), low, high)
            out = np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def decode_image(path: str) -> PILImage.Image:
    """An image file → 8-bit RGB PIL image (see the module docstring); any failure is one line
    naming the file."""
    from PIL import Image

    try:
        # The bomb warning is an error here, for this call only: PIL's process-wide
        # MAX_IMAGE_PIXELS stays as it is.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode in HIGH_DEPTH_MODES:
                    return _rescale_to_8bit(image).convert("RGB")
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"{path}: too large to be a dataset image ({error}); downscale or remove it"
        ) from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file missing") from None
    except Exception as error:  # any decoder failure (truncated, not an image) is this file's
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{path}: not a readable image ({detail}); is it truncated or not an image? "
            "Re-copy or remove it"
        ) from None


class ContiguousRandomResizedCrop(torch.nn.Module):
    """torchvision's RandomResizedCrop (same random draws, same pixels: see
    tests/test_prepared_cache.py), with the crop made contiguous before the resize: torch
    resizes a strided view of an image 2-3× more slowly than a contiguous copy of it."""

    def __init__(self, size: int, *, interpolation: Any, antialias: bool = True) -> None:
        from torchvision.transforms import v2

        super().__init__()
        self.crop = v2.RandomResizedCrop(size, interpolation=interpolation, antialias=antialias)

    def forward(self, image: Any) -> Any:
        from torchvision.transforms.v2 import functional as TF

        if not isinstance(image, torch.Tensor):
            return self.crop(image)
        box = self.crop.make_params([image])
        region = TF.crop(image, box["top"], box["left"], box["height"], box["width"])
        return TF.resize(
            region.contiguous(),
            list(self.crop.size),
            interpolation=self.crop.interpolation,
            antialias=self.crop.antialias,
        )


def transform_steps(
    name: str, *, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> tuple[list[Callable], list[Callable]]:
    """(deterministic steps, random steps) of transform `name` on a uint8 CHW tensor: the
    transform is the one, then the other (`image_transform`). The prepared-image cache
    stores the output of the deterministic steps (`robustft.data.prepared`)."""
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode(interpolation)
    scaled = int(size / crop_pct)
    steps = {
        "resize": ([v2.Resize((size, size), interpolation=mode, antialias=True)], []),
        "resize_center_crop": (
            [v2.Resize(scaled, interpolation=mode, antialias=True), v2.CenterCrop(size)],
            [],
        ),
        "random_resized_crop": (
            [],
            [
                ContiguousRandomResizedCrop(size, interpolation=mode),
                v2.RandomHorizontalFlip(),
            ],
        ),
        "resize_random_crop": (
            [v2.Resize((scaled, scaled), interpolation=mode, antialias=True)],
            [v2.RandomCrop(size), v2.RandomHorizontalFlip()],
        ),
    }
    if name not in steps:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(steps)}")
    return steps[name]


def image_transform(
    name: str, *, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> Callable:
    """A CPU transform from a PIL image or uint8 CHW tensor to a uint8 CHW tensor of `size`.

    resize: squash to size×size (CIFAR→STL, DomainNet test, FMoW); resize_center_crop:
    shorter side to size/crop_pct, centre crop (ImageNet test: 256 → 224);
    random_resized_crop: RandomResizedCrop + flip (ImageNet train); resize_random_crop:
    squash to (size/crop_pct)², random crop, flip (DomainNet train).
    """
    from torchvision.transforms import v2

    fixed, random = transform_steps(name, size=size, crop_pct=crop_pct, interpolation=interpolation)
    # PIL images become uint8 tensors first; tensors pass through PILToTensor unchanged.
    return v2.Compose([v2.PILToTensor(), *fixed, *random, v2.ToDtype(torch.uint8)])


def preprocess_settings(preprocess: Any) -> tuple[int, float, str]:
    """(input size, crop_pct, interpolation) of a `Preprocess`, with the transforms' defaults."""
    size = int(preprocess.input_size)
    crop_pct = float(getattr(preprocess, "crop_pct", 0.875) or 0.875)
    interpolation = str(getattr(preprocess, "interpolation", "bicubic") or "bicubic")
    return size, crop_pct, interpolation


def split_images(split: Any, transform: Callable) -> Dataset:
    """A split's images with `transform` applied to each (a PIL image from a file, or a uint8
    CHW tensor from memory): (transformed image, label)."""
    if hasattr(split, "images"):
        return TransformedArrayDataset(split.images, split.labels, transform)
    return FileImageDataset(split.paths, split.labels, transform, border=split.border)


def as_torch_dataset(split: Any, *, preprocess: Any, transform: str = "resize") -> Dataset:
    """Any split of the registry (ImageArrays or ImageFiles) as a Dataset of
    (uint8 CHW tensor at the backbone's input size, label); `class_subset` rides along.

    `transform`: the setting's train or eval transform (see `image_transform`). In-memory
    images already at the input size pass through untouched under `resize` (the toy data).
    """
    size, crop_pct, interpolation = preprocess_settings(preprocess)
    if (
        hasattr(split, "images")
        and transform == "resize"
        and split.images.shape[1:3] == (size, size)
    ):
        dataset: Dataset = ArrayImageDataset(split.images, split.labels)
    else:
        fn = image_transform(transform, size=size, crop_pct=crop_pct, interpolation=interpolation)
        dataset = split_images(split, fn)
    dataset.class_subset = getattr(split, "class_subset", None)
    dataset.class_groups = getattr(split, "class_groups", None)
    return dataset
