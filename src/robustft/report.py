"""Summary tables (CSV and Markdown) and the ID-vs-OOD plot."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustft.io import atomic_path, read_json

Z_90 = 1.645  # two-sided 90% normal interval, as in Kumar et al. 2022


def interval90(values: Sequence[float]) -> float:
    """Half-width of the 90% interval of the mean: 1.645 · sample std / √n (0 for n = 1)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return 0.0
    return float(Z_90 * values.std(ddof=1) / math.sqrt(len(values)))


def summarize_runs(
    *,
    method: str,
    runs: Sequence[Mapping[str, Any]],
    ood_splits: Sequence[str],
    hparam_name: str,
    hparam_value: str,
) -> dict[str, Any]:
    """One table row from the per-seed metrics of a method's selected runs.

    OOD accuracy of a run is the mean over its OOD splits; the row's OOD is the mean over
    seeds of that, with its interval.
    """
    if not runs:
        raise ValueError(f"no runs for method {method!r}")
    id_test = [run["id_test"] for run in runs]
    ood = [float(np.mean([run[f"ood_{split}"] for split in ood_splits])) for run in runs]
    row: dict[str, Any] = {
        "method": method,
        "hparam": f"{hparam_name}={hparam_value}",
        "seeds": len(runs),
        "id_val": float(np.mean([run["id_val"] for run in runs])),
        "id": float(np.mean(id_test)),
        "id_ci90": interval90(id_test),
        "ood": float(np.mean(ood)),
        "ood_ci90": interval90(ood),
    }
    for split in ood_splits:
        values = [run[f"ood_{split}"] for run in runs]
        row[f"ood_{split}"] = float(np.mean(values))
        row[f"ood_{split}_ci90"] = interval90(values)
    return {**row, **calibration_columns(runs=runs, ood_splits=ood_splits)}


def calibration_columns(
    *, runs: Sequence[Mapping[str, Any]], ood_splits: Sequence[str]
) -> dict[str, float]:
    """Expected calibration error (fractions) over seeds: of ID test (`ece_id`), the mean over
    the OOD splits (`ece_ood`), and each OOD split, with 90% intervals. NaN where a run did
    not record it (results from before ECE existed)."""
    columns = ["ece_id_test", *(f"ece_ood_{split}" for split in ood_splits)]
    values = {column: [float(run.get(column, float("nan"))) for run in runs] for column in columns}
    ood = [
        float(np.mean([values[f"ece_ood_{split}"][i] for split in ood_splits]))
        if ood_splits
        else float("nan")
        for i in range(len(runs))
    ]
    row = {
        "ece_id": float(np.mean(values["ece_id_test"])),
        "ece_id_ci90": interval90(values["ece_id_test"]),
        "ece_ood": float(np.mean(ood)),
        "ece_ood_ci90": interval90(ood),
    }
    for split in ood_splits:
        row[f"ece_ood_{split}"] = float(np.mean(values[f"ece_ood_{split}"]))
        row[f"ece_ood_{split}_ci90"] = interval90(values[f"ece_ood_{split}"])
    return row


def probe_row(*, metrics_files: Sequence[str | Path], ood_splits: Sequence[str]) -> dict[str, Any]:
    runs = [read_json(path) for path in metrics_files]
    values = sorted({f"{run['C']:.3g}" for run in runs})
    return summarize_runs(
        method="lp",
        runs=runs,
        ood_splits=ood_splits,
        hparam_name="C",
        hparam_value="/".join(values),
    )


