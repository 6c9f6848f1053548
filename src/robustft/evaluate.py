"""Batched inference: logits, accuracy and calibration (ECE) of a classifier on a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


# Guo et al. 2017 ("On Calibration of Modern Neural Networks"): 15 equal-width bins.
ECE_BINS = 15


def _restricted(
    logits: np.ndarray, class_subset: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits over the scored classes, their class ids): all classes, or `class_subset`."""
    if class_subset is None:
        return logits, np.arange(logits.shape[1])
    subset = np.asarray(class_subset, dtype=np.int64)
    return logits[:, subset], subset


def subset_accuracy(
    logits: np.ndarray,
    labels: np.ndarray,
    class_subset: Sequence[int] | None = None,
    class_groups: Sequence[int] | None = None,
) -> float:
    """Accuracy of argmax over `class_subset` only (ImageNet-R/A: their 200 classes); with
    `class_groups`, a prediction is right when it falls in the label's group (ObjectNet)."""
    return float(_correct(logits, labels, class_subset, class_groups).mean())


def _correct(
    logits: np.ndarray,
    labels: np.ndarray,
    class_subset: Sequence[int] | None,
    class_groups: Sequence[int] | None,
) -> np.ndarray:
    scored, classes = _restricted(logits, class_subset)
    predicted = classes[scored.argmax(axis=1)]
    if class_groups is not None:
        groups = np.asarray(class_groups, dtype=np.int64)
        return groups[predicted] == groups[labels]
    return predicted == labels


def expected_calibration_error(
    *,
    logits: np.ndarray,
    labels: np.ndarray,
    num_bins: int = ECE_BINS,
    class_subset: Sequence[int] | None = None,
    class_groups: Sequence[int] | None = None,
) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017), as a fraction.

    Confidence = the largest softmax probability (over `class_subset` when given, as for
    accuracy); examples fall into `num_bins` equal-width bins (i/M, (i+1)/M];
    ECE = Σ_bins |B|/N · |accuracy(B) − mean confidence(B)|. A prediction is correct as in
    `subset_accuracy` (within the label's group with `class_groups`).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"need N×C logits and N labels, got {logits.shape} and {labels.shape}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")
    if len(labels) == 0:
        return float("nan")
    scored, _ = _restricted(logits, class_subset)
    shifted = scored - scored.max(axis=1, keepdims=True)
    confidence = 1.0 / np.exp(shifted).sum(axis=1)  # the top class's softmax probability
    correct = _correct(logits, labels, class_subset, class_groups).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=num_bins)
    # Σ_B |B|/N · |acc(B) − conf(B)| = Σ_B |Σ_{i∈B} (correct_i − conf_i)| / N
    return float(np.abs(gap[count > 0]).sum() / len(labels))


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
