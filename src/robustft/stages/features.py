"""Frozen features of the pretrained backbone, and how far fine-tuning moved them."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustft import provenance
from robustft.data.registry import load_split, split_column
from robustft.features import (
    extract_features,
    resolve_num_workers,
    resolve_precision,
    write_features,
)
from robustft.models import ImageClassifier, load_backbone, weights_path
from robustft.stages.common import eval_transform, load_splits, split_dataset

log = logging.getLogger("robustft.stages")


def extract_split(
    *,
    dataset: str,
    split: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    out_path: str | Path,
    backbone_name: str,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int | str = "auto",
    precision: str = "auto",
    threads: int = 1,
    progress: bool = True,
    data_options: Mapping[str, Any] | None = None,
    preprocess_overrides: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
    prepared: str | Path | None = None,
) -> None:
    """Frozen, eval-mode penultimate features of one split into an HDF5 file.

    `data_root`: the toyshift folder or {source: folder}; `data_options`:
    `registry.dataset_options` (eval transform, val carving, imagefolder layout);
    `preprocess_overrides`: config overrides of the backbone's pretrained preprocessing
    (`load_backbone`). The file's attrs record the resolved preprocessing, as text
    (`preprocessing`) and as JSON (`preprocess`), and the provenance (`provenance.record`:
    backbone, weights_sha256, `data_fingerprint` of the data manifest). Non-finite features
    are refused, naming the weights, and nothing is written. `prepared`: the split's
    prepared-image cache under the eval transform, read instead of its images (attr
    `prepared_images`).
    """
    # The backbone first: a missing weight cache fails at once, before a dataset is read.
    backbone, preprocess, meta = load_backbone(model_dir, preprocess=preprocess_overrides)
    arrays = load_split(dataset=dataset, split=split, root=data_root, options=data_options)
    model = ImageClassifier(
        backbone=backbone, num_classes=len(arrays.class_names), preprocess=preprocess
    )
    transform = eval_transform(data_options)
    precision = resolve_precision(precision, device)
    features, labels = extract_features(
        model,
        split_dataset(
            split,
            arrays,
            preprocess=preprocess,
            transform=transform,
            prepared={split: prepared} if prepared else None,
            data_fingerprint=data_fingerprint,
        ),
        batch_size=batch_size,
        device=device,
        num_workers=resolve_num_workers(num_workers, device=device, threads=threads),
        precision=precision,
        progress=progress,
    )
    bad = int((~np.isfinite(features).all(axis=1)).sum())
    if bad:
        raise ValueError(
            f"{weights_path(model_dir, meta)}: backbone {backbone_name!r} gives non-finite "
            f"features for {bad} of {len(features)} images of {dataset}/{split} "
            f"({_non_finite_weights(backbone)}); nothing written"
        )
    # Scoring hooks for the probe (ImageNet-R/A subsets, ObjectNet groups).
    subset = {
        key: list(value)
        for key in ("class_subset", "class_groups")
        if (value := getattr(arrays, key, None)) is not None
    }
    write_features(
        out_path,
        features=features,
        labels=labels,
        attrs={
            **provenance.record(
                backbone=backbone_name,
                weights_sha256=meta["sha256"],
                data_fingerprint=data_fingerprint,
            ),
            "dataset": dataset,
            "split": split,
            "num_classes": len(arrays.class_names),
            "preprocessing": f"{transform} to {preprocess.input_size}px (crop_pct "
            f"{preprocess.crop_pct}, {preprocess.interpolation}); to float in [0,1]; normalise "
            f"mean={list(preprocess.mean)} std={list(preprocess.std)}; no augmentation",
            "preprocess": json.dumps(
                {**preprocess.to_dict(), "transform": transform}, sort_keys=True
            ),
            "precision": precision,
            "prepared_images": str(prepared or ""),
            **subset,
        },
    )


def _non_finite_weights(backbone: torch.nn.Module) -> str:
    """Which weight tensor holds NaN or infinity (the first), for the error message."""
    for key, value in backbone.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"tensor '{key}' holds NaN or infinity"
    return "no weight tensor holds NaN or infinity: an overflow? try precision fp32"


def feature_distortion(
    *,
    dataset: str,
    data_root: str | Path,
    model_dir: str | Path,
    pretrained_features: Mapping[str, str | Path],
    runs: Sequence[Mapping[str, Any]],
    data_options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    num_workers: int | str = "auto",
    precision: str = "auto",
    threads: int = 1,
    device: str = "cpu",
    progress: bool = True,
    preprocess_overrides: Mapping[str, Any] | None = None,
    backbone_name: str | None = None,
    data_fingerprint: str | None = None,
    prepared: Mapping[str, str | Path] | None = None,
) -> list[dict[str, Any]]:
    """How far fine-tuning moved the penultimate features, per run and split.

    `pretrained_features` maps a split to the pretrained backbone's feature file (from the
    features rule, same images in the same order); `runs` are dicts with `method`, `seed`,
    `lr` and `path` (a run's metrics.json, beside its model.safetensors). Returns rows with
    the mean relative L2 change and the linear CKA between pretrained and fine-tuned features.
    The feature files and the runs must record the weights in `model_dir`'s meta.json, the
    feature files also `backbone_name` and `data_fingerprint` where given. `prepared`:
    {split: prepared-image cache file} read instead of the split's images.
    """
    from safetensors.torch import load_file

    from robustft.features import read_features
    from robustft.io import read_json
    from robustft.models import META_FILE, load_state
    from robustft.robustness import linear_cka, relative_change

    meta_path = Path(model_dir) / META_FILE
    meta = read_json(meta_path)
    before = {split: read_features(path) for split, path in pretrained_features.items()}
    for split, path in pretrained_features.items():
        provenance.check_backbone(
            path=path,
            recorded=before[split].attrs,
            meta=meta,
            meta_path=meta_path,
            backbone_name=backbone_name,
            data_fingerprint=data_fingerprint,
            data_source="this job's data manifest",
            rerun="extract_features",
        )
    for run in runs:
        provenance.check_backbone(
            path=run["path"],
            recorded=run,
            meta=meta,
            meta_path=meta_path,
            backbone_name=None,
            data_fingerprint=data_fingerprint,
            data_source="this job's data manifest",
            rerun="finetune",
        )
    splits = load_splits(
        dataset=dataset, data_root=data_root, splits=list(before), data_options=data_options
    )
    transform = eval_transform(data_options)
    rows = []
    for run in runs:
        weights = Path(run["path"]).parent / "model.safetensors"
        backbone, preprocess, _ = load_backbone(model_dir, preprocess=preprocess_overrides)
        model = ImageClassifier(
            backbone=backbone,
            num_classes=len(next(iter(splits.values())).class_names),
            preprocess=preprocess,
        )
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: fine-tuned model missing")
        load_state(model, load_file(str(weights)), source=weights)
        for split, arrays in splits.items():
            after, _ = extract_features(
                model,
                split_dataset(
                    split,
                    arrays,
                    preprocess=preprocess,
                    transform=transform,
                    prepared=prepared,
                    data_fingerprint=data_fingerprint,
                ),
                batch_size=batch_size,
                device=device,
                num_workers=resolve_num_workers(num_workers, device=device, threads=threads),
                precision=resolve_precision(precision, device),
                progress=progress,
            )
            if after.shape != before[split].features.shape:
                raise ValueError(
                    f"{pretrained_features[split]}: {before[split].features.shape} features, but "
                    f"the model gives {after.shape} on split {split!r}"
                )
            rows.append(
                {
                    "method": run["method"],
                    "lr": run["lr"],
                    "seed": run["seed"],
                    "split": split_column(split),
                    "relative_change": relative_change(before[split].features, after),
                    "cka": linear_cka(before[split].features, after),
                }
            )
    return rows


def distortion_rows(
    *,
    dataset: str,
    data_root: str | Path,
    plan: Mapping[str, Mapping[str, Any]],
    preprocess: Mapping[str, Mapping[str, Any] | None],
    data_options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    num_workers: int | str = "auto",
    precision: str = "auto",
    threads: int = 1,
    device: str = "cpu",
    progress: bool = True,
    data_fingerprint: str | None = None,
    prepared: Mapping[str, Mapping[str, str | Path]] | None = None,
) -> list[dict[str, Any]]:
    """`feature_distortion` of every selected run of every backbone of a dataset, as rows
    with `dataset` and `backbone` first.

    `plan` maps a backbone to its `model_dir`, its pretrained `features` ({split: feature
    file}) and its `selections` ({method: `select_run` file}); `preprocess` a backbone to its
    config overrides of the pretrained preprocessing; `prepared` a backbone to its
    {split: prepared-image cache file}.
    """
    from robustft.io import read_json

    rows = []
    for backbone, entry in plan.items():
        runs = [
            {**run, "method": method}
            for method, path in entry["selections"].items()
            for run in read_json(path)["runs"]
        ]
        for row in feature_distortion(
            dataset=dataset,
            data_root=data_root,
            model_dir=entry["model_dir"],
            pretrained_features=entry["features"],
            runs=runs,
            data_options=data_options,
            preprocess_overrides=preprocess[backbone],
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
            threads=threads,
            device=device,
            progress=progress,
            backbone_name=backbone,
            data_fingerprint=data_fingerprint,
            prepared=(prepared or {}).get(backbone),
        ):
            rows.append({"dataset": dataset, "backbone": backbone, **row})
    return rows
