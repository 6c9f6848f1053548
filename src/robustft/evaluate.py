"""Batched inference: logits, accuracy and calibration (ECE) of a classifier on a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from robustft.data.datasets import memory_format, to_float
from robustft.robustness import correct_predictions, expected_calibration_error


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
    return float(correct_predictions(logits, labels, class_subset, class_groups).mean())


def ece_column(name: str) -> str:
    """The column of a split's ECE beside its accuracy column: id_val → ece_id_val."""
    return f"ece_{name}"


@dataclass(frozen=True)
class Scores:
    """Accuracy and expected calibration error of one model on one split."""

    accuracy: float
    ece: float


def score_logits(
    *,
    logits: np.ndarray,
    labels: np.ndarray,
    class_subset: Sequence[int] | None = None,
    class_groups: Sequence[int] | None = None,
) -> Scores:
    """Accuracy and ECE from one set of logits (the same classes scored for both)."""
    return Scores(
        accuracy=subset_accuracy(logits, labels, class_subset, class_groups),
        ece=expected_calibration_error(
            logits=logits, labels=labels, class_subset=class_subset, class_groups=class_groups
        ),
    )


def score(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: str = "cpu",
    num_workers: int = 0,
) -> Scores:
    """Accuracy and ECE of `model` on `dataset`, scored over the dataset's own class subset
    and groups (`as_torch_dataset` sets them), from one pass."""
    logits, labels = predict_logits(
        model, dataset, batch_size=batch_size, device=device, num_workers=num_workers
    )
    return score_logits(
        logits=logits,
        labels=labels,
        class_subset=getattr(dataset, "class_subset", None),
        class_groups=getattr(dataset, "class_groups", None),
    )


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
