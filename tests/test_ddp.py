"""Data-parallel fine-tuning (robustft.distributed) on the CPU: 2 gloo processes stand in for
2 GPUs. They give the history of one process with the same global batch (accuracies exactly,
losses and weights within float rounding: docs/multi-gpu.md), and a SIGTERM to one rank stops
both at the same step, after which a rerun ends exactly as an uninterrupted 2-process run."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch
from fake_data import write_tiny_toyshift_job
from safetensors.torch import load_file

from robustft.data.datasets import random_crop_flip, to_float
from robustft.distributed import Parallel, resolve_processes, share_of_batches
from robustft.runtime import STOPPED_EXIT_CODE
from robustft.stages import run_finetune


def ranks(world):
    return [Parallel(rank=r, world_size=world, local_rank=r, control=None) for r in range(world)]


def test_the_ranks_together_take_each_global_batch_of_the_one_process_order():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    shares = [share_of_batches(order, batch_size=12, parallel=p) for p in ranks(2)]
    for batch in range(50 // 12):  # whole batches only, as drop_last in one process
        global_batch = order[batch * 12 : (batch + 1) * 12]
        joined = torch.cat([share[batch * 6 : (batch + 1) * 6] for share in shares])
        assert torch.equal(joined, global_batch)
    assert all(len(share) == 4 * 6 for share in shares)


@pytest.mark.parametrize("transform", [random_crop_flip, to_float])
def test_each_rank_applies_its_rows_of_the_global_batch_augmentation(transform):
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    one = torch.Generator().manual_seed(5)
    expected = transform(images, one)
    pieces = []
    for rank in range(2):
        generator = torch.Generator().manual_seed(5)
        pieces.append(transform(images[rank * 4 : (rank + 1) * 4], generator, share=(rank, 2)))
        # Every rank's generator moves on as the one process's did.
        assert torch.equal(generator.get_state(), one.get_state())
    assert torch.equal(torch.cat(pieces), expected)


def test_processes_default_to_one_per_gpu_the_job_asks_for():
    assert resolve_processes(processes=None, gpus=0) == 1
    assert resolve_processes(processes=None, gpus=4) == 4
    assert resolve_processes(processes=2, gpus=0) == 2  # CPU processes
    with pytest.raises(ValueError, match=re.escape("'finetune.processes'")):
        resolve_processes(processes=0, gpus=1)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"batch_size": 9, "bn": "frozen"}, "'finetune.batch_size'"),
        ({"batch_size": 8, "bn": "train", "sync_batchnorm": True}, "'finetune.sync_batchnorm'"),
    ],
)
def test_settings_several_processes_cannot_run_fail_before_any_process_starts(
    tmp_path, settings, key
):
    started = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(key)) as error:
        run_finetune(
            method="ft",
            dataset="toyshift",
            data_root=tmp_path / "missing",
            model_dir=tmp_path / "missing",
            out_dir=tmp_path / "out",
            ood_splits=["real"],
            lr=0.05,
            seed=1,
            epochs=1,
            momentum=0.9,
            weight_decay=0.0,
            augment=False,
            device="cpu",
            processes=2,
            **settings,
        )
    assert "\n" not in str(error.value)
    assert time.monotonic() - started < 5  # refused here, not by the workers
    assert not (tmp_path / "out").exists()


# --- real fine-tuning jobs in subprocesses -----------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import sys
    from robustft.runtime import job
    from robustft.stages import run_finetune

    root, processes = sys.argv[1], int(sys.argv[2])
    with job(log_path=f"{root}/job.log", threads=2):
        run_finetune(
            method="ft", dataset="toyshift", data_root=f"{root}/data",
            model_dir=f"{root}/backbone", out_dir=f"{root}/out", state_dir=f"{root}/state",
            checkpoint_minutes=0.0, ood_splits=["real"], lr=0.05, seed=1, epochs=3,
            batch_size=8, momentum=0.9, weight_decay=0.0, bn="frozen", augment=True,
            save_epochs=[0, 2], progress=False, processes=processes,
        )
    """
)


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    return write_tiny_toyshift_job(tmp_path_factory.mktemp("inputs"), train_per_class=40, width=8)


