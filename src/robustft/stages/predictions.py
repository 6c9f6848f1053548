"""Stored predictions of the selected runs: per-example logits and labels of every split."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from robustft import __version__, provenance
from robustft.io import read_json, sha256_file
from robustft.models import ImageClassifier, load_backbone
from robustft.predictions import SeedPredictions, predict_splits, write_predictions
from robustft.stages.common import eval_sets, eval_transform, load_splits, run_splits

log = logging.getLogger("robustft.stages")


class Evaluation:
    """The pretrained backbone in a classifier of the dataset's classes, and the dataset's
    evaluation splits (every split but train): what loading a run's weights is scored on."""

    def __init__(
        self,
        *,
        dataset: str,
        data_root: str | Path | Mapping[str, str | Path],
        model_dir: str | Path,
        ood_splits: Sequence[str],
        data_options: Mapping[str, Any] | None = None,
        preprocess_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        backbone, preprocess, self.meta = load_backbone(model_dir, preprocess=preprocess_overrides)
        self.meta_path = Path(model_dir) / "meta.json"
        splits = load_splits(
            dataset=dataset,
            data_root=data_root,
            splits=run_splits(ood_splits, train=False),
            data_options=data_options,
        )
        self.class_names = list(splits["val"].class_names)
        self.model = ImageClassifier(
            backbone=backbone, num_classes=len(self.class_names), preprocess=preprocess
        )
        self.datasets = eval_sets(
            splits, preprocess=preprocess, transform=eval_transform(data_options)
        )

    def check(self, *, path: str | Path, recorded: Mapping[str, Any], data_fingerprint: str | None):
        """Refuse a run made from other backbone weights or other data."""
        provenance.check_backbone(
            path=path,
            recorded=recorded,
            meta=self.meta,
            meta_path=self.meta_path,
            backbone_name=None,
            data_fingerprint=data_fingerprint,
            data_source="this job's data manifest",
            rerun="finetune",
        )

    def file_attrs(
        self,
        *,
        method: str,
        dataset: str,
        run: str,
        all_diverged: bool,
        data_fingerprint: str | None,
    ) -> dict[str, Any]:
        """The attributes of a predictions file of this backbone (`write_predictions`)."""
        return {
            "method": method,
            "backbone": self.meta_path.parent.name,
            "dataset": dataset,
            "run": run,
            "class_names": self.class_names,
            provenance.WEIGHTS_SHA256: self.meta["sha256"],
            provenance.DATA_FINGERPRINT: data_fingerprint or provenance.UNKNOWN,
            "robustft": __version__,
            "all_diverged": all_diverged,
        }

    def predict(
        self,
        state: Mapping[str, torch.Tensor],
        *,
        batch_size: int,
        device: str,
        num_workers: int = 0,
        columns: Sequence[str] | None = None,
    ):
        """{split column: logits and labels} of the classifier with weights `state`, on every
        evaluation split or only those of `columns`."""
        self.model.load_state_dict(state)
        chosen = self.datasets if columns is None else {c: self.datasets[c] for c in columns}
        return predict_splits(
            self.model,
            chosen,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
        )


def store_predictions(
    *,
    method: str,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    selection_file: str | Path,
    ood_splits: Sequence[str],
    out_path: str | Path,
    batch_size: int = 512,
    device: str = "cpu",
    data_options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    preprocess_overrides: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> dict[int, dict[str, float]]:
    """Logits (float16) and labels of every evaluation split for the selected run of each
    seed (`select_run`'s file), in one HDF5 file (`robustft.predictions`); {seed: {split:
    accuracy}}. A selection whose every run diverged gives a file with no seed groups and
    `all_diverged` set."""
    from safetensors.torch import load_file

    selection = read_json(selection_file)
    evaluation = Evaluation(
        dataset=dataset,
        data_root=data_root,
        model_dir=model_dir,
        ood_splits=ood_splits,
        data_options=data_options,
        preprocess_overrides=preprocess_overrides,
    )
    seeds = []
    for run in selection.get("runs", []):
        evaluation.check(path=run["path"], recorded=run, data_fingerprint=data_fingerprint)
        weights = Path(run["path"]).parent / "model.safetensors"
        splits = evaluation.predict(
            load_file(str(weights)), batch_size=batch_size, device=device, num_workers=num_workers
        )
        seeds.append(
            SeedPredictions(
                seed=int(run["seed"]),
                source=str(weights.parent),
                model_sha256=sha256_file(weights),
                splits=splits,
            )
        )
        log.info(
            "%s seed %s: %s",
            method,
            run["seed"],
            {name: round(split.scores().accuracy, 4) for name, split in splits.items()},
        )
    write_predictions(
        out_path,
        seeds=seeds,
        attrs=evaluation.file_attrs(
            method=method,
            dataset=dataset,
            run=selection.get("run") or "",
            all_diverged=bool(selection.get("all_diverged")),
            data_fingerprint=data_fingerprint,
        ),
    )
    return {
        entry.seed: {name: split.scores().accuracy for name, split in entry.splits.items()}
        for entry in seeds
    }
