"""Models trained here from scratch: the toy backbone (pretraining) and the baseline models."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustft.data import toyshift_format
from robustft.data.datasets import ArrayImageDataset, as_torch_dataset, train_transform
from robustft.data.registry import GENERATED, ImageArrays, split_column, take
from robustft.evaluate import accuracy
from robustft.io import write_csv, write_json
from robustft.models import ImageClassifier, Preprocess, build_backbone, save_backbone
from robustft.stages.common import load_splits, run_splits
from robustft.training import TrainSettings, train_classifier

log = logging.getLogger("robustft.stages")


def _dataset(arrays: ImageArrays) -> ArrayImageDataset:
    return ArrayImageDataset(arrays.images, arrays.labels)


def preprocess_of(images: np.ndarray) -> Preprocess:
    """Input size and per-channel mean/std of uint8 images (N, H, W, 3) scaled to [0, 1]."""
    scaled = images.astype(np.float32) / 255.0
    return Preprocess(
        input_size=int(images.shape[1]),
        mean=tuple(float(x) for x in scaled.mean(axis=(0, 1, 2))),
        std=tuple(float(x) for x in scaled.std(axis=(0, 1, 2))),
    )


def pretrain_toy_backbone(
    *,
    pretrain_file: str | Path,
    out_dir: str | Path,
    width: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    pool_fraction: float = 1.0,
    pool_domains: Sequence[str] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the toy ResNet on the toyshift pretraining pool; save the backbone only.

    `pool_fraction` and `pool_domains` pretrain it on a part of the pool instead
    (`robustft.pretraining_pools.select_pool`, drawn with `seed`; its validation split alike):
    the backbones whose ER is compared against their pretraining data. meta.json records the
    pool under pretrain.pool.
    """
    from robustft.data import toyshift
    from robustft.pretraining_pools import pool_summary, select_pool

    train = toyshift.read_split(pretrain_file, "train")
    val = toyshift.read_split(pretrain_file, "val")
    num_classes = len(toyshift.class_names(pretrain_file))
    if pool_fraction != 1.0 or pool_domains is not None:
        # The whole pool is not redrawn: the default backbone's data stays bit for bit.
        domains = list(toyshift.DOMAINS) if pool_domains is None else list(pool_domains)
        train, val = (
            select_pool(split=split, fraction=pool_fraction, domains=domains, seed=seed)
            for split in (train, val)
        )
    pool = {"fraction": pool_fraction, **pool_summary(split=train, classes=num_classes)}
    log.info(
        "pretraining pool: %d images (%.0f per class), domains %s",
        pool["images"],
        pool["images_per_class"],
        "+".join(pool["domains"]),
    )
    # The toy backbone's own "pretrained config": the statistics of its pretraining data.
    preprocess = preprocess_of(train.images)
    torch.manual_seed(seed)
    kwargs = {"width": width}
    backbone = build_backbone(architecture="toyresnet", kwargs=kwargs)
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, preprocess=preprocess)
    settings = TrainSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=0.9,
        weight_decay=weight_decay,
        seed=seed,
    )
    result = train_classifier(
        model=model,
        train_set=_dataset(train),
        eval_sets={"val": _dataset(val)},
        settings=settings,
        select_on="val",
        device=device,
        progress=progress,
    )
    # Keep the last epoch: pretraining has no early stopping.
    val_accuracy = result.history[-1]["val"]
    model.cpu()
    save_backbone(
        backbone=model.backbone,
        out_dir=out_dir,
        architecture="toyresnet",
        kwargs=kwargs,
        preprocess=preprocess,
        extra={
            "pretrain": {
                "val_accuracy": val_accuracy,
                "settings": asdict(settings),
                "classes": num_classes,
                "pool": pool,
            }
        },
    )
    write_csv(Path(out_dir) / "history.csv", result.history)
    return {"val_accuracy": val_accuracy, "pool": pool}


