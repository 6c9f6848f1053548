"""Experiment tracking: W&B (offline) and MLflow (local file store), and a tracker that cannot be
reached, which only warns."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from robustft.config import load_schema, validate_config
from robustft.tracking import TrackingSettings, finetune_run, log_run, probe_run

ROOT = Path(__file__).resolve().parents[1]
HISTORY = [
    {"epoch": 0, "lr": 0.01, "train_loss": math.nan, "id_val": 0.25, "ood_real": 0.2},
    {"epoch": 1, "lr": 0.01, "train_loss": 1.3, "id_val": 0.5, "ood_real": 0.4},
    {"epoch": 2, "lr": 0.005, "train_loss": 1.1, "id_val": 0.75, "ood_real": 0.3},
]


def l2sp_run():
    return finetune_run(
        dataset="toyshift",
        backbone="toyresnet",
        method="l2sp",
        run="lr0.01-alpha0.1",
        hparams={"lr": 0.01, "alpha": 0.1},
        seed=1,
        config={"settings": {"epochs": 2, "batch_size": 16}, "augment": True},
        history=HISTORY,
        metrics={"best_epoch": 2, "id_val": 0.75, "ood_real": 0.3, "diverged": False},
    )


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No tracker credentials or caches from the machine: W&B offline, files under tmp."""
    for name in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    return tmp_path


def mlflow_runs(uri: str, project: str = "robustft"):
    """The client of a local file store, and the runs of its experiment `project`."""
    from unittest import mock

    from mlflow import MlflowClient

    # MLflow 3 opens its file store only when asked (what log_run does for a file:// URI).
    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(project)
        return client, client.search_runs([experiment.experiment_id])


def test_tracking_is_off_by_default():
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config.pop("tracking", None)
    validate_config(config, load_schema(ROOT / "workflow/schemas/config.schema.yaml"))
    assert config["tracking"]["backend"] == "none"
    assert TrackingSettings.from_config(config["tracking"]) is None
    assert log_run(l2sp_run(), settings=None) is False


def test_mlflow_file_store_holds_one_run_with_its_history_tags_and_metrics(offline):
    pytest.importorskip("mlflow")
    uri = (offline / "mlruns").as_uri()
    settings = TrackingSettings(backend="mlflow", tracking_uri=uri, tags={"study": "unit"})
    assert log_run(l2sp_run(), settings=settings)
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "toyshift/toyresnet/l2sp/lr0.01-alpha0.1/seed1"
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert {key: tags[key] for key in ("dataset", "backbone", "method", "seed", "alpha")} == {
        "dataset": "toyshift",
        "backbone": "toyresnet",
        "method": "l2sp",
        "seed": "1",
        "alpha": "0.1",
    }
    assert tags["study"] == "unit"
    assert run.data.params["settings.epochs"] == "2" and run.data.params["lr"] == "0.01"
    history = client.get_metric_history(run.info.run_id, "id_val")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.5), (2, 0.75)]
    # NaN (no training loss before the first epoch) is left out, not logged as a number.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert run.data.metrics["best/best_epoch"] == 2


def test_probe_logs_its_c_sweep_in_ascending_order(offline):
    pytest.importorskip("mlflow")
    uri = (offline / "mlruns").as_uri()
    run = probe_run(
        dataset="toyshift",
        backbone="toyresnet",
        seed=0,
        config={"c_grid": [0.01, 1.0, 100.0]},
        sweep=[
            {"C": 100.0, "val_acc": 0.3, "converged": True},
            {"C": 0.01, "val_acc": 0.4, "converged": True},
            {"C": 1.0, "val_acc": 0.5, "converged": False},
        ],
        metrics={"C": 1.0, "id_val": 0.5, "id_test": 0.45},
    )
    assert log_run(run, settings=TrackingSettings(backend="mlflow", tracking_uri=uri))
    client, (logged,) = mlflow_runs(uri)
    assert logged.data.tags["method"] == "lp" and logged.data.tags["C"] == "1.0"
    sweep = client.get_metric_history(logged.info.run_id, "C")
    assert sorted((m.step, m.value) for m in sweep) == [(0, 0.01), (1, 1.0), (2, 100.0)]
    assert "sweep.csv" in [f.path for f in client.list_artifacts(logged.info.run_id)]


