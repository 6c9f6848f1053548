"""The from-scratch baseline models of effective robustness: what they train on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from robustft.data import toyshift
from robustft.stages.pretrain import baseline_pool_splits, train_baseline

TINY: dict[str, Any] = {
    "image_size": 16,
    "pretrain_classes": 2,
    "task_classes": 2,
    "pretrain_images_per_class": {"real": 1, "clipart": 0, "painting": 0, "sketch": 1},
    "train_per_class": 4,
    "val_per_class": 2,
    "test_per_class": 2,
    "ood_per_class": 2,
}
SETTINGS: dict[str, Any] = {
    "architecture": "toyresnet",
    "width": 4,
    "epochs": 1,
    "lr": 0.05,
    "batch_size": 4,
    "weight_decay": 0.0,
    "augment": False,
    "seed": 0,
}


def _toyshift(folder: Path, **overrides: Any) -> Path:
    folder.mkdir()
    toyshift.write_toyshift(
        pretrain_path=folder / "pretrain.h5",
        task_path=folder / "task.h5",
        seed=0,
        **{**TINY, **overrides},
    )
    return folder


@pytest.mark.parametrize(
    ("pool_per_class", "fraction", "images"), [(0, 1.0, 8), (6, 1.0, 20), (6, 0.5, 10)]
)
def test_baseline_trains_on_the_id_train_split_and_the_pool(
    tmp_path: Path, pool_per_class: int, fraction: float, images: int
) -> None:
    data = _toyshift(tmp_path / "data", baseline_per_class=pool_per_class)
    expected_pool = [toyshift.BASELINE_SPLIT] if pool_per_class else []
    assert baseline_pool_splits(dataset="toyshift", data_root=data) == expected_pool
    metrics = train_baseline(
        dataset="toyshift",
        data_root=data,
        out_dir=tmp_path / "out",
        ood_splits=["real", "clipart", "painting"],
        fraction=fraction,
        progress=False,
        **SETTINGS,
    )
    assert metrics["pool_images"] == 2 * pool_per_class
    assert metrics["train_images"] == images
    # Scored on ID test and every OOD split, never on the pool.
    assert {"id_test", "ood_real", "ood_clipart", "ood_painting"} <= set(metrics)
    assert not any(toyshift.BASELINE_SPLIT in key for key in metrics)
    assert json.loads((tmp_path / "out/metrics.json").read_text()) == metrics


def test_settings_without_a_pool_offer_none(tmp_path: Path) -> None:
    roots = {"cifar10": tmp_path, "stl10": tmp_path}
    assert baseline_pool_splits(dataset="cifar10_stl", data_root=roots) == []
