"""The torch steps of the workflow: pretraining, feature extraction, fine-tuning.

One function per step; each takes paths and settings, writes its outputs atomically, and knows
nothing of Snakemake (the scripts in workflow/scripts call these). The probe and the tables,
which need no torch, live in probe.py and report.py so that their jobs start fast.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustft import __version__
from robustft.data.datasets import ArrayImageDataset
from robustft.data.registry import ID_SPLITS, ImageArrays, load_split, split_column
from robustft.features import (
    extract_features,
    resolve_num_workers,
    resolve_precision,
    write_features,
)
from robustft.io import write_csv, write_json
from robustft.models import (
    ImageClassifier,
    Preprocess,
    build_backbone,
    load_backbone,
    save_backbone,
    save_model,
)
from robustft.training import TrainSettings, train_classifier

log = logging.getLogger(__name__)

METHODS_WITH_PROBE_HEAD = ("lpft",)


def environment_info() -> dict[str, Any]:
    """Library versions and the git commit, for the `config.json` of every run."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "robustft": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        # From the package metadata: importing scikit-learn costs a fine-tuning job seconds.
        "scikit-learn": importlib.metadata.version("scikit-learn"),
        "python": platform.python_version(),
        "git_commit": commit,
    }


def _dataset(arrays: ImageArrays) -> ArrayImageDataset:
    return ArrayImageDataset(arrays.images, arrays.labels)


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
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the toy ResNet on the toyshift pretraining pool; save the backbone only."""
    from robustft.data import toyshift

    train = toyshift.read_split(pretrain_file, "train")
    val = toyshift.read_split(pretrain_file, "val")
    num_classes = len(toyshift.class_names(pretrain_file))
    images = train.images.astype(np.float32) / 255.0
    # The toy backbone's own "pretrained config": the statistics of its pretraining data.
    preprocess = Preprocess(
        input_size=int(train.images.shape[1]),
        mean=tuple(float(x) for x in images.mean(axis=(0, 1, 2))),
        std=tuple(float(x) for x in images.std(axis=(0, 1, 2))),
    )
    del images
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
            }
        },
    )
    write_csv(Path(out_dir) / "history.csv", result.history)
    return {"val_accuracy": val_accuracy}


def extract_split(
    *,
    dataset: str,
    split: str,
    data_root: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    backbone_name: str,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int | str = "auto",
    precision: str = "auto",
    threads: int = 1,
    progress: bool = True,
) -> None:
    """Frozen, eval-mode penultimate features of one split into an HDF5 file."""
    # The backbone first: a missing weight cache fails at once, before a dataset is read.
    backbone, preprocess, meta = load_backbone(model_dir)
    arrays = load_split(dataset=dataset, split=split, root=data_root)
    model = ImageClassifier(
        backbone=backbone, num_classes=len(arrays.class_names), preprocess=preprocess
    )
    precision = resolve_precision(precision, device)
    features, labels = extract_features(
        model,
        _dataset(arrays),
        batch_size=batch_size,
        device=device,
        num_workers=resolve_num_workers(num_workers, device=device, threads=threads),
        precision=precision,
        progress=progress,
    )
    write_features(
        out_path,
        features=features,
        labels=labels,
        attrs={
            "backbone": backbone_name,
            "weights_sha256": meta["sha256"],
            "dataset": dataset,
            "split": split,
            "num_classes": len(arrays.class_names),
            "preprocessing": f"input {preprocess.input_size}px (crop_pct {preprocess.crop_pct}, "
            f"{preprocess.interpolation}); to float in [0,1]; normalise "
            f"mean={list(preprocess.mean)} std={list(preprocess.std)}; no augmentation",
            "precision": precision,
        },
    )


def load_probe_head(probe_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(probe_dir) / "head.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: probe head missing")
    state = load_file(str(path))
    return state["weight"], state["bias"]


def run_finetune(
    *,
    method: str,
    dataset: str,
    data_root: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    ood_splits: Sequence[str],
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    freeze_bn: bool,
    augment: bool,
    probe_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    resolved_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune the whole network (FT: new random head; LP-FT: head from the probe)."""
    backbone, preprocess, _ = load_backbone(model_dir)  # first: fail at once without weights
    splits = {
        split: load_split(dataset=dataset, split=split, root=data_root)
        for split in (*ID_SPLITS, *ood_splits)
    }
    num_classes = len(splits["train"].class_names)
    torch.manual_seed(seed)  # the new head's initialisation depends on the seed only
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, preprocess=preprocess)
    if method in METHODS_WITH_PROBE_HEAD:
        if probe_dir is None:
            raise ValueError(f"method {method!r} needs the probe's head (probe_dir)")
        weight, bias = load_probe_head(probe_dir)
        if tuple(weight.shape) != tuple(model.head.weight.shape):
            raise ValueError(
                f"{probe_dir}: probe head {tuple(weight.shape)} does not fit the "
                f"model head {tuple(model.head.weight.shape)}"
            )
        with torch.no_grad():
            model.head.weight.copy_(weight)
            model.head.bias.copy_(bias)
    elif method != "ft":
        raise ValueError(f"unknown fine-tuning method {method!r}; known: ft, lpft")
    settings = TrainSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        freeze_bn=freeze_bn,
        seed=seed,
    )
    eval_sets = {
        split_column(split): _dataset(arrays)
        for split, arrays in splits.items()
        if split != "train"
    }
    result = train_classifier(
        model=model,
        train_set=_dataset(splits["train"]),
        eval_sets=eval_sets,
        settings=settings,
        select_on="id_val",
        device=device,
        progress=progress,
    )
    out_dir = Path(out_dir)
    model.load_state_dict(result.best_state)
    save_model(model, out_dir / "model.safetensors")
    write_csv(out_dir / "history.csv", result.history)
    best = result.history[result.best_epoch]
    metrics = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "diverged": result.diverged,
        **{key: value for key, value in best.items() if key.startswith(("id_", "ood_"))},
    }
    write_json(
        out_dir / "config.json",
        {
            "method": method,
            "dataset": dataset,
            "model_dir": str(model_dir),
            "probe_dir": str(probe_dir) if probe_dir else None,
            "settings": asdict(settings),
            "augment": augment,
            "ood_splits": list(ood_splits),
            "device": device,
            "resolved_config": dict(resolved_config or {}),
            "environment": environment_info(),
        },
    )
    write_json(out_dir / "metrics.json", metrics)
    return metrics
