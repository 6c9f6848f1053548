"""Data-parallel training on several processes of one machine (torch.distributed).

A job that wants N processes (one per GPU, or N CPU processes with gloo) calls a function
decorated with `data_parallel` with `processes=N`. The job's own process then only launches:
it starts torchrun (`torch.distributed.run --standalone`), which starts N workers
(`python -m robustft.distributed <folder>`), each calling the same function with the same
arguments inside an initialised process group (`current()` names the worker's rank), and
waits. Why torchrun started by the job, and not by the rule: a Snakemake `script:` job is one
Python process, locally and under SLURM alike (the SLURM profile asks for one task with N
GPUs), and torchrun brings what a launcher must get right: a free port per job, the worker
environment, and ending every worker when one fails. The job's process forwards SIGTERM to
torchrun, which forwards it to every worker.

Every worker writes its outcome (result, stop message or exception) to the launch folder; the
job returns rank 0's result, or raises the first error or `StopRequested`, so that a
data-parallel job fails, or stops with exit code 143, exactly like a one-process job.

Host-side agreement between ranks (whether SIGTERM arrived somewhere, whether state is due)
runs on a gloo group (`Parallel.control`) also when the gradients go over NCCL: such a flag
then costs no device synchronisation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from robustft import runtime
from robustft.evaluate import Scores, predict_logits, score_logits
from robustft.io import atomic_path

log = logging.getLogger(__name__)

SPEC_FILE = "spec.pkl"


@dataclass(frozen=True)
class Parallel:
    """This process's place among the data-parallel processes of one job."""

    rank: int
    world_size: int
    local_rank: int
    control: Any  # a gloo ProcessGroup for host-side flags and objects

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and resumable state."""
        return self.rank == 0


_current: dict[str, Parallel | None] = {"parallel": None}


def current() -> Parallel | None:
    """The worker's `Parallel` inside a data-parallel worker, else None."""
    return _current["parallel"]


def resolve_processes(*, processes: int | None, gpus: int) -> int:
    """Processes of one job: `processes` when set (config finetune.processes), else one per
    GPU the job asks for (resources.finetune.gpu), at least one."""
    if processes is not None:
        if processes < 1:
            raise ValueError(f"config key 'finetune.processes': must be >= 1, got {processes}")
        return processes
    return max(1, gpus)


def check_settings(
    *, processes: int, batch_size: int, bn: str, sync_batchnorm: bool, device: str
) -> None:
    """Refuse settings that `processes` data-parallel processes cannot run (one line each)."""
    if processes <= 1:
        return
    if batch_size % processes:
        raise ValueError(
            f"config key 'finetune.batch_size': {batch_size} is the global batch and must be "
            f"a multiple of the {processes} processes (resources.finetune.gpu or "
            "finetune.processes)"
        )
    if bn == "train" and sync_batchnorm and not str(device).startswith("cuda"):
        raise ValueError(
            "config key 'finetune.sync_batchnorm': torch's SyncBatchNorm runs on GPUs only; "
            "set it false to keep BatchNorm statistics per process on the CPU"
        )
    if str(device).startswith("cuda") and torch.cuda.device_count() < processes:
        raise ValueError(
            f"{processes} data-parallel processes need {processes} GPUs, but "
            f"{torch.cuda.device_count()} are visible (resources.finetune.gpu)"
        )


# ---- inside the workers: agreement, shares of batches, sharded evaluation --------------------


def agree(parallel: Parallel, flags: Sequence[bool]) -> list[bool]:
    """Each flag true on any rank, on every rank (one small all-reduce on the gloo group)."""
    values = torch.tensor([int(flag) for flag in flags], dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=parallel.control)
    return [bool(value) for value in values.tolist()]


def barrier(parallel: Parallel) -> None:
    dist.barrier(group=parallel.control)