def selected_row(
    *, method: str, selection_file: str | Path, ood_splits: Sequence[str]
) -> dict[str, Any]:
    selection = read_json(selection_file)
    diverged = len(selection.get("diverged_runs", []))
    total = selection.get("total_runs", len(selection["runs"]))
    if selection.get("all_diverged"):
        return failed_row(
            method=method,
            ood_splits=ood_splits,
            note=f"all {total} runs diverged (collapsed); see {selection_file}",
            diverged=f"{diverged}/{total}",
        )
    hparams = selection.get("hparams") or {"lr": selection["lr"]}
    names = ["lr", *sorted(key for key in hparams if key != "lr")]  # JSON files sort keys
    row = summarize_runs(
        method=method,
        runs=selection["runs"],
        ood_splits=ood_splits,
        hparam_name=names[0],
        hparam_value=", ".join(
            [f"{hparams[names[0]]:g}", *(f"{name}={hparams[name]:g}" for name in names[1:])]
        ),
    )
    return {**row, "diverged": f"{diverged}/{total}"}


def failed_row(
    *, method: str, ood_splits: Sequence[str], note: str, diverged: str = ""
) -> dict[str, Any]:
    """A table row that reports no number: every accuracy NaN, and why in `note`."""
    nan = float("nan")
    row: dict[str, Any] = {
        "method": method,
        "hparam": "",
        "seeds": 0,
        "id_val": nan,
        "id": nan,
        "id_ci90": nan,
        "ood": nan,
        "ood_ci90": nan,
    }
    for split in ood_splits:
        row[f"ood_{split}"] = nan
        row[f"ood_{split}_ci90"] = nan
    return {**row, "diverged": diverged, "note": note}


def soup_row(
    *, method: str, soups_file: str | Path, kind: str, ood_splits: Sequence[str]
) -> dict[str, Any]:
    """The row of one kind of model soup ("uniform" or "greedy") of a method's runs: every
    seed's soup (`run_soups`'s file). hparam: how many runs each seed's soup holds, of how
    many healthy ones."""
    records = read_json(soups_file)["soups"][kind]
    if not records:
        return failed_row(
            method=method,
            ood_splits=ood_splits,
            note=f"no soup: every run of every seed diverged; see {soups_file}",
        )
    counts = "/".join(str(len(record["ingredients"])) for record in records)
    candidates = "/".join(sorted({str(record["candidates"]) for record in records}))
    return summarize_runs(
        method=method,
        runs=records,
        ood_splits=ood_splits,
        hparam_name="runs",
        hparam_value=f"{counts} of {candidates}",
    )


def wiseft_row(
    *, curve_files: Sequence[str | Path], alpha: float, endpoint: str, ood_splits: Sequence[str]
) -> dict[str, Any]:
    """The WiSE-FT row: every seed's curve at a fixed α, interpolating toward `endpoint`'s
    selected run."""
    runs = []
    for path in curve_files:
        # An empty curve: run_wiseft skipped every endpoint (each had only diverged runs).
        try:
            curve = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            curve = pd.DataFrame()
        if curve.empty or endpoint not in set(curve["method"]):
            return failed_row(
                method="wiseft",
                ood_splits=ood_splits,
                note=f"no {endpoint} run to interpolate: every {endpoint} run diverged",
            )
        rows = curve[(curve["method"] == endpoint) & np.isclose(curve["alpha"], alpha)]
        if rows.empty:
            raise ValueError(f"{path}: no row for method {endpoint!r} at alpha {alpha:g}")
        runs.append(rows.iloc[0].to_dict())
    return summarize_runs(
        method="wiseft",
        runs=runs,
        ood_splits=ood_splits,
        hparam_name="alpha",
        hparam_value=f"{alpha:g} ({endpoint} {runs[0]['run']})",
    )


