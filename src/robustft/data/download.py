"""Resumable, verified downloads and atomic extraction of the data sources.

`fetch_source` fills `<out_dir>` from a source's URLs:

1. each file is downloaded into `<cache>/<name>.part`, resuming with an HTTP Range request
   where a previous attempt stopped, then renamed to `<cache>/<name>`;
2. its checksum is checked: the published MD5 where there is one, otherwise the SHA-256
   recorded by the first download (`<cache>/checksums.json`, trust on first use). A mismatch
   deletes the file (the next run downloads it again) and fails with one line;
3. archives are unpacked, plain files copied, into a temporary folder beside `out_dir`; its
   layout and its sizes (`sources.check_sizes`: a smaller copy is refused unless
   `allow_subset`) are checked; `MANIFEST.json` records the checksums and the sizes; the
   folder is renamed onto `out_dir`. A failure at any step leaves no `out_dir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustft.data.sources import SOURCES, Download, SizeMismatch, check_layout, check_sizes
from robustft.io import write_json

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or its verification failed; the message is one line naming the file."""


def _digests(path: Path) -> dict[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def download_file(url: str, path: str | Path, *, timeout: float = 60.0) -> Path:
    """Download `url` to `path` via `path.part`, resuming a partial `.part` with HTTP Range."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "robustft"})
    if offset and url.startswith(("http://", "https://")):
        request.add_header("Range", f"bytes={offset}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = getattr(response, "status", None)
            if offset and status != 206:
                offset = 0  # the server ignored the Range header: start again
            log.info("%s: %s from byte %d", path.name, url, offset)
            with open(part, "ab" if offset else "wb") as handle:
                shutil.copyfileobj(response, handle, CHUNK)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            pass  # Range not satisfiable: the .part is already the whole file
        else:
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason} (for {path})") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"{url}: download failed ({reason}); {part} is kept and the next run resumes it"
        ) from None
    part.replace(path)
    return path


def _load_known(cache: Path) -> dict[str, str]:
    known = cache / "checksums.json"
    if not known.exists():
        return {}
    try:
        return dict(json.loads(known.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValueError, TypeError):
        raise DownloadError(f"{known}: not valid JSON; delete it to re-record") from None


def verify(path: Path, item: Download, *, known: Mapping[str, str]) -> dict[str, str]:
    """Check `path` against the published MD5 or the recorded SHA-256; delete it on mismatch."""
    digests = _digests(path)
    expected = ("md5", item.md5) if item.md5 else ("sha256", known.get(item.filename))
    if expected[1] and digests[expected[0]] != expected[1]:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{path}: checksum mismatch ({expected[0]} {digests[expected[0]]}, expected "
            f"{expected[1]}); deleted, the next run downloads it again"
        )
    return digests


def _unpack(archive: Path, into: Path) -> None:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle:
                bad = handle.testzip()
                if bad is not None:
                    raise DownloadError(f"{archive}: corrupt member {bad}")
                handle.extractall(into)
        else:
            with tarfile.open(archive) as handle:
                # filter="data": no absolute paths, links out of the folder or device files.
                handle.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise DownloadError(f"{archive}: not a complete archive ({error})") from None


def fetch_source(
    *,
    source: str,
    out_dir: str | Path,
    cache_dir: str | Path,
    urls: Mapping[str, str] | None = None,
    after_unpack: Any = None,
    allow_subset: bool = False,
) -> dict[str, Any]:
    """Download, verify and unpack every file of `source` into `out_dir`, atomically.

    `urls`: replacement URLs by file name (mirrors; the tests' local server).
    `after_unpack(folder)`: a step run on the unpacked folder before its layout is checked.
    `allow_subset`: accept unpacked files that hold fewer images than published (a warning,
    and `complete: false` in MANIFEST.json) instead of refusing them.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")
    spec = SOURCES[source]
    if not spec.downloads:
        raise DownloadError(f"{source}: {spec.how_to_get}")
    out_dir, cache = Path(out_dir), Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    known = _load_known(cache)
    manifest: dict[str, Any] = {"source": source, "files": {}}
    files = []
    for item in spec.downloads:
        target = cache / item.filename
        if not target.exists():
            download_file((urls or {}).get(item.filename, item.url), target)
        digests = verify(target, item, known=known)
        manifest["files"][item.filename] = {"url": item.url, **digests}
        files.append((item, target))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DownloadError(f"{out_dir}: exists and is not empty; remove it to fetch again")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        for item, target in files:
            if item.extract:
                try:
                    _unpack(target, tmp)
                except DownloadError:
                    target.unlink(missing_ok=True)  # fetch it again next time
                    raise
            else:
                (tmp / item.dest).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, tmp / item.dest / item.filename)
        if after_unpack is not None:
            after_unpack(tmp)
        try:
            check_layout(source, tmp)
        except FileNotFoundError as error:
            raise DownloadError(
                f"{source}: unpacked files lack the expected layout: {error}"
            ) from None
        try:
            sizes = check_sizes(source=source, root=tmp, allow_subset=allow_subset)
        except SizeMismatch as error:
            # A verified archive that holds less (a changed upload, or an unpublished
            # checksum's first download): never unpacked into place, never trusted.
            message = str(error).replace(str(tmp), str(out_dir))
            raise DownloadError(f"{source}: the download is refused: {message}") from None
        manifest["complete"] = all(split["complete"] for split in sizes.values())
        manifest["sizes"] = sizes
        write_json(tmp / "MANIFEST.json", manifest)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); Snakemake may have created it
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Trust on first use, recorded only once the files unpacked into the expected layout (a
    # truncated first download must not become the reference).
    new = {
        item.filename: manifest["files"][item.filename]["sha256"]
        for item, _ in files
        if not item.md5 and item.filename not in known
    }
    if new:
        log.info("first download, recorded sha256: %s", new)
        write_json(cache / "checksums.json", {**known, **new})
    # The archives are no longer needed once unpacked and verified (FMoW alone is 54 GB).
    for item, target in files:
        if item.extract:
            target.unlink(missing_ok=True)
    return manifest


def build_breeds_class_maps(folder: str | Path) -> None:
    """living17.json and entity30.json from the BREEDS info files, through the `robustness`
    package's helpers (`make_living17/make_entity30(info_dir, split="rand")`)."""
    folder = Path(folder)
    try:
        from robustness.tools import breeds_helpers  # type: ignore[import-not-found]
    except ImportError:
        raise DownloadError(
            f"{folder}: building living17.json/entity30.json from the BREEDS info files needs "
            "the `robustness` package (pip install robustness==1.2.1.post2), or set paths.breeds "
            "to a folder holding them (format: docs/paper-settings.md, 'BREEDS class maps')"
        ) from None
    for name, make in (
        ("living17", breeds_helpers.make_living17),
        ("entity30", breeds_helpers.make_entity30),
    ):
        _, (source, target), label_map = make(str(folder), split="rand")
        classes = [
            {"name": label_map[i], "source": list(map(int, s)), "target": list(map(int, t))}
            for i, (s, t) in enumerate(zip(source, target, strict=True))
        ]
        write_json(folder / f"{name}.json", {"classes": classes, "split": "rand"})