def baseline_pool_splits(
    *, dataset: str, data_root: str | Path | Mapping[str, str | Path]
) -> list[str]:
    """The extra ID training splits a dataset offers its baseline models: toyshift's
    `BASELINE_SPLIT` where its task file has one (`toyshift.baseline_per_class` > 0), else none."""
    setting = GENERATED.get(dataset)
    if setting is None or isinstance(data_root, Mapping):
        return []
    task = setting.files(root=data_root)["task"]
    splits = toyshift_format.list_splits(task)
    return [toyshift_format.BASELINE_SPLIT] if toyshift_format.BASELINE_SPLIT in splits else []


def train_baseline(
    *,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    out_dir: str | Path,
    ood_splits: Sequence[str],
    architecture: str,
    width: int,
    epochs: int,
    fraction: float,
    lr: float,
    batch_size: int,
    weight_decay: float,
    augment: bool,
    seed: int,
    data_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A model trained from scratch on (a fraction of) the ID training data only.

    Such models define the baseline line of effective robustness. Their training pool is the
    ID train split plus the dataset's baseline pool where it has one (`baseline_pool_splits`:
    toyshift's extra ID-domain images, never its val or test ones); `fraction` of that pool is
    drawn with `seed`. The best epoch by ID val is kept; ID test and the OOD splits are
    evaluated on it once, at the end. Images are used at the training images' own size
    (in-memory settings: toyshift, the CIFAR ones).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    pool_splits = baseline_pool_splits(dataset=dataset, data_root=data_root)
    splits = load_splits(
        dataset=dataset,
        data_root=data_root,
        splits=(*run_splits(ood_splits), *pool_splits),
        data_options=data_options,
    )
    pools = [splits.pop(name) for name in pool_splits]
    train = splits["train"]
    if not isinstance(train, ImageArrays):
        raise ValueError(
            f"dataset {dataset!r}: baseline models are trained on in-memory settings only; "
            f"give its published line as config key 'baseline.lines.{dataset}'"
        )
    pool_images = sum(len(pool.labels) for pool in pools)
    if pools:
        train = replace(
            train,
            images=np.concatenate([train.images, *(pool.images for pool in pools)]),
            labels=np.concatenate([train.labels, *(pool.labels for pool in pools)]),
        )
    count = min(len(train.labels), max(batch_size, round(fraction * len(train.labels))))
    keep = np.sort(np.random.default_rng(seed).permutation(len(train.labels))[:count])
    train = take(train, keep)
    # From scratch, so the model's normalisation is that of its own training data.
    preprocess = preprocess_of(train.images)
    torch.manual_seed(seed)
    backbone = build_backbone(architecture=architecture, kwargs={"width": width})
    model = ImageClassifier(
        backbone=backbone, num_classes=len(train.class_names), preprocess=preprocess
    )
    settings = TrainSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=0.9,
        weight_decay=weight_decay,
        seed=seed,
    )

    def torch_dataset(split: str) -> torch.utils.data.Dataset:
        arrays = train if split == "train" else splits[split]
        return as_torch_dataset(arrays, preprocess=preprocess, transform="resize")

    result = train_classifier(
        model=model,
        train_set=torch_dataset("train"),
        eval_sets={"id_val": torch_dataset("val")},
        settings=settings,
        select_on="id_val",
        device=device,
        progress=progress,
        batch_transform=train_transform(augment=augment),
    )
    model.load_state_dict(result.best_state)
    scores = {
        split_column(split): accuracy(model, torch_dataset(split), device=device)
        for split in splits
        if split not in ("train", "val")
    }
    out_dir = Path(out_dir)
    write_csv(out_dir / "history.csv", result.history)
    metrics = {
        "dataset": dataset,
        "architecture": architecture,
        "width": width,
        "epochs": epochs,
        "fraction": fraction,
        "train_images": count,
        "pool_images": pool_images,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "id_val": result.history[result.best_epoch]["id_val"],
        **scores,
        "data_fingerprint": data_fingerprint or "",
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics
