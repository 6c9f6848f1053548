"""One training loop for every way of training a classifier in this project.

Pretraining the toy backbone and every fine-tuning method go through `train_classifier`; they
differ only in the model they pass in (initialisation, which parameters require grad), the
settings (BatchNorm mode, gradient clipping, ...), and an optional extra loss term
(`ExtraLoss`: L1/L2-SP, KD).

A run that collapses (non-finite loss, a training loss far above the uniform predictor's, or ID
val accuracy that falls to chance) ends with `TrainResult.diverged` set and the reason in
`TrainResult.collapse`: it is a result about its settings, never a number to report.

The loop can save resumable state (where and how often: `Checkpointing`; what: `_RunState`,
saved and restored by `Checkpointer`) every epoch, every few minutes and on SIGTERM; a rerun
with the same state file continues where it stopped and ends with exactly the history and
weights of an uninterrupted run.

With `parallel` (a data-parallel worker, see `robustft.distributed`) the loop runs on several
processes as one: every rank shuffles with the same generator, takes its share of each global
batch (`distributed.share_of_batches`) and its rows of the batch's augmentation draws
(`BatchTransform` with `share=`); DistributedDataParallel averages the gradients; history sums
are summed over the ranks every step; evaluation is dealt out by batches and gathered; rank 0
saves the state, all ranks restore it; SIGTERM to any rank stops every rank at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from robustft import distributed
from robustft.data.datasets import BatchTransform, memory_format, to_float
from robustft.distributed import Parallel
from robustft.evaluate import ece_column, score
from robustft.io import atomic_path
from robustft.runtime import StopRequested, sigterm_deferred, stop_requested

log = logging.getLogger(__name__)


# BatchNorm while training: `train` = running statistics (and affine) train; `frozen` =
# running statistics stay as pretrained (Kumar et al.'s LP-FT); `frozen_adapt` = statistics
# recomputed once on the training set before training, then frozen.
BN_MODES = ("train", "frozen", "frozen_adapt")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    bn: str = "train"  # one of BN_MODES
    bn_momentum: float | None = None  # PyTorch convention (new-batch weight); None = the model's
    clip_grad_norm: float | None = None  # max L2 norm of all gradients together; None = off
    seed: int = 0
    eval_batch_size: int = 512
    eval_every: int = 1  # score the non-selection splits every this many epochs (and the last)
    collapse_loss_factor: float | None = 10.0  # see `collapse_reason`; None = off
    num_workers: int = 0  # DataLoader processes decoding images (image-file datasets)
    precision: str = "fp32"  # "bf16": forward pass under bf16 autocast (GPU throughput)
    # Several processes with bn "train": BatchNorm statistics over the global batch
    # (SyncBatchNorm, GPUs only); False = each process normalises with its own share.
    sync_batchnorm: bool = True

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_state: dict[str, torch.Tensor] = field(repr=False)
    diverged: bool = False
    collapse: str | None = None  # why the run counts as diverged (one line), else None


STATE_FORMAT = 2

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


def remove_unowned_state(*, root: str | Path, owned: Iterable[str | Path]) -> list[Path]:
    """Delete the resumable state under `root` whose folder is not in `owned` (with the
    partial saves beside it and the folders left empty); say each on one line. Returns them."""
    root = Path(root)
    keep = {Path(folder).resolve() for folder in owned}
    removed = []
    for state in sorted(root.rglob("last.pt")) if root.exists() else []:
        folder = state.parent
        if folder.resolve() in keep:
            continue
        size = state.stat().st_size
        Checkpointing(path=state, fingerprint="").discard()
        log.warning("removed %s (%.1f MB): no requested run owns it", state, size / 2**20)
        removed.append(state)
    log.info("%d resumable state file(s) removed under %s", len(removed), root)
    return removed


def raise_if_stop_requested(
    checkpointing: Checkpointing | None, *, when: str, stopped: bool | None = None
) -> None:
    """Raise `StopRequested` if SIGTERM has arrived (or if `stopped`: another rank's SIGTERM),
    naming the state a rerun resumes from."""
    if stop_requested() if stopped is None else stopped:
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


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics stay as pretrained.

    Their affine parameters still train. Call after each `model.train()`.
    """
    for module in _batchnorms(model):
        module.eval()


def set_batchnorm_momentum(model: nn.Module, momentum: float) -> None:
    """Momentum of every BatchNorm layer, in PyTorch's convention (the new batch's weight:
    TensorFlow's 0.99 is PyTorch's 0.01)."""
    for module in _batchnorms(model):
        module.momentum = momentum


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int,
    device: str,
    num_workers: int = 0,
    progress: bool = False,
) -> None:
    """Running statistics of every BatchNorm layer re-estimated on `data` (a plain average over
    one pass, as `torch.optim.swa_utils.update_bn` does), every other layer in eval mode."""
    layers = _batchnorms(model)
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the pass
        layer.train()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, _ in tqdm(loader, disable=not progress, desc="bn statistics", ascii=True):
        model(to_float(images.to(device), None))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()


