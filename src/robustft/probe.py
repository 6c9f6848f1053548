"""Linear probe: multinomial L2 logistic regression over a grid of C, chosen on ID val.

Following Kumar et al. 2022, features are standardised by one scalar mean and standard
deviation over the training features before the fit.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from robustft.data.registry import split_column
from robustft.features import read_features
from robustft.io import atomic_path, write_csv, write_json

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    C: float
    weight: np.ndarray  # (K, D), on standardised features
    bias: np.ndarray  # (K,)
    mean: float
    std: float
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    def raw_scale_head(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) acting on raw features: W·(f − m)/s + b = (W/s)·f + (b − m/s·ΣW)."""
        weight = self.weight / self.std
        bias = self.bias - (self.mean / self.std) * self.weight.sum(axis=1)
        return weight.astype(np.float32), bias.astype(np.float32)


def scalar_standardization(features: np.ndarray) -> tuple[float, float]:
    mean, std = float(features.mean()), float(features.std())
    return mean, (std if std > 0 else 1.0)


def fit_probe(
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    c_grid: list[float],
    num_classes: int,
    max_iter: int = 1000,
    tol: float = 1e-4,
    progress: bool = False,
) -> ProbeResult:
    """Fit one model per C (ascending), each from zero, and keep the best by val accuracy.

    Each fit starts from zero rather than warm-starting: with a warm start, fits at large C
    stop after zero iterations (the previous solution already meets `tol`), so they are
    never really fitted. Ties go to the smallest C (the most regularised model).
    """
    if len(c_grid) == 0:
        raise ValueError("empty C grid")
    mean, std = scalar_standardization(train_x)
    train_z, _val_z = (train_x - mean) / std, (val_x - mean) / std
    best: ProbeResult | None = None
    best_val = -1.0
    sweep = []
    for c_value in tqdm(sorted(c_grid), disable=not progress, desc="C sweep", ascii=True):
        model = LogisticRegression(C=c_value, max_iter=max_iter, tol=tol)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(train_z, train_y)
        n_iter = int(np.max(model.n_iter_))
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        weight, bias = _full_head(model, num_classes=num_classes, dim=train_x.shape[1])
        candidate = ProbeResult(C=c_value, weight=weight, bias=bias, mean=mean, std=std)
        train_acc = float((candidate.predict(train_x) == train_y).mean())
        val_acc = float((candidate.predict(val_x) == val_y).mean())
        sweep.append(
            {
                "C": c_value,
                "train_acc": train_acc,
                "val_acc": val_acc,
                "n_iter": n_iter,
                "converged": converged,
            }
        )
        if not converged:
            log.warning("C=%g did not converge in %d iterations", c_value, max_iter)
        if val_acc > best_val:
            best, best_val = candidate, val_acc
    assert best is not None
    best.sweep = sweep
    return best


def _full_head(
    model: LogisticRegression, *, num_classes: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (K, D) head over all `num_classes`, also when the training set lacks a class."""
    weight = np.zeros((num_classes, dim), dtype=np.float64)
    bias = np.full(num_classes, -1e9 if len(model.classes_) < num_classes else 0.0)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2 and coef.shape[0] == 1:
        # Binary problems come back as one row; make them a symmetric two-row softmax.
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight[model.classes_] = coef
    bias[model.classes_] = intercept
    return weight, bias


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


def run_probe(
    *,
    feature_files: Mapping[str, str | Path],
    out_dir: str | Path,
    c_grid: Sequence[float],
    max_iter: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the probe on `train`, choose C on `val`, report accuracy on every split."""
    missing = [split for split in ("train", "val") if split not in feature_files]
    if missing:
        raise ValueError(f"probe needs feature files for splits {missing}")
    first = read_features(feature_files["train"])
    num_classes = int(first.attrs.get("num_classes", first.labels.max() + 1))
    sets = {
        split: read_features(path, num_classes=num_classes) for split, path in feature_files.items()
    }
    # Every split must come from the same backbone weights and the same label space.
    for key in ("num_classes", "weights_sha256"):
        expected = first.attrs.get(key)
        for split, data in sets.items():
            if data.attrs.get(key) != expected:
                raise ValueError(
                    f"{feature_files[split]}: attribute {key}={data.attrs.get(key)!r} differs "
                    f"from the train features' {expected!r} ({feature_files['train']})"
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
    )
    accuracies = {
        split_column(split): _accuracy(result, data)
        for split, data in sets.items()
        if split != "train"
    }
    out_dir = Path(out_dir)
    weight, bias = result.raw_scale_head()
    from safetensors.numpy import save_file

    with atomic_path(out_dir / "head.safetensors") as tmp:
        save_file({"weight": weight, "bias": bias}, str(tmp))
    write_csv(out_dir / "sweep.csv", result.sweep)
    chosen = next(row for row in result.sweep if row["C"] == result.C)
    metrics = {
        "C": result.C,
        "converged": chosen["converged"],
        "n_iter": chosen["n_iter"],
        "train_acc": chosen["train_acc"],
        "feature_mean": result.mean,
        "feature_std": result.std,
        **accuracies,
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics
