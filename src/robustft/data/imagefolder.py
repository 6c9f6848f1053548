"""Bring-your-own data: the `imagefolder` dataset type.

Each split is either a folder of class folders (`<split dir>/<class>/<image>`) or a list file
(`.csv` or `.txt`) of `path,label` lines, paths relative to the dataset's root. Labels are class
names, or integer ids (0-based, in class order). Classes: `classes` from the config, else the
sorted class folders (or label names) of `train`. A split without `val` gets one carved from
`train`.

Folders: hidden folders (`.ipynb_checkpoints`), `__MACOSX` and folders without image files are
not classes (ignored, one warning line); hidden files are not images; images in subfolders of a
class folder count, as in torchvision's ImageFolder; other files are skipped with one warning.
Lists: UTF-8 (a BOM is dropped), an optional header on the first line, blank lines skipped. An
image listed twice in a split, or in two of the splits used (compared by resolved path, symlinks
followed), is an error unless `duplicates: warn`; the check reads every used split's listing
(paths only, no image is decoded) whichever split is loaded, so that every job of a dataset agrees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustft.data import readers
from robustft.data.splits import ID_SPLITS, ImageFiles, carve_val, take

log = logging.getLogger(__name__)
DUPLICATES = ("error", "warn")
LIST_SUFFIXES = (".csv", ".txt")


@dataclass(frozen=True)
class _Listing:
    """One split's images as listed, for messages: a folder of class folders or a list file."""

    source: Path
    paths: tuple[str, ...]
    labels: np.ndarray | None = None  # folders: label ids
    raw_labels: tuple[str, ...] = ()  # lists: labels as written
    listed: tuple[str, ...] = ()  # lists: paths as written
    lines: tuple[int, ...] = ()  # lists: line numbers

    def at(self, index: int) -> str:
        return f"{self.source}:{self.lines[index]}" if self.lines else self.paths[index]

    def entry(self, index: int) -> str:
        return f"{self.at(index)}: {self.listed[index]}" if self.lines else self.paths[index]


def _missing(path: Path, *, split: str, dataset: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path}: split {split!r} of dataset {dataset!r} missing "
        f"(dataset_settings.{dataset}.splits.{split})"
    )


def _class_names(
    root: Path, train: str, classes: list[str] | None, *, dataset: str
) -> tuple[str, ...]:
    if classes:
        return tuple(classes)
    path = root / train
    if path.is_dir():
        return tuple(readers.list_class_folders(path))
    if not path.exists():
        raise _missing(path, split="train", dataset=dataset)
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise _not_a_list(path, split="train", dataset=dataset)
    listed = readers.read_path_label_csv(path, image_root=root, classes=None)
    return tuple(sorted(set(listed.labels)))


def _not_a_list(path: Path, *, split: str, dataset: str) -> ValueError:
    return ValueError(
        f"{path}: split {split!r} of dataset {dataset!r} is neither a folder of class folders "
        f"nor a {'/'.join(LIST_SUFFIXES)} list (dataset_settings.{dataset}.splits.{split})"
    )


def _listing(root: Path, entry: str, names: tuple[str, ...], *, dataset: str, split: str):
    path = root / entry
    if path.is_dir():
        index = {name: i for i, name in enumerate(names)}
        images = readers.read_class_folders(path, class_to_label=index)
        return _Listing(source=path, paths=images.paths, labels=images.labels)
    if not path.exists():
        raise _missing(path, split=split, dataset=dataset)
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise _not_a_list(path, split=split, dataset=dataset)
    listed = readers.read_path_label_csv(path, image_root=root, classes=names)
    return _Listing(
        source=path,
        paths=listed.paths,
        raw_labels=listed.labels,
        listed=listed.listed,
        lines=listed.lines,
    )