def test_wandb_offline_run_records_its_history_and_identity(offline):
    pytest.importorskip("wandb")
    from wandb_records import history, run_info

    settings = TrackingSettings(backend="wandb", mode="offline", dir=str(offline / "tracking"))
    assert log_run(l2sp_run(), settings=settings)
    import wandb

    wandb.teardown()  # what a job's exit does: W&B's service writes the rest of the log
    (log_file,) = (offline / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    info = run_info(log_file)
    assert info["name"] == "toyshift/toyresnet/l2sp/lr0.01-alpha0.1/seed1"
    assert info["group"] == "toyshift/toyresnet/l2sp" and info["job_type"] == "finetune"
    assert {"toyshift", "toyresnet", "l2sp"} <= set(info["tags"])
    assert (info["config"]["alpha"], info["config"]["seed"]) == (0.1, 1)
    rows = history(log_file)
    assert [(row["epoch"], row["id_val"]) for row in rows] == [(0, 0.25), (1, 0.5), (2, 0.75)]


def test_an_unreachable_mlflow_server_gives_one_warning_and_no_error(offline, caplog):
    pytest.importorskip("mlflow")
    settings = TrackingSettings(backend="mlflow", tracking_uri="http://127.0.0.1:9", retries=1)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        assert log_run(l2sp_run(), settings=settings) is False
    assert time.monotonic() - started < 60
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "http://127.0.0.1:9" in message and "l2sp/lr0.01-alpha0.1/seed1" in message
    assert "\n" not in message


def test_wandb_without_a_login_gives_one_warning(offline, caplog):
    pytest.importorskip("wandb")
    settings = TrackingSettings(
        backend="wandb", mode="online", dir=str(offline / "tracking"), timeout_s=5
    )
    with caplog.at_level(logging.INFO):
        assert log_run(l2sp_run(), settings=settings) is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "wandb" in warnings[0].getMessage()


def test_bad_tracking_config_names_the_key():
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["tracking"] = {"backend": "comet"}
    with pytest.raises(Exception, match=r"tracking\.backend"):
        validate_config(config, load_schema(ROOT / "workflow/schemas/config.schema.yaml"))


# --- the workflow, tracked -----------------------------------------------------------------

TINY = ROOT / "configs" / "tiny.yaml"
# configs/tiny.yaml with one seed and LP, FT (2 lrs), LP-FT (1 lr): 3 fine-tuning runs, 1 probe.
SMALL = [
    "methods=[lp,ft,lpft]",
    "seeds=[0]",
    "analysis={'effective_robustness': False, 'feature_distortion': False}",
]
FT_RUNS = ["ft/lr0.01", "ft/lr0.03", "lpft/lr0.001"]


def run_workflow(workdir, *args, env):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def tracking_config(**settings):
    return "tracking=" + repr(settings)


@pytest.mark.workflow
def test_tiny_workflow_tracks_every_finetuning_run_and_probe(offline):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    workdir = offline / "work"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    results = workdir / "results/finetune"

    # MLflow, local file store: one tracked run per fine-tuning run, with its history.
    uri = (offline / "mlruns").as_uri()
    config = [*SMALL, tracking_config(backend="mlflow", tracking_uri=uri)]
    run_workflow(workdir, "--cores", "2", "--configfile", str(TINY), "--config", *config, env=env)
    client, runs = mlflow_runs(uri)
    by_name = {run.info.run_name: run for run in runs}
    finetuned = [name for name, run in by_name.items() if run.data.tags["job_type"] == "finetune"]
    assert sorted(finetuned) == sorted(f"toyshift/toyresnet/{run}/seed0" for run in FT_RUNS)
    for run in FT_RUNS:
        logged = by_name[f"toyshift/toyresnet/{run}/seed0"]
        assert logged.data.tags["job_type"] == "finetune" and logged.info.status == "FINISHED"
        history = pd.read_csv(
            results / run.replace("/", "/toyresnet/toyshift/") / "seed0/history.csv"
        )
        id_val = client.get_metric_history(logged.info.run_id, "id_val")
        assert sorted((m.step, m.value) for m in id_val) == list(
            zip(history["epoch"], history["id_val"], strict=True)
        )
    (probe,) = [run for run in runs if run.data.tags["job_type"] == "probe"]
    assert len(client.get_metric_history(probe.info.run_id, "val_acc")) == 3  # the C grid

    # W&B, offline: the same jobs again, each an offline run with its history.
    wandb_dir = offline / "wandb-runs"
    config = [*SMALL, tracking_config(backend="wandb", mode="offline", dir=str(wandb_dir))]
    run_workflow(
        workdir,
        "--cores", "2", "--configfile", str(TINY), "--forcerun", "finetune", "fit_probe",
        "--config", *config,
        env=env,
    )  # fmt: skip
    from wandb_records import history as wandb_history
    from wandb_records import run_info

    logs = sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    infos = {run_info(path)["name"]: path for path in logs}
    assert len(logs) == len(FT_RUNS) + 1
    for run in FT_RUNS:
        path = infos[f"toyshift/toyresnet/{run}/seed0"]
        history = pd.read_csv(
            results / run.replace("/", "/toyresnet/toyshift/") / "seed0/history.csv"
        )
        rows = wandb_history(path)
        assert [row["epoch"] for row in rows] == list(history["epoch"])
        assert [row["id_val"] for row in rows] == pytest.approx(list(history["id_val"]))

    # An MLflow server that cannot be reached: one warning in the job's log, the job succeeds.
    target = "results/finetune/ft/toyresnet/toyshift/lr0.01/seed0/metrics.json"
    before = (workdir / target).stat().st_mtime
    config = [*SMALL, tracking_config(backend="mlflow", tracking_uri="http://127.0.0.1:9")]
    run_workflow(
        workdir,
        target, "--cores", "1", "--configfile", str(TINY), "--forcerun", "finetune",
        "--config", *config,
        env=env,
    )  # fmt: skip
    assert (workdir / target).stat().st_mtime > before
    log = (workdir / "results/logs/finetune/ft/toyresnet/toyshift/lr0.01/seed0.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "tracking: mlflow at http://127.0.0.1:9" in warnings[0], log
