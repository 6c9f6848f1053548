"""The bad-input matrix: every wrong config value or broken file stops the job with a non-zero
exit and one line naming the key or the file, and leaves no partial output behind.

Config errors go through Snakemake, as a user meets them; file errors go through the job
wrapper every workflow script uses (`robustft.runtime.job`), on files written here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import torch
from fake_data import write_tiny_toyshift_job
from safetensors.torch import load_file, save_file

from robustft.features import write_features
from robustft.io import sha256_file
from robustft.models import ImageClassifier, load_backbone, save_model
from robustft.probe import run_probe
from robustft.runtime import job
from robustft.selection import select_run
from robustft.stages import extract_split, feature_distortion, run_finetune, run_wiseft

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
    "unknown subset source": (["--config", "allow_subset=[imagenet,imagenett]"], "allow_subset[1]"),
    "method entry not importable": (
        ["--config", "finetune={'mine': {'entry': 'nosuchpkg.methods:make', 'lr_grid': [0.01]}}"],
        "config key 'finetune.mine.entry': cannot import 'nosuchpkg.methods'",
    ),
    "method entry returns no method": (
        ["--config", "finetune={'mine': {'entry': 'time:time', 'lr_grid': [0.01]}}"],
        "config key 'finetune.mine.entry': time:time returned float, not a robustft Method",
    ),
    "method grid not declared": (
        [
            "--config",
            f"finetune={{'mine': {{'entry': '{ROOT}/examples/freeze_early.py:make_method', "
            "'lr_grid': [0.01], 'frozen_grid': [0.5], 'alpha_grid': [0.1]}}",
        ],
        "unknown config key 'alpha_grid' under 'finetune.mine'",
    ),
    "method grid missing": (
        [
            "--config",
            f"finetune={{'mine': {{'entry': '{ROOT}/examples/freeze_early.py:make_method', "
            "'lr_grid': [0.01]}}",
        ],
        "'frozen_grid' is a required property",
    ),
    "method hook off the protocol": (
        [
            "--config",
            f"finetune={{'mine': {{'entry': '{ROOT}/tests/method_fixtures.py:off_protocol', "
            "'lr_grid': [0.01]}}",
        ],
        "does not take options, teacher; the protocol is prepare(*, model, options, teacher)",
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
    sha = json.loads((root / "backbone/meta.json").read_text())["sha256"]
    provenance = {"backbone": "toyresnet", "weights_sha256": sha, "data_fingerprint": DATA}
    attrs = {**provenance, "num_classes": 3}
    for split in ("train", "val"):
        write_features(
            root / "features" / f"{split}.h5",
            features=rng.normal(size=(24, 8)).astype(np.float32),
            labels=np.arange(24) % 3,
            attrs={**attrs, "split": split},
        )
    (root / "probe").mkdir()
    backbone, preprocess, _ = load_backbone(root / "backbone")
    save_file(
        {"weight": torch.zeros(3, backbone.num_features), "bias": torch.zeros(3)},
        str(root / "probe/head.safetensors"),
        metadata=provenance,
    )
    # A fine-tuned run of seed 0 (the pretrained weights as they are), for WiSE-FT.
    save_model(
        ImageClassifier(backbone=backbone, num_classes=3, preprocess=preprocess),
        root / "run/model.safetensors",
    )
    (root / "run/metrics.json").write_text(
        json.dumps({"lr": 0.01, "seed": 0, "id_val": 0.5, **provenance})
    )
    (root / "metrics").mkdir()
    for seed in (0, 1):
        (root / "metrics" / f"seed{seed}.json").write_text(
            json.dumps({"lr": 0.01, "seed": seed, "id_val": 0.5, **provenance})
        )
    return root


DATA = "da7a" * 16  # the data fingerprint of the valid inputs


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


def set_h5_attrs(paths, **values):
    for path in paths:
        for name, value in values.items():
            set_h5_attr(path, name, value)


def del_h5_attr(path, name):
    with h5py.File(path, "r+") as handle:
        del handle.attrs[name]


def edit_head(path, *, tensors=None, **changes):
    """Rewrite a safetensors file with its metadata changed (None: the entry removed), or
    other tensors under the same metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata.update(changes)
    metadata = {key: value for key, value in metadata.items() if value is not None}
    save_file(tensors or load_file(str(path)), str(path), metadata=metadata or None)


