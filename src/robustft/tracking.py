"""Experiment tracking, optional: each fine-tuning run and each probe, logged to W&B or MLflow.

One interface for both backends: a job describes what it did as a `TrackedRun` (its identity,
config, one history row per step, final metrics, tables) and `log_run` sends it to the
configured tracker (`TrackingSettings`, the config's `tracking:` block). A run is logged once,
after its files are written, so a job resumed from saved state logs its epochs once.

A tracker never fails a job: when it cannot be reached (no network on a compute node, no W&B
login, a server that is down), `log_run` writes one warning line and returns False. Neither
backend is imported unless it is used (the extras `robustft[wandb]`, `robustft[mlflow]`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("robustft.tracking")

BACKENDS = ("none", "wandb", "mlflow")
# Loggers of the backends and their HTTP stack: their retries and notices would add lines to
# the job's log; a failure is reported in one line of ours instead.
_CHATTY_LOGGERS = ("mlflow", "urllib3", "requests", "wandb", "git", "databricks")


@dataclass(frozen=True)
class TrackingSettings:
    """The config's `tracking:` block (see workflow/schemas/config.schema.yaml)."""

    backend: str = "none"
    project: str = "robustft"
    entity: str | None = None
    mode: str | None = None
    tracking_uri: str | None = None
    dir: str = "results/tracking"
    tags: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    retries: int = 2

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"tracking.backend must be one of {BACKENDS}, not {self.backend!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> TrackingSettings | None:
        """The settings of a `tracking:` block; None when tracking is off (the default)."""
        section = dict(section or {})
        if section.get("backend", "none") == "none":
            return None
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown config key 'tracking.{unknown[0]}'")
        section["tags"] = {str(k): str(v) for k, v in (section.get("tags") or {}).items()}
        return cls(**section)


@dataclass(frozen=True)
class TrackedRun:
    """What one job logs. `identity` (dataset, backbone, method, run, seed and each
    hyper-parameter) becomes the tracker's tags and top-level config, so that its tables
    group runs by them; `history` has one row per step, numbered by its `step` column."""

    name: str
    group: str
    job_type: str
    identity: Mapping[str, Any]
    config: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]]
    step: str
    summary: Mapping[str, Any]
    tables: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)


def finetune_run(
    *,
    dataset: str,
    backbone: str,
    method: str,
    run: str,
    hparams: Mapping[str, float],
    seed: int,
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
) -> TrackedRun:
    """One fine-tuning run: its config, every epoch of history.csv, metrics.json as `best/*`
    (the epoch selected on ID val)."""
    return TrackedRun(
        name=f"{dataset}/{backbone}/{method}/{run}/seed{seed}",
        group=f"{dataset}/{backbone}/{method}",
        job_type="finetune",
        identity=_identity(dataset, backbone, method, run, seed, hparams),
        config=config,
        history=history,
        step="epoch",
        summary=metrics,
    )


def probe_run(
    *,
    dataset: str,
    backbone: str,
    seed: int,
    config: Mapping[str, Any],
    sweep: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
) -> TrackedRun:
    """One linear probe: its C sweep (one step per C, ascending, also as a table) and the
    accuracies at the chosen C."""
    rows = sorted(sweep, key=lambda row: float(row["C"]))
    history = [
        {"sweep_step": index, "log10_C": math.log10(float(row["C"])), **row}
        for index, row in enumerate(rows)
    ]
    chosen = float(metrics["C"])
    return TrackedRun(
        name=f"{dataset}/{backbone}/lp/C{chosen:g}/seed{seed}",
        group=f"{dataset}/{backbone}/lp",
        job_type="probe",
        identity=_identity(dataset, backbone, "lp", f"C{chosen:g}", seed, {"C": chosen}),
        config=config,
        history=history,
        step="sweep_step",
        summary=metrics,
        tables={"sweep": rows},
    )


def _identity(
    dataset: str, backbone: str, method: str, run: str, seed: int, hparams: Mapping[str, float]
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "backbone": backbone,
        "method": method,
        "run": run,
        "seed": int(seed),
        **{name: float(value) for name, value in hparams.items()},
    }


