"""The registry of settings: which splits a dataset has and how to read one.

Split names: `train`, `val`, `test` are in-distribution (ID); every other split is an
out-of-distribution (OOD) test set, named after its domain or source. Labels of every split are
in the setting's ID label space. A split is either `ImageArrays` (uint8 images in memory: the
toy data, CIFAR, STL) or `ImageFiles` (paths decoded later, in DataLoader workers), both in
`robustft.data.splits`; `robustft.data.datasets.as_torch_dataset` turns either into a torch
Dataset.

Every built-in setting is one registry entry: `SETTINGS` (read from downloaded or existing
sources) and `GENERATED` (made by the workflow from a seed: toyshift). Code asks an entry
(`generated`, `in_memory`, `ood_splits`) rather than comparing dataset names.

Imported by the workflow at parse time: numpy and h5py (the toyshift file format), no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from robustft.data import readers, toyshift_format
from robustft.data.imagefolder import load_imagefolder_split
from robustft.data.sources import (
    SOURCES,
    SizeMismatch,
    check_layout,
    mismatch_message,
    official_classes,
)

# Re-exported: the split types and helpers live in `splits`; callers import them from here too.
from robustft.data.splits import ID_SPLITS as ID_SPLITS
from robustft.data.splits import ImageArrays as ImageArrays
from robustft.data.splits import ImageFiles as ImageFiles
from robustft.data.splits import Split as Split
from robustft.data.splits import carve_val as carve_val
from robustft.data.splits import split_column as split_column
from robustft.data.splits import take as take

TRANSFORMS = ("resize", "resize_center_crop", "random_resized_crop", "resize_random_crop")


@dataclass(frozen=True)
class Setting:
    """A distribution-shift setting: the sources it reads, its splits and transforms."""

    name: str
    id_source: str
    ood_sources: Mapping[str, str]  # OOD split → source it is read from
    train_transform: str
    eval_transform: str
    has_val: bool = False  # False: `val` is carved from ID train (val_fraction, split_seed)
    optional_splits: tuple[str, ...] = ()  # OOD splits used by default only if configured
    extra_sources: tuple[str, ...] = ()  # read for every split (BREEDS class maps)
    # Images held in memory at their own small size (ImageArrays): baseline models train on
    # these; the others need a published line (baseline.lines) for effective robustness.
    in_memory: bool = False
    description: str = ""
    generated: ClassVar[bool] = False


SETTINGS: dict[str, Setting] = {
    setting.name: setting
    for setting in (
        Setting(
            name="cifar10_stl",
            id_source="cifar10",
            ood_sources={"stl": "stl10"},
            train_transform="resize",
            eval_transform="resize",
            in_memory=True,
            description="CIFAR-10 → STL-10 test (STL→CIFAR label map, monkey dropped)",
        ),
        Setting(
            name="cifar10_cifar101",
            id_source="cifar10",
            ood_sources={"cifar101": "cifar101"},
            train_transform="resize",
            eval_transform="resize",
            in_memory=True,
            description="CIFAR-10 → CIFAR-10.1 v6",
        ),
        *(
            Setting(
                name=name,
                id_source="imagenet",
                ood_sources={"target": "imagenet"},
                extra_sources=("breeds",),
                train_transform="random_resized_crop",
                eval_transform="resize_center_crop",
                description=f"BREEDS {title}: source → target subclasses (ImageNet train/val)",
            )
            for name, title in (("living17", "Living-17"), ("entity30", "Entity-30"))
        ),
        Setting(
            name="domainnet",
            id_source="domainnet",
            ood_sources={"real": "domainnet", "painting": "domainnet", "clipart": "domainnet"},
            train_transform="resize_random_crop",
            eval_transform="resize",
            description="DomainNet-40 (SENTRY mini lists): sketch → real, painting, clipart",
        ),
        Setting(
            name="fmow",
            id_source="fmow",
            ood_sources={"africa": "fmow", "europe": "fmow"},
            train_transform="resize",
            eval_transform="resize",
            has_val=True,
            description="WILDS FMoW: region Americas → Africa (Europe logged too)",
        ),
        Setting(
            name="imagenet",
            id_source="imagenet",
            ood_sources={
                "v2": "imagenet_v2",
                "r": "imagenet_r",
                "a": "imagenet_a",
                "sketch": "imagenet_sketch",
                "objectnet": "objectnet",
            },
            optional_splits=("objectnet",),  # where paths.objectnet names a copy
            train_transform="random_resized_crop",
            eval_transform="resize_center_crop",
            description="ImageNet → V2 matched-frequency, R, A, Sketch (R, A over 200 classes)",
        ),
    )
}


@dataclass(frozen=True)
class GeneratedSetting:
    """A setting the workflow generates from a seed (rule generate_<name>) into HDF5 files of
    the toyshift format in `folder`: task.h5 (ID train, val, test, then one OOD split per
    other domain) and pretrain.h5. The config key of its name holds the generator's settings,
    `id_domain` among them; every other domain is an OOD split."""

    name: str
    folder: str  # relative to the workflow's working directory
    domains: tuple[str, ...]
    default_id_domain: str  # when the config names none (the schema's default)
    train_transform: str = "resize"
    eval_transform: str = "resize"
    description: str = ""
    generated: ClassVar[bool] = True
    in_memory: ClassVar[bool] = True

    @property
    def task_file(self) -> str:
        """The file the workflow's jobs read (relative to the working directory)."""
        return f"{self.folder}/task.h5"

    def files(self, *, root: str | Path) -> dict[str, Path]:
        """The generated files under `root` (the setting's folder wherever it is)."""
        root = Path(root)
        return {"task": root / "task.h5", "pretrain": root / "pretrain.h5"}

    def ood_splits(self, config: Mapping[str, Any]) -> list[str]:
        """The domains other than the configured ID domain, in the generator's order."""
        id_domain = (config.get(self.name) or {}).get("id_domain") or self.default_id_domain
        return [domain for domain in self.domains if domain != id_domain]

    def load(self, *, split: str, root: str | Path) -> ImageArrays:
        task = self.files(root=root)["task"]
        arrays = toyshift_format.read_split(task, split)
        return ImageArrays(
            images=arrays.images,
            labels=arrays.labels,
            class_names=tuple(toyshift_format.class_names(task)),
        )


