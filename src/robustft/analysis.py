"""Tables and plots of effective robustness along fine-tuning and of feature distortion.

Reads what the workflow wrote (baseline metrics, probe metrics, run selections and their
histories); needs no torch, so these jobs start fast.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustft.data.splits import TRAIN_PER_CLASS_KEY
from robustft.io import atomic_path, read_json, write_json
from robustft.provenance import DATA_FINGERPRINT, check_same
from robustft.report import method_style
from robustft.robustness import BaselineLine, effective_robustness, fit_baseline

MEAN = "mean"  # the line and ER of the mean over OOD splits
# Column of the ER table: ID training images per class of a run trained on a larger ID set
# than the dataset's train split (analysis.er_large_id); empty for every other row.
TRAIN_PER_CLASS = "train_per_class"

log = logging.getLogger(__name__)


def _accuracies(source: Mapping[str, Any], ood_splits: Sequence[str], *, where: str) -> dict:
    columns = ["id_test", *(f"ood_{split}" for split in ood_splits)]
    missing = [column for column in columns if column not in source]
    if missing:
        raise ValueError(f"{where}: no {missing}")
    row = {"id": float(source["id_test"])}
    row.update({f"ood_{split}": float(source[f"ood_{split}"]) for split in ood_splits})
    row["ood"] = float(np.mean([row[f"ood_{split}"] for split in ood_splits]))
    return row


def line_from_settings(settings: Mapping[str, Any]) -> BaselineLine:
    """A line of `baseline.lines`: slope, intercept and, where given, r and n_models."""
    return BaselineLine(
        slope=float(settings["slope"]),
        intercept=float(settings["intercept"]),
        r_value=float(settings.get("r", float("nan"))),
        models=int(settings.get("n_models", 0)),
        id_range=tuple(map(float, settings["id_range"])) if "id_range" in settings else None,
    )


def baseline_lines(
    *,
    baseline: pd.DataFrame | None,
    ood_splits: Sequence[str],
    published: Mapping[str, Any] | None = None,
    key: str = "baseline.lines",
) -> dict[str, BaselineLine]:
    """One line per OOD split and one for the mean: fitted over the baseline models, or
    published. A published `{slope, intercept, ...}` serves every split and the mean; a
    published `{split: {slope, intercept, ...}}` needs every OOD split, and without a `mean`
    entry the mean has no line (its ER is then the mean of the splits' ERs)."""
    keys = [*ood_splits, MEAN]
    if published and "slope" in published:
        return dict.fromkeys(keys, line_from_settings(published))
    if published:
        missing = [split for split in ood_splits if split not in published]
        if missing:
            raise ValueError(f"{key}: no line for OOD split(s) {missing}")
        return {split: line_from_settings(published[split]) for split in keys if split in published}
    if baseline is None or baseline.empty:
        raise ValueError("no baseline models and no published line: cannot compute ER")
    return {
        split: fit_baseline(
            id_accuracy=baseline["id"].to_numpy(),
            ood_accuracy=baseline["ood" if split == MEAN else f"ood_{split}"].to_numpy(),
        )
        for split in keys
    }


def large_id_rows(*, metrics_file: str | Path, ood_splits: Sequence[str]) -> list[dict[str, Any]]:
    """One ER-table row per scored epoch of a run trained on a larger ID set: its history.csv
    beside `metrics_file`, which must name the images per class (`TRAIN_PER_CLASS_KEY` among
    its hparams, as its folder does)."""
    metrics = read_json(metrics_file)
    per_class = (metrics.get("hparams") or {}).get(TRAIN_PER_CLASS_KEY)
    if per_class is None:
        raise ValueError(
            f"{metrics_file}: no {TRAIN_PER_CLASS_KEY} among its hparams; not a large-ID run"
        )
    history_path = Path(metrics_file).parent / "history.csv"
    history = pd.read_csv(history_path)
    scored = [column for column in history if column.startswith(("id_test", "ood_"))]
    return [
        {
            "model": metrics["run"],
            "seed": metrics["seed"],
            "epoch": int(record["epoch"]),
            **_accuracies(record, ood_splits, where=str(history_path)),
            TRAIN_PER_CLASS: int(per_class),
        }
        for record in history.dropna(subset=scored).to_dict("records")
    ]


def effective_robustness_table(
    *,
    dataset: str,
    ood_splits: Sequence[str],
    baseline_files: Sequence[str | Path],
    probe_files: Mapping[str, Sequence[str | Path]],
    selection_files: Mapping[str, str | Path],
    published_line: Mapping[str, Any] | None = None,
    large_id_files: Mapping[str, str | Path] | None = None,
) -> tuple[pd.DataFrame, dict[str, BaselineLine]]:
    """ER of every baseline model, probe and fine-tuning epoch (the selected lr, every seed).

    `probe_files` maps a backbone to its probes' metrics files; `selection_files` maps
    "method/backbone" to a `select_run` file, whose runs' history.csv give one row per epoch.
    `large_id_files` maps "method/backbone" to the metrics.json of a run trained on a larger
    ID training set (analysis.er_large_id): one row per scored epoch too, with its images per
    class in column `TRAIN_PER_CLASS` (absent when there is no such run). The baseline line
    is fitted over the baseline models only, whatever else the table holds.
    ID accuracy is ID test accuracy; `er_pts*` columns are in accuracy points.
    """
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str | Path, Mapping[str, Any]]] = []  # every model is of the same data
    for path in baseline_files:
        metrics = read_json(path)
        origins.append((path, metrics))
        rows.append(
            {
                "method": "baseline",
                "backbone": "",
                "model": Path(path).parent.name,
                "seed": metrics.get("seed"),
                "epoch": metrics.get("best_epoch"),
                **_accuracies(metrics, ood_splits, where=str(path)),
            }
        )
    for backbone, files in probe_files.items():
        for path in files:
            metrics = read_json(path)
            origins.append((path, metrics))
            rows.append(
                {
                    "method": "lp",
                    "backbone": backbone,
                    "model": "probe",
                    "seed": int(Path(path).parent.name.removeprefix("seed")),
                    "epoch": np.nan,
                    **_accuracies(metrics, ood_splits, where=str(path)),
                }
            )
    for key, selection_file in selection_files.items():
        method, backbone = key.split("/", 1)
        selection = read_json(selection_file)
        for run in selection["runs"]:
            origins.append((run["path"], run))
            history_path = Path(run["path"]).parent / "history.csv"
            history = pd.read_csv(history_path)
            # Epochs between scored ones (finetune.eval_every) have no test/OOD values.
            scored = [column for column in history if column.startswith(("id_test", "ood_"))]
            for record in history.dropna(subset=scored).to_dict("records"):
                rows.append(
                    {
                        "method": method,
                        "backbone": backbone,
                        "model": selection.get("run") or f"lr{selection['lr']:g}",
                        "seed": run["seed"],
                        "epoch": int(record["epoch"]),
                        **_accuracies(record, ood_splits, where=str(history_path)),
                    }
                )
    for key, metrics_file in (large_id_files or {}).items():
        method, backbone = key.split("/", 1)
        metrics = read_json(metrics_file)
        origins.append((metrics_file, metrics))
        rows += [
            {**row, "method": method, "backbone": backbone}
            for row in large_id_rows(metrics_file=metrics_file, ood_splits=ood_splits)
        ]
    check_same(records=origins, name=DATA_FINGERPRINT, rerun="train_baseline fit_probe finetune")
    table = pd.DataFrame(rows)
    baseline = table[table["method"] == "baseline"]
    lines = baseline_lines(
        baseline=baseline,
        ood_splits=ood_splits,
        published=published_line,
        key=f"baseline.lines.{dataset}",
    )
    for split in ood_splits:
        table[f"er_pts_{split}"] = 100 * effective_robustness(
            id_accuracy=table["id"].to_numpy(),
            ood_accuracy=table[f"ood_{split}"].to_numpy(),
            line=lines[split],
        )
    if MEAN in lines:
        table["er_pts"] = 100 * effective_robustness(
            id_accuracy=table["id"].to_numpy(),
            ood_accuracy=table["ood"].to_numpy(),
            line=lines[MEAN],
        )
    else:  # published per-split lines only
        table["er_pts"] = table[[f"er_pts_{split}" for split in ood_splits]].mean(axis=1)
    # An ER read off a line beyond the ID accuracies it was fitted over is an extrapolation.
    outside = np.zeros(len(table), dtype=bool)
    for line in lines.values():
        outside |= line.outside_range(table["id"].to_numpy())
    table["outside_line_range"] = outside
    table.insert(0, "dataset", dataset)
    return table, lines


