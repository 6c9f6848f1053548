"""What every workflow job does first: logging into its log file, threads, device."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def job(
    *, log_path: str | Path | None, threads: int | None = None, offline: bool = True
) -> Iterator[None]:
    """Run a workflow step: output and progress bars go to `log_path`; `threads` (for torch
    steps) caps torch's thread pools so that parallel jobs do not oversubscribe the cores and
    makes torch deterministic; `offline` forbids Hugging Face Hub calls (compute nodes may have
    no network, and a job must fail at once rather than hang on one); a failure writes its
    traceback to the log and one line to the terminal, and exits non-zero."""
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
    if threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(max(1, threads))
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        message = f"robustft: {type(error).__name__}: {error}".splitlines()[0]
        print(message, file=original_stderr, flush=True)
        if handle:
            print(message, file=handle, flush=True)
        sys.exit(1)
    finally:
        if handle:
            sys.stdout, sys.stderr = sys.__stdout__, original_stderr
            handle.close()
