"""Effective robustness (Taori et al. 2020; Andreassen et al. 2022), feature distortion
(Kumar et al. 2022) and calibration (expected calibration error): small pure functions over
accuracies, feature matrices and logits.

ER of a model = its OOD accuracy minus the OOD accuracy that the baseline line predicts from
its ID accuracy, where the line is fitted in logit space over models trained on ID data only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Accuracies of exactly 0 or 1 have infinite logits: clip them to this distance from the ends.
LOGIT_EPSILON = 1e-4


def logit(accuracy: float | np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(accuracy, dtype=np.float64), LOGIT_EPSILON, 1 - LOGIT_EPSILON)
    return np.log(p / (1 - p))


def sigmoid(value: float | np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(value, dtype=np.float64)))


@dataclass(frozen=True)
class BaselineLine:
    """logit(OOD) = slope · logit(ID) + intercept, fitted over baseline models."""

    slope: float
    intercept: float
    r_value: float = float("nan")
    models: int = 0
    # Lowest and highest ID accuracy of the models it was fitted over: where it was measured.
    # Beyond it the line is an extrapolation, and an ER read from it is flagged.
    id_range: tuple[float, float] | None = None

    def predict(self, id_accuracy: float | np.ndarray) -> np.ndarray:
        """The OOD accuracy the line expects at this ID accuracy."""
        return sigmoid(self.slope * logit(id_accuracy) + self.intercept)

    def outside_range(self, id_accuracy: float | np.ndarray) -> np.ndarray:
        """Whether each ID accuracy lies outside `id_range` (False where the range is unknown)."""
        id_accuracy = np.asarray(id_accuracy, dtype=np.float64)
        if self.id_range is None:
            return np.zeros(id_accuracy.shape, dtype=bool)
        low, high = self.id_range
        return (id_accuracy < low) | (id_accuracy > high)


def fit_baseline(*, id_accuracy: Sequence[float], ood_accuracy: Sequence[float]) -> BaselineLine:
    """Least-squares line in logit space (`scipy.stats.linregress`) over baseline models."""
    from scipy.stats import linregress

    x, y = logit(np.asarray(id_accuracy)), logit(np.asarray(ood_accuracy))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"{x.shape} ID and {y.shape} OOD accuracies: need two equal 1-d lists")
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(
            f"the baseline line needs at least two models with different ID accuracy, got {len(x)}"
        )
    fit = linregress(x, y)
    return BaselineLine(
        slope=float(fit.slope),
        intercept=float(fit.intercept),
        r_value=float(fit.rvalue),
        models=len(x),
        id_range=(float(np.min(id_accuracy)), float(np.max(id_accuracy))),
    )


def effective_robustness(
    *, id_accuracy: float | np.ndarray, ood_accuracy: float | np.ndarray, line: BaselineLine
) -> np.ndarray:
    """OOD accuracy above (positive) or below (negative) the baseline line, as a fraction."""
    return np.asarray(ood_accuracy, dtype=np.float64) - line.predict(id_accuracy)


def linear_cka(first: np.ndarray, second: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same examples (N × D).

    1 for identical representations; invariant to rotations and isotropic scaling of either.
    Computed from the D×D cross-covariances (Kornblith et al. 2019), cheap for N ≫ D.
    """
    if first.ndim != 2 or second.ndim != 2 or len(first) != len(second):
        raise ValueError(
            f"need two N×D matrices over the same N, got {first.shape}, {second.shape}"
        )
    x = first.astype(np.float64) - first.mean(axis=0)
    y = second.astype(np.float64) - second.mean(axis=0)
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    norms = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    return float(cross / norms) if norms > 0 else float("nan")


def relative_change(before: np.ndarray, after: np.ndarray) -> float:
    """Mean over examples of ‖after − before‖ / ‖before‖: how far fine-tuning moved features."""
    if before.shape != after.shape:
        raise ValueError(f"feature shapes differ: {before.shape} vs {after.shape}")
    before, after = before.astype(np.float64), after.astype(np.float64)
    norms = np.linalg.norm(before, axis=1)
    change = np.linalg.norm(after - before, axis=1)
    return float(np.mean(change / np.maximum(norms, 1e-12)))


# Guo et al. 2017 ("On Calibration of Modern Neural Networks"): 15 equal-width bins.
ECE_BINS = 15