def write_effective_robustness(
    *,
    table: pd.DataFrame,
    lines: Mapping[str, BaselineLine],
    csv_path: str | Path,
    line_path: str | Path,
    er_plot: str | Path,
    scatter_plot: str | Path,
) -> None:
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(line_path, {key: asdict(line) for key, line in lines.items()})
    plot_er_along_training(table, out_path=er_plot)
    plot_logit_id_vs_ood(table, line=lines.get(MEAN), out_path=scatter_plot)


def _training_curves(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Mean over seeds per epoch, for each fine-tuning method (and backbone); a run on a
    larger ID training set is a curve of its own, labelled with its images per class."""
    runs = table[~table["method"].isin(["baseline", "lp"])]
    if TRAIN_PER_CLASS not in runs:
        runs = runs.assign(**{TRAIN_PER_CLASS: np.nan})
    curves = {}
    keys = ["method", "backbone", TRAIN_PER_CLASS]
    for (method, backbone, per_class), group in runs.groupby(keys, sort=False, dropna=False):
        label = method if runs["backbone"].nunique() == 1 else f"{method} ({backbone})"
        large = not pd.isna(per_class)
        if large:
            label += f", {int(per_class)} ID images/class"
        curve = group.groupby("epoch")[["id", "ood", "er_pts"]].mean().reset_index()
        curves[label] = curve.assign(method=method, large_id=large)
    return curves


def _curve_style(curve: pd.DataFrame) -> dict[str, str]:
    """The method's colour and marker; a large-ID curve dashed, with open markers."""
    style = method_style(curve["method"].iloc[0])
    if curve["large_id"].iloc[0]:
        style.update(linestyle="--", markerfacecolor="none")
    return style


def _save(fig: Any, out_path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_er_along_training(table: pd.DataFrame, *, out_path: str | Path) -> None:
    """ER (points) of each fine-tuning method, mean over seeds: against the epoch (left) and
    against ID accuracy (right, the view of Andreassen et al.); the probe as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_id) = plt.subplots(1, 2, figsize=(10, 4.2))
    probes = table[table["method"] == "lp"]
    for axis in (by_epoch, by_id):
        axis.axhline(0, color="0.5", linewidth=0.8, linestyle="--", label="baseline line (ER = 0)")
    for label, curve in _training_curves(table).items():
        style = _curve_style(curve)
        by_epoch.plot(curve["epoch"], curve["er_pts"], markersize=4, label=label, **style)
        (drawn,) = by_id.plot(
            100 * curve["id"], curve["er_pts"], markersize=4, label=label, **style
        )
        for index in (0, len(curve) - 1):
            by_id.annotate(
                f"ep {int(curve['epoch'].iloc[index])}",
                (100 * curve["id"].iloc[index], curve["er_pts"].iloc[index]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=drawn.get_color(),
            )
    if not probes.empty:
        lp = method_style("lp")
        by_epoch.axhline(
            probes["er_pts"].mean(), color=lp["color"], linewidth=0.8, linestyle=":", label="lp"
        )
        by_id.scatter(
            100 * probes["id"].mean(), probes["er_pts"].mean(), s=60, label="lp", zorder=3, **lp
        )
    by_epoch.set_xlabel("epoch (0 = before fine-tuning)")
    by_id.set_xlabel("ID test accuracy (%)")
    for axis in (by_epoch, by_id):
        axis.set_ylabel("effective robustness (points, mean OOD)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"{table['dataset'].iloc[0]}: effective robustness along fine-tuning")
    fig.tight_layout()
    _save(fig, out_path)


def plot_logit_id_vs_ood(
    table: pd.DataFrame, *, line: BaselineLine | None, out_path: str | Path
) -> None:
    """ID vs mean OOD accuracy on logit axes: baseline models, the fitted line (none where
    only per-split lines are published), the probe and the fine-tuning trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6, 4.8))
    ax.set_xscale("logit")
    ax.set_yscale("logit")
    clip = (0.005, 0.995)
    baseline = table[table["method"] == "baseline"]
    if not baseline.empty:
        ax.scatter(
            baseline["id"].clip(*clip),
            baseline["ood"].clip(*clip),
            s=18,
            label="baseline models (ID data only)",
            **{**method_style("baseline"), "marker": "o"},
        )
    low = min(table["id"].min(), 0.1)
    high = max(table["id"].max(), 0.9)
    xs = np.linspace(max(low * 0.8, clip[0]), min(1 - (1 - high) * 0.5, clip[1]), 200)
    if line is not None:
        ax.plot(
            xs,
            line.predict(xs),
            color="0.3",
            linestyle="--",
            label=f"fit: logit(OOD) = {line.slope:.2f}·logit(ID) {line.intercept:+.2f}",
        )
    for label, curve in _training_curves(table).items():
        style = _curve_style(curve)
        ax.plot(
            curve["id"].clip(*clip), curve["ood"].clip(*clip), markersize=4, label=label, **style
        )
    probes = table[table["method"] == "lp"]
    if not probes.empty:
        ax.scatter(
            probes["id"].mean(),
            probes["ood"].mean(),
            s=60,
            label="lp",
            zorder=3,
            **method_style("lp"),
        )
    percent = FuncFormatter(lambda value, _: f"{100 * value:g}%")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(percent)
        axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_xlabel("ID test accuracy (logit axis)")
    ax.set_ylabel("OOD accuracy, mean of splits (logit axis)")
    ax.set_title(f"{table['dataset'].iloc[0]}: ID vs OOD")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="major")
    fig.tight_layout()
    _save(fig, out_path)


