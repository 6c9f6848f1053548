"""The tidy table of every run (robustft.tidy) on a hand-made sweep: flags, ECE and ER."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from robustft.io import write_csv, write_json
from robustft.robustness import BaselineLine, effective_robustness
from robustft.tidy import runs_table, write_runs_table


def make_run(root, *, run, lr, seed, best_epoch, history):
    folder = root / "finetune" / run / f"seed{seed}"
    write_csv(folder / "history.csv", history)
    write_json(
        folder / "metrics.json",
        {
            "run": run,
            "lr": lr,
            "hparams": {"lr": lr},
            "seed": seed,
            "best_epoch": best_epoch,
            "diverged": False,
            **history[best_epoch],
        },
    )
    return str(folder / "metrics.json")


def epoch(number, id_val, id_test, ood_a, **extra):
    return {"epoch": number, "id_val": id_val, "id_test": id_test, "ood_a": ood_a, **extra}


@pytest.fixture
def sweep(tmp_path):
    """ft with lr 0.1 (chosen, best epoch 1; its history records ECE) and lr 1 (not chosen),
    one probe, and a baseline line for split a."""
    chosen = make_run(
        tmp_path,
        run="lr0.1",
        lr=0.1,
        seed=0,
        best_epoch=1,
        history=[
            epoch(0, 0.5, 0.5, 0.4, ece_id_val=0.2, ece_id_test=0.25, ece_ood_a=0.3),
            epoch(1, 0.8, 0.7, 0.5, ece_id_val=0.1, ece_id_test=0.15, ece_ood_a=0.35),
        ],
    )
    other = make_run(
        tmp_path,
        run="lr1",
        lr=1.0,
        seed=0,
        best_epoch=0,
        history=[epoch(0, 0.6, 0.6, 0.3), epoch(1, 0.4, math.nan, math.nan)],
    )
    write_json(tmp_path / "selected.json", {"run": "lr0.1", "lr": 0.1})
    write_json(
        tmp_path / "probe/seed0/metrics.json",
        {"C": 0.1, "id_val": 0.6, "id_test": 0.55, "ood_a": 0.45},
    )
    write_json(tmp_path / "line.json", {"a": {"slope": 1.0, "intercept": -0.5}})
    return {
        "toy": {
            "ood_splits": ["a"],
            "finetune": {
                "ft/net": {"selection": str(tmp_path / "selected.json"), "metrics": [chosen, other]}
            },
            "probes": {"net": [str(tmp_path / "probe/seed0/metrics.json")]},
            "er_line": str(tmp_path / "line.json"),
        }
    }


def test_rows_flags_ece_and_er(sweep):
    runs = runs_table(datasets=sweep)
    ft = runs[runs["method"] == "ft"]
    # lr0.1: 2 epochs × 3 splits; lr1: epoch 0 × 3, epoch 1 only id_val (others unscored)
    assert len(ft) == 6 + 3 + 1
    chosen = ft[ft["run"] == "lr0.1"]
    assert chosen["selected_run"].all() and not ft[ft["run"] == "lr1"]["selected_run"].any()
    picked = ft[ft["selected"]]
    assert set(picked["epoch"]) == {1} and set(picked["run"]) == {"lr0.1"}
    assert dict(zip(picked["split"], picked["ece"], strict=True)) == {
        "id_val": 0.1,
        "id_test": 0.15,
        "ood_a": 0.35,
    }
    assert ft[ft["run"] == "lr1"]["ece"].isna().all()  # a history without ECE columns
    line = BaselineLine(slope=1.0, intercept=-0.5)
    ood = picked[picked["split"] == "ood_a"].iloc[0]
    assert ood["er_pts"] == pytest.approx(
        100 * float(effective_robustness(id_accuracy=0.7, ood_accuracy=0.5, line=line))
    )
    assert picked[picked["distribution"] == "id"]["er_pts"].isna().all()
    probe = runs[runs["method"] == "lp"]
    assert len(probe) == 3 and probe["selected"].all() and set(probe["C"]) == {0.1}
    assert probe["epoch"].isna().all()


def test_parquet_keeps_types_and_csv_matches(sweep, tmp_path):
    runs = runs_table(datasets=sweep)
    write_runs_table(runs, parquet_path=tmp_path / "runs.parquet", csv_path=tmp_path / "runs.csv")
    back = pd.read_parquet(tmp_path / "runs.parquet")
    assert str(back["epoch"].dtype) == "Int64" and back["selected"].dtype == bool
    pd.testing.assert_frame_equal(back, runs, check_dtype=False)
    assert pd.read_csv(tmp_path / "runs.csv").shape == runs.shape
