"""Summary tables (CSV and Markdown), the ID-vs-OOD plot, and the one style per method that
every plot uses."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustft.io import atomic_path, read_json
from robustft.robustness import at_chance

Z_90 = 1.645  # two-sided 90% normal interval, as in Kumar et al. 2022

# One colour and marker per method, the same in every plot and so in the report. Colours of the
# Okabe-Ito palette (told apart with colour-blindness too) and tab10; markers differ as well,
# so that a grey print still tells methods apart.
METHOD_STYLES: dict[str, dict[str, str]] = {
    "lp": {"color": "#0072B2", "marker": "s"},
    "ft": {"color": "#D55E00", "marker": "o"},
    "lpft": {"color": "#009E73", "marker": "D"},
    "wiseft": {"color": "#CC79A7", "marker": "P"},
    "l2sp": {"color": "#E69F00", "marker": "^"},
    "l1sp": {"color": "#56B4E9", "marker": "v"},
    "kd": {"color": "#8C564B", "marker": "<"},
    "lora": {"color": "#9467BD", "marker": ">"},
    "zeroshot": {"color": "#000000", "marker": "*"},
    "baseline": {"color": "#7F7F7F", "marker": "."},
    # Model soups, freeze-embed, surgical, layer-wise lr decay, FLYP: fixed when they arrive.
    "soup_uniform": {"color": "#E7298A", "marker": "X"},
    "soup_greedy": {"color": "#66A61E", "marker": "h"},
    "freeze_embed": {"color": "#A6761D", "marker": "p"},
    "surgical": {"color": "#17BECF", "marker": "d"},
    "llrd": {"color": "#BCBD22", "marker": "H"},
    "flyp": {"color": "#393B79", "marker": "8"},
}
# Methods not listed above (a user's own) get one of these, chosen from their name, so that
# they too look the same in every plot and every run.
_MORE_COLORS = ("#D62728", "#2CA02C", "#FF9896", "#98DF8A", "#C49C94", "#F7B6D2", "#C5B0D5")
_MORE_MARKERS = ("o", "s", "^", "v", "D", "P", "X")


def method_style(method: str) -> dict[str, str]:
    """{"color": ..., "marker": ...} of a method, for every plot of it."""
    if method in METHOD_STYLES:
        return dict(METHOD_STYLES[method])
    for kind in ("soup_uniform", "soup_greedy"):  # ft_soup_greedy: the soup's marker, the
        base = method.removesuffix(f"_{kind}")  # souped method's colour
        if base != method:
            return {"color": method_style(base)["color"], "marker": METHOD_STYLES[kind]["marker"]}
    code = zlib.crc32(method.encode("utf-8"))
    return {
        "color": _MORE_COLORS[code % len(_MORE_COLORS)],
        "marker": _MORE_MARKERS[(code // len(_MORE_COLORS)) % len(_MORE_MARKERS)],
    }


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
    seeds of that, with its interval. Runs at chance on ID val and ID test
    (`robustness.at_chance`, from what metrics.json records) give a row without numbers that
    says so in `note`.
    """
    if not runs:
        raise ValueError(f"no runs for method {method!r}")
    note = at_chance(runs)
    if note:
        failed = failed_row(method=method, ood_splits=ood_splits, note=note)
        return {**failed, "hparam": f"{hparam_name}={hparam_value}", "seeds": len(runs)}
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
    backbones = list(dict.fromkeys(mean.index.get_level_values(0)))
    marked: set[str] = set()
    for (backbone, method), rows in mean.groupby(level=[0, 1]):
        x, y = 100 * rows["id_test"].to_numpy(), 100 * rows["ood"].to_numpy()
        style = method_style(method)
        ax.plot(
            x,
            y,
            linestyle=("-", "--", ":", "-.")[backbones.index(backbone) % 4],
            markersize=4,
            label=f"{method} · {backbone}",
            **style,
        )
        if backbone not in marked:  # θ₀ is the same for every method: mark it once
            marked.add(backbone)
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


# Mark the point labels of the ID-vs-OOD plot and their lines to the points.
LABEL_GID, LABEL_LINE_GID = "method-label", "method-label-line"