def plot_wiseft(*, curve_files: Sequence[str | Path], out_path: str | Path) -> None:
    """ID test (x) against mean OOD (y) along α, one line per (backbone, method), mean over
    seeds; α = 0 (pretrained + LP head) and α = 1 (the fine-tuned run) are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = []
    for path in curve_files:
        frame = pd.read_csv(path)
        frame["backbone"] = Path(path).parents[2].name
        frames.append(frame)
    curves = pd.concat(frames, ignore_index=True)
    mean = curves.groupby(["backbone", "method", "alpha"], sort=True)[["id_test", "ood"]].mean()
    fig, ax = plt.subplots(figsize=(5, 4))
    for (backbone, method), rows in mean.groupby(level=[0, 1]):
        x, y = 100 * rows["id_test"].to_numpy(), 100 * rows["ood"].to_numpy()
        ax.plot(x, y, "o-", markersize=3, label=f"{method} · {backbone}")
        ax.annotate("α=0", (x[0], y[0]), textcoords="offset points", xytext=(4, -10))
        ax.annotate("α=1", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("ID test accuracy (%)")
    ax.set_ylabel("OOD accuracy, mean of splits (%)")
    ax.set_title("WiSE-FT: (1 − α)·θ₀ + α·θ₁")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def to_markdown(table: pd.DataFrame) -> str:
    """Percentages with their 90% intervals, one row per method."""
    ood_columns = [c for c in table.columns if c.startswith("ood_") and not c.endswith("_ci90")]
    shown = pd.DataFrame(
        {
            key: table[key]
            for key in ("dataset", "backbone", "method", "hparam", "seeds")
            if key in table
        }
    )
    # Flags appear only when a run collapsed, so that healthy tables stay as they were.
    if "diverged" in table and table["diverged"].map(_has_diverged).any():
        shown["diverged"] = table["diverged"].fillna("").astype(str)
    shown["ID"] = [_pct(m, c) for m, c in zip(table["id"], table["id_ci90"], strict=True)]
    shown["OOD (mean)"] = [_pct(m, c) for m, c in zip(table["ood"], table["ood_ci90"], strict=True)]
    for column in ood_columns:
        shown[column.removeprefix("ood_")] = [
            _pct(m, c) for m, c in zip(table[column], table[f"{column}_ci90"], strict=True)
        ]
    for column, title in (("ece_id", "ECE ID"), ("ece_ood", "ECE OOD")):
        if column in table:
            shown[title] = [
                _pct(m, c) for m, c in zip(table[column], table[f"{column}_ci90"], strict=True)
            ]
    if "note" in table and table["note"].fillna("").astype(str).str.len().gt(0).any():
        shown["note"] = table["note"].fillna("").astype(str)
    return shown.to_markdown(index=False) + "\n" + _subset_footnotes(table)


def _subset_footnotes(table: pd.DataFrame) -> str:
    """A line under the table for every split read from a copy smaller than published."""
    if "subset" not in table:
        return ""
    lines = []
    for dataset, value in zip(table["dataset"], table["subset"].fillna(""), strict=True):
        for note in str(value).split(" | ") if value else ():
            line = f"- {dataset}, {note}"
            if line not in lines:
                lines.append(line)
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def subset_notes(
    *,
    data_checks: Mapping[str, str | Path],
    check_splits: Mapping[str, Sequence[Sequence[str]]],
) -> list[str]:
    """ "ood_r: subset copy of imagenet_r test (6 of 30,000 images; allow_subset)" for every
    table split (`check_splits`: column → [(source, source split)]) that a source's check
    (`data_checks`: rule check_dataset's JSON, or a download's folder with MANIFEST.json)
    records as not complete."""
    sizes: dict[str, Mapping[str, Any]] = {}
    for source, path in data_checks.items():
        path = Path(path)
        path = path / "MANIFEST.json" if path.is_dir() else path
        # Downloads from before size checks have no sizes: nothing to mark.
        sizes[source] = read_json(path).get("sizes", {}) if path.exists() else {}
    notes = []
    for column, parts in check_splits.items():
        for source, split in parts:
            found = sizes.get(source, {}).get(split)
            if not found or found.get("complete", True):
                continue
            if found.get("expected_images") is not None:
                counts = f"{found['found_images']:,} of {found['expected_images']:,} images"
            else:
                counts = f"{found['found_classes']} of {found['expected_classes']} classes"
            notes.append(f"{column}: subset copy of {source} {split} ({counts}; allow_subset)")
    return notes


def _has_diverged(value: Any) -> bool:
    """True for a "k/n" count with k > 0."""
    return isinstance(value, str) and "/" in value and not value.startswith("0/")


def _pct(mean: float, ci: float) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * ci:.1f}"


def write_tables(table: pd.DataFrame, *, csv_path: str | Path, md_path: str | Path) -> None:
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(table), encoding="utf-8")


def plot_id_vs_ood(table: pd.DataFrame, *, out_path: str | Path) -> None:
    """ID accuracy (x) against mean OOD accuracy (y), one point per method with 90% bars;
    one panel per dataset and backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table.groupby(["dataset", "backbone"], sort=True))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, ((dataset, backbone), rows) in zip(axes[0], groups, strict=True):
        for _, row in rows.dropna(subset=["id", "ood"]).iterrows():
            ax.errorbar(
                100 * row["id"],
                100 * row["ood"],
                xerr=100 * row["id_ci90"],
                yerr=100 * row["ood_ci90"],
                fmt="s" if "_soup_" in str(row["method"]) else "o",  # soups: squares
                capsize=3,
                label=row["method"],
            )
            ax.annotate(
                row["method"],
                (100 * row["id"], 100 * row["ood"]),
                textcoords="offset points",
                xytext=(5, 5),
            )
        ax.set_xlabel("ID test accuracy (%)")
        ax.set_ylabel("OOD accuracy, mean of splits (%)")
        ax.set_title(f"{dataset} · {backbone}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def aggregate_dataset(
    *,
    dataset: str,
    sources: Mapping[str, str | Sequence[str]],
    ood_splits: Sequence[str],
    csv_path: str | Path,
    md_path: str | Path,
    data_checks: Mapping[str, str | Path] | None = None,
    check_splits: Mapping[str, Sequence[Sequence[str]]] | None = None,
) -> pd.DataFrame:
    """The table of one dataset: a row per (backbone, method), from `sources`, which maps
    "method/backbone" to the probe metrics of every seed (lp), a `select_run` file, for
    wiseft {"curves": [curve.csv per seed], "alpha": α, "endpoint": "ft"}, or for a soup row
    {"soups": its `run_soups` file, "kind": "uniform" or "greedy"}. Splits read from
    a subset copy (see `subset_notes`) get a `subset` column and a line under the table."""
    rows = []
    for key, files in sources.items():
        method, backbone = key.split("/", 1)
        if method == "lp":
            row = probe_row(metrics_files=list(files), ood_splits=ood_splits)
        elif method == "zeroshot":
            row = summarize_runs(
                method="zeroshot",
                runs=[read_json(files)],
                ood_splits=ood_splits,
                hparam_name="templates",
                hparam_value="80",
            )
        elif isinstance(files, Mapping) and "soups" in files:
            row = soup_row(
                method=method,
                soups_file=files["soups"],
                kind=files["kind"],
                ood_splits=ood_splits,
            )
        elif method == "wiseft":
            row = wiseft_row(
                curve_files=list(files["curves"]),
                alpha=float(files["alpha"]),
                endpoint=files["endpoint"],
                ood_splits=ood_splits,
            )
        else:
            row = selected_row(method=method, selection_file=str(files), ood_splits=ood_splits)
        rows.append({"dataset": dataset, "backbone": backbone, **row})
    table = pd.DataFrame(rows)
    notes = subset_notes(data_checks=data_checks or {}, check_splits=check_splits or {})
    if notes:  # a column only then: tables of complete copies stay as they were
        table["subset"] = " | ".join(notes)
    write_tables(table, csv_path=csv_path, md_path=md_path)
    return table


def summary_table(
    *, csv_files: Sequence[str | Path], csv_path: str | Path, md_path: str | Path
) -> pd.DataFrame:
    """All datasets' tables in one."""
    table = pd.concat([pd.read_csv(path) for path in csv_files], ignore_index=True)
    write_tables(table, csv_path=csv_path, md_path=md_path)
    return table
