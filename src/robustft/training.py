"""One training loop for every way of training a classifier in this project.

Pretraining the toy backbone and every fine-tuning method go through `train_classifier`; they
differ only in the model they pass in (initialisation, which parameters require grad),
`freeze_bn`, the settings, and an optional extra loss term (`ExtraLoss`: L1/L2-SP, KD).

The loop can save resumable state (`Checkpointing`) every epoch, every few minutes and on
SIGTERM; a rerun with the same state file continues where it stopped and ends with exactly
the history and weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from robustft.data.datasets import BatchTransform, memory_format, to_float
from robustft.evaluate import accuracy
from robustft.io import atomic_path
from robustft.runtime import StopRequested, sigterm_deferred, stop_requested

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
    precision: str = "fp32"  # "bf16": forward pass under bf16 autocast (GPU throughput)


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_state: dict[str, torch.Tensor] = field(repr=False)
    diverged: bool = False


STATE_FORMAT = 1

# extra_loss(model=..., images=..., logits=..., labels=...) -> scalar added to the loss. It
# must be a function of the model and the batch only (state it holds, such as w₀ or a frozen
# teacher, is rebuilt identically by the caller), so that resumed runs stay exact.
ExtraLoss = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often `train_classifier` saves resumable state.

    `path` must not be a declared output of a Snakemake job: Snakemake deletes those when a
    job fails, and the state exists precisely for the job that failed. State saved under
    another `fingerprint` (other settings, weights or data) is ignored, never resumed.
    """

    path: Path
    fingerprint: str
    every_seconds: float = 300.0

    def discard(self) -> None:
        """Delete the state, and the folders it leaves empty: call once the outputs are written."""
        self.path.unlink(missing_ok=True)
        # Temporary files of saves that a SIGKILL cut short (see io.atomic_path).
        for partial in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            partial.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.removedirs(self.path.parent)  # stops at the first folder that is not empty


def raise_if_stop_requested(checkpointing: Checkpointing | None, *, when: str) -> None:
    """Raise `StopRequested` if SIGTERM has arrived, naming the state a rerun resumes from."""
    if stop_requested():
        where = f"; state saved to {checkpointing.path}" if checkpointing else ""
        raise StopRequested(f"stopped by SIGTERM {when}{where}")