def id_vs_ood_figure(table: pd.DataFrame) -> Any:
    """ID accuracy (x) against mean OOD accuracy (y), one point per method with 90% bars, in
    the method's colour and marker; one panel per dataset and backbone. Labels are moved
    apart (adjustText) so that none overlaps another, joined to their point by a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table.groupby(["dataset", "backbone"], sort=True))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.8 * len(groups), 4.2), squeeze=False)
    for ax, ((dataset, backbone), rows) in zip(axes[0], groups, strict=True):
        points = rows.dropna(subset=["id", "ood"])
        for _, row in points.iterrows():
            style = method_style(row["method"])
            ax.errorbar(
                100 * row["id"],
                100 * row["ood"],
                xerr=100 * row["id_ci90"],
                yerr=100 * row["ood_ci90"],
                fmt=style["marker"],
                color=style["color"],
                markersize=7,
                capsize=3,
                label=row["method"],
            )
        ax.set_xlabel("ID test accuracy (%)")
        ax.set_ylabel("OOD accuracy, mean of splits (%)")
        ax.set_title(f"{dataset} · {backbone}")
        ax.grid(alpha=0.3)
        ax.margins(0.12)  # room for the labels inside the axes
    panels = [
        (ax, rows.dropna(subset=["id", "ood"]))
        for ax, (_, rows) in zip(axes[0], groups, strict=True)
    ]
    # Placing labels works in display coordinates, so after the layout. A legend beside a
    # panel too crowded for labels changes the layout: then every label is placed again.
    crowded: list[Any] = []
    while True:
        fig.tight_layout()
        newly = [ax for ax, points in panels if ax not in crowded and not _label_points(ax, points)]
        if not newly:
            return fig
        crowded += newly
        for ax, _ in panels:
            _remove_labels(ax)
        for ax in newly:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def _error_bar_points(points: pd.DataFrame, per_bar: int = 9) -> list[tuple[float, float]]:
    """Points along every error bar (in %), which labels keep away from as from markers."""
    steps = np.linspace(-1.0, 1.0, per_bar)
    found = []
    for row in points.to_dict("records"):
        x, y = 100 * row["id"], 100 * row["ood"]
        found += [(x + step * 100 * row["id_ci90"], y) for step in steps]
        found += [(x, y + step * 100 * row["ood_ci90"]) for step in steps]
    return found


def _label_points(ax: Any, points: pd.DataFrame) -> bool:
    """Label each point with its method, moved apart by adjustText, away from the points and
    their error bars (a fixed number of steps, so that the same table gives the same figure on
    any machine). False, and no label, where points crowd so that labels would still overlap:
    then a legend names them (colours and markers are the method's own in every plot)."""
    if points.empty:
        return True
    from adjustText import adjust_text

    x, y = list(100 * points["id"]), list(100 * points["ood"])
    before = set(ax.get_children())
    texts = [
        ax.text(px, py, label, fontsize=9, color=method_style(label)["color"], gid=LABEL_GID)
        for px, py, label in zip(x, y, points["method"], strict=True)
    ]
    avoid = _error_bar_points(points)
    adjust_text(
        texts,
        x=[*x, *(point[0] for point in avoid)],
        y=[*y, *(point[1] for point in avoid)],
        ax=ax,
        iter_lim=300,
        expand=(1.2, 1.4),
        force_static=(0.3, 0.5),
        arrowprops={"arrowstyle": "-", "color": "0.4", "linewidth": 0.6},
    )
    for artist in set(ax.get_children()) - before - set(texts):  # the lines to the points
        artist.set_gid(LABEL_LINE_GID)
    if labels_overlap(texts):
        _remove_labels(ax)
        return False
    return True


def _remove_labels(ax: Any) -> None:
    for artist in list(ax.get_children()):
        if artist.get_gid() in (LABEL_GID, LABEL_LINE_GID):
            artist.remove()


def labels_overlap(texts: Sequence[Any]) -> bool:
    """Whether any two of the drawn texts' boxes overlap."""
    if not texts:
        return False
    renderer = texts[0].figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in texts]
    return any(
        first.overlaps(second) for index, first in enumerate(boxes) for second in boxes[index + 1 :]
    )


def save_figure(fig: Any, *, png: str | Path, svg: str | Path | None = None) -> None:
    """Write the figure as PNG (and SVG), each atomically; an SVG carries no date and no random
    id, so the same figure gives the same file."""
    import matplotlib.pyplot as plt

    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    if svg is not None:
        # A fixed salt for the SVG's element ids, which are random otherwise.
        with atomic_path(svg) as tmp, plt.rc_context({"svg.hashsalt": "robustft"}):
            fig.savefig(tmp, format="svg", metadata={"Date": None})
    plt.close(fig)


def plot_id_vs_ood(
    table: pd.DataFrame, *, out_path: str | Path, svg_path: str | Path | None = None
) -> None:
    """`id_vs_ood_figure` as PNG (`out_path`) and, with `svg_path`, SVG."""
    save_figure(id_vs_ood_figure(table), png=out_path, svg=svg_path)


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