GENERATED: dict[str, GeneratedSetting] = {
    setting.name: setting
    for setting in (
        GeneratedSetting(
            name="toyshift",
            folder="resources/datasets/toyshift",
            domains=toyshift_format.DOMAINS,
            default_id_domain="sketch",
            description="toyshift: procedural shapes, the ID domain → the other three",
        ),
    )
}
# Every built-in setting by name, the generated ones first.
BUILTIN_SETTINGS: dict[str, Setting | GeneratedSetting] = {**GENERATED, **SETTINGS}
BUILTIN = tuple(BUILTIN_SETTINGS)
DEFAULT_VAL_FRACTION = 0.1


# --- resolving a setting from the config ------------------------------------------------


def dataset_options(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The settings of one dataset: its `dataset_settings` entry over the registry's defaults.

    Keys: type (builtin | imagefolder), ood_splits, train_transform, eval_transform,
    val_fraction, split_seed, for imagefolder root, splits, classes, and for a built-in
    setting allow_subset (the config's `allow_subset` sources it reads; only when any).
    """
    own = dict((config.get("dataset_settings") or {}).get(dataset) or {})
    kind = own.get("type") or ("builtin" if dataset in BUILTIN else None)
    if kind is None:
        raise ValueError(
            f"dataset {dataset!r} is not built in ({', '.join(BUILTIN)}); describe it under "
            f"dataset_settings.{dataset} with type: imagefolder"
        )
    if kind == "builtin" and dataset not in BUILTIN:
        raise ValueError(f"dataset_settings.{dataset}.type: {dataset!r} is not a built-in dataset")
    options: dict[str, Any] = {
        "type": kind,
        "val_fraction": own.get("val_fraction") or DEFAULT_VAL_FRACTION,
        "split_seed": int(own.get("split_seed") or 0),
    }
    if kind == "imagefolder":
        splits = dict(own.get("splits") or {})
        for required in ("train", "test"):
            if required not in splits:
                raise ValueError(f"dataset_settings.{dataset}.splits: no {required!r} entry")
        if not own.get("root"):
            raise ValueError(f"dataset_settings.{dataset}.root: required for type imagefolder")
        ood = own.get("ood_splits")
        ood = list(ood) if ood is not None else [s for s in splits if s not in ID_SPLITS]
        unknown = [s for s in ood if s not in splits or s in ID_SPLITS]
        if unknown:
            raise ValueError(
                f"dataset_settings.{dataset}.ood_splits: {unknown} not among its splits "
                f"{sorted(s for s in splits if s not in ID_SPLITS)}"
            )
        options.update(
            root=str(own["root"]),
            splits={k: str(v) for k, v in splits.items()},
            classes=list(own["classes"]) if own.get("classes") else None,
            ood_splits=ood,
            train_transform=own.get("train_transform") or "resize",
            eval_transform=own.get("eval_transform") or "resize",
            duplicates=own.get("duplicates") or "error",
        )
        return options
    if dataset in GENERATED:
        # A generated setting's splits and transforms are fixed by its generator's config.
        generated = GENERATED[dataset]
        options.update(
            ood_splits=generated.ood_splits(config),
            train_transform=generated.train_transform,
            eval_transform=generated.eval_transform,
        )
        return options
    setting = SETTINGS[dataset]
    ood = own.get("ood_splits")
    if ood is None:
        configured = config.get("paths") or {}
        ood = [
            split
            for split, source in setting.ood_sources.items()
            if split not in setting.optional_splits or configured.get(source)
        ]
    unknown = [s for s in ood if s not in setting.ood_sources]
    if unknown:
        raise ValueError(
            f"dataset_settings.{dataset}.ood_splits: {unknown} not among "
            f"{list(setting.ood_sources)}"
        )
    options.update(
        ood_splits=ood,
        train_transform=own.get("train_transform") or setting.train_transform,
        eval_transform=own.get("eval_transform") or setting.eval_transform,
    )
    # Present only when set, so that the params (and results) of complete copies stay as
    # they were; listing a source reruns the jobs that read it, which read a subset.
    read = dataset_sources(dataset, ood_splits=ood)
    allowed = [source for source in config.get("allow_subset") or [] if source in read]
    if allowed:
        options["allow_subset"] = allowed
    return options


def dataset_sources(dataset: str, *, ood_splits: Sequence[str]) -> list[str]:
    """The sources (download units, see `sources.SOURCES`) a setting reads."""
    if dataset not in SETTINGS:
        return []
    setting = SETTINGS[dataset]
    names = [setting.id_source, *setting.extra_sources]
    names += [setting.ood_sources[split] for split in ood_splits]
    return list(dict.fromkeys(names))


def source_splits(dataset: str, split: str) -> list[tuple[str, str]]:
    """The (source, split of `Source.sizes`) pairs one split of a built-in setting reads: their
    counts say whether it comes from a complete copy (none for other datasets)."""
    if dataset not in SETTINGS:
        return []
    setting = SETTINGS[dataset]
    id_part = "train" if split in ("train", "val") else "test"
    if dataset in ("living17", "entity30"):
        return [("imagenet", "train" if id_part == "train" else "val"), ("breeds", dataset)]
    if dataset == "domainnet":
        domain = DOMAINNET_ID_DOMAIN if split in ID_SPLITS else split
        return [("domainnet", f"{domain}_{id_part}")]
    if dataset == "fmow":
        return [("fmow", {"train": "train", "val": "id_val"}.get(split, "val"))]
    if split in ID_SPLITS:
        if dataset == "imagenet":
            return [("imagenet", "train" if id_part == "train" else "val")]
        return [(setting.id_source, id_part)]
    return [(setting.ood_sources[split], "test")]


def dataset_files(dataset: str, *, root: str | Path) -> dict[str, Path]:
    """The files a generated setting's reader needs, relative to its resource folder."""
    if dataset in GENERATED:
        return GENERATED[dataset].files(root=root)
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(GENERATED)}")


# --- loading ------------------------------------------------------------------------------


def load_split(
    *,
    dataset: str,
    split: str,
    root: str | Path | Mapping[str, str | Path],
    options: Mapping[str, Any] | None = None,
) -> Split:
    """Images and labels of one split, labels already in the ID label space.

    `root`: a generated setting's folder, or {source: folder} for the real settings (see
    `sources.SOURCES`). `options`: `dataset_options(config, dataset)` (defaults if None).
    """
    if dataset in GENERATED:
        return GENERATED[dataset].load(split=split, root=root)  # type: ignore[arg-type]
    options = dict(options or dataset_options({}, dataset))
    if options["type"] == "imagefolder":
        return load_imagefolder_split(split=split, options=options, dataset=dataset)
    if dataset not in SETTINGS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(BUILTIN)}")
    setting = SETTINGS[dataset]
    if split not in ID_SPLITS and split not in setting.ood_sources:
        raise ValueError(
            f"{dataset} has no split {split!r}; splits: {[*ID_SPLITS, *setting.ood_sources]}"
        )
    if not isinstance(root, Mapping):
        raise ValueError(f"{dataset}: root must map sources to folders, got {root!r}")
    roots = {name: Path(folder) for name, folder in root.items()}
    needed = dataset_sources(dataset, ood_splits=[split] if split in setting.ood_sources else [])
    for source in needed:
        if source not in roots:
            raise ValueError(f"{dataset}: no folder given for source {source!r}")
        check_layout(source, roots[source])
    allowed = frozenset(options.get("allow_subset") or ())
    if split in ("train", "val") and not setting.has_val:
        full = _READERS[dataset](split="train", roots=roots, allowed=allowed)
        train_index, val_index = carve_val(
            full.labels, fraction=float(options["val_fraction"]), seed=int(options["split_seed"])
        )
        return take(full, train_index if split == "train" else val_index)
    return _READERS[dataset](split=split, roots=roots, allowed=allowed)


