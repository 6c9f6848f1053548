"""Torch datasets over images held in memory, and the transforms of a setting."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2


class ArrayImageDataset(Dataset):
    """uint8 images (N, H, W, 3) and int64 labels, returned as (float CHW in [0, 1], label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Transform) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        # CHW once, up front: the per-item work is then only the augmentation.
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def make_transform(*, image_size: int, augment: bool, crop_padding: int = 4) -> v2.Transform:
    """Train-time augmentation (random crop with padding, horizontal flip) or none."""
    steps: list[v2.Transform] = []
    if augment:
        steps += [
            v2.RandomCrop(image_size, padding=crop_padding, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
        ]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)