def log_run(run: TrackedRun, *, settings: TrackingSettings | None) -> bool:
    """Log `run` to the configured tracker; True when it was logged. Never raises for the
    tracker's sake: any failure is one warning line naming the backend, the run and why."""
    if settings is None or settings.backend == "none":
        return False
    started = time.monotonic()
    try:
        with _quiet():
            (_log_wandb if settings.backend == "wandb" else _log_mlflow)(run, settings)
    except Exception as error:
        root = _root_cause(error)
        log.warning(
            "tracking: %s could not log run %s (%s: %s); its files are written as usual",
            _where(settings),
            run.name,
            type(root).__name__,
            " ".join(str(root).split())[:300],
        )
        return False
    log.info(
        "tracking: logged %s to %s in %.1f s",
        run.name,
        settings.backend,
        time.monotonic() - started,
    )
    return True


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception that says something (a refused connection, not the client's
    wrapper of it)."""
    seen = {id(error)}
    while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        if not str(cause).strip():
            break
        error = cause
    return error


def _where(settings: TrackingSettings) -> str:
    if settings.backend == "mlflow":
        return f"mlflow at {mlflow_uri(settings)}"
    return f"wandb (project {settings.project}, mode {settings.mode or 'from WANDB_MODE'})"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of a row (booleans as 0/1): what a tracker plots."""
    values = {}
    for key, value in row.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(float(value)):
            values[str(key)] = float(value)
    return values


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"settings.lr": 0.01, ...}: nested mappings joined by dots (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


# --- W&B ----------------------------------------------------------------------------------


def _log_wandb(run: TrackedRun, settings: TrackingSettings) -> None:
    import wandb

    Path(settings.dir).mkdir(parents=True, exist_ok=True)
    identity = dict(run.identity)
    tags = [str(identity[key]) for key in ("dataset", "backbone", "method")]
    tags += [f"{key}:{value}" for key, value in settings.tags.items()]
    tracked = wandb.init(
        project=settings.project,
        entity=settings.entity,
        mode=settings.mode,
        dir=settings.dir,
        name=run.name,
        group=run.group,
        job_type=run.job_type,
        tags=[tag[:64] for tag in tags],  # W&B's limit per tag
        config={**identity, **dict(settings.tags), "config": dict(run.config)},
        reinit="create_new",
        settings=wandb.Settings(
            silent=True,
            console="off",  # the job's log stays the job's
            init_timeout=settings.timeout_s,
            save_code=False,
            disable_git=True,
            x_disable_stats=True,
        ),
    )
    exit_code = 1
    try:
        tracked.define_metric(run.step)
        tracked.define_metric("*", step_metric=run.step)
        for row in run.history:
            tracked.log(_numbers(row), step=int(row[run.step]))
        tracked.summary.update(
            {f"best/{key}": value for key, value in _numbers(run.summary).items()}
        )
        last_step = int(run.history[-1][run.step]) if run.history else None
        for name, rows in run.tables.items():
            columns = list(dict.fromkeys(key for row in rows for key in row))
            table = wandb.Table(
                columns=columns, data=[[row.get(c) for c in columns] for row in rows]
            )
            tracked.log({name: table}, step=last_step)
        exit_code = 0
    finally:
        tracked.finish(exit_code=exit_code)


# --- MLflow -------------------------------------------------------------------------------

# MLflow's limits per log_batch call.
_MAX_METRICS, _MAX_PARAMS = 1000, 100


def mlflow_uri(settings: TrackingSettings) -> str:
    """`tracking_uri`, else MLFLOW_TRACKING_URI, else a local store under `dir`/mlruns; a
    plain path becomes a file:// URI."""
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = str(Path(settings.dir) / "mlruns")
    if "://" not in uri and not uri.startswith(("file:", "databricks", "sqlite:")):
        uri = Path(uri).resolve().as_uri()
    return uri


def _log_mlflow(run: TrackedRun, settings: TrackingSettings) -> None:
    uri = mlflow_uri(settings)
    # A server that is down must cost seconds, not MLflow's default of minutes of retries.
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(settings.timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.retries)
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless asked: a config that names one asks for it.
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(settings.project)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(settings.project)
        except MlflowException:  # another job created it first
            experiment_id = client.get_experiment_by_name(settings.project).experiment_id
    else:
        experiment_id = experiment.experiment_id
    identity = {key: str(value) for key, value in run.identity.items()}
    tags = {**identity, **dict(settings.tags), "group": run.group, "job_type": run.job_type}
    created = client.create_run(experiment_id, run_name=run.name, tags=tags)
    run_id = created.info.run_id
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        params = {**flatten(run.config), **run.identity}
        metrics = [
            Metric(key, value, now, int(row[run.step]))
            for row in run.history
            for key, value in _numbers(row).items()
        ]
        metrics += [
            Metric(f"best/{key}", value, now, 0) for key, value in _numbers(run.summary).items()
        ]
        param_list = [Param(str(key), str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(param_list), _MAX_PARAMS):
            client.log_batch(run_id, params=param_list[start : start + _MAX_PARAMS])
        for start in range(0, len(metrics), _MAX_METRICS):
            client.log_batch(run_id, metrics=metrics[start : start + _MAX_METRICS])
        client.log_dict(run_id, dict(run.config), "config.json")
        for name, rows in run.tables.items():
            import pandas as pd

            client.log_text(run_id, pd.DataFrame(list(rows)).to_csv(index=False), f"{name}.csv")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
