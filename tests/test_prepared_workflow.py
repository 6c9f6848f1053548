"""The prepared-image cache in the workflow, on an imagefolder dataset of JPEG photographs:
every job reads the cache; the results are those of the uncached run, bit for bit; the cache
is rebuilt when the data or the preprocessing changes, never for a fine-tuning setting."""

from __future__ import annotations

import json

import fake_data
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from test_workflow import TINY, planned_jobs, snakemake

pytestmark = pytest.mark.workflow

SPLITS = ("train", "val", "test", "night")
EVAL, TRAIN = "resize_center_crop", "resize_random_crop"
RUN = "results/finetune/ft/toyresnet/shots/lr0.01/seed0"


def write_shots(root):
    """Two classes of JPEG photographs of a few sizes; an OOD split `night`."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 3), ("night", 3)):
        for name in ("cow", "ant"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                width, height = ((96, 72), (72, 96), (130, 60))[k % 3]
                image = fake_data.photo_like(rng, width=width, height=height)
                image.save(folder / f"{k}.jpg", quality=90)
    return root


def write_config(path, root, *, enabled=True, own=None, crop_pct=0.8, epochs=2):
    """configs/tiny.yaml on `shots`: `enabled` = prepared_cache.enabled, `own` =
    dataset_settings.shots.prepared_cache."""
    config = yaml.safe_load(TINY.read_text())
    shots = {
        "type": "imagefolder",
        "root": str(root),
        "splits": {"train": "train", "test": "test", "night": "night"},
        # A random crop from (32 / 0.8)² = 40² images: a cached squash, crops on read.
        "train_transform": TRAIN,
        "eval_transform": EVAL,
        "preprocess": {"crop_pct": crop_pct, "interpolation": "bicubic"},
        "prepared_cache": own,
    }
    config.update(
        datasets=["shots"],
        methods=["lp", "ft", "wiseft"],
        seeds=[0],
        dataset_settings={"shots": shots},
        prepared_cache={"enabled": enabled},
    )
    config["finetune"].update(epochs=epochs)
    config["finetune"]["ft"]["lr_grid"] = [0.01]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return write_shots(tmp_path_factory.mktemp("shots"))


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory, shots):
    workdir = tmp_path_factory.mktemp("cached")
    config = write_config(workdir / "config.yaml", shots)
    snakemake("--cores", "2", "--configfile", str(config), cwd=workdir)
    return workdir


def cache_file(split, transform):
    return f"results/prepared/toyresnet/shots/{split}/{transform}.h5"


def test_each_split_is_prepared_once_per_transform_and_every_job_reads_it(cached_run):
    manifest = json.loads((cached_run / "results/data/shots.json").read_text())
    expected = {(split, EVAL) for split in SPLITS} | {("train", TRAIN)}
    found = {
        (path.parent.name, path.stem)
        for path in (cached_run / "results/prepared/toyresnet/shots").glob("*/*.h5")
    }
    assert found == expected
    for split, transform in expected:
        with h5py.File(cached_run / cache_file(split, transform)) as handle:
            assert handle.attrs["data_fingerprint"] == manifest["fingerprint"]
            assert handle.attrs["transform"] == transform and handle.attrs["input_size"] == 32
            shape = (3, 40, 40) if transform == TRAIN else (3, 32, 32)
            assert handle["images"].shape[1:] == shape
    # Fine-tuning reads train under the train transform and the rest under the eval one;
    # feature extraction reads each split's eval cache.
    config = json.loads((cached_run / RUN / "config.json").read_text())
    assert config["prepared_images"] == {
        split: cache_file(split, TRAIN if split == "train" else EVAL) for split in SPLITS
    }
    for split in SPLITS:
        with h5py.File(cached_run / f"results/features/toyresnet/shots/{split}.h5") as handle:
            assert handle.attrs["prepared_images"] == cache_file(split, EVAL)
    logs = (cached_run / "results/logs/wiseft/toyresnet/shots/seed0.log").read_text()
    assert "prepared images" in logs and cache_file("night", EVAL) in logs
    assert (cached_run / "results/analysis/distortion/shots.csv").exists()


def test_results_equal_those_of_the_uncached_run_bit_for_bit(cached_run, shots, tmp_path):
    config = write_config(tmp_path / "config.yaml", shots, enabled=False)
    targets = [f"results/features/toyresnet/shots/{split}.h5" for split in SPLITS]
    snakemake(
        "--cores", "2", *targets, f"{RUN}/history.csv", "--configfile", str(config), cwd=tmp_path
    )
    assert not (tmp_path / "results/prepared").exists()
    for split in SPLITS:
        path = f"results/features/toyresnet/shots/{split}.h5"
        with h5py.File(cached_run / path) as cached, h5py.File(tmp_path / path) as uncached:
            assert uncached.attrs["prepared_images"] == ""
            assert np.array_equal(cached["features"][...], uncached["features"][...])
    # Training crops too: the random crop and flip draw the same numbers on cached images.
    history = [pd.read_csv(run / RUN / "history.csv") for run in (cached_run, tmp_path)]
    assert history[0]["train_loss"].notna().sum() == 2
    pd.testing.assert_frame_equal(
        *(table.drop(columns="seconds") for table in history), check_exact=True
    )


def dry_run(workdir, config):
    return planned_jobs(snakemake("-n", "--configfile", str(config), cwd=workdir).stdout)


def test_a_finetuning_setting_never_rebuilds_the_cache(cached_run, shots):
    config = write_config(cached_run / "epochs.yaml", shots, epochs=3)
    jobs = dry_run(cached_run, config)
    assert jobs["finetune"] == 1 and "prepare_images" not in jobs
    assert "extract_features" not in jobs


def test_the_preprocessing_rebuilds_the_cache_and_what_reads_it(cached_run, shots):
    config = write_config(cached_run / "pre.yaml", shots, crop_pct=0.9)
    jobs = dry_run(cached_run, config)
    assert jobs["prepare_images"] == 5 and jobs["extract_features"] == 4
    assert jobs["finetune"] == 1


def test_changed_data_rebuilds_the_cache(cached_run, shots):
    config = write_config(cached_run / "config.yaml", shots)
    added = shots / "train" / "cow" / "added.jpg"
    fake_data.photo_like(np.random.default_rng(5), width=80, height=60).save(added)
    try:
        jobs = dry_run(cached_run, config)
        assert jobs["fingerprint_dataset"] == 1 and jobs["prepare_images"] == 5
    finally:
        added.unlink()
    assert "prepare_images" not in dry_run(cached_run, config)


def test_turning_the_cache_off_for_a_dataset_plans_no_cache(cached_run, shots):
    config = write_config(cached_run / "off.yaml", shots, own=False)
    jobs = dry_run(cached_run, config)
    assert "prepare_images" not in jobs and jobs["finetune"] == 1