def chance_accuracy(data: Dataset, num_classes: int) -> float:
    """Accuracy of always predicting the most frequent class of `data` (1/K without labels)."""
    labels = getattr(data, "labels", None)
    if labels is None or len(labels) == 0:
        return 1.0 / max(num_classes, 1)
    counts = torch.bincount(torch.as_tensor(labels).long().flatten())
    return float(counts.max()) / len(labels)


def collapse_reason(
    *,
    history: list[dict[str, Any]],
    select_on: str,
    num_classes: int,
    chance: float,
    eval_size: int,
    loss_factor: float | None = 10.0,
    final: bool = True,
) -> str | None:
    """Why a run counts as collapsed, in one line, or None.

    - a non-finite training loss;
    - an epoch's mean training loss above `loss_factor` × max(ln K, the first epoch's loss)
      (ln K for epoch 1: the loss of the uniform prediction over K classes);
    - with `final`: ID val accuracy (`select_on`) at chance at the last epoch although an
      earlier epoch (epoch 0 included: LP-FT's probe) was clearly above it. "At chance" is at
      most the majority-class accuracy plus two binomial standard deviations σ on `eval_size`
      examples, "clearly above" at least 5σ above it, so that small val sets do not flag
      noise. A run that never leaves chance is not flagged: it is a weak result, not a
      collapse.
    """
    epochs = [row for row in history if row["epoch"] >= 1]
    if not epochs:
        return None
    uniform = math.log(max(num_classes, 2))
    first_loss = epochs[0]["train_loss"]
    for row in epochs:
        loss = row["train_loss"]
        if not math.isfinite(loss):
            return f"training loss is {loss} at epoch {row['epoch']}"
        reference = uniform if row is epochs[0] else max(uniform, first_loss)
        if loss_factor is not None and loss > loss_factor * reference:
            return (
                f"training loss {loss:.3g} at epoch {row['epoch']} is over {loss_factor:g}× "
                f"{reference:.3g} ({'ln K' if reference == uniform else 'epoch 1'})"
            )
    if not final:
        return None
    sigma = math.sqrt(chance * (1.0 - chance) / max(eval_size, 1))
    at_chance, clearly_above = chance + 2.0 * sigma, chance + 5.0 * sigma
    scores = [row[select_on] for row in history]
    if scores[-1] <= at_chance and max(scores[:-1]) >= clearly_above:
        return (
            f"{select_on} accuracy fell to chance at epoch {history[-1]['epoch']} "
            f"({scores[-1]:.3f}, from {max(scores[:-1]):.3f}; chance {chance:.3f})"
        )
    return None


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
    lr_factors: Mapping[str, float] | None = None,
    parallel: Parallel | None = None,
    frozen_statistics: Iterable[str] = (),
) -> TrainResult:
    """SGD with momentum and a per-step cosine schedule, one `train_one_epoch` per epoch.

    Row 0 of the history is the model before training. `eval_sets[select_on]` is scored every
    epoch, the other sets at epoch 0, every `settings.eval_every` epochs, at the last epoch and
    at the best one (other rows hold NaN there). The best epoch is the one with the highest
    `select_on` accuracy (the first such epoch on ties).
    `batch_transform` (augmentation) is applied to each training batch on the device.
    BatchNorm follows `settings.bn` (`BN_MODES`); `settings.clip_grad_norm` caps the L2 norm of
    all gradients together at every step (bf16 autocast needs no loss scaling, so the gradients
    clipped are the true ones); each history row records the epoch's largest gradient norm
    (before clipping) and the fraction of steps clipped.
    A run that collapses (`collapse_reason`) stops, or is flagged at the end, with
    `TrainResult.diverged` set: a result about its settings, not a crash of the workflow.
    With `checkpointing`, state is saved after every epoch, every `every_seconds` and when
    SIGTERM arrives (then `StopRequested` is raised); a call that finds matching state resumes.
    `on_epoch_end(epoch, model)` runs after each epoch's evaluation (to keep checkpoints).
    `extra_loss(model=, images=, logits=, labels=)` is added to `loss_fn` at every step (the
    augmented images the model saw); the logged train loss includes it.
    `lr_factors` {parameter-name prefix: factor}: those parameters train at lr × factor (the
    longest matching prefix wins; e.g. {"head.": 10} for a 10× head learning rate).
    `parallel`: this process's rank among the data-parallel processes (see the module's
    docstring); `settings.batch_size` is the global batch.
    `frozen_statistics`: names of BatchNorm layers kept in eval mode while training, whatever
    `settings.bn` says (the layers a method froze keep their pretrained statistics).
    """
    if select_on not in eval_sets:
        raise ValueError(f"select_on={select_on!r} is not one of the eval sets {list(eval_sets)}")
    if parallel is not None and parallel.world_size == 1:
        parallel = None
    if parallel is not None:
        _prepare_data_parallel(
            model, parallel=parallel, settings=settings, device=device, transform=batch_transform
        )
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    steps_per_epoch = _steps_per_epoch(train_set, settings)
    total_steps = settings.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(settings.seed)
    # The global RNG (dropout, drop path): a stream of its own per rank; rank 0's is the
    # one-process stream.
    torch.manual_seed(settings.seed + (1_000_003 * parallel.rank if parallel else 0))
    groups = _parameter_groups(model, settings=settings, lr_factors=lr_factors)
    optimizer, scheduler = _sgd_with_cosine_schedule(groups, settings, total_steps=total_steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # for clipping
    model.to(device=device, memory_format=memory_format(device))
    if settings.bn_momentum is not None:
        set_batchnorm_momentum(model, settings.bn_momentum)
    run = _RunState(settings=settings)
    checkpointer = None
    if checkpointing is not None:
        checkpointer = Checkpointer(
            checkpointing,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            generator=generator,
            parallel=parallel,
        )
        checkpointer.restore(run)
    trained: nn.Module = model  # what the training steps call: the model, or its DDP wrapper
    if parallel is not None:
        trained = DistributedDataParallel(
            model,
            device_ids=[torch.device(device).index] if str(device).startswith("cuda") else None,
        )

    def save() -> None:
        if checkpointer is not None:
            checkpointer.save(run)

    def stop_if_requested(save_due: bool = False) -> None:
        """Save if due; save and stop if SIGTERM arrived (on any rank: all ranks agree)."""
        stop = stop_requested()
        if parallel is not None:
            stop, save_due = distributed.agree(parallel, [stop, save_due])
        if stop:
            save()
            log.warning("stopping by SIGTERM at epoch %d, step %d", run.epoch, run.step)
            raise_if_stop_requested(
                checkpointing, when=f"at epoch {run.epoch}, step {run.step}", stopped=True
            )
        if save_due:
            save()

    def evaluate(names: list[str]) -> dict[str, float]:
        """Accuracies (then ECEs, `ece_<name>`) of `names`, NaN for the other eval sets."""
        scores = validate(
            model,
            {name: eval_sets[name] for name in names},
            settings=settings,
            device=device,
            after_each=stop_if_requested,
            parallel=parallel,
        )
        columns = [*eval_sets, *(ece_column(name) for name in eval_sets)]
        return {column: scores.get(column, float("nan")) for column in columns}

    def scored(epoch: int) -> list[str]:
        every = epoch == 0 or epoch % settings.eval_every == 0 or epoch == settings.epochs
        return list(eval_sets) if every else [select_on]

    bar = tqdm(
        total=total_steps,
        initial=(run.epoch - 1) * steps_per_epoch + run.step if run.history else 0,
        disable=not progress,
        desc="train",
        unit="step",
        mininterval=2.0,
        ascii=True,
    )

    def after_step() -> None:
        bar.update()
        # Rank 0's clock decides for all ranks (`agree`).
        main = parallel is None or parallel.is_main
        stop_if_requested(save_due=checkpointer is not None and main and checkpointer.is_due())

    with sigterm_deferred():
        if not run.history:
            if settings.bn == "frozen_adapt":
                recompute_batchnorm_statistics(
                    model,
                    train_set,
                    batch_size=settings.eval_batch_size,
                    device=device,
                    num_workers=settings.num_workers,
                    progress=progress,
                )
            _start_history(run, model, scores=evaluate(scored(0)), select_on=select_on)
            save()
        while run.epoch <= settings.epochs and not run.diverged:
            started = time.perf_counter() - run.seconds
            train_one_epoch(
                model,
                train_set,
                run=run,
                optimizer=optimizer,
                scheduler=scheduler,
                generator=generator,
                params=params,
                device=device,
                loss_fn=loss_fn,
                extra_loss=extra_loss,
                batch_transform=batch_transform,
                started=started,
                after_step=after_step,
                trained=trained,
                parallel=parallel,
                frozen_statistics=tuple(frozen_statistics),
            )
            row = _epoch_row(
                run,
                scores=evaluate(scored(run.epoch)),
                seconds=time.perf_counter() - started,  # evaluation included
            )
            _end_epoch(run, model, row=row, select_on=select_on, select_set=eval_sets[select_on])
            if on_epoch_end is not None:
                on_epoch_end(run.epoch, model)
            run.epoch, run.step, run.seconds = run.epoch + 1, 0, 0.0
            save()
        if not run.diverged:
            _flag_collapse(run, eval_sets[select_on], select_on=select_on, final=True)
        _score_best_epoch(run, model, names=list(eval_sets), evaluate=evaluate)
    bar.close()
    return TrainResult(
        history=run.history,
        best_epoch=run.best_epoch,
        best_state=run.best_state,
        diverged=run.diverged,
        collapse=run.collapse,
    )


def _prepare_data_parallel(
    model: nn.Module,
    *,
    parallel: Parallel,
    settings: TrainSettings,
    device: str,
    transform: BatchTransform,
) -> None:
    """Check what several processes need; SyncBatchNorm in `model` where statistics train
    over the global batch (the layers are replaced in place; parameters and buffers stay)."""
    distributed.check_settings(
        processes=parallel.world_size,
        batch_size=settings.batch_size,
        bn=settings.bn,
        sync_batchnorm=settings.sync_batchnorm,
        device=device,
    )
    if "share" not in inspect.signature(transform).parameters:
        raise ValueError(
            f"batch transform {getattr(transform, '__name__', transform)!r} takes no share= "
            "(rank, world): it cannot draw a global batch's randomness on several processes"
        )
    if settings.bn == "train" and settings.sync_batchnorm:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:
            raise ValueError(
                "the model is a BatchNorm layer itself; SyncBatchNorm cannot replace it"
            )


def _steps_per_epoch(train_set: Dataset, settings: TrainSettings) -> int:
    num_examples = len(train_set)  # type: ignore[arg-type]
    steps = num_examples // settings.batch_size
    if steps == 0:
        raise ValueError(
            f"training set has {num_examples} examples, fewer than one batch "
            f"({settings.batch_size})"
        )
    return steps


def _parameter_groups(
    model: nn.Module, *, settings: TrainSettings, lr_factors: Mapping[str, float] | None
) -> list[nn.Parameter] | list[dict[str, Any]]:
    """The trainable parameters; with `lr_factors`, one SGD group per factor (lr × factor),
    in the order the parameters first appear. Without, the plain list (one group)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not lr_factors:
        return [p for _, p in trainable]
    unmatched = [
        prefix for prefix in lr_factors if not any(n.startswith(prefix) for n, _ in trainable)
    ]
    if unmatched:
        raise ValueError(f"lr_factors: no trainable parameter starts with {unmatched[0]!r}")
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in trainable:
        prefixes = [prefix for prefix in lr_factors if name.startswith(prefix)]
        factor = float(lr_factors[max(prefixes, key=len)]) if prefixes else 1.0
        groups.setdefault(factor, []).append(param)
    return [{"params": ps, "lr": settings.lr * factor} for factor, ps in groups.items()]


def _sgd_with_cosine_schedule(
    params: list[nn.Parameter] | list[dict[str, Any]], settings: TrainSettings, *, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with momentum, and its learning rate decayed per step (`cosine_lr`)."""
    optimizer = torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step=step, total_steps=total_steps, base_lr=1.0)
    )
    return optimizer, scheduler


