"""The workflow as a user runs it: dry runs, a tiny end-to-end run, caching and config errors."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from robustft.robustness import CHANCE_KEYS, logit

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]

pytestmark = pytest.mark.workflow
FINETUNED = ("ft", "lpft", "l2sp", "l1sp", "kd", "lora")  # configs/tiny.yaml's fine-tuned methods


def snakemake(*args, cwd, check=True, timeout=600):
    result = subprocess.run(
        [*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


def planned_jobs(output):
    """{rule: count} from the 'Job stats' table of a dry run."""
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal", output, re.S)
    if match is None:
        return {}
    jobs = {}
    for line in match.group(1).splitlines():
        name, count = line.split()
        jobs[name] = int(count)
    return jobs


def test_dry_run_of_the_default_config_plans_the_whole_dag(tmp_path):
    result = snakemake("-n", "--configfile", str(ROOT / "config.yaml"), cwd=tmp_path)
    jobs = planned_jobs(result.stdout)
    # (ft, lpft, and like for like l2sp, l1sp, kd) × FT's 2 lrs × 2 seeds; lora, freeze_embed,
    # surgical and llrd one point × 2 seeds; one FT run of each er_pretraining pool's backbone;
    # one FT run on the large ID set (analysis.er_large_id)
    assert jobs["finetune"] == 5 * 2 * 2 + 4 * 2 + 2 + 1
    assert jobs["select_run"] == jobs["store_predictions"] == 9
    assert jobs["soups"] == 2  # ft's and lpft's
    assert jobs["wiseft"] == 2 and jobs["plot_wiseft"] == 1
    assert jobs["extract_features"] == 6  # train, val, test + 3 OOD domains
    assert jobs["fit_probe"] == 2
    # the toy and the two er_pretraining pools' backbones
    assert jobs["pretrain_backbone"] == 3 and jobs["generate_toyshift"] == 1
    assert jobs["train_baseline"] == 6
    assert jobs["effective_robustness"] == jobs["feature_distortion"] == 1
    assert jobs["er_pretraining"] == 1
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    snakemake("--cores", "2", "--configfile", str(TINY), cwd=workdir)
    return workdir


def test_tiny_run_writes_a_complete_table(tiny_run):
    table = pd.read_csv(tiny_run / "results" / "tables" / "summary.csv")
    assert list(table["method"]) == [
        "lp",
        "ft",
        "lpft",
        "l2sp",
        "l1sp",
        "kd",
        "lora",
        "wiseft",
        "ft_soup_uniform",
        "ft_soup_greedy",
        "lpft_soup_uniform",
        "lpft_soup_greedy",
    ]
    hparams = dict(zip(table["method"], table["hparam"], strict=True))
    assert hparams["l2sp"] in ("lr=0.01, alpha=0.01", "lr=0.01, alpha=0.1")
    assert hparams["kd"] == "lr=0.01, lambda=0.5" and hparams["lora"] == "lr=0.03, rank=2"
    assert hparams["wiseft"].startswith("alpha=0.5")
    expected = {
        "dataset",
        "backbone",
        "method",
        "hparam",
        "seeds",
        "id",
        "id_ci90",
        "ood",
        "ood_ci90",
        "ood_real",
        "ood_clipart",
        "ood_painting",
    }
    assert expected <= set(table.columns)
    accuracy_columns = [
        c for c in table.columns if c.startswith(("id", "ood")) and not c.endswith("_ci90")
    ]
    # The tiny run's methods barely train: a row at chance shows no number and says why.
    flagged = table["note"].fillna("").str.startswith("at chance") if "note" in table else False
    assert table.loc[flagged, accuracy_columns].isna().all().all()
    assert {"lp", "lpft"} <= set(table.loc[~flagged, "method"])
    values = table.loc[~flagged, accuracy_columns].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    assert (tiny_run / "results" / "plots" / "id_vs_ood.png").stat().st_size > 1000
    assert (tiny_run / "results" / "tables" / "summary.md").read_text().count("\n") >= 5


def test_run_folders_hold_history_metrics_model_and_config(tiny_run):
    run_dir = tiny_run / "results/finetune/lpft/toyresnet/toyshift/lr0.001/seed0"
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert {"train_loss", "id_val", "id_test", "ood_real", "ood_clipart", "ood_painting"} <= set(
        history.columns
    )
    for name in ("model.safetensors", "metrics.json", "config.json"):
        assert (run_dir / name).stat().st_size > 0


def test_new_methods_have_their_own_run_folders_and_merged_weights(tiny_run):
    root = tiny_run / "results/finetune"
    for run in (
        "l2sp/toyresnet/toyshift/lr0.01-alpha0.01",
        "l2sp/toyresnet/toyshift/lr0.01-alpha0.1",
        "l1sp/toyresnet/toyshift/lr0.01-alpha0.001",
        "kd/toyresnet/toyshift/lr0.01-lambda0.5",
        "lora/toyresnet/toyshift/lr0.03-rank2",
    ):
        metrics = json.loads((root / run / "seed0/metrics.json").read_text())
        assert metrics["run"] == run.rsplit("/", 1)[1]
    from safetensors.torch import load_file

    lora = load_file(str(root / "lora/toyresnet/toyshift/lr0.03-rank2/seed0/model.safetensors"))
    ft = load_file(str(root / "ft/toyresnet/toyshift/lr0.01/seed0/model.safetensors"))
    assert set(lora) == set(ft)  # merged: the plain architecture, no adapter keys
    selection = json.loads((tiny_run / "results/selected/l2sp/toyresnet/toyshift.json").read_text())
    assert set(selection["mean_id_val_by_run"]) == {"lr0.01-alpha0.01", "lr0.01-alpha0.1"}


def test_soups_calibration_and_stored_predictions(tiny_run):
    from robustft.evaluate import subset_accuracy
    from robustft.predictions import read_predictions

    table = pd.read_csv(tiny_run / "results" / "tables" / "summary.csv").set_index("method")
    ece = table.loc[table["id"].notna(), ["ece_id", "ece_ood", "ece_ood_real"]]  # rows at chance: –
    assert ece.notna().all().all() and ((ece >= 0) & (ece <= 1)).all().all()
    assert "ECE OOD" in (tiny_run / "results" / "tables" / "summary.md").read_text()
    # FT's two learning rates of a seed share its head: souped. LP-FT has one run: its soups
    # are that run.
    assert table.loc["ft_soup_uniform", "hparam"] == "runs=2/2 of 2"
    soups = json.loads((tiny_run / "results/soups/ft/toyresnet/toyshift.json").read_text())
    for record in soups["soups"]["greedy"]:
        assert record["id_val"] >= record["steps"][0]["val_accuracy"]
    lpft = json.loads((tiny_run / "results/soups/lpft/toyresnet/toyshift.json").read_text())
    selection = json.loads((tiny_run / "results/selected/lpft/toyresnet/toyshift.json").read_text())
    for record, run in zip(lpft["soups"]["uniform"], selection["runs"], strict=True):
        assert record["id_test"] == pytest.approx(run["id_test"])
    for method in (*FINETUNED, "ft_soup_uniform", "ft_soup_greedy", "lpft_soup_greedy"):
        stored = read_predictions(tiny_run / f"results/predictions/{method}/toyresnet/toyshift.h5")
        assert sorted(stored) == [0, 1] and "ood_real" in stored[0]
    stored = read_predictions(tiny_run / "results/predictions/lpft/toyresnet/toyshift.h5")
    for run in selection["runs"]:
        test = stored[run["seed"]]["id_test"]
        assert subset_accuracy(test.logits, test.labels) == pytest.approx(run["id_test"])


def test_wiseft_curves_span_the_pretrained_and_finetuned_models(tiny_run):
    for seed in (0, 1):
        curve = pd.read_csv(tiny_run / f"results/wiseft/toyresnet/toyshift/seed{seed}/curve.csv")
        assert sorted(set(curve["method"])) == ["ft", "lpft"]
        assert sorted(set(curve["alpha"])) == [0.0, 0.5, 1.0]
        probe = json.loads(
            (tiny_run / f"results/probe/toyresnet/toyshift/seed{seed}/metrics.json").read_text()
        )
        for method in ("ft", "lpft"):
            selection = json.loads(
                (tiny_run / f"results/selected/{method}/toyresnet/toyshift.json").read_text()
            )
            run = next(r for r in selection["runs"] if r["seed"] == seed)
            rows = curve[curve["method"] == method].set_index("alpha")
            # So that the WiSE-FT row is flagged when at chance, as the runs' rows are.
            for key in CHANCE_KEYS:
                assert (rows[key] == probe[key]).all(), key
            for column in ("id_val", "id_test", "ood_real"):
                # α = 0: the pretrained backbone with the probe head; α = 1: the selected run.
                assert rows.loc[0.0, column] == pytest.approx(probe[column], abs=1e-9)
                assert rows.loc[1.0, column] == pytest.approx(run[column], abs=1e-9)
    assert (tiny_run / "results/plots/wiseft_toyshift.png").stat().st_size > 1000


def test_lpft_starts_from_the_probe(tiny_run):
    """Epoch 0 of LP-FT is the probe itself: same ID val and OOD accuracy."""
    probe = json.loads(
        (tiny_run / "results/probe/toyresnet/toyshift/seed0/metrics.json").read_text()
    )
    history = pd.read_csv(
        tiny_run / "results/finetune/lpft/toyresnet/toyshift/lr0.001/seed0" / "history.csv"
    )
    for column in ("id_val", "id_test", "ood_real", "ood_clipart", "ood_painting"):
        assert history.loc[0, column] == pytest.approx(probe[column], abs=1e-9), column


def test_batchnorm_and_clipping_settings_reach_each_run_with_dataset_overrides(tiny_run):
    """configs/tiny.yaml: FT's BatchNorm and clipping come from dataset_settings.toyshift, LP-FT
    keeps its own (frozen; clipped at the schema's default 5)."""
    runs = tiny_run / "results/finetune"
    ft = json.loads((runs / "ft/toyresnet/toyshift/lr0.01/seed0/config.json").read_text())
    lpft = json.loads((runs / "lpft/toyresnet/toyshift/lr0.001/seed0/config.json").read_text())
    assert (ft["settings"]["bn"], ft["settings"]["clip_grad_norm"]) == ("frozen_adapt", 5)
    assert (lpft["settings"]["bn"], lpft["settings"]["clip_grad_norm"]) == ("frozen", 5.0)
    history = pd.read_csv(runs / "ft/toyresnet/toyshift/lr0.01/seed0/history.csv")
    assert {"grad_norm_max", "clipped"} <= set(history.columns)
    metrics = json.loads((runs / "ft/toyresnet/toyshift/lr0.01/seed0/metrics.json").read_text())
    assert metrics["diverged"] is False and metrics["collapse"] is None
    # What a table needs to flag a run or probe at chance: 4 classes, 10 val images each.
    probe = json.loads(
        (tiny_run / "results/probe/toyresnet/toyshift/seed0/metrics.json").read_text()
    )
    for recorded in (metrics, probe):
        assert (recorded["chance_id_val"], recorded["id_val_examples"]) == (0.25, 40)
        assert (recorded["chance_id_test"], recorded["id_test_examples"]) == (0.25, 40)


def test_effective_robustness_table_has_every_epoch_and_the_baseline(tiny_run):
    table = pd.read_csv(tiny_run / "results/analysis/er/toyshift.csv")
    assert set(table["method"]) == {"baseline", "lp", *FINETUNED}
    assert (table["method"] == "baseline").sum() == 3  # the tiny config's baseline models
    # Selected runs: 2 seeds × epochs 0, 1, 2 for each fine-tuning method.
    for method in FINETUNED:
        rows = table[table["method"] == method]
        assert sorted(rows["epoch"]) == [0, 0, 1, 1, 2, 2]
    for column in ("er_pts", "er_pts_real", "er_pts_clipart", "er_pts_painting"):
        assert table[column].notna().all()
    # The baseline models span the line's ID range; only other models can fall outside it.
    assert not table.loc[table["method"] == "baseline", "outside_line_range"].any()
    line = json.loads((tiny_run / "results/analysis/er/toyshift_line.json").read_text())
    assert set(line) == {"real", "clipart", "painting", "mean"}
    # The line is the least-squares fit over the baseline models in logit space: their
    # residuals there sum to zero.
    baseline = table[table["method"] == "baseline"]
    residuals = logit(baseline["ood"]) - (
        line["mean"]["slope"] * logit(baseline["id"]) + line["mean"]["intercept"]
    )
    assert abs(residuals.sum()) < 1e-3
    for name in ("er_toyshift.png", "id_vs_ood_logit_toyshift.png", "distortion_toyshift.png"):
        assert (tiny_run / "results/plots" / name).stat().st_size > 1000, name


def test_feature_distortion_covers_every_selected_run_and_split(tiny_run):
    table = pd.read_csv(tiny_run / "results/analysis/distortion/toyshift.csv")
    assert set(table["method"]) == set(FINETUNED)
    assert set(table["split"]) == {"id_train", "id_test", "ood_real", "ood_clipart", "ood_painting"}
    assert len(table) == len(FINETUNED) * 2 * 5  # methods × seeds × splits
    assert ((table["cka"] > 0) & (table["cka"] <= 1 + 1e-9)).all()
    assert (table["relative_change"] >= 0).all()
    # A run whose best epoch is 0 is the pretrained backbone: no distortion at all.
    for method in ("ft", "lpft"):
        selection = json.loads(
            (tiny_run / f"results/selected/{method}/toyresnet/toyshift.json").read_text()
        )
        for run in selection["runs"]:
            if run["best_epoch"] == 0:
                rows = table[(table["method"] == method) & (table["seed"] == run["seed"])]
                assert (rows["relative_change"] == 0).all() and (rows["cka"] == 1).all()


def test_the_report_holds_every_plot_and_table(tiny_run):
    report = tiny_run / "results" / "report.html"
    snakemake("--configfile", str(TINY), "--report", str(report), cwd=tiny_run)
    html = report.read_text()
    for name in (
        "id_vs_ood.png",
        "er_toyshift.png",
        "id_vs_ood_logit_toyshift.png",
        "distortion_toyshift.png",
        "wiseft_toyshift.png",
        "summary.csv",
        "toyshift.csv",
    ):
        assert name in html, name


def test_second_run_has_nothing_to_do(tiny_run):
    result = snakemake("-n", "--configfile", str(TINY), cwd=tiny_run)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_a_finetuning_key_reruns_only_finetuning_and_what_follows(tiny_run):
    result = snakemake(
        "-n", "--configfile", str(TINY), "--config", "finetune={'epochs': 3}", cwd=tiny_run
    )
    jobs = planned_jobs(result.stdout)
    # ft: 2 lrs, lpft: 1, l2sp: 2 α, l1sp, kd, lora: 1 each; × 2 seeds
    assert jobs.pop("finetune") == (2 + 1 + 2 + 1 + 1 + 1) * 2
    assert set(jobs) == {
        "select_run",
        "wiseft",
        "plot_wiseft",
        "soups",
        "store_predictions",
        "aggregate_tables",
        "summary_table",
        "tidy_runs",
        "plot_id_vs_ood",
        "effective_robustness",
        "feature_distortion",
        "all",
    }


def test_a_target_file_reruns_one_dataset(tiny_run):
    table = tiny_run / "results" / "tables" / "toyshift.md"
    table.unlink()
    # The target goes first: --configfile takes several values.
    result = snakemake(
        "-n", str(table.relative_to(tiny_run)), "--configfile", str(TINY), cwd=tiny_run
    )
    assert planned_jobs(result.stdout) == {"aggregate_tables": 1}
    snakemake(
        "--cores", "1", str(table.relative_to(tiny_run)), "--configfile", str(TINY), cwd=tiny_run
    )
    assert table.exists()


def test_same_seed_gives_an_identical_summary_table(tiny_run, tmp_path):
    snakemake("--cores", "2", "--configfile", str(TINY), cwd=tmp_path)
    first = (tiny_run / "results" / "tables" / "summary.csv").read_bytes()
    second = (tmp_path / "results" / "tables" / "summary.csv").read_bytes()
    assert first == second


def test_workflow_is_lint_clean(tmp_path):
    result = snakemake("--lint", "--configfile", str(TINY), cwd=ROOT, check=False)
    assert "Lints for" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_runs_table_has_a_row_per_run_epoch_and_split(tiny_run):
    runs = pd.read_parquet(tiny_run / "results/tables/runs.parquet")
    key = ["dataset", "backbone", "method", "hparam", "seed", "epoch", "split"]
    assert not runs.duplicated(subset=key).any()
    splits = {"id_val", "id_test", "ood_real", "ood_clipart", "ood_painting"}
    finetuned = runs[runs["method"].isin(FINETUNED)]
    # ft: 2 lrs, lpft: 1, l2sp: 2 α, l1sp, kd, lora: 1 each; × 2 seeds × epochs 0-2 × 5 splits
    assert len(finetuned) == (2 + 1 + 2 + 1 + 1 + 1) * 2 * 3 * len(splits)
    for _, rows in finetuned.groupby(["method", "run", "seed", "epoch"]):
        assert set(rows["split"]) == splits
    lr = runs[(runs["method"] == "l2sp") & (runs["run"] == "lr0.01-alpha0.1")]
    assert set(lr["lr"]) == {0.01} and set(lr["alpha"]) == {0.1}
    # ER wherever the dataset has a baseline line: every OOD row, no ID row.
    assert runs.loc[runs["distribution"] == "ood", "er_pts"].notna().all()
    assert runs.loc[runs["distribution"] == "id", "er_pts"].isna().all()
    assert pd.read_csv(tiny_run / "results/tables/runs.csv").shape == runs.shape


def test_selected_rows_of_the_runs_table_reproduce_the_summary(tiny_run):
    runs = pd.read_parquet(tiny_run / "results/tables/runs.parquet")
    summary = pd.read_csv(tiny_run / "results/tables/summary.csv")
    selected = runs[runs["selected"]]
    per_seed = selected.pivot_table(
        index=["dataset", "backbone", "method", "seed"], columns="split", values="accuracy"
    )
    ood_columns = [c for c in per_seed.columns if c.startswith("ood_")]
    per_seed["id"] = per_seed["id_test"]
    per_seed["ood"] = per_seed[ood_columns].mean(axis=1)
    rebuilt = per_seed.groupby(["dataset", "backbone", "method"]).agg(["mean", "count"])
    assert len(rebuilt) == len(summary)
    for row in summary.to_dict("records"):
        key = (row["dataset"], row["backbone"], row["method"])
        assert rebuilt.loc[key, ("id", "count")] == row["seeds"], key
        if math.isnan(row["id"]):  # a row at chance: its runs are in the runs table, no number
            assert str(row["note"]).startswith("at chance"), key
            continue
        for column in ("id_val", "id", "ood", *ood_columns):
            assert rebuilt.loc[key, (column, "mean")] == pytest.approx(row[column], abs=1e-6), (
                key,
                column,
            )
    # Every selected row is of the run select_run chose, at the epoch metrics.json reports.
    for method in FINETUNED:
        choice = json.loads(
            (tiny_run / f"results/selected/{method}/toyresnet/toyshift.json").read_text()
        )
        rows = selected[selected["method"] == method]
        assert set(rows["run"]) == {choice["run"]}
        best = {run["seed"]: run["best_epoch"] for run in choice["runs"]}
        assert {(s, e) for s, e in zip(rows["seed"], rows["epoch"], strict=True)} == set(
            best.items()
        )