def _cifar10(split: str, roots: Mapping[str, Path]) -> ImageArrays:
    folder = roots["cifar10"] / "cifar-10-batches-bin"
    files = readers.CIFAR10_TRAIN_FILES if split == "train" else readers.CIFAR10_TEST_FILES
    images, labels = readers.read_cifar10_bin([folder / name for name in files])
    return ImageArrays(images=images, labels=labels, class_names=readers.CIFAR10_CLASSES)


def _cifar10_stl(
    *, split: str, roots: Mapping[str, Path], allowed: frozenset[str] = frozenset()
) -> ImageArrays:
    if split != "stl":
        return _cifar10(split, roots)
    folder = roots["stl10"] / "stl10_binary"
    images, labels = readers.read_stl10(folder / "test_X.bin", folder / "test_y.bin")
    images, labels = readers.stl_to_cifar(images, labels)
    return ImageArrays(images=images, labels=labels, class_names=readers.CIFAR10_CLASSES)


def _cifar10_cifar101(
    *, split: str, roots: Mapping[str, Path], allowed: frozenset[str] = frozenset()
) -> ImageArrays:
    if split != "cifar101":
        return _cifar10(split, roots)
    folder = roots["cifar101"]
    images, labels = readers.read_npy_pair(
        folder / "cifar10.1_v6_data.npy", folder / "cifar10.1_v6_labels.npy"
    )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{folder / 'cifar10.1_v6_labels.npy'}: labels must be 0..9")
    return ImageArrays(images=images, labels=labels, class_names=readers.CIFAR10_CLASSES)