def _labels(listing: _Listing, names: tuple[str, ...], *, dataset: str) -> np.ndarray:
    if listing.labels is not None:
        return listing.labels
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for number, label in enumerate(listing.raw_labels):
        if label in index:
            labels.append(index[label])
        elif readers.is_label_id(label) and int(label) < len(names):
            labels.append(int(label))
        else:
            shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
            raise ValueError(
                f"{listing.at(number)}: label {label!r} is neither a class of dataset "
                f"{dataset!r} nor a class id 0..{len(names) - 1} ({len(names)} classes: {shown})"
            )
    return np.asarray(labels, dtype=np.int64)


def _resolver() -> Callable[[str], str]:
    """Path → its real path; each folder is resolved once (ImageNet-sized lists stay cheap),
    then a file that is a symlink is followed (splits built from links to one pool)."""
    folders: dict[str, str] = {}

    def resolve(path: str) -> str:
        folder, name = os.path.split(os.path.abspath(path))
        real = folders.get(folder)
        if real is None:
            real = folders[folder] = os.path.realpath(folder)
        full = os.path.join(real, name)
        return os.path.realpath(full) if os.path.islink(full) else full

    return resolve


def _duplicates(listings: Mapping[str, _Listing]) -> list[str]:
    """One line per split with an image listed twice and per pair of splits sharing images."""
    resolve = _resolver()
    first: dict[str, dict[str, int]] = {}
    problems = []
    for split, listing in listings.items():
        seen: dict[str, int] = {}
        again = []
        for index, path in enumerate(listing.paths):
            key = resolve(path)
            if key in seen:
                again.append((seen[key], index))
            else:
                seen[key] = index
        first[split] = seen
        if again:
            earlier, index = again[0]
            problems.append(
                f"{listing.entry(index)} is listed again (first at {listing.at(earlier)}); "
                f"{len(again)} duplicate(s) in split {split!r}"
            )
    splits = list(listings)
    for number, a in enumerate(splits):
        for b in splits[number + 1 :]:
            shared = [(index, first[a][key]) for key, index in first[b].items() if key in first[a]]
            if shared:
                index, other = min(shared)
                problems.append(
                    f"{listings[b].entry(index)} is also in split {a!r} at "
                    f"{listings[a].at(other)}; {len(shared)} image(s) in both {a!r} and {b!r}"
                )
    return problems


def load_imagefolder_split(*, split: str, options: Mapping[str, Any], dataset: str):
    root = Path(options["root"])
    splits: dict[str, str] = dict(options["splits"])
    if split not in splits and split != "val":
        known = sorted({*splits, "val"} if "val" not in splits else splits)
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; splits: {known}")
    mode = options.get("duplicates") or "error"
    if mode not in DUPLICATES:
        raise ValueError(f"dataset_settings.{dataset}.duplicates: {mode!r}, expected error or warn")
    names = _class_names(root, splits["train"], options.get("classes"), dataset=dataset)
    ood = options.get("ood_splits")
    ood = list(ood) if ood is not None else [s for s in splits if s not in ID_SPLITS]
    # Every split the dataset's jobs use, so that each job finds the same duplicates.
    used = [s for s in ID_SPLITS if s in splits] + ood + ([split] if split in splits else [])
    listings = {
        name: _listing(root, splits[name], names, dataset=dataset, split=name)
        for name in dict.fromkeys(used)
    }
    problems = _duplicates(listings)
    if problems and mode == "error":
        raise ValueError(
            f"{problems[0]}; an image belongs in one split, once: remove the duplicates, or set "
            f"dataset_settings.{dataset}.duplicates: warn to keep them"
        )
    for problem in problems:
        readers.warn_once(
            f"{problem}; kept as listed (dataset_settings.{dataset}.duplicates)", logger=log
        )
    carved = split in ("train", "val") and "val" not in splits
    listing = listings["train" if carved else split]
    labels = _labels(listing, names, dataset=dataset)
    files = ImageFiles(paths=tuple(listing.paths), labels=labels, class_names=names)
    if carved:
        train_index, val_index = carve_val(
            labels, fraction=float(options["val_fraction"]), seed=int(options["split_seed"])
        )
        return take(files, train_index if split == "train" else val_index)
    return files
