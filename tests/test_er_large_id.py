"""ER along fine-tuning with a large ID training set (analysis.er_large_id): the run the
default config plans, what it trains on, and its curve in the ER table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_baseline import TINY  # the smallest toyshift the baseline tests generate

from robustft.analysis import (
    TRAIN_PER_CLASS,
    _training_curves,
    effective_robustness_table,
    write_effective_robustness,
)
from robustft.data import toyshift
from robustft.data.splits import ImageArrays, first_per_class

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())
OOD = ["real", "clipart", "painting"]


def dry_run_finetune_folders(tmp_path: Path, *config: str) -> list[str]:
    """The run folders of every finetune job a dry run of config.yaml plans."""
    extra = ["--config", *config] if config else []
    result = subprocess.run(
        [*SNAKEMAKE, "-n", "--configfile", str(ROOT / "config.yaml"), *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"results/finetune/(\S+)/metrics\.json", result.stdout)


@pytest.mark.workflow
def test_the_default_dry_run_plans_one_large_id_run_and_the_switch_removes_it(tmp_path):
    toy = DEFAULT["toyshift"]
    per_class = toy["train_per_class"] + toy["baseline_per_class"]
    # null: all of them, whatever toyshift's sizes (a variant with a smaller pool runs too).
    assert DEFAULT["analysis"]["er_large_id"]["train_per_class"] is None
    folders = set(dry_run_finetune_folders(tmp_path))
    large = [folder for folder in folders if "trainpc" in folder]
    # Exactly one, trained on the train split and the whole baseline pool, its size in its path.
    assert large == [f"ft/toyresnet/toyshift/lr0.03-trainpc{per_class}/seed0"]
    off = set(dry_run_finetune_folders(tmp_path, "analysis={er_large_id: {enabled: false}}"))
    assert off == folders - set(large)


@pytest.mark.workflow
def test_a_size_beyond_the_train_split_and_pool_stops_the_dry_run(tmp_path):
    too_many = "analysis={er_large_id: {train_per_class: 2000}}"
    result = subprocess.run(
        [*SNAKEMAKE, "-n", "--configfile", str(ROOT / "config.yaml"), "--config", too_many],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "'analysis.er_large_id.train_per_class': 2000 > the 1150" in result.stderr


def test_first_per_class_keeps_the_task_images_first_and_nests():
    def split(labels: list[int], offset: int) -> ImageArrays:
        images = np.zeros((len(labels), 2, 2, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = offset + np.arange(len(labels))  # which image it is
        return ImageArrays(images=images, labels=np.array(labels), class_names=("a", "b"))

    train, pool = split([0, 1, 0, 1], 0), split([1, 0, 0, 1, 1, 0], 100)
    three = first_per_class([train, pool], per_class=3)
    assert np.bincount(three.labels).tolist() == [3, 3]
    assert three.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 100, 101]  # train, then the pool
    two = first_per_class([train, pool], per_class=2)
    assert set(two.images[:, 0, 0, 0]) == {0, 1, 2, 3}  # a smaller set is a subset
    with pytest.raises(ValueError, match="6 images per class asked for; the splits hold 5"):
        first_per_class([train, pool], per_class=6)


@pytest.mark.parametrize(("per_class", "images"), [(10, 20), (6, 12)])
def test_a_trainpc_run_trains_on_the_train_split_then_the_pool(tmp_path, per_class, images):
    from robustft.models import Preprocess, build_backbone, save_backbone
    from robustft.stages import run_finetune

    data = tmp_path / "data"
    data.mkdir()
    toyshift.write_toyshift(
        pretrain_path=data / "pretrain.h5",
        task_path=data / "task.h5",
        seed=0,
        baseline_per_class=6,
        **TINY,
    )
    torch.manual_seed(0)
    preprocess = Preprocess(input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    save_backbone(
        backbone=build_backbone(architecture="toyresnet", kwargs={"width": 4}),
        out_dir=tmp_path / "backbone",
        architecture="toyresnet",
        kwargs={"width": 4},
        preprocess=preprocess,
    )
    run = dict(
        method="ft",
        dataset="toyshift",
        data_root=data,
        model_dir=tmp_path / "backbone",
        ood_splits=OOD,
        lr=0.01,
        seed=0,
        epochs=1,
        batch_size=4,
        momentum=0.9,
        weight_decay=0.0,
        augment=False,
        progress=False,
    )
    metrics = run_finetune(out_dir=tmp_path / "large", hparams={"trainpc": per_class}, **run)
    assert metrics["train_images"] == images  # 2 classes × per_class (4 train + 6 pool at most)
    assert metrics["run"] == f"lr0.01-trainpc{per_class}"
    default = run_finetune(out_dir=tmp_path / "default", **run)
    assert default["train_images"] == 2 * 4
    # The same val, test and OOD images: the epoch-0 model (same seed, same head) scores alike.
    first = pd.read_csv(tmp_path / "large/history.csv").iloc[0]
    assert first.filter(regex="^(id_val|id_test|ood_)").equals(
        pd.read_csv(tmp_path / "default/history.csv").iloc[0].filter(regex="^(id_val|id_test|ood_)")
    )
    with pytest.raises(ValueError, match="11 images per class asked for"):
        run_finetune(out_dir=tmp_path / "too_many", hparams={"trainpc": 11}, **run)


def test_the_large_id_run_is_a_curve_of_its_own_and_leaves_the_line_alone(tmp_path):
    def write(path: Path, record: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, "data_fingerprint": "aa" * 32}))
        return path

    baselines = [
        write(
            tmp_path / f"b{i}/metrics.json", {"seed": 0, "best_epoch": 1, "id_test": a, "ood_x": b}
        )
        for i, (a, b) in enumerate([(0.4, 0.2), (0.6, 0.3), (0.9, 0.5)])
    ]
    run_dir = tmp_path / "ft/lr0.03-trainpc1150/seed0"
    large = write(
        run_dir / "metrics.json",
        {"run": "lr0.03-trainpc1150", "seed": 0, "hparams": {"lr": 0.03, "trainpc": 1150.0}},
    )
    pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "id_val": [0.1, 0.9, 0.95],
            "id_test": [0.1, 0.9, 0.95],
            "ood_x": [0.1, 0.8, 0.6],
        }
    ).to_csv(run_dir / "history.csv", index=False)
    args = dict(
        dataset="d", ood_splits=["x"], baseline_files=baselines, probe_files={}, selection_files={}
    )
    plain, plain_lines = effective_robustness_table(**args)
    assert TRAIN_PER_CLASS not in plain  # no large-ID run, the table as before
    table, lines = effective_robustness_table(**args, large_id_files={"ft/bb": large})
    assert lines == plain_lines  # fitted over the baseline models only
    rows = table[table[TRAIN_PER_CLASS] == 1150]
    assert rows["epoch"].tolist() == [0, 1, 2] and set(rows["method"]) == {"ft"}
    assert table[TRAIN_PER_CLASS].isna().sum() == len(baselines)
    assert list(_training_curves(table)) == ["ft, 1150 ID images/class"]
    for name, drawn in (("plain", plain), ("large", table)):  # both plots draw
        write_effective_robustness(
            table=drawn,
            lines=lines,
            csv_path=tmp_path / f"{name}.csv",
            line_path=tmp_path / f"{name}.json",
            er_plot=tmp_path / f"{name}_er.png",
            scatter_plot=tmp_path / f"{name}_scatter.png",
        )
        assert (tmp_path / f"{name}_er.png").stat().st_size > 1000
    # ER of each epoch against the same line: OOD minus the line's prediction at its ID.
    expected = 100 * (0.6 - lines["mean"].predict(0.95))
    assert rows["er_pts"].iloc[-1] == pytest.approx(expected)
    with pytest.raises(ValueError, match="no trainpc among its hparams"):
        bad = write(
            tmp_path / "other/metrics.json", {"run": "lr0.03", "seed": 0, "hparams": {"lr": 0.03}}
        )
        pd.read_csv(run_dir / "history.csv").to_csv(bad.parent / "history.csv", index=False)
        effective_robustness_table(**args, large_id_files={"ft/bb": bad})


def test_the_cost_estimate_counts_the_larger_training_set():
    from robustft.estimate import PlannedJob, job_work, split_sizes

    config = {**DEFAULT, "dataset_settings": {}}
    sizes = {"toyshift": split_sizes(dataset="toyshift", config=config)}

    def work(run: str):
        job = PlannedJob(
            rule="finetune",
            wildcards={"method": "ft", "backbone": "toyresnet", "dataset": "toyshift", "run": run},
            params={"settings": {"epochs": 1, "batch_size": 64, "eval_every": 1}},
            threads=1,
            gpus=0,
        )
        return job_work(job=job, config=config, sizes=sizes)

    assert work("lr0.03").train_images == 1792  # 150 per class × 12, whole batches of 64
    assert work("lr0.03-trainpc1150").train_images == 13760  # 1150 × 12 = 13800
