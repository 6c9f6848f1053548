"""Stored predictions: per-example logits (float16) and labels of every evaluation split, in one
HDF5 file per table row (a method's selected runs, or a soup), one group per seed.

Layout (`FORMAT`):

    /                     attrs: format, method, backbone, dataset, run, class_names (JSON),
                                 weights_sha256, data_fingerprint, robustft, all_diverged
    /seed<s>/             attrs: seed, source (the run folder or soup weights), model_sha256
    /seed<s>/<split>/     attrs: accuracy, ece (computed from the float32 logits), count
        logits            float16 N × C
        labels            int64 N
        class_subset      int64 (only for splits scored over some classes: ImageNet-R/A)
        class_groups      int64 (only for splits scored by group: ObjectNet)

<split> is the table's column name: id_val, id_test, ood_<name>. They allow post-hoc analyses
without rerunning anything: agreement between methods, recalibration, ensembles.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustft.io import atomic_path, open_hdf5

FORMAT = "robustft-predictions-1"


@dataclass(frozen=True)
class SplitPredictions:
    """Logits and labels of one split, and how its accuracy is scored."""

    logits: np.ndarray
    labels: np.ndarray
    class_subset: Sequence[int] | None = None
    class_groups: Sequence[int] | None = None

    def scores(self) -> Any:
        from robustft.evaluate import score_logits

        return score_logits(
            logits=self.logits,
            labels=self.labels,
            class_subset=self.class_subset,
            class_groups=self.class_groups,
        )


def predict_splits(
    model: Any,
    datasets: Mapping[str, Any],
    *,
    batch_size: int = 512,
    device: str = "cpu",
    num_workers: int = 0,
) -> dict[str, SplitPredictions]:
    """{split column: its logits and labels} of `model` on each of `datasets`."""
    from robustft.evaluate import predict_logits

    out = {}
    for name, data in datasets.items():
        logits, labels = predict_logits(
            model, data, batch_size=batch_size, device=device, num_workers=num_workers
        )
        out[name] = SplitPredictions(
            logits=logits,
            labels=labels,
            class_subset=getattr(data, "class_subset", None),
            class_groups=getattr(data, "class_groups", None),
        )
    return out


@dataclass(frozen=True)
class SeedPredictions:
    """The predictions of one seed's model on every split, and where the model came from."""

    seed: int
    source: str
    model_sha256: str
    splits: Mapping[str, SplitPredictions]


def write_predictions(
    path: str | Path, *, seeds: Sequence[SeedPredictions], attrs: Mapping[str, Any]
) -> None:
    """Write the predictions file (layout above) atomically; `attrs` go on the root
    (lists and dicts as JSON)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["format"] = FORMAT
        for key, value in attrs.items():
            handle.attrs[key] = _attr(value)
        for entry in seeds:
            group = handle.create_group(f"seed{entry.seed}")
            group.attrs["seed"] = int(entry.seed)
            group.attrs["source"] = str(entry.source)
            group.attrs["model_sha256"] = str(entry.model_sha256)
            for name, split in entry.splits.items():
                scores = split.scores()
                sub = group.create_group(name)
                sub.create_dataset("logits", data=np.asarray(split.logits, dtype=np.float16))
                sub.create_dataset("labels", data=np.asarray(split.labels, dtype=np.int64))
                for field in ("class_subset", "class_groups"):
                    value = getattr(split, field)
                    if value is not None:
                        sub.create_dataset(field, data=np.asarray(value, dtype=np.int64))
                sub.attrs["accuracy"] = scores.accuracy
                sub.attrs["ece"] = scores.ece
                sub.attrs["count"] = len(split.labels)


def read_predictions(path: str | Path) -> dict[int, dict[str, SplitPredictions]]:
    """{seed: {split column: its logits (float32) and labels}} of a predictions file."""
    out: dict[int, dict[str, SplitPredictions]] = {}
    with open_hdf5(path, what="predictions file") as handle:
        if handle.attrs.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a predictions file (format {handle.attrs.get('format')!r}, "
                f"expected {FORMAT!r})"
            )
        for group in handle.values():
            splits = {}
            for name, sub in group.items():
                splits[name] = SplitPredictions(
                    logits=sub["logits"][()].astype(np.float32),
                    labels=sub["labels"][()],
                    class_subset=sub["class_subset"][()] if "class_subset" in sub else None,
                    class_groups=sub["class_groups"][()] if "class_groups" in sub else None,
                )
            out[int(group.attrs["seed"])] = splits
    return out


def _attr(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value