DOMAINNET_ID_DOMAIN = "sketch"


def _domainnet(
    *, split: str, roots: Mapping[str, Path], allowed: frozenset[str] = frozenset()
) -> ImageFiles:
    root = roots["domainnet"]
    domain, part = (DOMAINNET_ID_DOMAIN, split) if split in ID_SPLITS else (split, "test")
    images, names = readers.read_sentry_list(
        root / "txt" / f"{domain}_{part}_mini.txt", image_root=root
    )
    # The class names come from the ID training list, so that every split agrees on them.
    _, id_names = readers.read_sentry_list(
        root / "txt" / f"{DOMAINNET_ID_DOMAIN}_train_mini.txt", image_root=root
    )
    for label, name in names.items():
        if id_names.get(label) != name:
            raise ValueError(
                f"{root / 'txt' / f'{domain}_{part}_mini.txt'}: id {label} is {name!r} here "
                f"but {id_names.get(label)!r} in the sketch training list"
            )
    count = max(id_names) + 1
    class_names = tuple(id_names.get(i, f"class_{i}") for i in range(count))
    return ImageFiles(paths=images.paths, labels=images.labels, class_names=class_names)


def imagenet_wnids() -> list[str]:
    """ImageNet's 1000 classes in the standard order (the official list, never the folders
    of a copy: a copy with fewer folders keeps every label where it belongs)."""
    return list(official_classes("imagenet"))


