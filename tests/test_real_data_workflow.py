"""The real settings in the workflow: the paper's dry run, config errors, and the features
rule end to end on small copies of the real datasets (toy backbone, resized input)."""

from __future__ import annotations

import json
import time

import fake_data
import h5py
import numpy as np
import pytest
import yaml
from test_workflow import ROOT, TINY, planned_jobs, snakemake

PAPER = ROOT / "configs" / "paper.yaml"
pytestmark = pytest.mark.workflow

PAPER_JOBS = {
    # cifar10, stl10, cifar101, domainnet, breeds, fmow, ImageNet-V2/R/A/Sketch
    "download_dataset": 10,
    "check_dataset": 1,  # ImageNet: an existing copy (paths.imagenet)
    "fingerprint_dataset": 7,  # one data manifest per setting
    "fetch_backbone": 3,
    # train, val, test + OOD: 4 (CIFAR→STL) 4 (→CIFAR-10.1) 4 + 4 (BREEDS) 6 (DomainNet)
    # 5 (FMoW) 7 (ImageNet)
    "extract_features": 34,
    # The prepared-image cache of the image-file settings, one per split and transform: the
    # eval transform of every split, and the train transform of train where it differs
    # (BREEDS 4 + 1 each, DomainNet 6 + 1, FMoW 5, ImageNet 7 + 1).
    "prepare_images": 2 * 5 + 7 + 5 + 8,
    "fit_probe": 7 * 3,
    # 7 settings × (FT, LP-FT, freeze-embed 6 lrs; L2-SP, L1-SP, KD FT's 6 lrs × 3 values;
    # LoRA 3 lrs × 2 ranks; LLRD 3 lrs × 2 decays; surgical 5 lrs × 4 block groups) × 3 seeds,
    # and FLYP (5 lrs × 3 seeds) on the two CLIP settings (DomainNet, ImageNet) only.
    "finetune": 7 * (3 * 6 + 3 * 18 + 6 + 6 + 20) * 3 + 2 * 5 * 3,
    "select_run": 7 * 9 + 2,
    "store_predictions": 7 * 9 + 2,  # the selected runs' logits, one file per method
    "soups": 7 * 2,  # FT's and LP-FT's runs of each setting
    "wiseft": 7 * 3,
    "plot_wiseft": 7,
    # Text towers of the two CLIP backbones (DomainNet RN50, ImageNet ViT-B/16): zero-shot
    # heads and FLYP.
    "fetch_text_tower": 2,
    "zeroshot": 2,
    "aggregate_tables": 7,
    # Effective robustness: baseline models for the in-memory CIFAR settings (6 each), and
    # ImageNet's published lines (baseline.lines); the other settings get no ER table.
    "train_baseline": 2 * 6,
    "effective_robustness": 3,
    "feature_distortion": 7,
    "summary_table": 1,
    "tidy_runs": 1,
    "plot_id_vs_ood": 1,
    "all": 1,
}


def test_paper_dry_run_plans_the_whole_dag_in_seconds(tmp_path):
    started = time.perf_counter()
    result = snakemake("-n", "--configfile", str(PAPER), cwd=tmp_path)
    elapsed = time.perf_counter() - started
    assert planned_jobs(result.stdout) == PAPER_JOBS
    assert elapsed < 30, elapsed  # about 2 s here; the bound leaves room for a busy machine
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_paper_dry_run_of_one_dataset_plans_only_that_setting(tmp_path):
    result = snakemake(
        "-n", "--configfile", str(PAPER), "--config", "datasets=[cifar10_stl]", cwd=tmp_path
    )
    jobs = planned_jobs(result.stdout)
    assert jobs == {
        "download_dataset": 2,  # cifar10, stl10
        "fingerprint_dataset": 1,
        "fetch_backbone": 1,
        "extract_features": 4,
        "fit_probe": 3,
        "finetune": (3 * 6 + 3 * 18 + 6 + 6 + 20) * 3,  # no FLYP: not a CLIP backbone
        "select_run": 9,
        "store_predictions": 9,
        "soups": 2,
        "wiseft": 3,
        "plot_wiseft": 1,
        "aggregate_tables": 1,
        "train_baseline": 6,
        "effective_robustness": 1,
        "feature_distortion": 1,
        "summary_table": 1,
        "tidy_runs": 1,
        "plot_id_vs_ood": 1,
        "all": 1,
    }
    assert "domainnet" not in result.stdout and "imagenet" not in result.stdout