def _start_history(
    run: _RunState, model: nn.Module, *, scores: dict[str, float], select_on: str
) -> None:
    """Row 0 (the model before training), which is the best epoch so far."""
    run.history.append(
        {
            "epoch": 0,
            "lr": run.settings.lr,
            "train_loss": float("nan"),
            "train_acc": float("nan"),
            "grad_norm_max": float("nan"),
            "clipped": float("nan"),
            **scores,
            "seconds": 0.0,
        }
    )
    run.best_epoch, run.best_score = 0, scores[select_on]
    run.best_state = copy.deepcopy(model.state_dict())


def _epoch_row(run: _RunState, *, scores: dict[str, float], seconds: float) -> dict[str, Any]:
    """The history row of epoch `run.epoch`, from the sums `train_one_epoch` left in `run`."""
    return {
        "epoch": run.epoch,
        "lr": run.epoch_lr,
        "train_loss": run.loss_sum.item() / run.seen,
        "train_acc": run.correct.item() / run.seen,
        "grad_norm_max": run.grad_norm_max.item(),
        "clipped": run.clipped.item() / max(run.steps_in_epoch, 1),
        **scores,
        "seconds": seconds,
    }


def _end_epoch(
    run: _RunState,
    model: nn.Module,
    *,
    row: dict[str, Any],
    select_on: str,
    select_set: Dataset,
) -> None:
    """Append `row`; stop a run that collapsed, else keep the weights of a new best epoch."""
    run.history.append(row)
    if _flag_collapse(run, select_set, select_on=select_on, final=False):
        return
    log.info("epoch %d: %s", run.epoch, {k: round(v, 4) for k, v in row.items()})
    if row[select_on] > run.best_score:
        run.best_epoch, run.best_score = run.epoch, row[select_on]
        run.best_state = copy.deepcopy(model.state_dict())


