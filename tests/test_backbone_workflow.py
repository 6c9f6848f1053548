"""Real backbones in the workflow: names with dots as wildcards, the fetch rules, and jobs
that fail at once, with one line, when the weight cache is empty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
BACKBONES = (
    "backbones=[toyresnet,resnet50.tv_in1k,vit_base_patch16_clip_224.openai,moco_v2_resnet50]"
)

pytestmark = pytest.mark.workflow


def snakemake(*args, cwd, env=None):
    return subprocess.run(
        [*SNAKEMAKE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def robustft_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("robustft:")]


def test_dry_run_with_real_backbone_names_plans_one_fetch_per_backbone(tmp_path):
    result = snakemake("-n", "--configfile", str(TINY), "--config", BACKBONES, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ["resnet50.tv_in1k", "vit_base_patch16_clip_224.openai", "moco_v2_resnet50"]:
        assert f"resources/models/{name}/meta.json" in result.stdout
        assert f"results/features/{name}/toyshift/train.h5" in result.stdout
    assert result.stdout.count("rule fetch_backbone:") == 3
    assert result.stdout.count("rule pretrain_backbone:") == 1  # the toy is not fetched


def test_fetch_backbones_is_the_one_command_for_a_login_node(tmp_path):
    result = snakemake(
        "fetch_backbones", "-n", "--configfile", str(TINY), "--config", BACKBONES, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("rule fetch_backbone:") == 3
    assert "extract_features" not in result.stdout and "generate_toyshift" not in result.stdout


def test_a_bad_backbone_name_stops_before_any_job(tmp_path):
    result = snakemake("-n", "--configfile", str(TINY), "--config", "backbones=[a/b]", cwd=tmp_path)
    assert result.returncode != 0
    (line,) = robustft_lines(result)
    assert "backbones[0]" in line and "'a/b'" in line


def test_fetch_without_network_fails_at_once_with_one_line(tmp_path):
    started = time.monotonic()
    result = snakemake(
        "fetch_backbones",
        "--cores",
        "1",
        "--configfile",
        str(TINY),
        "--config",
        "backbones=[resnet18.tv_in1k]",
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    (line,) = robustft_lines(result)
    assert "cannot download backbone 'resnet18.tv_in1k'" in line
    assert time.monotonic() - started < 120
    assert not (tmp_path / "resources" / "models" / "resnet18.tv_in1k" / "meta.json").exists()


def test_a_job_with_an_empty_weight_cache_fails_at_once_with_one_line(tmp_path):
    """meta.json was fetched, but the cache it points to is gone on this machine."""
    models = tmp_path / "resources" / "models" / "resnet18.tv_in1k"
    models.mkdir(parents=True)
    missing = "../hub/models--timm--resnet18.tv_in1k/snapshots/0123/model.safetensors"
    meta = {
        "architecture": "resnet18.tv_in1k",
        "kwargs": {"embedding": "pooled"},
        "num_features": 512,
        "sha256": "00",
        "weights": {"file": missing, "format": "timm"},
        "preprocess": {"input_size": 224, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "source": {"kind": "hf-hub"},
    }
    (models / "meta.json").write_text(json.dumps(meta))
    data = tmp_path / "resources" / "datasets" / "toyshift"
    data.mkdir(parents=True)
    (data / "task.h5").write_bytes(b"")  # never read: the backbone is loaded first
    started = time.monotonic()
    result = snakemake(
        "results/features/resnet18.tv_in1k/toyshift/val.h5",  # before --config, which is greedy
        "--cores",
        "1",
        "--configfile",
        str(TINY),
        "--config",
        "backbones=[resnet18.tv_in1k]",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    (line,) = robustft_lines(result)
    assert "backbone 'resnet18.tv_in1k'" in line and "snakemake fetch_backbones" in line
    assert time.monotonic() - started < 120
    assert not (tmp_path / "results" / "features" / "resnet18.tv_in1k").exists()


def test_preprocessing_reruns_features_and_drop_rates_do_not(tmp_path):
    """dataset_settings.<d>.preprocess is a params entry of extract_features (rerun, reason
    params); backbone_options.<b>.drop_rate only of finetune (features stay)."""
    target = "results/features/toyresnet/toyshift/val.h5"
    built = snakemake(target, "--cores", "1", "--configfile", str(TINY), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    resized = snakemake(
        target,
        "-n",
        "--configfile",
        str(TINY),
        "--config",
        "dataset_settings={toyshift: {preprocess: {input_size: 40}}}",
        cwd=tmp_path,
    )
    assert resized.returncode == 0, resized.stderr
    assert "rule extract_features:" in resized.stdout
    assert "Params have changed since last execution" in resized.stdout
    assert "rule pretrain_backbone:" not in resized.stdout
    dropout = snakemake(
        target,
        "-n",
        "--configfile",
        str(TINY),
        "--config",
        "backbone_options={toyresnet: {drop_rate: 0.1}}",
        cwd=tmp_path,
    )
    assert dropout.returncode == 0, dropout.stderr
    assert "Nothing to be done" in dropout.stdout + dropout.stderr
    finetune = snakemake(
        "-n",
        "--configfile",
        str(TINY),
        "--config",
        "backbone_options={toyresnet: {drop_rate: 0.1}}",
        cwd=tmp_path,
    )
    assert "rule finetune:" in finetune.stdout
    assert finetune.stdout.count("rule extract_features:") == 5  # val is done: the other splits