def test_imagenet_without_a_path_is_one_config_line(tmp_path):
    config = yaml.safe_load(PAPER.read_text())
    config["paths"] = {}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", str(path), cwd=tmp_path, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("robustft:")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "paths.imagenet" in lines[0] and "living17" in lines[0]


def test_an_unknown_dataset_name_is_one_config_line(tmp_path):
    result = snakemake(
        "-n", "--configfile", str(TINY), "--config", "datasets=[mydata]", cwd=tmp_path, check=False
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("robustft:")]
    assert len(lines) == 1 and "dataset_settings.mydata" in lines[0], result.stderr


FEATURE_TARGETS = {
    ("cifar10_stl", "stl"): 9 * fake_data.STL_PER_CLASS,
    ("cifar10_cifar101", "cifar101"): 20,
    ("domainnet", "real"): 3 * 2,
    ("fmow", "africa"): 2,
    ("imagenet", "r"): 3 * 2,
    ("living17", "target"): 3 * 2,
    ("mine", "night"): 2 * 2,  # bring your own: config only
}


def test_features_rule_runs_on_every_format(tmp_path):
    paths = fake_data.write_all(tmp_path / "data")
    config = yaml.safe_load(TINY.read_text())
    mine = tmp_path / "mine"
    for split, count in (("train", 4), ("test", 2), ("night", 2)):
        for label, name in enumerate(("cow", "ant")):
            for k in range(count):
                fake_data.save_image(mine / split / name / f"{k}.png", value=60 * label)
    config.update(
        datasets=sorted({dataset for dataset, _ in FEATURE_TARGETS}),
        paths=paths,
        allow_subset=sorted(paths),  # small copies, used knowingly
        seeds=[0],
        dataset_settings={
            "mine": {
                "type": "imagefolder",
                "root": str(mine),
                "splits": {"train": "train", "test": "test", "night": "night"},
            }
        },
    )
    config_file = tmp_path / "real.yaml"
    config_file.write_text(yaml.safe_dump(config))
    targets = [
        f"results/features/toyresnet/{dataset}/{split}.h5" for dataset, split in FEATURE_TARGETS
    ]
    snakemake("--cores", "2", *targets, "--configfile", str(config_file), cwd=tmp_path)
    for (dataset, split), count in FEATURE_TARGETS.items():
        with h5py.File(tmp_path / f"results/features/toyresnet/{dataset}/{split}.h5") as handle:
            assert handle["features"].shape[0] == count, (dataset, split)
            assert np.isfinite(handle["features"][...]).all()
            if (dataset, split) == ("imagenet", "r"):
                # ImageNet-R's official 200 classes; the copy holds 3 of them.
                assert len(handle.attrs["class_subset"]) == 200
                assert set(handle["labels"][...].tolist()) == {1, 2, 4}
    # Existing copies are checked, not downloaded; the checks record the subset.
    check = json.loads((tmp_path / "results/data_checks/imagenet.json").read_text())
    assert check["complete"] is False and check["sizes"]["train"]["found_classes"] == 6
    assert not (tmp_path / "resources/datasets/cifar10").exists()


def test_a_corrupt_download_fails_in_one_line_and_is_fetched_again(tmp_path):
    from test_download import Server, imagenet_r_tar

    server = Server()
    try:
        good = imagenet_r_tar(tmp_path)
        server.files["r.tar"] = good[: len(good) // 2]  # truncated
        config = yaml.safe_load(TINY.read_text())
        config["download"] = {"urls": {"imagenet-r.tar": server.url("r.tar")}}
        config["allow_subset"] = ["imagenet_r"]  # 6 of its 30,000 images
        config_file = tmp_path / "c.yaml"
        config_file.write_text(yaml.safe_dump(config))
        target = "resources/datasets/imagenet_r"
        args = ("--cores", "1", target, "--configfile", str(config_file))
        result = snakemake(*args, cwd=tmp_path, check=False)
        lines = [line for line in result.stderr.splitlines() if line.startswith("robustft:")]
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert "imagenet-r.tar" in lines[0]
        assert not (tmp_path / target).exists()
        server.files["r.tar"] = good
        snakemake(*args, cwd=tmp_path)
        assert (tmp_path / target / "imagenet-r" / fake_data.R_WNIDS[0]).is_dir()
        assert [name for name, _ in server.requests] == ["r.tar", "r.tar"]
    finally:
        server.close()