def _flag_collapse(run: _RunState, data: Dataset, *, select_on: str, final: bool) -> bool:
    """Mark the run diverged if it collapsed (`collapse_reason`, chance on `data`); say so."""
    reason = collapse_reason(
        history=run.history,
        select_on=select_on,
        num_classes=run.num_classes,
        chance=chance_accuracy(data, run.num_classes),
        eval_size=len(data),  # type: ignore[arg-type]
        loss_factor=run.settings.collapse_loss_factor,
        final=final,
    )
    if reason:
        stopping = "" if final else "; stopping"
        log.warning("run collapsed (lr %g): %s%s", run.settings.lr, reason, stopping)
        run.diverged, run.collapse = True, reason
    return bool(reason)


def _score_best_epoch(
    run: _RunState,
    model: nn.Module,
    *,
    names: list[str],
    evaluate: Callable[[list[str]], dict[str, float]],
) -> None:
    """Score the best epoch's weights on the eval sets `names` it was not scored on (it fell
    between scored epochs); the model keeps its last weights."""
    best_row = run.history[run.best_epoch]
    missing = [name for name in names if math.isnan(best_row[name])]
    if not missing:
        return
    current = copy.deepcopy(model.state_dict())
    model.load_state_dict(run.best_state)
    scores = evaluate(missing)
    best_row.update({key: scores[key] for name in missing for key in (name, ece_column(name))})
    model.load_state_dict(current)