def _scored_logits(
    logits: np.ndarray, class_subset: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits over the scored classes, their class ids): all classes, or `class_subset`."""
    if class_subset is None or len(class_subset) == 0:
        return logits, np.arange(logits.shape[1])
    subset = np.asarray(class_subset, dtype=np.int64)
    return logits[:, subset], subset


def correct_predictions(
    logits: np.ndarray,
    labels: np.ndarray,
    class_subset: Sequence[int] | None = None,
    class_groups: Sequence[int] | None = None,
) -> np.ndarray:
    """Whether each argmax (over `class_subset` only when given: ImageNet-R/A's 200 classes)
    is right; with `class_groups`, right when it falls in the label's group (ObjectNet)."""
    scored, classes = _scored_logits(np.asarray(logits), class_subset)
    predicted = classes[scored.argmax(axis=1)]
    if class_groups is not None and len(class_groups):
        groups = np.asarray(class_groups, dtype=np.int64)
        return groups[predicted] == groups[labels]
    return predicted == np.asarray(labels)


def expected_calibration_error(
    *,
    logits: np.ndarray,
    labels: np.ndarray,
    num_bins: int = ECE_BINS,
    class_subset: Sequence[int] | None = None,
    class_groups: Sequence[int] | None = None,
) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017), as a fraction.

    Confidence = the largest softmax probability (over `class_subset` when given, the classes
    accuracy is scored over); examples fall into `num_bins` equal-width bins (i/M, (i+1)/M];
    ECE = Σ_bins |B|/N · |accuracy(B) − mean confidence(B)|, a prediction being right as in
    `correct_predictions`.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"need N×C logits and N labels, got {logits.shape} and {labels.shape}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")
    if len(labels) == 0:
        return float("nan")
    scored, _ = _scored_logits(logits, class_subset)
    shifted = scored - scored.max(axis=1, keepdims=True)
    confidence = 1.0 / np.exp(shifted).sum(axis=1)  # the top class's softmax probability
    correct = correct_predictions(logits, labels, class_subset, class_groups).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=num_bins)
    # Σ_B |B|/N · |acc(B) − conf(B)| = Σ_B |Σ_{i∈B} (correct_i − conf_i)| / N
    return float(np.abs(gap[count > 0]).sum() / len(labels))


# --- a result at chance (flagged in the tables, never reported as a number) --------------


CHANCE_SPLITS = ("id_val", "id_test")
# What chance_record writes: per ID split, the majority class's share and the split's size.
CHANCE_KEYS = tuple(
    key for split in CHANCE_SPLITS for key in (f"chance_{split}", f"{split}_examples")
)


def chance_record(
    *, id_val: np.ndarray | None, id_test: np.ndarray | None
) -> dict[str, float | int]:
    """What metrics.json records so that a table can tell a result at chance: for ID val and
    ID test (their labels; None: not scored), the accuracy of always predicting the most
    frequent class, and the number of images."""
    record: dict[str, float | int] = {}
    for split, labels in zip(CHANCE_SPLITS, (id_val, id_test), strict=True):
        if labels is None:
            continue
        labels = np.asarray(labels).astype(np.int64).ravel()
        share = float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0
        record[f"chance_{split}"], record[f"{split}_examples"] = share, len(labels)
    return record


def at_chance(runs: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a row's runs count as at chance, in one line, or None (also when a run does not
    record chance: results from before the check).

    At chance: on ID val and on ID test alike, the mean accuracy over the runs is at most the
    majority class's share plus two binomial standard deviations σ on the split's images (the
    band `training.collapse_reason` calls chance). Both, so that a val set too small to tell
    (two images) does not flag a probe that scores 100% on test. Such a row learned nothing:
    a table shows no number for it.
    """
    if not runs or not all(key in run for key in CHANCE_KEYS for run in runs):
        return None
    found = []
    for split in CHANCE_SPLITS:
        score = float(np.mean([run[split] for run in runs]))
        share = float(np.mean([run[f"chance_{split}"] for run in runs]))
        examples = min(int(run[f"{split}_examples"]) for run in runs)
        sigma = float(np.sqrt(share * (1.0 - share) / max(examples, 1)))
        if score > share + 2.0 * sigma:
            return None
        name = split.replace("id_", "ID ")
        found.append(f"{name} {100 * score:.1f}% (majority class {100 * share:.1f}%)")
    return f"at chance: {' and '.join(found)}, within 2σ; it learned nothing"