def check_class_folders(
    *, source: str, split: str, folder: Path, allowed: frozenset[str]
) -> list[str]:
    """The class folders of a copy, each one of the source's official classes (else an error
    naming it); fewer than the official number is refused unless `allowed` names the source."""
    size = next(s for s in SOURCES[source].sizes if s.split == split)
    official = set(official_classes(size.names))
    present = readers.list_class_folders(folder)
    for name in present:
        if name not in official:
            raise ValueError(
                f"{SOURCES[source].short} {split}: {folder / name} is not one of the "
                f"{len(official)} official classes: a different dataset or version?"
            )
    if len(present) != size.classes and source not in allowed:
        raise SizeMismatch(
            mismatch_message(
                source=source,
                split=split,
                where=f"under {folder}",
                found_classes=len(present),
                expected_classes=size.classes,
            )
        )
    return present


def _imagenet(
    *, split: str, roots: Mapping[str, Path], allowed: frozenset[str] = frozenset()
) -> ImageFiles:
    wnids = imagenet_wnids()
    index = {wnid: i for i, wnid in enumerate(wnids)}
    names = tuple(wnids)
    if split in ID_SPLITS:
        check_class_folders(
            source="imagenet", split="train", folder=roots["imagenet"] / "train", allowed=allowed
        )
        folder = roots["imagenet"] / ("train" if split == "train" else "val")
        images = readers.read_class_folders(folder, class_to_label=index)
        return ImageFiles(paths=images.paths, labels=images.labels, class_names=names)
    source = SETTINGS["imagenet"].ood_sources[split]
    if split == "objectnet":
        return _objectnet(folder=roots[source], wnids=wnids)
    folder = roots[source] / SOURCES[source].image_folder
    check_class_folders(source=source, split="test", folder=folder, allowed=allowed)
    if split == "v2":
        # ImageNet-V2 folders are class indices 0..999, not wnids.
        images = readers.read_class_folders(
            folder, class_to_label={str(i): i for i in range(len(wnids))}
        )
        return ImageFiles(paths=images.paths, labels=images.labels, class_names=names)
    images = readers.read_class_folders(folder, class_to_label=index)
    # ImageNet-R and -A are scored over their official 200 classes, whatever a copy holds.
    subset = (
        tuple(sorted(index[w] for w in official_classes(source))) if split in ("r", "a") else None
    )
    return ImageFiles(
        paths=images.paths, labels=images.labels, class_names=names, class_subset=subset
    )