def validate(
    model: nn.Module,
    eval_sets: Mapping[str, Dataset],
    *,
    settings: TrainSettings,
    device: str,
    after_each: Callable[[], None] | None = None,
    parallel: Parallel | None = None,
) -> dict[str, float]:
    """Accuracy of `model` on each of `eval_sets` (eval mode), and its expected calibration
    error under `ece_column(name)`, both from one pass; with `parallel`, the batches dealt out
    to the ranks (`distributed.sharded_score`, the same scores)."""
    scores = {}
    for name, data in eval_sets.items():
        loader = {"batch_size": settings.eval_batch_size, "device": device}
        if parallel is None:
            scored = score(model, data, num_workers=settings.num_workers, **loader)
        else:
            scored = distributed.sharded_score(
                model, data, num_workers=settings.num_workers, parallel=parallel, **loader
            )
        scores[name], scores[ece_column(name)] = scored.accuracy, scored.ece
        if after_each is not None:
            after_each()
    return scores


def train_one_epoch(
    model: nn.Module,
    train_set: Dataset,
    *,
    run: _RunState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    params: list[nn.Parameter],
    device: str,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    extra_loss: ExtraLoss | None,
    batch_transform: BatchTransform,
    started: float,
    after_step: Callable[[], None],
    trained: nn.Module | None = None,
    parallel: Parallel | None = None,
    frozen_statistics: tuple[str, ...] = (),
) -> None:
    """The rest of epoch `run.epoch` from step `run.step`; sums accumulate in `run`.
    `trained` (default `model`) is what the steps call (a DDP wrapper of `model`); with
    `parallel`, this rank's share of each batch (see the module's docstring)."""
    settings = run.settings
    num_examples = len(train_set)  # type: ignore[arg-type]
    trained = trained if trained is not None else model
    trained.train()
    if settings.bn != "train":
        freeze_batchnorm_statistics(model)
    for name in frozen_statistics:
        model.get_submodule(name).eval()
    if run.step == 0:
        run.order = torch.randperm(num_examples, generator=generator)
        run.loss_sum = torch.zeros((), device=device)
        run.correct = torch.zeros((), device=device, dtype=torch.long)
        run.grad_norm_max = torch.zeros((), device=device)
        run.clipped = torch.zeros((), device=device, dtype=torch.long)
        run.seen = 0
        run.epoch_lr = optimizer.param_groups[0]["lr"]
    run.steps_in_epoch = num_examples // settings.batch_size
    max_norm = settings.clip_grad_norm if settings.clip_grad_norm is not None else math.inf
    rank, world = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    remaining = run.order[run.step * settings.batch_size :]
    if parallel is not None:
        remaining = distributed.share_of_batches(
            remaining, batch_size=settings.batch_size, parallel=parallel
        )
    loader = DataLoader(
        train_set,
        batch_size=settings.batch_size // world,
        sampler=remaining.tolist(),
        drop_last=True,
        num_workers=settings.num_workers,
        pin_memory=str(device).startswith("cuda"),  # so that copies need no host sync
        # Its own generator, seeded per epoch (and rank): a DataLoader draws from it the seed
        # of its workers' random transforms, and a resumed run creates one more loader.
        generator=torch.Generator().manual_seed(
            (settings.seed * 1_000_003 + run.epoch) * world + rank
        ),
    )
    # Sums stay on the device: no host sync per step.
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if parallel is None:
            inputs = batch_transform(images, generator)
        else:  # draws of the whole global batch, as one process makes them
            inputs = batch_transform(images, generator, share=(rank, world))  # type: ignore[call-arg]
        with autocast(device=device, precision=settings.precision):
            logits = trained(inputs).float()
        run.num_classes = int(logits.shape[1])
        loss = loss_fn(logits, labels)
        if extra_loss is not None:
            loss = loss + extra_loss(model=model, images=inputs, logits=logits, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # With max_norm = inf this only measures the norm (the gradients are scaled by 1.0).
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
        run.grad_norm_max = torch.maximum(run.grad_norm_max, norm.detach().float())
        run.clipped += (norm > max_norm).long()
        optimizer.step()
        scheduler.step()
        loss_sum = loss.detach() * len(labels)
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        if parallel is not None:  # sums of the global batch, the same on every rank
            totals = distributed.sum_over_ranks(torch.stack([loss_sum.float(), correct.float()]))
            loss_sum, correct = totals[0], totals[1].long()
        run.loss_sum += loss_sum
        run.correct += correct
        run.seen += len(labels) * world
        run.step += 1
        run.seconds = time.perf_counter() - started
        after_step()


# `_RunState` field metadata for `Checkpointer`: a field left out of the state file (rebuilt by
# every call), and a tensor on the training device (saved on the CPU, restored to the model's
# device). Every other field is saved and restored as it is.
_NOT_SAVED = {"saved": False}
_ON_DEVICE = {"on_device": True}


@dataclass
class _RunState:
    """Everything the loop needs to continue: position, partial-epoch sums, history, best.

    `Checkpointer` saves and restores every field (see the metadata above); a new field is
    resumable without further code.
    """

    settings: TrainSettings = field(metadata=_NOT_SAVED)
    epoch: int = 1  # the epoch in progress (epochs + 1 when training is over)
    step: int = 0  # steps of `epoch` already taken
    seconds: float = 0.0  # training time spent in `epoch` so far
    order: torch.Tensor | None = None  # the example order of `epoch` (on the CPU)
    loss_sum: torch.Tensor | None = field(default=None, metadata=_ON_DEVICE)
    correct: torch.Tensor | None = field(default=None, metadata=_ON_DEVICE)
    seen: int = 0
    epoch_lr: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -1.0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)  # restored on the CPU
    diverged: bool = False
    collapse: str | None = None
    # Largest gradient norm of `epoch` so far, and its steps whose gradients were clipped.
    grad_norm_max: torch.Tensor | None = field(default=None, metadata=_ON_DEVICE)
    clipped: torch.Tensor | None = field(default=None, metadata=_ON_DEVICE)
    num_classes: int = 0  # width of the model's output
    steps_in_epoch: int = field(default=0, metadata=_NOT_SAVED)  # set by `train_one_epoch`