def nan_in_weights(root):
    """A NaN in the backbone's first weight tensor, with meta.json's checksum updated (the
    weights are then as fetched, only broken)."""
    weights = root / "backbone/model.safetensors"
    state = load_file(str(weights))
    state["stem.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(weights))
    edit_json(root / "backbone/meta.json", sha256=sha256_file(weights))


def disk_full(step):
    """`step` with HDF5 failing as on a full disk: a multi-line error naming the temporary."""

    def fail(*args, **kwargs):
        raise OSError(
            "Can't synchronously write data (file write failed)\n"
            "  filename = '/scratch/.val.h5.k2j4x9q1.tmp', errno = 28\n"
            "  error message = 'No space left on device'"
        )

    def run(root):
        with mock.patch("h5py.Group.create_dataset", fail):
            step(root)

    return run


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
        data_fingerprint=DATA,
    )


def probe(root):
    run_probe(
        feature_files={"train": root / "features/train.h5", "val": root / "features/val.h5"},
        out_dir=root / "out",
        c_grid=[1.0],
        max_iter=50,
        progress=False,
        backbone_meta=root / "backbone/meta.json",
        backbone_name="toyresnet",
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
        data_fingerprint=DATA,
    )


def wiseft(root):
    select_run(metrics_files=[root / "run/metrics.json"], out_path=root / "selected/ft.json")
    run_wiseft(
        dataset="toyshift",
        data_root=root / "data",
        model_dir=root / "backbone",
        probe_dir=root / "probe",
        selection_files={"ft": root / "selected/ft.json"},
        seed=0,
        alphas=[0.0, 1.0],
        ood_splits=["real"],
        out_path=root / "out/curve.csv",
        data_fingerprint=DATA,
    )