def gather_objects(parallel: Parallel, value: Any) -> list[Any]:
    """`value` of every rank, in rank order, on every rank."""
    gathered: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(gathered, value, group=parallel.control)
    return gathered


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks (default group: on the training device)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def share_of_batches(order: torch.Tensor, *, batch_size: int, parallel: Parallel) -> torch.Tensor:
    """This rank's examples of each global batch of `order` (whole batches only): rows
    rank·n … (rank+1)·n − 1 of every batch of `batch_size`, n = batch_size / world_size.
    The ranks together see exactly the batches one process would."""
    batches = len(order) // batch_size
    share = batch_size // parallel.world_size
    per_batch = order[: batches * batch_size].view(batches, parallel.world_size, share)
    return per_batch[:, parallel.rank].reshape(-1)


def sharded_score(
    model: torch.nn.Module,
    data: Dataset,
    *,
    batch_size: int,
    device: str,
    num_workers: int,
    parallel: Parallel,
) -> Scores:
    """`evaluate.score` (accuracy and ECE) with the evaluation batches dealt out to the ranks
    (rank r scores batches r, r + N, ...), the logits gathered, and the scores computed from
    all of them on every rank. Each batch holds the images it holds in one process, so the
    logits, and the scores, are those of the one-process run."""
    size = len(data)  # type: ignore[arg-type]
    count = -(-size // batch_size)  # batches of one process; all full but the last
    mine = range(parallel.rank, count, parallel.world_size)
    indices = [i for b in mine for i in range(b * batch_size, min((b + 1) * batch_size, size))]
    scored = None
    if indices:
        scored = predict_logits(
            model,
            Subset(data, indices),
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
        )
    batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for rank, shard in enumerate(gather_objects(parallel, scored)):
        if shard is None:
            continue
        for k, b in enumerate(range(rank, count, parallel.world_size)):
            rows = slice(k * batch_size, (k + 1) * batch_size)
            batches[b] = (shard[0][rows], shard[1][rows])
    all_logits = np.concatenate([batches[b][0] for b in range(count)])
    all_labels = np.concatenate([batches[b][1] for b in range(count)])
    return score_logits(
        logits=all_logits,
        labels=all_labels,
        class_subset=getattr(data, "class_subset", None),
        class_groups=getattr(data, "class_groups", None),
    )


# ---- the job's process: launching the workers --------------------------------------------------

Function = TypeVar("Function", bound=Callable[..., Any])


def data_parallel(*, check: Callable[..., None] | None = None) -> Callable[[Function], Function]:
    """Decorator: run `function(**kwargs)` on `kwargs["processes"]` data-parallel processes
    when that is above 1 (see the module's docstring), after `check(**kwargs)` has refused
    what they cannot run; in a worker, or with one process, call it here."""

    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def wrapper(**kwargs: Any) -> Any:
            processes = int(kwargs.get("processes", 1))
            if processes <= 1 or current() is not None:
                return function(**kwargs)
            if check is not None:
                check(**kwargs)
            return launch(
                target=f"{function.__module__}:{function.__qualname__}",
                kwargs=kwargs,
                processes=processes,
            )

        return wrapper  # type: ignore[return-value]

    return decorate


def launch(*, target: str, kwargs: Mapping[str, Any], processes: int) -> Any:
    """`target` ("module:function") called with `kwargs` in `processes` workers started by
    torchrun; rank 0's return value. The job's threads are divided among the workers."""
    threads = max(1, torch.get_num_threads() // processes)
    with tempfile.TemporaryDirectory(prefix="robustft-ranks-") as tmp:
        folder = Path(tmp)
        spec = {"target": target, "kwargs": dict(kwargs), "threads": threads}
        (folder / SPEC_FILE).write_bytes(pickle.dumps(spec))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={processes}",
            "--max-restarts=0",
            f"--log-dir={folder / 'torchrun'}",  # its error files: gone with the folder
            "-m",
            "robustft.distributed",
            str(folder),
        ]
        log.info("starting %d data-parallel processes (torchrun) for %s", processes, target)
        returncode = _run_forwarding_sigterm(command)
        outcomes = {
            rank: pickle.loads(path.read_bytes())
            for rank in range(processes)
            if (path := folder / f"rank{rank}.pkl").exists()
        }
    return _job_outcome(outcomes, returncode=returncode, processes=processes)


def _log_descriptor() -> int | None:
    """The file descriptor of this process's stderr (the job's log), for the workers."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _run_forwarding_sigterm(command: list[str]) -> int:
    """Run `command`; SIGTERM to this process (inside `runtime.job`) is passed on to it."""
    descriptor = _log_descriptor()
    with runtime.sigterm_deferred():
        process = subprocess.Popen(
            command,
            stdout=descriptor,
            stderr=subprocess.STDOUT if descriptor is not None else None,
        )
        forwarded = False
        try:
            while True:
                try:
                    return process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
                if runtime.stop_requested() and not forwarded:
                    process.send_signal(signal.SIGTERM)
                    forwarded = True
        finally:
            if process.poll() is None:  # this process is failing: take the workers along
                process.terminate()
                process.wait()


def _job_outcome(outcomes: Mapping[int, dict[str, Any]], *, returncode: int, processes: int) -> Any:
    """Rank 0's result; else the first error (in time) of any rank; else `StopRequested`."""
    main = outcomes.get(0, {})
    if "result" in main:
        return main["result"]
    errors = sorted(
        (outcome["at"], rank, outcome["error"])
        for rank, outcome in outcomes.items()
        if "error" in outcome
    )
    if errors:
        _, rank, error = errors[0]
        if isinstance(error, BaseException):
            log.error("rank %d of %d failed first", rank, processes)
            raise error
        raise RuntimeError(f"rank {rank} of {processes}: {error}")
    stopped = [
        outcome["stopped"] for _, outcome in sorted(outcomes.items()) if "stopped" in outcome
    ]
    if stopped:
        raise runtime.StopRequested(main.get("stopped") or stopped[0])
    if runtime.stop_requested():
        raise runtime.StopRequested("stopped by SIGTERM while the processes started")
    raise RuntimeError(
        f"the {processes} data-parallel processes ended without a result (torchrun exit "
        f"code {returncode}); the log says why"
    )


# ---- a worker -------------------------------------------------------------------------------


def _target(name: str) -> Callable[..., Any]:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


@contextlib.contextmanager
def _process_group(*, device: str) -> Iterator[Parallel]:
    """The default process group (NCCL on GPUs, gloo on the CPU) from torchrun's environment,
    a gloo group for host-side flags, and `current()` set, for the block."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    try:
        control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        _current["parallel"] = Parallel(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            control=control,
        )
        yield _current["parallel"]
    finally:
        _current["parallel"] = None
        dist.destroy_process_group()


def _quiet_other_ranks(rank: int) -> None:
    """Rank 0 logs as a one-process job does; the others only warnings, marked with their rank."""
    if rank == 0:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
        )


def _picklable(error: BaseException) -> BaseException | str:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return f"{type(error).__name__}: {runtime.one_line(error)}"
    return error


def worker_main(folder: Path) -> None:
    """One worker: the spec's function in the process group; its outcome to `folder`."""
    spec = pickle.loads((folder / SPEC_FILE).read_bytes())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    kwargs = dict(spec["kwargs"])
    device = str(kwargs.get("device", "cpu"))
    if device.startswith("cuda"):
        device = kwargs["device"] = f"cuda:{local_rank}"
    if rank and "progress" in kwargs:
        kwargs["progress"] = False
    outcome: dict[str, Any] = {}
    # SIGTERM only sets the flag, from start to end: the training loop stops all ranks at
    # one step, and a second SIGTERM (torchrun passes one on to the ranks still running when
    # one has stopped) cannot cut the outcome short.
    with runtime.job(log_path=None, threads=spec["threads"]), runtime.sigterm_deferred():
        _quiet_other_ranks(rank)
        try:
            with _process_group(device=device):
                outcome["result"] = _target(spec["target"])(**kwargs)
        except runtime.StopRequested as stop:
            outcome["stopped"] = str(stop)
            raise
        except Exception as error:
            outcome.update(error=_picklable(error), at=time.time())
            raise
        finally:
            with atomic_path(folder / f"rank{rank}.pkl") as tmp:
                tmp.write_bytes(pickle.dumps(outcome))


if __name__ == "__main__":
    # Through the imported module, so that `current()` is the one the library reads.
    from robustft import distributed

    distributed.worker_main(Path(sys.argv[1]))