def cosine_lr(*, step: int, total_steps: int, base_lr: float) -> float:
    """Cosine decay from `base_lr` at step 0 to 0 at `total_steps`."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def autocast(*, device: str, precision: str) -> torch.autocast:
    """bf16 autocast of the forward pass when `precision` is "bf16"; a no-op for "fp32"."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(
            f"config key 'finetune.precision': expected fp32 or bf16, got {precision!r}"
        )
    return torch.autocast(
        device_type="cuda" if str(device).startswith("cuda") else "cpu",
        dtype=torch.bfloat16,
        enabled=precision == "bf16",
    )


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
    checkpointing: Checkpointing | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    extra_loss: ExtraLoss | None = None,
) -> TrainResult:
    """SGD with momentum and a per-step cosine schedule; evaluates every split each epoch.

    Row 0 of the history is the model before training. The best epoch is the one with the
    highest accuracy on `eval_sets[select_on]` (the first such epoch on ties).
    `batch_transform` (augmentation) is applied to each training batch on the device.
    With `checkpointing`, state is saved after every epoch, every `every_seconds` and when
    SIGTERM arrives (then `StopRequested` is raised); a call that finds matching state resumes.
    `on_epoch_end(epoch, model)` runs after each epoch's evaluation (to keep checkpoints).
    `extra_loss(model=, images=, logits=, labels=)` is added to `loss_fn` at every step (the
    augmented images the model saw); the logged train loss includes it.
    """
    if select_on not in eval_sets:
        raise ValueError(f"select_on={select_on!r} is not one of the eval sets {list(eval_sets)}")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    num_examples = len(train_set)  # type: ignore[arg-type]
    steps_per_epoch = num_examples // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"training set has {num_examples} examples, fewer than one batch "
            f"({settings.batch_size})"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    total_steps = settings.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step=step, total_steps=total_steps, base_lr=1.0)
    )
    model.to(device=device, memory_format=memory_format(device))
    run = _RunState(settings=settings)
    # What the resumable state is made of, besides `run`.
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "generator": generator}
    if checkpointing is not None:
        _resume(run, checkpointing=checkpointing, **parts)

    def save() -> None:
        if checkpointing is not None:
            _save(run, checkpointing=checkpointing, **parts)

    def stop_if_requested() -> None:
        if stop_requested():
            save()
            raise_if_stop_requested(checkpointing, when=f"at epoch {run.epoch}, step {run.step}")

    def evaluate_all() -> dict[str, float]:
        scores = {}
        for name, data in eval_sets.items():
            scores[name] = accuracy(
                model,
                data,
                batch_size=settings.eval_batch_size,
                device=device,
                num_workers=settings.num_workers,
            )
            stop_if_requested()
        return scores

    bar = tqdm(
        total=total_steps,
        initial=(run.epoch - 1) * steps_per_epoch + run.step if run.history else 0,
        disable=not progress,
        desc="train",
        unit="step",
        mininterval=2.0,
        ascii=True,
    )
    with sigterm_deferred():
        if not run.history:
            scores = evaluate_all()
            run.history.append(
                {
                    "epoch": 0,
                    "lr": settings.lr,
                    "train_loss": float("nan"),
                    "train_acc": float("nan"),
                    **scores,
                    "seconds": 0.0,
                }
            )
            run.best_epoch, run.best_score = 0, scores[select_on]
            run.best_state = copy.deepcopy(model.state_dict())
            save()
        last_save = time.monotonic()
        while run.epoch <= settings.epochs and not run.diverged:
            started = time.perf_counter() - run.seconds
            model.train()
            if settings.freeze_bn:
                freeze_batchnorm_statistics(model)
            if run.step == 0:
                run.order = torch.randperm(num_examples, generator=generator)
                run.loss_sum = torch.zeros((), device=device)
                run.correct = torch.zeros((), device=device, dtype=torch.long)
                run.seen = 0
                run.epoch_lr = optimizer.param_groups[0]["lr"]
            loader = DataLoader(
                train_set,
                batch_size=settings.batch_size,
                sampler=run.order[run.step * settings.batch_size :].tolist(),
                drop_last=True,
                num_workers=settings.num_workers,
                pin_memory=str(device).startswith("cuda"),  # so that copies need no host sync
                # Its own generator, seeded per epoch: a DataLoader draws from it the seed of
                # its workers' random transforms, and a resumed run creates one more loader.
                generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + run.epoch),
            )
            # Sums stay on the device: no host sync per step.
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                inputs = batch_transform(images, generator)
                with autocast(device=device, precision=settings.precision):
                    logits = model(inputs).float()
                loss = loss_fn(logits, labels)
                if extra_loss is not None:
                    loss = loss + extra_loss(
                        model=model, images=inputs, logits=logits, labels=labels
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                run.loss_sum += loss.detach() * len(labels)
                run.correct += (logits.detach().argmax(dim=1) == labels).sum()
                run.seen += len(labels)
                run.step += 1
                bar.update()
                run.seconds = time.perf_counter() - started
                if checkpointing and time.monotonic() - last_save >= checkpointing.every_seconds:
                    save()
                    last_save = time.monotonic()
                stop_if_requested()
            loss_value = run.loss_sum.item() / run.seen
            row = {
                "epoch": run.epoch,
                "lr": run.epoch_lr,
                "train_loss": loss_value,
                "train_acc": run.correct.item() / run.seen,
                **evaluate_all(),
                "seconds": time.perf_counter() - started,
            }
            run.history.append(row)
            if not math.isfinite(loss_value):
                # A diverged run is a result (this lr is too high), not a crash of the workflow.
                log.warning(
                    "loss is %s at epoch %d (lr %g): stopping", loss_value, run.epoch, settings.lr
                )
                run.diverged = True
            else:
                log.info("epoch %d: %s", run.epoch, {k: round(v, 4) for k, v in row.items()})
                if row[select_on] > run.best_score:
                    run.best_epoch, run.best_score = run.epoch, row[select_on]
                    run.best_state = copy.deepcopy(model.state_dict())
            if on_epoch_end is not None:
                on_epoch_end(run.epoch, model)
            run.epoch, run.step, run.seconds = run.epoch + 1, 0, 0.0
            save()
            last_save = time.monotonic()
    bar.close()
    return TrainResult(
        history=run.history,
        best_epoch=run.best_epoch,
        best_state=run.best_state,
        diverged=run.diverged,
    )


@dataclass
class _RunState:
    """Everything the loop needs to continue: position, partial-epoch sums, history, best."""

    settings: TrainSettings
    epoch: int = 1  # the epoch in progress (epochs + 1 when training is over)
    step: int = 0  # steps of `epoch` already taken
    seconds: float = 0.0  # training time spent in `epoch` so far
    order: torch.Tensor | None = None  # the example order of `epoch`
    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    seen: int = 0
    epoch_lr: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -1.0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    diverged: bool = False


def _save(
    run: _RunState,
    *,
    checkpointing: Checkpointing,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> None:
    state = {
        "format": STATE_FORMAT,
        "fingerprint": checkpointing.fingerprint,
        "epoch": run.epoch,
        "step": run.step,
        "seconds": run.seconds,
        "order": run.order,
        "loss_sum": None if run.loss_sum is None else run.loss_sum.cpu(),
        "correct": None if run.correct is None else run.correct.cpu(),
        "seen": run.seen,
        "epoch_lr": run.epoch_lr,
        "history": run.history,
        "best_epoch": run.best_epoch,
        "best_score": run.best_score,
        "best_state": run.best_state,
        "diverged": run.diverged,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    with atomic_path(checkpointing.path) as tmp:
        torch.save(state, tmp)


def _resume(
    run: _RunState,
    *,
    checkpointing: Checkpointing,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> None:
    path = checkpointing.path
    if not path.exists():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file cut short by a crash of the machine, say
        log.warning("%s: unreadable (%s); starting from scratch", path, error)
        return
    if state.get("format") != STATE_FORMAT or state.get("fingerprint") != checkpointing.fingerprint:
        log.warning("%s: saved by a run with other settings or inputs; starting from scratch", path)
        return
    device = next(model.parameters()).device
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.epoch, run.step, run.seconds = state["epoch"], state["step"], state["seconds"]
    run.order = state["order"]
    run.loss_sum = None if state["loss_sum"] is None else state["loss_sum"].to(device)
    run.correct = None if state["correct"] is None else state["correct"].to(device)
    run.seen, run.epoch_lr = state["seen"], state["epoch_lr"]
    run.history = state["history"]
    run.best_epoch, run.best_score = state["best_epoch"], state["best_score"]
    run.best_state = state["best_state"]
    run.diverged = state["diverged"]
    log.info("resuming from %s at epoch %d, step %d", path, run.epoch, run.step)