def distortion(root):
    feature_distortion(
        dataset="toyshift",
        data_root=root / "data",
        model_dir=root / "backbone",
        pretrained_features={"val": root / "features/val.h5"},
        runs=[],
        backbone_name="toyresnet",
        data_fingerprint=DATA,
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
        lambda r: edit_head(
            r / "probe/head.safetensors",
            tensors={"weight": torch.zeros(5, 32), "bias": torch.zeros(5)},
        ),
        lpft,
        "probe head (5, 32) does not fit the model head (3, 32)",
    ),
    "probe head corrupt": (
        lambda r: truncate(r / "probe/head.safetensors"),
        lpft,
        "head.safetensors",
    ),
    "backbone weights with a NaN": (
        nan_in_weights,
        extract,
        ("model.safetensors", "non-finite features for 12 of 12 images", "'stem.0.weight'"),
    ),
    "feature file write fails (disk full)": (
        None,
        disk_full(extract),
        ("val.h5: writing the feature file failed", "Can't synchronously write"),
    ),
    "features of another backbone in place": (
        lambda r: set_h5_attrs(
            [r / "features/train.h5", r / "features/val.h5"],
            backbone="resnet50",
            weights_sha256="cd" * 32,
        ),
        probe,
        ("train.h5: backbone 'resnet50' differs from 'toyresnet'",),
    ),
    "features of other weights than meta.json": (
        lambda r: set_h5_attrs(
            [r / "features/train.h5", r / "features/val.h5"], weights_sha256="cd" * 32
        ),
        probe,
        ("train.h5: weights_sha256 cdcdcdcdcdcd differs from", "meta.json"),
    ),
    "features of other data than the train split": (
        lambda r: set_h5_attr(r / "features/val.h5", "data_fingerprint", "0e" * 32),
        probe,
        ("val.h5: attribute data_fingerprint 0e0e0e0e0e0e differs", "da7ada7ada7a"),
    ),
    "features from before provenance": (
        lambda r: del_h5_attr(r / "features/val.h5", "data_fingerprint"),
        probe,
        ("val.h5: no data_fingerprint recorded", "snakemake --forcerun extract_features"),
    ),
    "probe head of other backbone weights": (
        lambda r: edit_head(r / "probe/head.safetensors", weights_sha256="cd" * 32),
        lpft,
        ("head.safetensors: weights_sha256 cdcdcdcdcdcd differs", "meta.json"),
    ),
    "probe head of other data": (
        lambda r: edit_head(r / "probe/head.safetensors", data_fingerprint="0e" * 32),
        lpft,
        ("head.safetensors: data_fingerprint 0e0e0e0e0e0e differs from da7ada7ada7a",),
    ),
    "probe head from before provenance": (
        lambda r: edit_head(r / "probe/head.safetensors", data_fingerprint=None),
        lpft,
        ("head.safetensors: no data_fingerprint recorded", "--forcerun fit_probe"),
    ),
    "WiSE-FT probe head of other data": (
        lambda r: edit_head(r / "probe/head.safetensors", data_fingerprint="0e" * 32),
        wiseft,
        ("head.safetensors: data_fingerprint 0e0e0e0e0e0e differs",),
    ),
    "WiSE-FT run of other backbone weights": (
        lambda r: edit_json(r / "run/metrics.json", weights_sha256="cd" * 32),
        wiseft,
        ("metrics.json: weights_sha256 cdcdcdcdcdcd differs", "meta.json"),
    ),
    "WiSE-FT run of other data": (
        lambda r: edit_json(r / "run/metrics.json", data_fingerprint="0e" * 32),
        wiseft,
        ("metrics.json: data_fingerprint 0e0e0e0e0e0e differs",),
    ),
    "distortion features of other weights": (
        lambda r: set_h5_attr(r / "features/val.h5", "weights_sha256", "cd" * 32),
        distortion,
        ("val.h5: weights_sha256 cdcdcdcdcdcd differs", "meta.json"),
    ),
    "run metrics not JSON": (
        lambda r: (r / "metrics/seed1.json").write_text("{"),
        select,
        "seed1.json",
    ),
    "runs of one sweep from other data": (
        lambda r: edit_json(r / "metrics/seed1.json", data_fingerprint="0ther" * 12),
        select,
        ("seed1.json", "data_fingerprint", "seed0.json"),
    ),
    "runs of one sweep from other weights": (
        lambda r: edit_json(r / "metrics/seed0.json", weights_sha256="be" * 32),
        select,
        ("seed1.json", "weights_sha256"),
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
    if damage is not None:
        damage(root)
    log = tmp_path / "job.log"
    with pytest.raises(SystemExit) as failed, job(log_path=log):
        step(root)
    assert failed.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustft:"), lines
    for part in (named,) if isinstance(named, str) else named:
        assert part in lines[0], lines[0]
    assert "Traceback" in log.read_text()  # the details are in the log
    assert not (root / "out").exists() or not any((root / "out").iterdir())


@pytest.mark.parametrize("step", [extract, probe, lpft, wiseft, distortion])
def test_the_valid_inputs_pass_every_step_the_cases_break(inputs, tmp_path, step):
    """So that each case above fails for its own damage, not for the fixture's."""
    root = copy_inputs(inputs, tmp_path / "inputs")
    step(root)


def test_a_multiline_error_keeps_its_file_on_the_one_line(tmp_path, capsys):
    """Errors from libraries (HDF5, the OS) can span lines with the file on a later one, or
    in `filename` only: the one line the terminal shows must still name it."""
    for error, named in (
        (OSError("Unable to open\n  name = '/data/x/task.h5'\n  errno = 5"), "/data/x/task.h5"),
        (OSError(5, "Input/output error\nretry", "/data/x/w.safetensors"), "w.safetensors"),
    ):
        with pytest.raises(SystemExit), job(log_path=tmp_path / "job.log"):
            raise error
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], lines
