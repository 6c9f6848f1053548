"""Preemption-safe fine-tuning: a job killed or stopped anywhere resumes to exactly the result of
an uninterrupted run (history, best epoch, weights); only wall-clock `seconds` may differ."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
from fake_data import write_tiny_toyshift_job
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from robustft.models import ImageClassifier, Preprocess
from robustft.models.toy import ToyResNet
from robustft.runtime import STOPPED_EXIT_CODE, job
from robustft.training import Checkpointing, TrainSettings, train_classifier

PRE = Preprocess(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
SETTINGS = TrainSettings(epochs=3, lr=0.05, batch_size=16, bn="frozen", seed=3)


def two_class_images(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.uniform(0, 0.4, (n, 3, 16, 16)).astype(np.float32)
    images[labels == 0, :, :, :8] += 0.5
    images[labels == 1, :, :, 8:] += 0.5
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


TRAIN, VAL = two_class_images(80, seed=0), two_class_images(40, seed=1)


def fresh_model():
    torch.manual_seed(0)
    return ImageClassifier(backbone=ToyResNet(width=4), num_classes=2, preprocess=PRE)


def noisy_flip(images, generator):
    """An augmentation that uses the loop's generator, as the real one does."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def train(*, checkpointing=None, batch_transform=noisy_flip):
    model = fresh_model()
    result = train_classifier(
        model=model,
        train_set=TRAIN,
        eval_sets={"val": VAL, "test": VAL},
        settings=SETTINGS,
        select_on="val",
        progress=False,
        batch_transform=batch_transform,
        checkpointing=checkpointing,
    )
    return result, model


