"""One tidy table of everything the workflow measured: results/tables/runs.parquet (and .csv).

One row per (dataset, backbone, method, hyper-parameters, seed, epoch, split), with the
split's accuracy, its ECE where the run recorded one (`ece_<split>` columns), its effective
robustness where the dataset has a baseline line, and the flags `selected_run` (the run a
method's selection chose: every epoch of it) and `selected` (the rows the summary tables
report: the selected run at its best epoch, the probe at its chosen C, WiSE-FT at the reported
α). docs/tidy-table.md shows how to read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustft.io import atomic_path, read_json
from robustft.robustness import BaselineLine, effective_robustness

# The identifying columns, in order; hyper-parameter columns (lr, C, alpha, ...) follow `hparam`.
KEYS = ("dataset", "backbone", "method", "run", "hparam")
MEASURES = (
    "seed",
    "epoch",
    "split",
    "distribution",
    "accuracy",
    "ece",
    "er_pts",
    "selected_run",
    "selected",
    "diverged",
)


def runs_table(*, datasets: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """The tidy table of every dataset. Each value of `datasets` names its files:

    - `ood_splits`: the dataset's OOD splits;
    - `finetune`: {"method/backbone": {"selection": select_run file, "metrics": [metrics.json
      of every run of the sweep]}}, each run's history.csv beside its metrics.json;
    - `probes`: {backbone: [probe metrics.json per seed]};
    - `wiseft`: {backbone: {"curves": [curve.csv per seed], "alpha": reported α,
      "endpoint": the method of the reported row}};
    - `zeroshot`: {backbone: metrics.json};
    - `soups`: {"method/backbone": {"soups": `run_soups` file, "kind": uniform or greedy}},
      the method named like its table row (ft_soup_greedy);
    - `er_line`: the effective-robustness lines (rule effective_robustness), or None.
    """
    rows: list[dict[str, Any]] = []
    for dataset, sources in datasets.items():
        ood_splits = list(sources["ood_splits"])
        lines = _read_lines(sources.get("er_line"))
        add = _Rows(rows, dataset=dataset, ood_splits=ood_splits, lines=lines)
        for backbone, files in (sources.get("probes") or {}).items():
            for path in files:
                metrics = read_json(path)
                add.record(
                    metrics,
                    backbone=backbone,
                    method="lp",
                    run=f"C{metrics['C']:g}",
                    hparam=f"C={metrics['C']:.3g}",
                    hparams={"C": float(metrics["C"])},
                    seed=int(Path(path).parent.name.removeprefix("seed")),
                    selected_run=True,
                    selected=True,
                )
        for key, files in (sources.get("finetune") or {}).items():
            method, backbone = key.split("/", 1)
            selection = read_json(files["selection"])
            for path in files["metrics"]:
                add.finetune_run(path, backbone=backbone, method=method, selection=selection)
        for backbone, wiseft in (sources.get("wiseft") or {}).items():
            for path in wiseft["curves"]:
                add.wiseft_curve(
                    path,
                    backbone=backbone,
                    alpha=float(wiseft["alpha"]),
                    endpoint=wiseft["endpoint"],
                )
        for key, soup in (sources.get("soups") or {}).items():
            method, backbone = key.split("/", 1)
            for record in read_json(soup["soups"])["soups"][soup["kind"]]:
                add.record(
                    record,
                    backbone=backbone,
                    method=method,
                    run=f"soup_{soup['kind']}",
                    hparam=f"runs={len(record['ingredients'])} of {record['candidates']}",
                    hparams={},
                    seed=int(record["seed"]),
                    selected_run=True,
                    selected=True,
                )
        for backbone, path in (sources.get("zeroshot") or {}).items():
            add.record(
                read_json(path),
                backbone=backbone,
                method="zeroshot",
                run="templates80",
                hparam="templates=80",
                hparams={},
                seed=None,
                selected_run=True,
                selected=True,
            )
    return _frame(rows)


class _Rows:
    """Appends the rows of one dataset's records: one row per split of each record."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        *,
        dataset: str,
        ood_splits: Sequence[str],
        lines: Mapping[str, BaselineLine],
    ) -> None:
        self.rows = rows
        self.dataset = dataset
        self.splits = ["id_val", "id_test", *(f"ood_{split}" for split in ood_splits)]
        self.lines = lines

    def record(
        self,
        record: Mapping[str, Any],
        *,
        backbone: str,
        method: str,
        run: str,
        hparam: str,
        hparams: Mapping[str, float],
        seed: int | None,
        selected_run: bool,
        selected: bool,
        epoch: int | None = None,
        diverged: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        id_test = _number(record.get("id_test"))
        for split in self.splits:
            accuracy = _number(record.get(split))
            if math.isnan(accuracy):  # not scored at this epoch (finetune.eval_every)
                continue
            is_ood = split.startswith("ood_")
            line = self.lines.get(split.removeprefix("ood_")) if is_ood else None
            er = math.nan
            if line is not None and not math.isnan(id_test):
                er = 100 * float(
                    effective_robustness(id_accuracy=id_test, ood_accuracy=accuracy, line=line)
                )
            self.rows.append(
                {
                    "dataset": self.dataset,
                    "backbone": backbone,
                    "method": method,
                    "run": run,
                    "hparam": hparam,
                    **hparams,
                    **(extra or {}),
                    "seed": seed,
                    "epoch": epoch,
                    "split": split,
                    "distribution": "ood" if is_ood else "id",
                    "accuracy": accuracy,
                    "ece": _ece(record, split),
                    "er_pts": er,
                    "selected_run": selected_run,
                    "selected": selected,
                    "diverged": diverged,
                }
            )

    def finetune_run(
        self, metrics_path: str | Path, *, backbone: str, method: str, selection: Mapping
    ) -> None:
        """Every scored epoch of one run of a sweep (its history.csv)."""
        metrics = read_json(metrics_path)
        hparams = {
            k: float(v) for k, v in (metrics.get("hparams") or {"lr": metrics["lr"]}).items()
        }
        names = ["lr", *sorted(key for key in hparams if key != "lr")]
        hparam = ", ".join(f"{name}={hparams[name]:g}" for name in names)
        chosen = selection.get("run") is not None and selection["run"] == metrics["run"]
        history = pd.read_csv(Path(metrics_path).parent / "history.csv")
        for record in history.to_dict("records"):
            epoch = int(record["epoch"])
            self.record(
                record,
                backbone=backbone,
                method=method,
                run=metrics["run"],
                hparam=hparam,
                hparams=hparams,
                seed=int(metrics["seed"]),
                epoch=epoch,
                selected_run=chosen,
                selected=chosen and epoch == int(metrics["best_epoch"]),
                diverged=bool(metrics.get("diverged")),
            )

    def wiseft_curve(self, path: str | Path, *, backbone: str, alpha: float, endpoint: str) -> None:
        """Every (endpoint method, α) of one seed's WiSE-FT curve; the reported α of the
        reported endpoint is the selected row."""
        try:
            curve = pd.read_csv(path)
        except pd.errors.EmptyDataError:  # every endpoint's sweep diverged: nothing to add
            return
        for record in curve.to_dict("records"):
            reported = record["method"] == endpoint and bool(np.isclose(record["alpha"], alpha))
            self.record(
                record,
                backbone=backbone,
                method="wiseft",
                run=str(record["run"]),
                hparam=f"alpha={record['alpha']:g} ({record['method']} {record['run']})",
                hparams={"alpha": float(record["alpha"])},
                extra={"endpoint": record["method"]},
                seed=int(record["seed"]),
                selected_run=reported,
                selected=reported,
            )


def _read_lines(path: str | Path | None) -> dict[str, BaselineLine]:
    if not path:
        return {}
    return {
        key: BaselineLine(slope=float(line["slope"]), intercept=float(line["intercept"]))
        for key, line in read_json(path).items()
    }


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ece(record: Mapping[str, Any], split: str) -> float:
    """The split's expected calibration error, as `ece_id_test` or `ece_test`, when recorded."""
    for key in (f"ece_{split}", f"ece_{split.split('_', 1)[1]}"):
        if key in record:
            return _number(record[key])
    return math.nan


def _frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(list(rows))
    if table.empty:
        return pd.DataFrame(columns=[*KEYS, *MEASURES])
    # The swept values (lr first, then C, alpha, lambda, rank, ... as they appear), then what
    # else names a row (WiSE-FT's endpoint method).
    hparam_columns = [c for c in table.columns if c not in (*KEYS, *MEASURES, "endpoint")]
    hparam_columns.sort(key=lambda column: column != "lr")
    hparam_columns += ["endpoint"] if "endpoint" in table.columns else []
    table = table[[*KEYS, *hparam_columns, *MEASURES]]
    for column in ("seed", "epoch"):
        table[column] = table[column].astype("Int64")
    for column in ("selected_run", "selected", "diverged"):
        table[column] = table[column].astype(bool)
    return table.reset_index(drop=True)


def write_runs_table(
    table: pd.DataFrame, *, parquet_path: str | Path, csv_path: str | Path
) -> None:
    """The table as Parquet (types kept: nullable integers, booleans) and CSV."""
    with atomic_path(parquet_path) as tmp:
        table.to_parquet(tmp, index=False, engine="pyarrow")
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
