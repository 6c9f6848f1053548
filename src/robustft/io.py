"""Atomic file writing, checksums and small JSON helpers.

Every writer in the project goes through `atomic_path`: a crash or a SIGKILL leaves either
the old file or no file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A SIGKILL leaves the temporary (`.<name>.<random>.tmp`) behind; the next write of the same
    output removes those of this name first (`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkstemp creates 0600, and writers that recreate the file (safetensors) keep that:
        # give the result the permissions a plain open() would have, so collaborators on a
        # shared filesystem can read it.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# mkstemp's names: the prefix, 8 characters of this alphabet, the suffix. Matching exactly
# these keeps `.model.<x>.tmp` of output `model` apart from those of `model.safetensors`.
_TMP_RANDOM = r"[a-z0-9_]{8}"


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporaries that interrupted writes of `path` left beside it; return them."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TMP_RANDOM}\.tmp")
    stale = [
        entry
        for entry in (path.parent.iterdir() if path.parent.is_dir() else ())
        if pattern.fullmatch(entry.name)
    ]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def open_hdf5(path: str | Path, *, what: str = "file") -> Any:
    """Open an HDF5 file for reading; a missing or unreadable file is a one-line error."""
    import h5py  # here, not at the top: report jobs import this module and need no HDF5

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path}: not a readable HDF5 file ({error})") from None


def _json_default(value: Any) -> Any:
    # numpy scalars and paths appear in metrics; write them as plain JSON values.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
