"""What the stages share: the run's environment, its splits (from the prepared-image cache
where the workflow made one), the eval transform, a head."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustft import __version__
from robustft.data.datasets import as_torch_dataset
from robustft.data.prepared import open_prepared
from robustft.data.registry import ID_SPLITS, Split, load_split, split_column
from robustft.models import ImageClassifier, Preprocess

log = logging.getLogger("robustft.stages")


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


def run_splits(ood_splits: Sequence[str], *, train: bool = True) -> tuple[str, ...]:
    """The splits of a run: the ID ones (without `train` unless `train`), then the OOD ones."""
    return tuple(split for split in (*ID_SPLITS, *ood_splits) if train or split != "train")


def load_splits(
    *,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    splits: Sequence[str],
    data_options: Mapping[str, Any] | None = None,
) -> dict[str, Split]:
    """{split: its images} for `splits` of `dataset`, in that order (`registry.load_split`)."""
    return {
        split: load_split(dataset=dataset, split=split, root=data_root, options=data_options)
        for split in splits
    }


def eval_transform(data_options: Mapping[str, Any] | None) -> str:
    """The dataset's evaluation transform (`registry.dataset_options`); resize by default."""
    return (data_options or {}).get("eval_transform", "resize")


def split_dataset(
    split: str,
    images: Split,
    *,
    preprocess: Preprocess,
    transform: str,
    prepared: Mapping[str, str | Path] | None = None,
    data_fingerprint: str | None = None,
) -> torch.utils.data.Dataset:
    """A split as a torch dataset under `transform`: read from its prepared-image cache where
    `prepared` names one for it (checked against this data and preprocessing), else decoded
    and transformed from the split's own images."""
    path = (prepared or {}).get(split)
    if path is None:
        return as_torch_dataset(images, preprocess=preprocess, transform=transform)
    log.info("%s: prepared images %s", split, path)
    return open_prepared(
        path,
        split=images,
        transform=transform,
        preprocess=preprocess,
        data_fingerprint=data_fingerprint,
    )


def eval_sets(
    splits: Mapping[str, Split],
    *,
    preprocess: Preprocess,
    transform: str,
    prepared: Mapping[str, str | Path] | None = None,
    data_fingerprint: str | None = None,
) -> dict[str, torch.utils.data.Dataset]:
    """{table column: torch dataset} of every split but `train`, for evaluation; from the
    prepared-image cache where `prepared` ({split: file}) names one."""
    return {
        split_column(split): split_dataset(
            split,
            arrays,
            preprocess=preprocess,
            transform=transform,
            prepared=prepared,
            data_fingerprint=data_fingerprint,
        )
        for split, arrays in splits.items()
        if split != "train"
    }


def set_head(model: ImageClassifier, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a linear head (weight, bias) into `model`'s head."""
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