def write_distortion(
    *, rows: Sequence[Mapping[str, Any]], csv_path: str | Path, plot_path: str | Path
) -> pd.DataFrame:
    """The per-run, per-split distortion table, and a bar plot of its means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    if table.empty:  # every selected sweep collapsed (select_run): say so, measure nothing
        log.warning("no fine-tuning run to measure distortion on: every sweep diverged")
        with atomic_path(csv_path) as tmp:
            pd.DataFrame(columns=["dataset", "backbone", "method", "seed", "split"]).to_csv(
                tmp, index=False
            )
        fig, axis = plt.subplots(figsize=(5, 2))
        axis.text(0.5, 0.5, "no run to measure: every sweep diverged", ha="center")
        axis.set_axis_off()
        with atomic_path(plot_path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return table
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    means = table.groupby(["method", "split"], sort=False)[["relative_change", "cka"]].mean()
    splits = list(dict.fromkeys(table["split"]))
    methods = list(dict.fromkeys(table["method"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    width = 0.8 / len(methods)
    for axis, column, title in (
        (axes[0], "relative_change", "mean ‖f − f₀‖ / ‖f₀‖ (higher: more distorted)"),
        (axes[1], "cka", "linear CKA with pretrained features (lower: more distorted)"),
    ):
        for index, method in enumerate(methods):
            values = [means.loc[(method, split), column] for split in splits]
            axis.bar(
                np.arange(len(splits)) + index * width,
                values,
                width,
                label=method,
                color=method_style(method)["color"],
            )
        axis.set_xticks(
            np.arange(len(splits)) + width * (len(methods) - 1) / 2,
            splits,
            rotation=20,
            ha="right",
        )
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{table['dataset'].iloc[0]}: feature distortion by fine-tuning (mean over seeds)")
    fig.tight_layout()
    _save(fig, plot_path)
    return table