def _saved_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(_RunState) if f.metadata.get("saved", True)]


def _cuda_rng_state() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []


def _set_cuda_rng_state(states: list[torch.Tensor]) -> None:
    if states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states)


class Checkpointer:
    """Saves a run's resumable state to `checkpointing.path` and restores it from there.

    The state file holds `format` and `fingerprint`, every saved field of `_RunState` under its
    name, and the state of each object the loop changes in place (`self.objects`: model,
    optimizer, scheduler, the loop's generator, the global RNGs), restored in that order.
    Saves are atomic (`io.atomic_path`); a file of another format or fingerprint, or one that
    cannot be read, is ignored.

    With `parallel`, `save` is called by every rank at the same point: rank 0 writes, adding
    every rank's global RNG states (`rank_rng`), and all ranks return once the file is
    written; `restore` is called by every rank, each taking its own RNG states back when the
    file was saved by as many ranks.
    """

    def __init__(
        self,
        checkpointing: Checkpointing,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
        parallel: Parallel | None = None,
    ) -> None:
        self.checkpointing = checkpointing
        self.model = model
        self.parallel = parallel
        # Name in the state file: (read the state, restore it).
        self.objects: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
            "model": (model.state_dict, model.load_state_dict),
            "optimizer": (optimizer.state_dict, optimizer.load_state_dict),
            "scheduler": (scheduler.state_dict, scheduler.load_state_dict),
            "generator": (generator.get_state, generator.set_state),
            "torch_rng": (torch.get_rng_state, torch.set_rng_state),
            "cuda_rng": (_cuda_rng_state, _set_cuda_rng_state),
        }
        self.saved_at = time.monotonic()

    def save(self, run: _RunState) -> None:
        parallel = self.parallel
        if parallel is not None:
            rank_rng = distributed.gather_objects(
                parallel, (torch.get_rng_state(), _cuda_rng_state())
            )
            if not parallel.is_main:
                distributed.barrier(parallel)  # until rank 0 has written the file
                self.saved_at = time.monotonic()
                return
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "fingerprint": self.checkpointing.fingerprint,
        }
        if parallel is not None:
            state["rank_rng"] = rank_rng
        for f in _saved_fields():
            value = getattr(run, f.name)
            if f.metadata.get("on_device") and value is not None:
                value = value.cpu()
            state[f.name] = value
        for name, (read, _) in self.objects.items():
            state[name] = read()
        with atomic_path(self.checkpointing.path) as tmp:
            torch.save(state, tmp)
        if parallel is not None:
            distributed.barrier(parallel)
        self.saved_at = time.monotonic()

    def is_due(self) -> bool:
        """Whether `checkpointing.every_seconds` have passed since the last save."""
        return time.monotonic() - self.saved_at >= self.checkpointing.every_seconds

    def save_if_due(self, run: _RunState) -> None:
        """Save if `checkpointing.every_seconds` have passed since the last save."""
        if self.is_due():
            self.save(run)

    def restore(self, run: _RunState) -> bool:
        """Fill `run` and the objects from the saved state, if there is state of this
        fingerprint; True if it did."""
        path = self.checkpointing.path
        if not path.exists():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a file cut short by a crash of the machine, say
            log.warning("%s: unreadable (%s); starting from scratch", path, error)
            return False
        if (
            state.get("format") != STATE_FORMAT
            or state.get("fingerprint") != self.checkpointing.fingerprint
        ):
            log.warning(
                "%s: saved by a run with other settings or inputs; starting from scratch", path
            )
            return False
        device = next(self.model.parameters()).device
        for name, (_, restore) in self.objects.items():
            restore(state[name])
        rank_rng = state.get("rank_rng")
        parallel = self.parallel
        if parallel is not None and rank_rng is not None and len(rank_rng) == parallel.world_size:
            torch_rng, cuda_rng = rank_rng[parallel.rank]
            torch.set_rng_state(torch_rng)
            _set_cuda_rng_state(cuda_rng)
        elif parallel is not None and not parallel.is_main:
            # Saved by another number of processes: this rank's stream starts afresh.
            torch.manual_seed(int(torch.randint(2**62, (1,))) + parallel.rank)
        for f in _saved_fields():
            value = state[f.name]
            if f.metadata.get("on_device") and value is not None:
                value = value.to(device)
            setattr(run, f.name, value)
        log.info("resuming from %s at epoch %d, step %d", path, run.epoch, run.step)
        self.saved_at = time.monotonic()
        return True
