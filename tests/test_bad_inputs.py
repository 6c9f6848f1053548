"""The bad-input matrix: every wrong config value or broken file stops the job with a non-zero
exit and one line naming the key or the file, and leaves no partial output behind.

Config errors go through Snakemake, as a user meets them; file errors go through the job
wrapper every workflow script uses (`robustft.runtime.job`), on files written here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fake_data import write_tiny_toyshift_job
from safetensors.torch import save_file

from robustft.features import write_features
from robustft.probe import run_probe
from robustft.report import select_run
from robustft.runtime import job
from robustft.stages import extract_split, run_finetune

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]

# --- config: (how, what the one line must name) -----------------------------------------------

CONFIG_CASES = {
    "unknown top-level key": (["--config", "bogus_key=1"], "'bogus_key'"),
    "misspelt nested key": (["--config", "finetune={'epoch': 3}"], "'epoch' under 'finetune'"),
    "wrong type": (["--config", "finetune={'epochs': 'ten'}"], "finetune.epochs"),
    "out of range": (["--config", "finetune={'epochs': 0}"], "finetune.epochs"),
    "empty seeds": (["--config", "seeds=[]"], "'seeds'"),
    "duplicate seeds": (["--config", "seeds=[0,0]"], "'seeds'"),
    "unknown method": (["--config", "methods=[lp,sft]"], "methods[1]"),
    "unknown dataset": (["--config", "datasets=[cifar11]"], "dataset 'cifar11' is not built in"),
    "unknown device": (["--config", "device=tpu"], "'device'"),
    "negative lr": (["--config", "finetune={'ft': {'lr_grid': [-0.01]}}"], "finetune.ft.lr_grid"),
    "duplicate lr": (["--config", "finetune={'ft': {'lr_grid': [0.01, 1e-2]}}"], "lr_grid"),
    "empty lr grid": (["--config", "finetune={'ft': {'lr_grid': []}}"], "finetune.ft.lr_grid"),
    "lr not a number": (
        ["--config", "finetune={'lpft': {'lr_grid': ['fast']}}"],
        "finetune.lpft.lr_grid[0]",
    ),
    "inverted C range": (
        ["--config", "probe={'c_grid': {'log10_min': 3, 'log10_max': 1}}"],
        "probe.c_grid",
    ),
    "C grid too large": (
        ["--config", "probe={'c_grid': {'num': 10000000000}}"],
        "probe.c_grid.num",
    ),
    "renamed freeze_bn": (
        ["--config", "finetune={'lpft': {'freeze_bn': true}}"],
        "'finetune.lpft.freeze_bn' was replaced by 'finetune.lpft.bn'",
    ),
    "unknown BatchNorm mode": (["--config", "finetune={'ft': {'bn': 'eval'}}"], "finetune.ft.bn"),
    "negative clipping": (
        ["--config", "finetune={'lpft': {'clip_grad_norm': -5}}"],
        "finetune.lpft.clip_grad_norm",
    ),
    "memory below minimum": (
        ["--config", "resources={'finetune': {'mem_mb': -1}}"],
        "resources.finetune.mem_mb",
    ),
}


@pytest.mark.workflow
@pytest.mark.parametrize(("how", "named"), CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_a_config_error_stops_before_any_job_with_one_line(tmp_path, how, named):
    result = subprocess.run(
        [*SNAKEMAKE, "--cores", "1", "--configfile", str(TINY), *how],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("robustft:")]
    assert len(errors) == 1 and named in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".snakemake"])


# --- files: each case breaks one input of one step ----------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small valid set of every file a step reads: data, backbone, features, probe, metrics."""
    root = write_tiny_toyshift_job(tmp_path_factory.mktemp("valid"), train_per_class=8, width=4)
    rng = np.random.default_rng(0)
    attrs = {"backbone": "toyresnet", "weights_sha256": "ab" * 32, "num_classes": 3}
    for split in ("train", "val"):
        write_features(
            root / "features" / f"{split}.h5",
            features=rng.normal(size=(24, 8)).astype(np.float32),
            labels=np.arange(24) % 3,
            attrs={**attrs, "split": split},
        )
    (root / "probe").mkdir()
    save_file(
        {"weight": torch.zeros(3, 16), "bias": torch.zeros(3)}, str(root / "probe/head.safetensors")
    )
    (root / "metrics").mkdir()
    for seed in (0, 1):
        (root / "metrics" / f"seed{seed}.json").write_text(
            json.dumps({"lr": 0.01, "seed": seed, "id_val": 0.5})
        )
    return root


def copy_inputs(inputs, workdir):
    shutil.copytree(inputs, workdir, dirs_exist_ok=True)
    return workdir


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def rewrite_h5(path, dataset, value):
    with h5py.File(path, "r+") as handle:
        del handle[dataset]
        if value is not None:
            handle[dataset] = value


def flip_first_pixel(path, dataset):
    with h5py.File(path, "r+") as handle:
        handle[dataset][0, 0, 0, 0] ^= 0xFF