def start_job(inputs, workdir, processes):
    for name in ("data", "backbone"):
        target = workdir / name
        if not target.exists():
            target.symlink_to(inputs / name)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(workdir), str(processes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(workdir):
    out = workdir / "out"
    history = pd.read_csv(out / "history.csv").drop(columns="seconds")
    return {
        "history": history,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "config": json.loads((out / "config.json").read_text()),
        "weights": load_file(str(out / "model.safetensors")),
        "kept": {path.name: load_file(str(path)) for path in sorted(out.glob("checkpoints/*"))},
    }


def run_to_the_end(inputs, workdir, processes):
    process = start_job(inputs, workdir, processes)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert not (workdir / "state").exists()  # deleted once the outputs were written
    return finished(workdir)


@pytest.fixture(scope="module")
def one_process(job_inputs, tmp_path_factory):
    return run_to_the_end(job_inputs, tmp_path_factory.mktemp("one"), 1)


@pytest.fixture(scope="module")
def two_processes(job_inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two")
    return run_to_the_end(job_inputs, workdir, 2), workdir


# Float rounding only: a batch's gradient summed in two halves and averaged over the ranks
# is rounded differently (float32, unit roundoff 6e-8) from the one-process sum; over the
# toy's 45 steps the weights drift apart by about 1e-7 (docs/multi-gpu.md).
RTOL, WEIGHTS_ATOL = 1e-5, 1e-5
EXACT_COLUMNS = ["epoch", "lr", "train_acc", "clipped", "id_val", "id_test", "ood_real"]


def test_two_processes_give_the_history_of_one_with_the_same_global_batch(
    one_process, two_processes
):
    two, _ = two_processes
    assert two["config"]["processes"] == 2 and one_process["config"]["processes"] == 1
    assert two["config"]["settings"] == one_process["config"]["settings"]  # batch 8 in both
    pd.testing.assert_frame_equal(
        two["history"][EXACT_COLUMNS], one_process["history"][EXACT_COLUMNS]
    )
    pd.testing.assert_frame_equal(
        two["history"][["train_loss", "grad_norm_max"]],
        one_process["history"][["train_loss", "grad_norm_max"]],
        check_exact=False,
        rtol=RTOL,
    )
    assert two["metrics"]["best_epoch"] == one_process["metrics"]["best_epoch"]
    for weights, reference in [
        (two["weights"], one_process["weights"]),
        *[(two["kept"][name], kept) for name, kept in one_process["kept"].items()],
    ]:
        assert weights.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=RTOL, atol=WEIGHTS_ATOL)


def descendants(pid):
    """{pid: environment} of every live descendant of `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = {}, [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            try:
                with open(f"/proc/{child}/environ", "rb") as environ:
                    pairs = environ.read().split(b"\0")
            except OSError:
                continue
            found[child] = dict(p.decode().split("=", 1) for p in pairs if b"=" in p)
            queue.append(child)
    return found


def worker_pid(job_pid, rank, deadline):
    while time.monotonic() < deadline:
        for pid, environ in descendants(job_pid).items():
            if environ.get("RANK") == str(rank) and "LOCAL_RANK" in environ:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under {job_pid}")


def test_sigterm_to_one_rank_stops_both_and_the_rerun_ends_as_an_uninterrupted_run(
    job_inputs, two_processes, tmp_path
):
    reference, reference_dir = two_processes
    training_seconds = pd.read_csv(reference_dir / "out" / "history.csv")["seconds"].sum()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    state = tmp_path / "state" / "last.pt"
    window = 0.9 * training_seconds
    for _attempt in range(5):
        process = start_job(job_inputs, tmp_path, 2)
        deadline = time.monotonic() + 300
        # Training starts once the first state is saved (after the epoch-0 evaluation).
        while not state.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        rank1 = worker_pid(process.pid, 1, deadline)
        rank0 = worker_pid(process.pid, 0, deadline)
        time.sleep(rng.uniform(0.0, window))
        os.kill(rank1, signal.SIGTERM)  # the other rank and the launcher get no signal
        _, stderr = process.communicate(timeout=300)
        if not (tmp_path / "out" / "metrics.json").exists():
            break
        # The signal came after training (the machine ran faster or slower than the
        # reference): start again and stop it sooner.
        for folder in ("out", "state"):
            subprocess.run(["rm", "-rf", str(tmp_path / folder)], check=True)
        window /= 2
    context = f"random seed {seed}; stderr: {stderr}"
    assert process.returncode == STOPPED_EXIT_CODE, context
    assert stderr.strip().splitlines()[-1].startswith("robustft: stopped by SIGTERM at epoch")
    assert str(state) in stderr, context
    assert state.exists() and not (tmp_path / "out" / "metrics.json").exists(), context
    for pid in (rank0, rank1):  # no worker outlives the job
        assert not os.path.exists(f"/proc/{pid}"), pid
    log = (tmp_path / "job.log").read_text()
    stops = re.findall(r"(\[rank 1\] )?\S+: stopping by SIGTERM at epoch (\d+), step (\d+)", log)
    assert len(stops) == 2, log[-3000:]
    assert {rank for rank, _, _ in stops} == {"", "[rank 1] "}  # rank 0 and rank 1
    assert len({(epoch, step) for _, epoch, step in stops}) == 1, stops  # the same step

    rerun = start_job(job_inputs, tmp_path, 2)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert "resuming from" in (tmp_path / "job.log").read_text(), context
    result = finished(tmp_path)
    pd.testing.assert_frame_equal(result["history"], reference["history"])  # exactly
    assert result["metrics"] == reference["metrics"], context
    for weights, expected in [
        (result["weights"], reference["weights"]),
        *[(result["kept"][name], kept) for name, kept in reference["kept"].items()],
    ]:
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected), context
    assert not state.exists()
    assert math.isnan(result["history"]["train_loss"][0])
