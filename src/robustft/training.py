"""One training loop for every way of training a classifier in this project.

Pretraining the toy backbone, FT and LP-FT all go through `train_classifier`; they differ
only in the model they pass in (initialisation), `freeze_bn`, and the settings.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from robustft.data.datasets import BatchTransform, memory_format, to_float
from robustft.evaluate import accuracy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    freeze_bn: bool = False
    seed: int = 0
    eval_batch_size: int = 512
    num_workers: int = 0  # DataLoader processes decoding images (image-file datasets)


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_state: dict[str, torch.Tensor] = field(repr=False)
    diverged: bool = False


def cosine_lr(*, step: int, total_steps: int, base_lr: float) -> float:
    """Cosine decay from `base_lr` at step 0 to 0 at `total_steps`."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics stay as pretrained.

    Their affine parameters still train. Call after each `model.train()`.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def train_classifier(
    *,
    model: nn.Module,
    train_set: Dataset,
    eval_sets: Mapping[str, Dataset],
    settings: TrainSettings,
    select_on: str,
    device: str = "cpu",
    progress: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_transform: BatchTransform = to_float,
) -> TrainResult:
    """SGD with momentum and a per-step cosine schedule; evaluates every split each epoch.

    Row 0 of the history is the model before training. The best epoch is the one with the
    highest accuracy on `eval_sets[select_on]` (the first such epoch on ties).
    `batch_transform` (augmentation) is applied to each training batch on the device.
    """
    if select_on not in eval_sets:
        raise ValueError(f"select_on={select_on!r} is not one of the eval sets {list(eval_sets)}")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    loader = DataLoader(
        train_set,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=settings.num_workers,
    )
    if len(loader) == 0:
        raise ValueError(
            f"training set has {len(train_set)} examples, fewer than one batch "
            f"({settings.batch_size})"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    total_steps = settings.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step=step, total_steps=total_steps, base_lr=1.0)
    )
    model.to(device=device, memory_format=memory_format(device))

    def evaluate_all() -> dict[str, float]:
        return {
            name: accuracy(
                model,
                data,
                batch_size=settings.eval_batch_size,
                device=device,
                num_workers=settings.num_workers,
            )
            for name, data in eval_sets.items()
        }

    history = [
        {
            "epoch": 0,
            "lr": settings.lr,
            "train_loss": float("nan"),
            "train_acc": float("nan"),
            **evaluate_all(),
            "seconds": 0.0,
        }
    ]
    best_epoch, best_score = 0, history[0][select_on]
    best_state = copy.deepcopy(model.state_dict())
    diverged = False
    bar = tqdm(
        total=total_steps,
        disable=not progress,
        desc="train",
        unit="step",
        mininterval=2.0,
        ascii=True,
    )
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        model.train()
        if settings.freeze_bn:
            freeze_batchnorm_statistics(model)
        # Sums stay on the device: no host sync per step.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        epoch_lr = optimizer.param_groups[0]["lr"]
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            logits = model(batch_transform(images, generator))
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            seen += len(labels)
            bar.update()
        row = {
            "epoch": epoch,
            "lr": epoch_lr,
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen,
            **evaluate_all(),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        if not math.isfinite(row["train_loss"]):
            # A diverged run is a result (this lr is too high), not a crash of the workflow.
            log.warning(
                "loss is %s at epoch %d (lr %g): stopping", row["train_loss"], epoch, settings.lr
            )
            diverged = True
            break
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        if row[select_on] > best_score:
            best_epoch, best_score = epoch, row[select_on]
            best_state = copy.deepcopy(model.state_dict())
    bar.close()
    return TrainResult(
        history=history, best_epoch=best_epoch, best_state=best_state, diverged=diverged
    )
