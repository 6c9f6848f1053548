"""The data fingerprint: one hash that changes when, and only when, a dataset's files change.

A dataset is one or more folder trees (its sources, or an `imagefolder` root). The fingerprint
of a tree hashes
- every image file by its path and size (images are many and large: reading them all on
  each run would cost more than the run), and
- every other file (split lists, label arrays, binary batches, metadata) by its content.

A file's modification time is not part of it: `touch` changes nothing, adding, removing or
renaming an image or editing a list does. An image overwritten in place by one of exactly the
same size is the one change it cannot see (docs/reliability.md, "Data fingerprints").

Listings are cached per folder, keyed by the folder's modification time (which changes when
an entry is added, removed or renamed), and content hashes per file, keyed by size and
modification time: a rerun stats the folders and the data files, not every image, so that
the fingerprint of ImageNet costs milliseconds once its first listing exists. Hidden entries
(`.ipynb_checkpoints/`, `.DS_Store`) and `__MACOSX/` are no part of any dataset: the
readers' own rules (`readers.is_hidden`, `readers.IMAGE_EXTENSIONS`) decide.

Imported by the workflow at parse time: no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustft.data.readers import IMAGE_EXTENSIONS, is_hidden
from robustft.io import sha256_file, write_text

# Archives beside the extracted data are not read by any reader: size only, never hashed.
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z")
CACHE_FORMAT = 1
# A folder modified this recently may still change within the same timestamp tick: its
# listing is not reused on the next run (the "racy" case of git's index).
RACY_NS = 2_000_000_000


def _is_hashed(name: str) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return suffix not in IMAGE_EXTENSIONS and not name.lower().endswith(ARCHIVE_EXTENSIONS)


@dataclass
class TreeFingerprint:
    root: str
    fingerprint: str
    images: int = 0  # files fingerprinted by path and size
    bytes: int = 0
    folders: int = 0
    data_files: dict[str, str] = field(default_factory=dict)  # relative path → sha256

    def summary(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "fingerprint": self.fingerprint,
            "images": self.images,
            "bytes": self.bytes,
            "folders": self.folders,
            "data_files": dict(sorted(self.data_files.items())),
        }


def _load_cache(path: Path | None, root: str) -> dict[str, Any]:
    empty = {"format": CACHE_FORMAT, "root": root, "folders": {}, "hashes": {}}
    if path is None or not path.exists():
        return empty
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty  # a damaged cache is rebuilt, never trusted
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT:
        return empty
    if cache.get("root") != root:
        return empty
    return cache


def _list_folder(path: str, now_ns: int, mtime_ns: int) -> dict[str, Any]:
    """One folder's entry: digest of its images (name, size), its data files and subfolders."""
    digest = hashlib.sha256()
    subfolders, data_files = [], []
    images = size = 0
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if is_hidden(entry.name):
                continue
            if entry.is_dir():
                subfolders.append(entry.name)
            elif entry.is_file():
                if _is_hashed(entry.name):
                    data_files.append(entry.name)
                else:
                    length = entry.stat().st_size
                    digest.update(f"{entry.name}\0{length}\n".encode())
                    images += 1
                    size += length
    return {
        "mtime_ns": None if now_ns - mtime_ns < RACY_NS else mtime_ns,
        "digest": digest.hexdigest(),
        "images": images,
        "bytes": size,
        "subfolders": subfolders,
        "data_files": data_files,
    }


