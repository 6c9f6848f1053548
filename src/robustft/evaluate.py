"""Batched inference: logits and accuracy of a classifier on a dataset."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from robustft.data.datasets import memory_format, to_float


@torch.inference_mode()
def predict_logits(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) of `model` in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval().to(memory_format=memory_format(device))
    logits, labels = [], []
    try:
        # Its own generator: each DataLoader iterator draws a seed, which must not move the
        # global RNG (a resumed training run re-evaluates and must still replay it exactly).
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator()
        )
        for images, targets in loader:
            logits.append(model(to_float(images.to(device, non_blocking=True))).float().cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def accuracy(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: str = "cpu"
) -> float:
    logits, labels = predict_logits(model, dataset, batch_size=batch_size, device=device)
    return float((logits.argmax(axis=1) == labels).mean())
