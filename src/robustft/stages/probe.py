"""The probe stage: fit the linear probe (`robustft.probe.fit_probe`) on a backbone's train
features, choose C on val, report accuracy on every split and write the head, the sweep and the
metrics. It needs no torch (reading features, the numpy solver), so that its jobs start fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustft import provenance
from robustft.data.registry import split_column
from robustft.features import read_features
from robustft.io import read_json, write_csv, write_json
from robustft.probe.solver import ProbeResult, fit_probe
from robustft.robustness import chance_record, expected_calibration_error
from robustft.tracking import TrackingSettings, log_run, probe_run


def _accuracy(result: ProbeResult, data: Any) -> float:
    """Argmax over the split's `class_subset` attribute when its feature file has one; with
    `class_groups`, right when the prediction is in the label's group (ObjectNet)."""
    subset = data.attrs.get("class_subset")
    if subset is None or len(subset) == 0:
        predicted = result.predict(data.features)
    else:
        subset = np.asarray(subset, dtype=np.int64)
        predicted = subset[result.logits(data.features)[:, subset].argmax(axis=1)]
    groups = data.attrs.get("class_groups")
    if groups is not None and len(groups):
        groups = np.asarray(groups, dtype=np.int64)
        return float((groups[predicted] == groups[data.labels]).mean())
    return float((predicted == data.labels).mean())


def _ece(result: ProbeResult, data: Any) -> float:
    """Expected calibration error, scored over the same classes as `_accuracy`."""
    return expected_calibration_error(
        logits=result.logits(data.features),
        labels=data.labels,
        class_subset=data.attrs.get("class_subset"),
        class_groups=data.attrs.get("class_groups"),
    )


def run_probe(
    *,
    feature_files: Mapping[str, str | Path],
    out_dir: str | Path,
    c_grid: Sequence[float],
    max_iter: int,
    progress: bool = True,
    solver: str = "torch",
    device: str = "cpu",
    backbone_meta: str | Path | None = None,
    backbone_name: str | None = None,
    tracking: TrackingSettings | None = None,
    dataset: str = "",
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the probe on `train`, choose C on `val`, report accuracy on every split.

    `solver` and `device` as in `fit_probe`. Every split's features must share one backbone,
    weights and data fingerprint; with `backbone_meta` (the backbone's meta.json) they must
    be of those weights, and of `backbone_name` when given. The head's safetensors metadata
    and metrics.json record the features' `backbone`, `weights_sha256`, `data_fingerprint`.

    `tracking`: also log the C sweep and the metrics to W&B or MLflow, as the probe of
    `dataset` and `seed` (`robustft.tracking`; a tracker that fails only warns)."""
    missing = [split for split in ("train", "val") if split not in feature_files]
    if missing:
        raise ValueError(f"probe needs feature files for splits {missing}")
    first = read_features(feature_files["train"])
    num_classes = int(first.attrs.get("num_classes", first.labels.max() + 1))
    sets = {
        split: read_features(path, num_classes=num_classes) for split, path in feature_files.items()
    }
    if backbone_meta is not None:
        meta = read_json(backbone_meta)
        for split, data in sets.items():
            provenance.check_backbone(
                path=feature_files[split],
                recorded=data.attrs,
                meta=meta,
                meta_path=backbone_meta,
                backbone_name=backbone_name,
                data_fingerprint=None,  # no reference here: the splits must agree (below)
                data_source="",
                rerun="extract_features",
            )
            provenance.require(
                path=feature_files[split],
                recorded=data.attrs,
                name=provenance.DATA_FINGERPRINT,
                rerun="extract_features",
            )
    # Every split must come from the same backbone weights, data and label space.
    for key in (
        "num_classes",
        provenance.BACKBONE,
        provenance.WEIGHTS_SHA256,
        provenance.DATA_FINGERPRINT,
    ):
        expected = first.attrs.get(key)
        for split, data in sets.items():
            found = data.attrs.get(key)
            if found != expected:
                raise ValueError(
                    f"{feature_files[split]}: attribute {key} {provenance.short(found)} "
                    f"differs from the train features' {provenance.short(expected)} "
                    f"({feature_files['train']})"
                )
    recorded = provenance.record(
        backbone=first.attrs.get(provenance.BACKBONE),
        weights_sha256=str(first.attrs.get(provenance.WEIGHTS_SHA256, provenance.UNKNOWN)),
        data_fingerprint=first.attrs.get(provenance.DATA_FINGERPRINT),
    )
    dims = {split: data.features.shape[1] for split, data in sets.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"feature dimensions differ between splits: {dims}")
    result = fit_probe(
        train_x=sets["train"].features,
        train_y=sets["train"].labels,
        val_x=sets["val"].features,
        val_y=sets["val"].labels,
        c_grid=list(c_grid),
        num_classes=num_classes,
        max_iter=max_iter,
        progress=progress,
        solver=solver,
        device=device,
    )
    accuracies = {
        split_column(split): _accuracy(result, data)
        for split, data in sets.items()
        if split != "train"
    }
    calibration = {
        f"ece_{split_column(split)}": _ece(result, data)
        for split, data in sets.items()
        if split != "train"
    }
    out_dir = Path(out_dir)
    weight, bias = result.raw_scale_head()
    from robustft.models.heads import HEAD_FILE, save_head

    save_head(out_dir / HEAD_FILE, weight=weight, bias=bias, metadata=recorded)
    write_csv(out_dir / "sweep.csv", result.sweep)
    chosen = next(row for row in result.sweep if row["C"] == result.C)
    metrics = {
        "solver": solver,
        "C": result.C,
        "converged": chosen["converged"],
        "n_iter": chosen["n_iter"],
        "train_acc": chosen["train_acc"],
        "feature_mean": result.mean,
        "feature_std": result.std,
        **accuracies,
        **calibration,
        # So that a table can flag a probe at chance.
        **chance_record(
            id_val=sets["val"].labels, id_test=sets["test"].labels if "test" in sets else None
        ),
        **recorded,
    }
    write_json(out_dir / "metrics.json", metrics)
    if tracking is not None:
        run = probe_run(
            dataset=dataset,
            backbone=backbone_name or str(recorded[provenance.BACKBONE]),
            seed=seed,
            config={"c_grid": list(c_grid), "max_iter": max_iter, "solver": solver},
            sweep=result.sweep,
            metrics=metrics,
        )
        log_run(run, settings=tracking)
    return metrics