def without_seconds(history):
    """History rows without wall-clock time; NaN (row 0's loss) compared as text."""

    def comparable(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    return [{k: comparable(v) for k, v in row.items() if k != "seconds"} for row in history]


def assert_same_tensors(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def uninterrupted():
    return train()


@pytest.mark.parametrize("stop_at_call", [1, 5, 11, 15])
def test_a_stop_at_any_step_resumes_to_the_uninterrupted_result(
    tmp_path, uninterrupted, stop_at_call
):
    """SIGTERM (a real signal, through the job's handler) after `stop_at_call` steps."""
    reference, reference_model = uninterrupted
    checkpointing = Checkpointing(path=tmp_path / "state" / "last.pt", fingerprint="run-a")
    calls = {"n": 0}

    def transform_then_sigterm(images, generator):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return noisy_flip(images, generator)

    with pytest.raises(SystemExit) as stopped, job(log_path=None):
        train(checkpointing=checkpointing, batch_transform=transform_then_sigterm)
    assert stopped.value.code == STOPPED_EXIT_CODE
    assert checkpointing.path.exists()

    resumed, resumed_model = train(checkpointing=checkpointing)
    assert without_seconds(resumed.history) == without_seconds(reference.history)
    assert resumed.best_epoch == reference.best_epoch
    assert_same_tensors(resumed.best_state, reference.best_state)
    assert_same_tensors(resumed_model.state_dict(), reference_model.state_dict())


def test_state_of_another_run_is_ignored(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    path = tmp_path / "last.pt"
    train(checkpointing=Checkpointing(path=path, fingerprint="other settings"))
    assert path.exists()  # the finished run's state: discarded only by the caller
    result, _ = train(checkpointing=Checkpointing(path=path, fingerprint="these settings"))
    assert without_seconds(result.history) == without_seconds(reference.history)


def test_unreadable_state_starts_from_scratch(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    path = tmp_path / "last.pt"
    path.write_bytes(b"cut short")
    result, _ = train(checkpointing=Checkpointing(path=path, fingerprint="x"))
    assert without_seconds(result.history) == without_seconds(reference.history)


def same(first, second):
    """Equal values, tensors equal in dtype and entries, also inside dicts and lists."""
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.dtype == second.dtype
            and torch.equal(first, second)
        )
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same(first[k], second[k]) for k in first)
    if isinstance(first, list | tuple) and isinstance(second, list | tuple):
        return len(first) == len(second) and all(map(same, first, second))
    return type(first) is type(second) and first == second


def test_the_checkpointer_round_trips_every_field_of_the_run_state(tmp_path):
    """Save, then restore into a fresh run state and fresh objects: every saved field of
    `_RunState` and the state of every object comes back equal; the others keep their defaults."""
    import dataclasses

    from robustft.training import Checkpointer, _RunState

    values = {
        "epoch": 3,
        "step": 2,
        "seconds": 1.5,
        "order": torch.tensor([2, 0, 1]),
        "loss_sum": torch.tensor(4.25),
        "correct": torch.tensor(7),
        "seen": 32,
        "epoch_lr": 0.01,
        "history": [{"epoch": 0, "lr": 0.05, "train_loss": float("inf"), "val": 0.5}],
        "best_epoch": 1,
        "best_score": 0.75,
        "best_state": {"weight": torch.arange(4.0)},
        "diverged": True,
        "collapse": "why",
        "grad_norm_max": torch.tensor(2.5),
        "clipped": torch.tensor(1),
        "num_classes": 2,
    }
    not_saved = {"settings", "steps_in_epoch"}
    fields = {f.name: f for f in dataclasses.fields(_RunState)}
    # A new field of the run state must be added here (or to `not_saved`).
    assert set(values) | not_saved == set(fields)
    for name, value in values.items():  # every value differs from its default
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert not same(value, default), name

    def objects(seed):
        torch.manual_seed(seed)
        model = ImageClassifier(backbone=ToyResNet(width=4), num_classes=2, preprocess=PRE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        generator = torch.Generator().manual_seed(seed)
        return dict(model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)

    saved = objects(0)
    saved["model"](torch.rand(4, 3, 16, 16)).sum().backward()
    saved["optimizer"].step()  # momentum buffers, and a scheduler and generator moved on
    saved["scheduler"].step()
    torch.rand(3, generator=saved["generator"])
    checkpointing = Checkpointing(path=tmp_path / "last.pt", fingerprint="f")
    run = _RunState(settings=SETTINGS, steps_in_epoch=5, **values)
    Checkpointer(checkpointing, **saved).save(run)
    rng = torch.get_rng_state()

    restored = objects(1)
    assert not same(restored["model"].state_dict(), saved["model"].state_dict())
    fresh = _RunState(settings=SETTINGS)
    assert Checkpointer(checkpointing, **restored).restore(fresh)
    for name, value in values.items():
        assert same(getattr(fresh, name), value), name
    assert fresh.settings is SETTINGS and fresh.steps_in_epoch == 0
    for name in ("model", "optimizer", "scheduler"):
        assert same(restored[name].state_dict(), saved[name].state_dict()), name
    assert same(restored["generator"].get_state(), saved["generator"].get_state())
    assert same(torch.get_rng_state(), rng)


def test_discard_removes_the_state_and_its_empty_folders(tmp_path):
    (tmp_path / "keep").mkdir()
    path = tmp_path / "resume" / "ft" / "seed0" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"state")
    Checkpointing(path=path, fingerprint="x").discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


# --- a real fine-tuning job in a subprocess, killed from outside -------------------------------

DRIVER = textwrap.dedent(
    """
    import sys
    from robustft.runtime import job
    from robustft.stages import run_finetune

    root = sys.argv[1]
    with job(log_path=f"{root}/job.log", threads=1):
        run_finetune(
            method="ft", dataset="toyshift", data_root=f"{root}/data",
            model_dir=f"{root}/backbone", out_dir=f"{root}/out", state_dir=f"{root}/state",
            checkpoint_minutes=0.0, ood_splits=["real"], lr=0.05, seed=1, epochs=3,
            batch_size=8, momentum=0.9, weight_decay=0.0, bn="frozen", augment=True,
            save_epochs=[0, 2], progress=False,
        )
    """
)


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    return write_tiny_toyshift_job(tmp_path_factory.mktemp("inputs"), train_per_class=40, width=8)


# The DRIVER, with SIGTERM sent to itself right after `robustft.stages.finetune.<argv[2]>` returns.
SIGTERM_AFTER_DRIVER = (
    textwrap.dedent(
        """
        import os, signal, sys
        import robustft.stages.finetune as stage

        def then_sigterm(function):
            def wrapped(*args, **kwargs):
                result = function(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGTERM)
                return result
            return wrapped

        name = sys.argv.pop(2)
        setattr(stage, name, then_sigterm(getattr(stage, name)))
        """
    )
    + DRIVER
)


def start_job(inputs, workdir, sigterm_after=None):
    for name in ("data", "backbone"):
        target = workdir / name
        if not target.exists():
            target.symlink_to(inputs / name)
    driver = [DRIVER] if sigterm_after is None else [SIGTERM_AFTER_DRIVER]
    extra = [] if sigterm_after is None else [sigterm_after]
    return subprocess.Popen(
        [sys.executable, "-c", *driver, str(workdir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished_outputs(workdir):
    out = workdir / "out"
    history = pd.read_csv(out / "history.csv").drop(columns="seconds")
    return {
        "history": without_seconds(history.to_dict("records")),
        "metrics": json.loads((out / "metrics.json").read_text()),
        "weights": load_file(str(out / "model.safetensors")),
        "kept": {path.name: load_file(str(path)) for path in sorted(out.glob("checkpoints/*"))},
    }


@pytest.fixture(scope="module")
def reference_job(job_inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    process = start_job(job_inputs, workdir)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert not (workdir / "state").exists()  # deleted once the outputs were written
    training_seconds = pd.read_csv(workdir / "out" / "history.csv")["seconds"].sum()
    return finished_outputs(workdir), training_seconds


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_job_killed_at_a_random_step_reruns_to_the_same_result(
    job_inputs, reference_job, tmp_path, signal_name
):
    reference, training_seconds = reference_job
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    state = tmp_path / "state" / "last.pt"
    window = 0.9 * training_seconds
    for _attempt in range(5):
        process = start_job(job_inputs, tmp_path)
        # Training starts once the first state is saved (after the epoch-0 evaluation).
        deadline = time.monotonic() + 120
        while not state.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, window))
        process.send_signal(getattr(signal, signal_name))
        _, stderr = process.communicate(timeout=120)
        if not (tmp_path / "out" / "metrics.json").exists():
            break
        # The signal came after training had finished (a loaded machine runs at another
        # speed than the reference did): start again and stop it sooner.
        shutil.rmtree(tmp_path / "out")
        shutil.rmtree(tmp_path / "state", ignore_errors=True)
        window /= 2
    context = f"random seed {seed}; stderr: {stderr}"
    if signal_name == "SIGKILL":
        assert process.returncode == -signal.SIGKILL, context
    else:
        assert process.returncode == STOPPED_EXIT_CODE, context
        assert stderr.strip().splitlines()[-1].startswith("robustft: stopped by SIGTERM"), context
        assert str(state) in stderr, context
    assert state.exists(), context
    assert not (tmp_path / "out" / "metrics.json").exists(), context

    rerun = start_job(job_inputs, tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "resuming from" in (tmp_path / "job.log").read_text(), context
    result = finished_outputs(tmp_path)
    assert result["history"] == reference["history"], context
    assert result["metrics"] == reference["metrics"], context
    assert_same_tensors(result["weights"], reference["weights"])
    assert sorted(result["kept"]) == ["epoch0.safetensors", "epoch2.safetensors"]
    for name, weights in reference["kept"].items():
        assert_same_tensors(result["kept"][name], weights)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("sigterm_after", "when"),
    [
        ("train_classifier", "after training"),
        ("write_csv", "while the outputs were written"),
    ],
)
def test_sigterm_between_training_and_the_outputs_keeps_the_state(
    job_inputs, reference_job, tmp_path, sigterm_after, when
):
    """The window a random SIGTERM rarely hits: training is over, the outputs not yet written."""
    reference, _ = reference_job
    state = tmp_path / "state" / "last.pt"
    process = start_job(job_inputs, tmp_path, sigterm_after=sigterm_after)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == STOPPED_EXIT_CODE, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"robustft: stopped by SIGTERM {when}; state saved to {state}"
    )
    assert state.exists()
    # Outputs half written are the failed job's: Snakemake deletes them before a rerun.
    shutil.rmtree(tmp_path / "out")

    rerun = start_job(job_inputs, tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    result = finished_outputs(tmp_path)
    assert result["history"] == reference["history"]
    assert result["metrics"] == reference["metrics"]
    assert_same_tensors(result["weights"], reference["weights"])
    assert not (tmp_path / "state").exists()