def set_h5_attr(path, name, value):
    with h5py.File(path, "r+") as handle:
        handle.attrs[name] = value


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    for key, value in changes.items():
        if value is None:
            del data[key]
    path.write_text(json.dumps(data))


def extract(root):
    extract_split(
        dataset="toyshift",
        split="val",
        data_root=root / "data",
        model_dir=root / "backbone",
        out_path=root / "out" / "val.h5",
        backbone_name="toyresnet",
        progress=False,
    )


def probe(root):
    run_probe(
        feature_files={"train": root / "features/train.h5", "val": root / "features/val.h5"},
        out_dir=root / "out",
        c_grid=[1.0],
        max_iter=50,
        progress=False,
    )


def lpft(root):
    run_finetune(
        method="lpft",
        dataset="toyshift",
        data_root=root / "data",
        model_dir=root / "backbone",
        probe_dir=root / "probe",
        out_dir=root / "out",
        ood_splits=["real"],
        lr=0.01,
        seed=0,
        epochs=1,
        batch_size=8,
        momentum=0.9,
        weight_decay=0.0,
        bn="frozen",
        augment=False,
        progress=False,
    )


def select(root):
    select_run(
        metrics_files=sorted((root / "metrics").glob("*.json")), out_path=root / "out" / "sel.json"
    )


# name: (break the inputs, the step that reads them, what the one line must name)
FILE_CASES = {
    "dataset file missing": (lambda r: (r / "data/task.h5").unlink(), extract, "task.h5"),
    "dataset file truncated": (lambda r: truncate(r / "data/task.h5"), extract, "task.h5"),
    "dataset split missing": (
        lambda r: rewrite_h5(r / "data/task.h5", "val", None),
        extract,
        "task.h5",
    ),
    "dataset label out of range": (
        lambda r: rewrite_h5(r / "data/task.h5", "val/labels", np.full(12, 7, np.int64)),
        extract,
        "task.h5",
    ),
    "dataset images of the wrong shape": (
        lambda r: rewrite_h5(r / "data/task.h5", "val/images", np.zeros((12, 16, 16, 3), np.uint8)),
        extract,
        "task.h5",
    ),
    "dataset checksum mismatch": (
        lambda r: flip_first_pixel(r / "data/task.h5", "val/images"),
        extract,
        "task.h5",
    ),
    "backbone weights missing": (
        lambda r: (r / "backbone/model.safetensors").unlink(),
        extract,
        "model.safetensors",
    ),
    "backbone weights corrupt": (
        lambda r: truncate(r / "backbone/model.safetensors"),
        extract,
        "model.safetensors",
    ),
    "backbone of another architecture": (
        lambda r: edit_json(r / "backbone/meta.json", kwargs={"width": 8}),
        extract,
        "model.safetensors",
    ),
    "backbone meta.json not JSON": (
        lambda r: (r / "backbone/meta.json").write_text("{architecture: toy"),
        extract,
        "meta.json",
    ),
    "features of the wrong shape": (
        lambda r: rewrite_h5(r / "features/val.h5", "features", np.ones(24, np.float32)),
        probe,
        "val.h5",
    ),
    "features without labels": (
        lambda r: rewrite_h5(r / "features/val.h5", "labels", None),
        probe,
        "val.h5",
    ),
    "feature label out of range": (
        lambda r: rewrite_h5(r / "features/val.h5", "labels", np.full(24, 5, np.int64)),
        probe,
        "val.h5",
    ),
    "features from another backbone": (
        lambda r: set_h5_attr(r / "features/val.h5", "weights_sha256", "cd" * 32),
        probe,
        "val.h5",
    ),
    "features file not HDF5": (
        lambda r: (r / "features/train.h5").write_text("features"),
        probe,
        "train.h5",
    ),
    "probe head of another class map": (
        lambda r: save_file(
            {"weight": torch.zeros(5, 16), "bias": torch.zeros(5)},
            str(r / "probe/head.safetensors"),
        ),
        lpft,
        "probe",
    ),
    "probe head corrupt": (
        lambda r: truncate(r / "probe/head.safetensors"),
        lpft,
        "head.safetensors",
    ),
    "run metrics not JSON": (
        lambda r: (r / "metrics/seed1.json").write_text("{"),
        select,
        "seed1.json",
    ),
    "run metrics without id_val": (
        lambda r: edit_json(r / "metrics/seed0.json", id_val=None),
        select,
        "seed0.json",
    ),
}


@pytest.mark.parametrize(("damage", "step", "named"), FILE_CASES.values(), ids=FILE_CASES.keys())
def test_a_broken_file_fails_its_step_with_one_line_naming_it(
    inputs, tmp_path, capsys, damage, step, named
):
    root = copy_inputs(inputs, tmp_path / "inputs")
    damage(root)
    log = tmp_path / "job.log"
    with pytest.raises(SystemExit) as failed, job(log_path=log):
        step(root)
    assert failed.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustft:"), lines
    assert named in lines[0], lines[0]
    assert "Traceback" in log.read_text()  # the details are in the log
    assert not (root / "out").exists() or not any((root / "out").iterdir())
