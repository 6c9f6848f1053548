"""Reruns that are correct: the data fingerprint in the DAG. Editing a dataset reruns exactly
what is made from it; touching its files, or rerunning with nothing changed, reruns nothing."""

import os
import re
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image
from test_workflow import ROOT, TINY, planned_jobs, snakemake

pytestmark = pytest.mark.workflow


def save_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(value).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    pixels[..., 0] = value  # the class shows in one channel
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def mine_run(tmp_path_factory):
    """The tiny toyshift experiment plus an imagefolder dataset, LP and FT, one seed."""
    workdir = tmp_path_factory.mktemp("caching")
    data = workdir / "mine"
    for split, count in (("train", 12), ("test", 4), ("night", 4)):
        for label, name in enumerate(("cow", "ant")):
            for k in range(count):
                save_png(data / split / name / f"{k}.png", value=40 + 120 * label + k)
    config = yaml.safe_load(TINY.read_text())
    config.update(
        datasets=["toyshift", "mine"],
        methods=["lp", "ft"],
        seeds=[0],
        dataset_settings={
            "mine": {
                "type": "imagefolder",
                "root": str(data),
                "splits": {"train": "train", "test": "test", "night": "night"},
            }
        },
    )
    config["finetune"].update(epochs=1, ft={"lr_grid": [1e-2], "bn": "frozen"})
    config["analysis"] = {"effective_robustness": False}
    config_file = workdir / "mine.yaml"
    config_file.write_text(yaml.safe_dump(config))
    snakemake("--cores", "2", "--configfile", str(config_file), cwd=workdir)
    return workdir, config_file, data


def dry_run(workdir, config_file):
    result = snakemake("-n", "--configfile", str(config_file), cwd=workdir)
    return result.stdout + result.stderr


def test_a_rerun_with_unchanged_data_has_nothing_to_do(mine_run):
    workdir, config_file, _ = mine_run
    assert "Nothing to be done" in dry_run(workdir, config_file)
    assert (workdir / "results/data/mine.json").exists()
    assert (workdir / "results/data/toyshift.json").exists()


def test_touching_images_and_folders_reruns_nothing(mine_run):
    workdir, config_file, data = mine_run
    future = os.stat(data).st_mtime + 60
    for path in (data / "train" / "cow" / "0.png", data / "night" / "ant" / "1.png"):
        os.utime(path, (future, future))
    assert "Nothing to be done" in dry_run(workdir, config_file)


def test_adding_one_image_reruns_that_dataset_and_nothing_else(mine_run):
    workdir, config_file, data = mine_run
    added = data / "train" / "ant" / "extra.png"
    save_png(added, value=200)
    try:
        output = dry_run(workdir, config_file)
        jobs = planned_jobs(output)
        assert jobs == {
            "fingerprint_dataset": 1,
            "prepare_images": 4,  # its prepared-image cache: train, val, test, night
            "extract_features": 4,  # train, val (carved from train), test, night
            "fit_probe": 1,
            "finetune": 1,
            "select_run": 1,
            "store_predictions": 1,
            "feature_distortion": 1,
            "aggregate_tables": 1,
            "summary_table": 1,
            "tidy_runs": 1,
            "plot_id_vs_ood": 1,
            "all": 1,
        }, output
        wildcard_datasets = set(re.findall(r"dataset=(\w+)", output))
        assert wildcard_datasets == {"mine"}, output
        snakemake("--cores", "2", "--configfile", str(config_file), cwd=workdir)
        assert "Nothing to be done" in dry_run(workdir, config_file)
        with open(workdir / "results/data/mine.json") as handle:
            assert '"images": 41' in handle.read()
    finally:
        added.unlink()
    # Removing it again is a change too.
    assert planned_jobs(dry_run(workdir, config_file))["extract_features"] == 4


def test_a_no_op_rerun_of_the_default_config_plans_nothing_new(tmp_path):
    """The default config's DAG builds without any data present (the fingerprint of the
    generated toyshift data is taken when it is made, not when the DAG is built)."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    output = dry_run(tmp_path, ROOT / "config.yaml")
    assert planned_jobs(output)["fingerprint_dataset"] == 1
    assert not (tmp_path / "results").exists()


def test_a_file_of_a_paths_copy_replaced_in_place_reruns_its_check_and_manifest(tmp_path):
    import fake_data

    cifar10 = fake_data.write_cifar10(tmp_path / "cifar10")
    cifar101 = fake_data.write_cifar101(tmp_path / "cifar101")
    config = yaml.safe_load(TINY.read_text())
    config.update(
        datasets=["cifar10_cifar101"],
        paths={"cifar10": str(cifar10), "cifar101": str(cifar101)},
        allow_subset=["cifar10", "cifar101"],
    )
    config_file = tmp_path / "copy.yaml"
    config_file.write_text(yaml.safe_dump(config))
    target = "results/data/cifar10_cifar101.json"
    args = (target, "--configfile", str(config_file))
    snakemake("--cores", "1", *args, cwd=tmp_path)
    first = (tmp_path / target).read_text()
    data = cifar101 / "cifar10.1_v6_data.npy"
    later = os.stat(data).st_mtime + 60
    os.utime(data, (later, later))
    result = snakemake("-n", *args, cwd=tmp_path)
    assert "Nothing to be done" in result.stdout + result.stderr
    pixels = np.load(data)
    pixels[0, 0, 0, 0] ^= 0xFF  # same size, other content
    np.save(data, pixels)
    result = snakemake("-n", *args, cwd=tmp_path)
    assert planned_jobs(result.stdout) == {"check_dataset": 1, "fingerprint_dataset": 1}
    snakemake("--cores", "1", *args, cwd=tmp_path)
    assert (tmp_path / target).read_text() != first
