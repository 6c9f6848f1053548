"""Batched inference: logits and accuracy of a classifier on a dataset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from robustft.data.datasets import memory_format, to_float


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: str = "cpu",
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) of `model` in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval().to(memory_format=memory_format(device))
    logits, labels = [], []
    try:
        # Its own generator: each DataLoader iterator draws a seed, which must not move the
        # global RNG (a resumed training run re-evaluates and must still replay it exactly).
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=torch.Generator(),
        )
        for images, targets in loader:
            logits.append(model(to_float(images.to(device, non_blocking=True))).float().cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def subset_accuracy(
    logits: np.ndarray,
    labels: np.ndarray,
    class_subset: Sequence[int] | None = None,
    class_groups: Sequence[int] | None = None,
) -> float:
    """Accuracy of argmax over `class_subset` only (ImageNet-R/A: their 200 classes); with
    `class_groups`, a prediction is right when it falls in the label's group (ObjectNet)."""
    if class_subset is None:
        predicted = logits.argmax(axis=1)
    else:
        subset = np.asarray(class_subset, dtype=np.int64)
        predicted = subset[logits[:, subset].argmax(axis=1)]
    if class_groups is not None:
        groups = np.asarray(class_groups, dtype=np.int64)
        return float((groups[predicted] == groups[labels]).mean())
    return float((predicted == labels).mean())


def accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: str = "cpu",
    class_subset: Sequence[int] | None = None,
    num_workers: int = 0,
) -> float:
    """Accuracy; `class_subset` defaults to the dataset's own (`as_torch_dataset` sets it)."""
    logits, labels = predict_logits(
        model, dataset, batch_size=batch_size, device=device, num_workers=num_workers
    )
    if class_subset is None:
        class_subset = getattr(dataset, "class_subset", None)
    return subset_accuracy(logits, labels, class_subset, getattr(dataset, "class_groups", None))
