"""What every workflow job does first: logging into its log file, threads, device, SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended.
STOPPED_EXIT_CODE = 128 + signal.SIGTERM


class StopRequested(BaseException):
    """SIGTERM arrived (SLURM sends it before a preemption or the time limit kills a job).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it.
    """


_stop = {"requested": False, "deferred": 0}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _stop["requested"] = True
    if not _stop["deferred"]:
        raise StopRequested("stopped by SIGTERM")


def stop_requested() -> bool:
    """Whether SIGTERM has arrived; checked by code that can save its state first."""
    return _stop["requested"]


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Inside this block SIGTERM only sets `stop_requested()`: the code polls it at points
    where it can save its state, then raises `StopRequested` itself."""
    _stop["deferred"] += 1
    try:
        yield
    finally:
        _stop["deferred"] -= 1


def resolve_device(name: str) -> str:
    """`auto` → `cuda` when a GPU is visible, else `cpu`; `cuda` without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA device is visible")
    return name


def set_hf_offline() -> None:
    """HF_HUB_OFFLINE=1 for this process and its children, also if huggingface_hub (which
    reads the variable once, at import) is already imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def use_deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without its import of
    torch._inductor, which costs about 2.4 s of every job's start-up (73 jobs in the default
    run) and matters only to torch.compile, which no step uses. If inductor is already
    loaded, its flag is set as torch would set it."""
    import torch

    torch._C._set_deterministic_algorithms(True, warn_only=True)
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        inductor_config.deterministic = True


@contextlib.contextmanager
def job(
    *, log_path: str | Path | None, threads: int | None = None, offline: bool = True
) -> Iterator[None]:
    """Run a workflow step: output and progress bars go to `log_path`; `threads` (for torch
    steps) caps torch's thread pools so that parallel jobs do not oversubscribe the cores and
    makes torch deterministic; `offline` forbids Hugging Face Hub calls (compute nodes may have
    no network, and a job must fail at once rather than hang on one); a failure writes its
    traceback to the log and one line to the terminal, and exits non-zero. SIGTERM ends the
    job with exit code 143 (after the code inside saved what it can; see `sigterm_deferred`)."""
    if offline:
        set_hf_offline()
    original_stderr = sys.stderr
    handle = open(log_path, "w", encoding="utf-8", buffering=1) if log_path else None  # noqa: SIM115
    if handle:
        sys.stdout = sys.stderr = handle
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _stop["requested"] = False
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if threads is not None:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            import torch

            torch.set_num_threads(max(1, threads))
            use_deterministic_algorithms()
        yield
    except StopRequested as stop:
        _report(f"robustft: {stop}", terminal=original_stderr, log_file=handle)
        sys.exit(STOPPED_EXIT_CODE)
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        _report(
            f"robustft: {type(error).__name__}: {one_line(error)}",
            terminal=original_stderr,
            log_file=handle,
        )
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        _stop["requested"] = False
        if handle:
            sys.stdout, sys.stderr = sys.__stdout__, original_stderr
            handle.close()


# A path-like token: something/with/a/slash, or a file name with an extension.
_PATH = re.compile(r"[\w.~-]*/[\w./~-]+|[\w-]+\.(?:h5|hdf5|json|safetensors|pt|csv|yaml|png)\b")


def one_line(error: BaseException) -> str:
    """The error's message on one line that still names its file.

    Library errors are one line already. Others (h5py's I/O errors, disk full) span several,
    with the file on a later line or only in `error.filename`: keep the first line and add
    the file from there.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0]
    filename = getattr(error, "filename", None)
    if filename and str(filename) not in first:
        return f"{filename}: {first}"
    if len(lines) == 1 or _PATH.search(first):
        return first
    named = next((line for line in lines[1:] if _PATH.search(line)), None)
    return f"{first} ({named})" if named else first


def _report(message: str, *, terminal: Any, log_file: Any) -> None:
    """One line on the terminal (and in the log): what a user reads first."""
    line = message.splitlines()[0] if message else "robustft: failed"
    print(line, file=terminal, flush=True)
    if log_file:
        print(line, file=log_file, flush=True)