def tree_fingerprint(
    *, root: str | Path, cache_file: str | Path | None = None, max_hash_bytes: int = 1 << 32
) -> TreeFingerprint:
    """Fingerprint the tree under `root` (a missing root has the fingerprint "missing").

    `cache_file`: where listings and content hashes are kept between runs (written only when
    something changed). Data files above `max_hash_bytes` count by size only.
    """
    root = os.path.abspath(root)
    cache_path = Path(cache_file) if cache_file is not None else None
    if not os.path.isdir(root):
        kind = "not a folder" if os.path.exists(root) else "missing"
        return TreeFingerprint(root=root, fingerprint=f"{kind}:{root}")
    cache = _load_cache(cache_path, root)
    old_folders, old_hashes = cache["folders"], cache["hashes"]
    folders: dict[str, Any] = {}
    hashes: dict[str, Any] = {}
    now_ns = time.time_ns()
    result = TreeFingerprint(root=root, fingerprint="")
    lines = []
    pending = [""]
    while pending:
        relative = pending.pop()
        path = os.path.join(root, relative) if relative else root
        mtime_ns = os.stat(path).st_mtime_ns
        entry = old_folders.get(relative)
        if entry is None or entry.get("mtime_ns") != mtime_ns:
            entry = _list_folder(path, now_ns, mtime_ns)
        folders[relative] = entry
        lines.append(f"D {relative}\0{entry['digest']}")
        result.images += entry["images"]
        result.bytes += entry["bytes"]
        result.folders += 1
        for name in entry["data_files"]:
            file_relative = os.path.join(relative, name) if relative else name
            file_path = os.path.join(root, file_relative)
            try:
                stat = os.stat(file_path)
            except FileNotFoundError:
                continue  # removed since the listing; the folder's next listing drops it
            known = old_hashes.get(file_relative)
            key = [stat.st_size, stat.st_mtime_ns]
            if known and known[:2] == key and stat.st_mtime_ns < now_ns - RACY_NS:
                content = known[2]
            elif stat.st_size > max_hash_bytes:
                content = f"size:{stat.st_size}"
            else:
                content = sha256_file(file_path)
            hashes[file_relative] = [*key, content]
            lines.append(f"F {file_relative}\0{content}")
            result.data_files[file_relative] = content
            result.bytes += stat.st_size
        pending += [os.path.join(relative, sub) if relative else sub for sub in entry["subfolders"]]
    result.fingerprint = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    new_cache = {"format": CACHE_FORMAT, "root": root, "folders": folders, "hashes": hashes}
    if cache_path is not None and new_cache != cache:
        # A read-only results folder only costs the next run a fresh listing.
        with contextlib.suppress(OSError):
            write_text(cache_path, json.dumps(new_cache, sort_keys=True))
    return result


def file_fingerprint(path: str | Path) -> TreeFingerprint:
    """A single generated file (the toyshift task) by its content."""
    path = Path(path)
    if not path.is_file():
        return TreeFingerprint(root=str(path), fingerprint=f"missing:{path}")
    digest = sha256_file(path)
    return TreeFingerprint(
        root=str(path.resolve()),
        fingerprint=digest,
        bytes=path.stat().st_size,
        data_files={path.name: digest},
    )


def combine(fingerprints: dict[str, str]) -> str:
    """One fingerprint of a dataset from those of its trees, by name."""
    text = json.dumps(dict(sorted(fingerprints.items())), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_name(name: str, root: str | Path) -> str:
    """The cache file name of a tree: readable, and distinct for distinct roots."""
    tag = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:12]
    return f"{name}-{tag}.json"


def dataset_manifest(
    *, dataset: str, trees: dict[str, str], cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """The manifest of a dataset: per tree (source, imagefolder root or generated file) its
    fingerprint, image count, bytes and content hashes of its data files, and one fingerprint
    of the whole that every output made from the data records."""
    parts = {}
    for name, root in sorted(trees.items()):
        if os.path.isfile(root):
            part = file_fingerprint(root)
        else:
            cache = Path(cache_dir) / cache_name(name, root) if cache_dir is not None else None
            part = tree_fingerprint(root=root, cache_file=cache)
        if part.fingerprint.startswith(("missing:", "not a folder:")):
            raise FileNotFoundError(f"{root}: data of dataset {dataset!r} ({name}) missing")
        parts[name] = part.summary()
    return {
        "dataset": dataset,
        "fingerprint": combine({name: part["fingerprint"] for name, part in parts.items()}),
        "trees": parts,
    }