def _objectnet(*, folder: Path, wnids: Sequence[str]) -> ImageFiles:
    """ObjectNet's 113 ImageNet-overlapping classes, scored as WiSE-FT does: argmax over the
    ImageNet classes they map to, right when that class belongs to the image's ObjectNet
    class. Labels are in ImageNet's space: each image gets one ImageNet class of its group."""
    groups = readers.read_objectnet_groups(folder / "objectnet-1.0" / "mappings")
    group_of = [-1] * len(wnids)
    for number, (_, ids) in enumerate(groups):
        for index in ids:
            if group_of[index] < 0:  # a class in two groups counts for the first (as WiSE-FT)
                group_of[index] = number
    images_root = folder / "objectnet-1.0" / "images"
    paths, labels = [], []
    for number, (folder_name, ids) in enumerate(groups):
        own = [index for index in ids if group_of[index] == number]
        if not own:
            continue  # every class of this group counts for an earlier one: never right
        files = sorted(str(p) for p in (images_root / folder_name).iterdir() if readers.is_image(p))
        paths += files
        labels += [own[0]] * len(files)
    subset = tuple(sorted({index for _, ids in groups for index in ids}))
    return ImageFiles(
        paths=tuple(paths),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=tuple(wnids),
        class_subset=subset,
        class_groups=tuple(g if g >= 0 else len(groups) + i for i, g in enumerate(group_of)),
        border=2,  # ObjectNet images carry a 1-pixel red border
    )


def _breeds(name: str):
    def read(
        *, split: str, roots: Mapping[str, Path], allowed: frozenset[str] = frozenset()
    ) -> ImageFiles:
        wnids = imagenet_wnids()
        check_class_folders(
            source="imagenet", split="train", folder=roots["imagenet"] / "train", allowed=allowed
        )
        class_map = readers.read_breeds_class_map(
            roots["breeds"] / f"{name}.json", imagenet_wnids=wnids
        )
        subclasses = class_map.target if split == "target" else class_map.source
        to_label = {wnid: label for label, group in enumerate(subclasses) for wnid in group}
        missing = sorted(set(to_label) - set(wnids))
        if missing:
            raise ValueError(
                f"{roots['breeds'] / f'{name}.json'}: {missing[0]} is not an ImageNet class"
            )
        folder = roots["imagenet"] / ("train" if split == "train" else "val")
        images = readers.read_class_folders(folder, class_to_label=to_label, strict=False)
        return ImageFiles(paths=images.paths, labels=images.labels, class_names=class_map.names)

    return read


FMOW_ID_REGION = "Americas"
FMOW_SPLITS = {  # our split → (WILDS split, region)
    "train": ("train", FMOW_ID_REGION),
    "val": ("id_val", FMOW_ID_REGION),
    "test": ("val", FMOW_ID_REGION),
    "africa": ("val", "Africa"),
    "europe": ("val", "Europe"),
}


def _fmow(
    *, split: str, roots: Mapping[str, Path], allowed: frozenset[str] = frozenset()
) -> ImageFiles:
    wilds_split, region = FMOW_SPLITS[split]
    images = readers.read_fmow_split(roots["fmow"], wilds_split=wilds_split, region=region)
    if not images.paths:
        raise ValueError(f"{roots['fmow']}: no images in WILDS split {wilds_split} of {region}")
    return ImageFiles(paths=images.paths, labels=images.labels, class_names=readers.FMOW_CATEGORIES)


_READERS = {
    "cifar10_stl": _cifar10_stl,
    "cifar10_cifar101": _cifar10_cifar101,
    "living17": _breeds("living17"),
    "entity30": _breeds("entity30"),
    "domainnet": _domainnet,
    "fmow": _fmow,
    "imagenet": _imagenet,
}
