"""Run selection: the best point of a method's sweep by mean ID val accuracy over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustft.config import hparam_folder
from robustft.io import read_json, write_json


def select_run(*, metrics_files: Sequence[str | Path], out_path: str | Path) -> dict[str, Any]:
    """Best hyper-parameters (lr, and a method's own α, λ or rank) by mean ID val accuracy over
    seeds; ties go to the first in sorted order (the smaller lr, then the smaller other value).

    A point of the sweep with a diverged (collapsed) run is never chosen: its runs are listed
    under `diverged_runs`. When every point has one, `all_diverged` is true and `runs` is
    empty, so that no table reports a collapsed run as a number.
    """
    by_point: dict[tuple[tuple[str, float], ...], list[dict[str, Any]]] = {}
    for path in metrics_files:
        metrics = read_json(path)
        missing = [key for key in ("lr", "seed", "id_val") if key not in metrics]
        if missing:
            raise ValueError(f"{path}: run metrics lack {missing}")
        metrics["path"] = str(path)
        hparams = metrics.get("hparams") or {"lr": metrics["lr"]}
        key = tuple((name, float(value)) for name, value in hparams.items())
        by_point.setdefault(key, []).append(metrics)
    if not by_point:
        raise ValueError("no runs to select from")
    _check_same_origin([run for runs in by_point.values() for run in runs])
    diverged = [
        {
            "run": hparam_folder(dict(point)),
            "seed": run["seed"],
            "path": run["path"],
            "collapse": run.get("collapse") or "diverged",
        }
        for point, runs in by_point.items()
        for run in runs
        if run.get("diverged")
    ]
    means = {
        point: float(np.mean([run["id_val"] for run in runs])) for point, runs in by_point.items()
    }
    ordered = sorted(means, key=lambda point: tuple(value for _, value in point))
    healthy = [point for point in ordered if not any(r.get("diverged") for r in by_point[point])]
    selection: dict[str, Any] = {
        "total_runs": sum(len(runs) for runs in by_point.values()),
        "diverged_runs": sorted(diverged, key=lambda run: (run["run"], run["seed"])),
        "all_diverged": not healthy,
        "mean_id_val_by_run": {hparam_folder(dict(point)): means[point] for point in ordered},
    }
    if healthy:
        best = max(healthy, key=lambda point: means[point])
        selection |= {
            "lr": dict(best)["lr"],
            "hparams": dict(best),
            "run": hparam_folder(dict(best)),
            "mean_id_val": means[best],
            "runs": sorted(by_point[best], key=lambda run: run["seed"]),
        }
    else:
        selection |= {"lr": None, "hparams": None, "run": None, "runs": []}
    write_json(out_path, selection)
    return selection


def _check_same_origin(runs: Sequence[Mapping[str, Any]]) -> None:
    """The runs of one sweep come from one backbone's weights and one copy of the data: a
    run left from other weights or data must not win the selection."""
    from robustft.provenance import DATA_FINGERPRINT, WEIGHTS_SHA256, check_same

    for name in (WEIGHTS_SHA256, DATA_FINGERPRINT):
        check_same(records=[(run["path"], run) for run in runs], name=name, rerun="finetune")
