"""ER against the pretraining data (config key er_pretraining): the pools the variant backbones
are pretrained on, their jobs in the default DAG, and the side-by-side table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustft.data.toyshift_format import DOMAINS, ImageSplit
from robustft.pretraining_pools import (
    er_pretraining_table,
    pool_backbone_name,
    select_pool,
    write_er_pretraining,
)
from robustft.robustness import logit, sigmoid

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
# config.yaml's pools: a quarter of the pool (size) and one domain alone (diversity).
POOLS = ("toyresnet-pool0.25-all", "toyresnet-pool0.6-real")


def _split(per_group: dict[str, int], classes: int = 3) -> ImageSplit:
    """A shuffled pretraining split with `per_group[domain]` images per class and domain;
    the first pixel numbers the images (`_number`), so that a subset can be traced back."""
    labels, domains = [], []
    for label in range(classes):
        for domain, count in per_group.items():
            labels += [label] * count
            domains += [DOMAINS.index(domain)] * count
    order = np.random.default_rng(1).permutation(len(labels))
    images = np.zeros((len(labels), 2, 2, 3), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.divmod(np.arange(len(labels)), 256)
    return ImageSplit(
        images=images,
        labels=np.asarray(labels, dtype=np.int64)[order],
        domains=np.asarray(domains, dtype=np.int64)[order],
    )


def _number(split: ImageSplit) -> list[int]:
    return (256 * split.images[:, 0, 0, 0].astype(int) + split.images[:, 0, 0, 1]).tolist()


def _counts(split: ImageSplit) -> dict[tuple[int, str], int]:
    pairs = zip(split.labels.tolist(), split.domains.tolist(), strict=True)
    counts: dict[tuple[int, str], int] = {}
    for label, domain in pairs:
        counts[label, DOMAINS[domain]] = counts.get((label, DOMAINS[domain]), 0) + 1
    return counts


def test_a_pool_has_the_requested_images_per_class_in_the_requested_domains() -> None:
    split = _split({"real": 40, "clipart": 20, "painting": 20, "sketch": 14})
    pool = select_pool(split=split, fraction=0.25, domains=["real", "sketch"], seed=0)
    expected = {(label, "real"): 10 for label in range(3)}
    expected.update({(label, "sketch"): 4 for label in range(3)})  # round(0.25 · 14) = 4
    assert _counts(pool) == expected
    # Each image is one of the split's, once, with its own label and domain, in split order.
    position = {number: row for row, number in enumerate(_number(split))}
    rows = [position[number] for number in _number(pool)]
    assert rows == sorted(set(rows))
    assert (split.labels[rows] == pool.labels).all() and (split.domains[rows] == pool.domains).all()
    # The same seed draws the same pool; another seed another one of the same size.
    again = select_pool(split=split, fraction=0.25, domains=["sketch", "real"], seed=0)
    assert np.array_equal(again.images, pool.images)
    other = select_pool(split=split, fraction=0.25, domains=["real", "sketch"], seed=1)
    assert _counts(other) == expected and not np.array_equal(other.images, pool.images)


def test_the_whole_pool_is_the_split_and_a_small_group_keeps_one_image() -> None:
    split = _split({"real": 5, "clipart": 1, "painting": 1, "sketch": 1})
    whole = select_pool(split=split, fraction=1.0, domains=list(DOMAINS), seed=3)
    assert np.array_equal(whole.images, split.images)
    small = select_pool(split=split, fraction=0.1, domains=["real", "clipart"], seed=0)
    assert set(_counts(small).values()) == {1}  # round(0.5) and round(0.1): one each
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        select_pool(split=split, fraction=0.0, domains=["real"], seed=0)
    with pytest.raises(ValueError, match="unknown toyshift domain"):
        select_pool(split=split, fraction=0.5, domains=["photo"], seed=0)


def test_a_pool_backbone_is_named_from_its_settings_in_one_spelling() -> None:
    assert pool_backbone_name(base="toyresnet", fraction=0.25, domains=list(DOMAINS)) == (
        "toyresnet-pool0.25-all"
    )
    assert pool_backbone_name(base="toyresnet", fraction=2.5e-1, domains=["sketch", "real"]) == (
        pool_backbone_name(base="toyresnet", fraction="0.25", domains=["real", "sketch"])
    )
    assert pool_backbone_name(base="toyresnet", fraction=1, domains=["real"]) == (
        "toyresnet-pool1-real"
    )


LINE = {"slope": 0.5, "intercept": -1.0, "r_value": 0.9, "models": 6, "id_range": [0.2, 0.9]}


def _run(folder: Path, *, history: list[dict], best_epoch: int) -> Path:
    folder.mkdir(parents=True)
    pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
    best = next(row for row in history if row["epoch"] == best_epoch)
    metrics = {"method": "ft", "run": "lr0.03", "seed": 0, "best_epoch": best_epoch, **best}
    (folder / "metrics.json").write_text(json.dumps({**metrics, "data_fingerprint": "abc"}))
    return folder


def _epoch(epoch: int, id_test: float, a: float, b: float) -> dict:
    return {"epoch": epoch, "id_val": id_test, "id_test": id_test, "ood_a": a, "ood_b": b}


def _expected_er(id_test: float, a: float, b: float) -> float:
    predicted = sigmoid(LINE["slope"] * logit(id_test) + LINE["intercept"])
    return 100 * ((a + b) / 2 - float(predicted))


def test_the_table_puts_each_backbone_s_pool_and_er_side_by_side(tmp_path: Path) -> None:
    line = tmp_path / "line.json"
    line.write_text(json.dumps({"a": LINE, "b": LINE, "mean": LINE}))
    nan = float("nan")
    small = _run(
        tmp_path / "small",
        history=[
            _epoch(0, 0.1, 0.1, 0.1),
            {**_epoch(1, 0.5, nan, nan), "id_test": nan},  # not scored (eval_every)
            _epoch(2, 0.8, 0.5, 0.3),
            _epoch(3, 0.85, 0.4, 0.3),
        ],
        best_epoch=2,
    )
    whole = _run(
        tmp_path / "whole",
        history=[_epoch(0, 0.1, 0.1, 0.1), _epoch(2, 0.95, 0.8, 0.7), _epoch(3, 0.9, 0.8, 0.6)],
        best_epoch=2,
    )
    runs = {
        "toyresnet": {
            "run_dir": whole,
            "pool": {
                "fraction": 1.0,
                "domains": list(DOMAINS),
                "images": 80,
                "images_per_class": 40,
            },
        },
        "toyresnet-pool0.25-real": {
            "run_dir": small,
            "pool": {"fraction": 0.25, "domains": ["real"], "images": 20, "images_per_class": 10},
        },
    }
    table = er_pretraining_table(dataset="toy", ood_splits=["a", "b"], line_file=line, runs=runs)
    # Smallest pool first; one row per backbone.
    assert table["backbone"].tolist() == ["toyresnet-pool0.25-real", "toyresnet"]
    small_row, whole_row = table.iloc[0], table.iloc[1]
    assert small_row["domains"] == "real" and small_row["pool_images"] == 20
    assert whole_row["domains"] == "+".join(DOMAINS) and whole_row["n_domains"] == 4
    assert small_row["best_epoch"] == 2 and small_row["final_epoch"] == 3
    assert small_row["id_best"] == 0.8 and small_row["ood_best"] == pytest.approx(0.4)
    assert small_row["er_pts_best"] == pytest.approx(_expected_er(0.8, 0.5, 0.3))
    assert (small_row["ood_a_best"], small_row["ood_b_best"]) == (0.5, 0.3)
    assert small_row["er_pts_final"] == pytest.approx(_expected_er(0.85, 0.4, 0.3))
    assert whole_row["er_pts_best"] == pytest.approx(_expected_er(0.95, 0.8, 0.7))
    assert whole_row["er_pts_final"] == pytest.approx(_expected_er(0.9, 0.8, 0.6))
    # ER of every scored epoch; an epoch without test/OOD scores has none.
    assert "er_pts_epoch1" not in table
    assert small_row["er_pts_epoch0"] == pytest.approx(_expected_er(0.1, 0.1, 0.1))
    assert whole_row["er_pts_epoch3"] == pytest.approx(_expected_er(0.9, 0.8, 0.6))
    # The best epoch's 0.95 ID lies beyond the baseline models' 0.2-0.9: flagged.
    assert bool(whole_row["outside_line_range"]) and not bool(small_row["outside_line_range"])
    write_er_pretraining(table=table, csv_path=tmp_path / "t.csv", plot_path=tmp_path / "t.png")
    assert len(pd.read_csv(tmp_path / "t.csv")) == 2
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def _dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "-n", "--configfile", str(ROOT / "config.yaml"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _jobs(output: str) -> list[tuple[str, str]]:
    """(rule, wildcards line) of every job a dry run plans."""
    return re.findall(r"^rule (\w+):\n(?:    .*\n)*?    wildcards: (.*)$", output, re.M)


@pytest.mark.workflow
def test_the_default_dag_pretrains_and_finetunes_each_pool_backbone_once(tmp_path: Path) -> None:
    result = _dry_run(tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = _jobs(result.stdout)
    for name in POOLS:
        assert jobs.count(("pretrain_backbone", f"backbone={name}")) == 1
        finetuned = [w for rule, w in jobs if rule == "finetune" and f"backbone={name}," in w]
        assert finetuned == [f"method=ft, backbone={name}, dataset=toyshift, run=lr0.03, seed=0"]
        assert f"backbone={name}" not in " ".join(w for rule, w in jobs if rule == "fit_probe")
    assert [w for rule, w in jobs if rule == "er_pretraining"] == ["dataset=toyshift"]
    # Switched off: none of their jobs, the rest of the DAG as it was.
    off = _dry_run(tmp_path, "--config", "er_pretraining={enabled: false}")
    assert off.returncode == 0, off.stderr
    off_jobs = _jobs(off.stdout)
    assert not [job for job in off_jobs if "-pool" in job[1] or job[0] == "er_pretraining"]
    assert sorted(job for job in jobs if "-pool" not in job[1] and job[0] != "er_pretraining") == (
        sorted(off_jobs)
    )


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("pools", "named"),
    [
        ("[{fraction: 0.5, domains: [photo]}]", "er_pretraining.pools[0].domains[0]"),
        ("[{fraction: 0, domains: [real]}]", "er_pretraining.pools[0].fraction"),
        ("[{fraction: 1.5, domains: [real]}]", "er_pretraining.pools[0].fraction"),
        (
            "[{fraction: 0.5, domains: [real, sketch]}, {fraction: 0.5, domains: [sketch, real]}]",
            "er_pretraining.pools[1]",
        ),
    ],
)
def test_a_bad_pool_stops_the_run_with_one_line_naming_the_key(
    tmp_path: Path, pools: str, named: str
) -> None:
    result = _dry_run(tmp_path, "--config", f"er_pretraining={{pools: {pools}}}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("robustft:")]
    assert len(errors) == 1 and f"'{named}" in errors[0], result.stderr


@pytest.mark.workflow
def test_a_tiny_run_pretrains_the_pool_backbone_on_its_pool_and_tables_its_er(
    tmp_path: Path,
) -> None:
    pools = "{pools: [{fraction: 0.5, domains: [sketch, real]}]}"
    result = subprocess.run(
        [
            *SNAKEMAKE,
            "--cores",
            "2",
            "--configfile",
            str(ROOT / "configs" / "tiny.yaml"),
            "--config",
            "methods=[ft]",
            "seeds=[0]",
            f"er_pretraining={pools}",
            "--",
            "results/analysis/er_pretraining/toyshift.csv",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    name = "toyresnet-pool0.5-real-sketch"
    meta = json.loads((tmp_path / "resources" / "models" / name / "meta.json").read_text())
    # tiny.yaml: 40 real and 20 sketch images per class, 5% held out: 38 and 19, halved.
    assert meta["pretrain"]["pool"] == {
        "fraction": 0.5,
        "images": 6 * (19 + 10),
        "images_per_class": 29.0,
        "domains": ["real", "sketch"],
    }
    table = pd.read_csv(tmp_path / "results" / "analysis" / "er_pretraining" / "toyshift.csv")
    assert table["backbone"].tolist() == [name, "toyresnet"]
    assert table["pool_images"].tolist() == [6 * 29, 6 * 95]  # the whole pool: 38 + 19 · 3
    assert table["run"].tolist() == ["lr0.03", "lr0.03"]
    assert table[["er_pts_best", "er_pts_final"]].notna().all().all()
    assert (tmp_path / "results" / "plots" / "er_pretraining_toyshift.png").exists()
