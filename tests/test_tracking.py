"""Experiment tracking: W&B (offline) and MLflow (local file store), and a tracker that cannot be
reached, which only warns."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

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
    from mlflow import MlflowClient

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
