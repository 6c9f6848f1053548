"""Data sources: the download units the settings read, where they come from, their layout.

A source is one folder (`resources/datasets/<source>`, or an existing copy named under
`paths:` in the config). `download_dataset` fills the folder from public URLs; ImageNet has no
public URL and is always an existing copy. `check_layout` says, in one line, which file or
folder is missing and what would provide it.

Checksums: `md5` is the value the dataset's authors (or torchvision) publish. Where none is
published, the SHA-256 of the first download is recorded (trust on first use) and every later
download of the same file must match it.

Expected sizes: every source lists the published size of each split it provides (`Size`);
`check_sizes` counts a copy cheaply (directory listings, record counts from file sizes, list
lines; never decoding an image) and refuses, in one line, a copy that differs, unless the
config's `allow_subset` names the source.

Imported by the workflow at parse time: standard library only (the official class lists are
read from timm's data files when a check or a reader asks for them, not at import).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

DATA_ROOT = "resources/datasets"
DOMAINNET_DOMAINS = ("sketch", "real", "painting", "clipart")
# Images in the SENTRY mini lists (40 classes): (train, test) per domain.
DOMAINNET_SIZES = {
    "clipart": (3707, 1616),
    "painting": (6727, 2909),
    "real": (16141, 6943),
    "sketch": (5537, 2399),
}
SENTRY_LISTS = "https://raw.githubusercontent.com/virajprabhu/SENTRY/main/data/DomainNet/txt"
BREEDS_INFO = (
    "https://github.com/MadryLab/BREEDS-Benchmarks/blob/master/imagenet_class_hierarchy/modified"
)
BREEDS_INFO_FILES = ("dataset_class_info.json", "class_hierarchy.txt", "node_names.txt")
# torchvision's ImageFolder's (torchvision.datasets.folder.IMG_EXTENSIONS), case-insensitive.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NOT_CLASS_FOLDERS = ("__MACOSX",)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Download:
    url: str
    filename: str  # name in the download cache (and, for plain files, in the source folder)
    md5: str | None = None  # published checksum; None → trust on first use (SHA-256)
    extract: bool = True  # an archive (tar, tar.gz, zip) unpacked into the source folder
    dest: str = ""  # plain files: the subfolder they go into


@dataclass(frozen=True)
class Size:
    """The published size of one split of a source, and how a copy's is counted.

    `count`: class_folders (class folders under where[0] and the image files in them; `names`
    is the official list the folder names must belong to), records (CIFAR-10 binary: file size
    / 3073), stl_labels (one byte per image in where[0]), npy_rows (rows of a .npy header),
    sentry_list (lines of a SENTRY list whose image exists), fmow_rows (WILDS split of
    rgb_metadata.csv whose image exists under images/), class_map (BREEDS classes whose
    subclasses are all ImageNet classes). None: not published, or not known here for sure;
    then only what can be checked is (the listed files exist).
    """

    split: str
    count: str
    where: tuple[str, ...]
    images: int | None
    classes: int | None = None
    names: str = ""  # official class list: imagenet, imagenet_r, imagenet_a, imagenet_index


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    downloads: tuple[Download, ...]  # empty: cannot be downloaded by script
    layout: tuple[str, ...]  # files (and folders, ending in /) that must exist
    image_folder: str = ""  # class folders of an OOD image set, relative to the root
    how_to_get: str = ""  # for sources without downloads
    short: str = ""  # the name messages use (ImageNet-R)
    sizes: tuple[Size, ...] = ()  # expected size of every split the settings read


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source(
            name="cifar10",
            short="CIFAR-10",
            # 10,000 records of 3073 bytes per file: 5 training batches, one test batch.
            sizes=(
                Size(
                    split="train",
                    count="records",
                    where=tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
                    images=50_000,
                ),
                Size(
                    split="test",
                    count="records",
                    where=("cifar-10-batches-bin/test_batch.bin",),
                    images=10_000,
                ),
            ),
            title="CIFAR-10 (binary version)",
            downloads=(
                Download(
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                    filename="cifar-10-binary.tar.gz",
                    # As listed on the CIFAR page next to the python version's md5, which
                    # torchvision also pins (c58f3010...).
                    md5="c32a1d4ab5d03f1284b67883e8d87530",
                ),
            ),
            layout=tuple(
                f"cifar-10-batches-bin/{name}"
                for name in (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")
            ),
        ),
        Source(
            name="stl10",
            short="STL-10",
            # Before the monkey class is dropped (800 test images per class).
            sizes=(
                Size(
                    split="test",
                    count="stl_labels",
                    where=("stl10_binary/test_y.bin",),
                    images=8000,
                ),
            ),
            title="STL-10 (binary version)",
            downloads=(
                Download(
                    url="http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                    filename="stl10_binary.tar.gz",
                    md5="91f7769df0f17e558f3565bffb0c7dfb",  # torchvision.datasets.STL10
                ),
            ),
            layout=("stl10_binary/test_X.bin", "stl10_binary/test_y.bin"),
        ),
        Source(
            name="cifar101",
            short="CIFAR-10.1",
            sizes=(
                Size(
                    split="test", count="npy_rows", where=("cifar10.1_v6_labels.npy",), images=2000
                ),
            ),
            title="CIFAR-10.1 v6",
            downloads=tuple(
                Download(
                    url="https://raw.githubusercontent.com/modestyachts/CIFAR-10.1/master/"
                    f"datasets/cifar10.1_v6_{part}.npy",
                    filename=f"cifar10.1_v6_{part}.npy",
                    extract=False,
                )
                for part in ("data", "labels")
            ),
            layout=("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy"),
        ),
        Source(
            name="domainnet",
            short="DomainNet",
            # Lines of the SENTRY mini lists (40 classes); every listed image must exist.
            sizes=tuple(
                Size(
                    split=f"{domain}_{part}",
                    count="sentry_list",
                    where=(f"txt/{domain}_{part}_mini.txt",),
                    images=DOMAINNET_SIZES[domain][part == "test"],
                    classes=40,
                )
                for domain in DOMAINNET_DOMAINS
                for part in ("train", "test")
            ),
            title="DomainNet (sketch, real, painting, clipart) with the SENTRY mini split lists",
            downloads=(
                *(
                    Download(
                        # clipart and painting are served from the cleaned `groundtruth/` set.
                        url="http://csr.bu.edu/ftp/visda/2019/multi-source/"
                        + ("groundtruth/" if domain in ("clipart", "painting") else "")
                        + f"{domain}.zip",
                        filename=f"{domain}.zip",
                    )
                    for domain in DOMAINNET_DOMAINS
                ),
                *(
                    Download(
                        url=f"{SENTRY_LISTS}/{domain}_{part}_mini.txt",
                        filename=f"{domain}_{part}_mini.txt",
                        extract=False,
                        dest="txt",
                    )
                    for domain in DOMAINNET_DOMAINS
                    for part in ("train", "test")
                ),
            ),
            layout=(
                *(f"{domain}/" for domain in DOMAINNET_DOMAINS),
                *(
                    f"txt/{domain}_{part}_mini.txt"
                    for domain in DOMAINNET_DOMAINS
                    for part in ("train", "test")
                ),
            ),
        ),
        Source(
            name="breeds",
            short="BREEDS",
            # Derived from ImageNet: the maps must name ImageNet classes; their image counts are
            # ImageNet's (checked there). Living-17: 17 superclasses, Entity-30: 30.
            sizes=(
                Size(
                    split="living17",
                    count="class_map",
                    where=("living17.json",),
                    images=None,
                    classes=17,
                ),
                Size(
                    split="entity30",
                    count="class_map",
                    where=("entity30.json",),
                    images=None,
                    classes=30,
                ),
            ),
            title="BREEDS class maps (living17.json, entity30.json)",
            downloads=tuple(
                Download(url=f"{BREEDS_INFO}/{name}?raw=true", filename=name, extract=False)
                for name in BREEDS_INFO_FILES
            ),
            layout=("living17.json", "entity30.json"),
        ),
        Source(
            name="fmow",
            short="FMoW",
            # The WILDS splits the setting reads. Their published image counts are not recorded
            # here (not known for sure): every image rgb_metadata.csv lists for them must exist
            # under images/, and WILDS train holds all 62 categories.
            sizes=(
                Size(
                    split="train",
                    count="fmow_rows",
                    where=("rgb_metadata.csv",),
                    images=None,
                    classes=62,
                ),
                Size(split="id_val", count="fmow_rows", where=("rgb_metadata.csv",), images=None),
                Size(split="val", count="fmow_rows", where=("rgb_metadata.csv",), images=None),
            ),
            title="WILDS FMoW v1.1",
            downloads=(
                Download(
                    # wilds.datasets.FMoWDataset._versions_dict["1.1"] (about 54 GB).
                    url="https://worksheets.codalab.org/rest/bundles/"
                    "0xaec91eb7c9d548ebb15e1b5e60f966ab/contents/blob/",
                    filename="fmow_v1.1.tar.gz",
                ),
            ),
            layout=("rgb_metadata.csv", "country_code_mapping.csv", "images/"),
        ),
        Source(
            name="imagenet",
            short="ImageNet",
            sizes=(
                Size(
                    split="train",
                    count="class_folders",
                    where=("train",),
                    images=1_281_167,
                    classes=1000,
                    names="imagenet",
                ),
                Size(
                    split="val",
                    count="class_folders",
                    where=("val",),
                    images=50_000,
                    classes=1000,
                    names="imagenet",
                ),
            ),
            title="ImageNet (ILSVRC-2012) as class folders",
            downloads=(),
            layout=("train/", "val/"),
            how_to_get=(
                "ImageNet cannot be downloaded by script: set paths.imagenet to a copy with "
                "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
            ),
        ),
        Source(
            name="objectnet",
            short="ObjectNet",
            # ObjectNet 1.0: 313 classes (113 of them overlap ImageNet and are scored).
            sizes=(
                Size(
                    split="test",
                    count="class_folders",
                    where=("objectnet-1.0/images",),
                    images=50_000,
                    classes=313,
                ),
            ),
            title="ObjectNet 1.0 (the 113 classes that overlap ImageNet)",
            downloads=(),
            layout=(
                "objectnet-1.0/images/",
                *(
                    f"objectnet-1.0/mappings/{name}"
                    for name in (
                        "folder_to_objectnet_label.json",
                        "objectnet_to_imagenet_1k.json",
                        "pytorch_to_imagenet_2012_id.json",
                        "imagenet_to_label_2012_v2",
                    )
                ),
            ),
            image_folder="objectnet-1.0/images",
            how_to_get=(
                "ObjectNet is not downloaded by script (its licence must be accepted): set "
                "paths.objectnet to the folder holding the unpacked objectnet-1.0/"
            ),
        ),
        Source(
            name="imagenet_v2",
            short="ImageNet-V2",
            sizes=(
                Size(
                    split="test",
                    count="class_folders",
                    where=("imagenetv2-matched-frequency-format-val",),
                    images=10_000,
                    classes=1000,
                    names="imagenet_index",
                ),
            ),
            title="ImageNet-V2 matched-frequency",
            downloads=(
                Download(
                    url="https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                    "imagenetv2-matched-frequency.tar.gz",
                    filename="imagenetv2-matched-frequency.tar.gz",
                ),
            ),
            layout=("imagenetv2-matched-frequency-format-val/",),
            image_folder="imagenetv2-matched-frequency-format-val",
        ),
        Source(
            name="imagenet_r",
            short="ImageNet-R",
            sizes=(
                Size(
                    split="test",
                    count="class_folders",
                    where=("imagenet-r",),
                    images=30_000,
                    classes=200,
                    names="imagenet_r",
                ),
            ),
            title="ImageNet-R",
            downloads=(
                Download(
                    url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                    filename="imagenet-r.tar",
                ),
            ),
            layout=("imagenet-r/",),
            image_folder="imagenet-r",
        ),
        Source(
            name="imagenet_a",
            short="ImageNet-A",
            sizes=(
                Size(
                    split="test",
                    count="class_folders",
                    where=("imagenet-a",),
                    images=7500,
                    classes=200,
                    names="imagenet_a",
                ),
            ),
            title="ImageNet-A",
            downloads=(
                Download(
                    url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                    filename="imagenet-a.tar",
                ),
            ),
            layout=("imagenet-a/",),
            image_folder="imagenet-a",
        ),
        Source(
            name="imagenet_sketch",
            short="ImageNet-Sketch",
            sizes=(
                Size(
                    split="test",
                    count="class_folders",
                    where=("sketch",),
                    images=50_889,
                    classes=1000,
                    names="imagenet",
                ),
            ),
            title="ImageNet-Sketch",
            downloads=(
                Download(
                    url="https://huggingface.co/datasets/imagenet_sketch/resolve/main/data/"
                    "ImageNet-Sketch.zip",
                    filename="ImageNet-Sketch.zip",
                ),
            ),
            layout=("sketch/",),
            image_folder="sketch",
        ),
    )
}


def source_root(source: str, *, paths: dict[str, str | None] | None = None) -> str:
    """The folder of a source: the configured existing copy, else `resources/datasets/<source>`."""
    configured = (paths or {}).get(source)
    return str(configured) if configured else f"{DATA_ROOT}/{source}"


def fetch_hint(source: str, root: str | Path | None = None) -> str:
    """What provides a source: the rule that downloads it, or the config key to set."""
    spec = SOURCES[source]
    if not spec.downloads:
        return spec.how_to_get
    default = f"{DATA_ROOT}/{source}"
    if root is not None and Path(root) != Path(default):
        return (
            f"an existing copy named by paths.{source}; remove that key to have rule "
            f"download_dataset fetch it into {default}"
        )
    return (
        f"fetched by rule download_dataset: remove {default} if it is incomplete and run "
        f"again, or set paths.{source} to an existing copy"
    )


def check_layout(source: str, root: str | Path) -> None:
    """Raise FileNotFoundError (one line: what is missing, what provides it) unless every
    file and folder of the source's layout exists under `root`."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")
    root = Path(root)
    for entry in SOURCES[source].layout:
        path = root / entry.rstrip("/")
        exists = path.is_dir() if entry.endswith("/") else path.is_file()
        if not exists:
            kind = "folder" if entry.endswith("/") else "file"
            raise FileNotFoundError(f"{path}: {kind} missing ({fetch_hint(source, root)})")


def describe_copy(
    *, source: str, root: str | Path, allow_subset: bool = False
) -> dict[str, object]:
    """Check an existing copy's layout and sizes (one-line error if incomplete, unless
    `allow_subset`) and describe it: per split expected and found counts, complete or not."""
    check_layout(source, root)
    root = Path(root)
    sizes = check_sizes(source=source, root=root, allow_subset=allow_subset)
    return {
        "source": source,
        "root": str(root.resolve()),
        "entries": {
            entry: (
                sum(1 for _ in (root / entry).iterdir())
                if entry.endswith("/")
                else (root / entry).stat().st_size
            )
            for entry in SOURCES[source].layout
        },
        "complete": all(split["complete"] for split in sizes.values()),
        "sizes": sizes,
    }


# --- expected sizes -----------------------------------------------------------------------


class SizeMismatch(ValueError):
    """A copy differs from the published size; one line naming the source, the split, the
    expected and found counts, the likely cause and `allow_subset`."""


OFFICIAL_LISTS = {  # timm/data/_info/<file>: fixed lists, independent of any copy's folders
    "imagenet": ("imagenet_synsets.txt", 1000),
    "imagenet_r": ("imagenet_r_synsets.txt", 200),
    "imagenet_a": ("imagenet_a_synsets.txt", 200),
}


@cache
def official_classes(name: str) -> tuple[str, ...]:
    """The official class list `name`: ImageNet's 1000 wnids in the standard order (sorted:
    the class indices of every ImageNet model), ImageNet-R's or ImageNet-A's 200 wnids, or
    `imagenet_index` (ImageNet-V2's folder names "0".."999"). Read from the lists timm ships,
    without importing timm (that would import torch)."""
    if name == "imagenet_index":
        return tuple(str(index) for index in range(1000))
    filename, expected = OFFICIAL_LISTS[name]
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the official {name} class list is read from timm's data/_info/{filename}: "
            "install timm (the version pyproject.toml pins)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / filename
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(set(wnids)) != expected or len(wnids) != expected:
        raise ValueError(f"{path}: {len(wnids)} class ids, expected {expected} distinct ones")
    return wnids


def mismatch_message(
    *,
    source: str,
    split: str,
    where: str,
    found_images: int | None = None,
    expected_images: int | None = None,
    found_classes: int | None = None,
    expected_classes: int | None = None,
    missing: int = 0,
) -> str:
    """One line: which copy differs from the published size, by how much, why, what to do."""
    counts = []
    if expected_classes is not None and found_classes != expected_classes:
        counts.append(f"{found_classes} of {expected_classes} classes")
    if expected_images is not None and found_images != expected_images:
        counts.append(f"{found_images:,} of {expected_images:,} images")
    fewer = (found_images or 0) < (expected_images or 0) or (found_classes or 0) < (
        expected_classes or 0
    )
    if missing:
        cause = f"{missing:,} listed images missing: an incomplete copy (extraction interrupted?)"
    elif fewer:
        cause = "an incomplete copy (extraction interrupted?)"
    else:
        cause = "more than published: a different version?"
    return (
        f"{SOURCES[source].short} {split}: {', '.join(counts)} {where}: {cause}; set "
        f"allow_subset: [{source}] to use this copy knowingly"
    )


def check_sizes(
    *, source: str, root: str | Path, allow_subset: bool = False
) -> dict[str, dict[str, object]]:
    """Count every split of a copy against its published size (`Source.sizes`).

    A difference raises SizeMismatch (one line), or with `allow_subset` logs that line as a
    warning and records the split as not complete. Returns {split: {expected_images,
    found_images, expected_classes, found_classes, complete}}.
    """
    spec = SOURCES[source]
    root = Path(root)
    memo: dict[str, object] = {}
    out: dict[str, dict[str, object]] = {}
    for size in spec.sizes:
        counted = _count(size, root=root, source=source, memo=memo)
        expected = size.images if size.images is not None else counted["listed"]
        complete = counted["images"] == expected and (
            size.classes is None or counted["classes"] == size.classes
        )
        out[size.split] = {
            "expected_images": expected,
            "found_images": counted["images"],
            "expected_classes": size.classes,
            "found_classes": counted["classes"],
            "complete": complete,
        }
        if complete:
            continue
        message = mismatch_message(
            source=source,
            split=size.split,
            where=str(counted["where"]),
            found_images=counted["images"],
            expected_images=expected,
            found_classes=counted["classes"] if size.classes is not None else None,
            expected_classes=size.classes,
            missing=(counted["listed"] or 0) - (counted["images"] or 0),
        )
        if not allow_subset:
            raise SizeMismatch(message)
        log.warning("%s (allowed: allow_subset lists %s)", message, source)
    return out


def _count(size: Size, *, root: Path, source: str, memo: dict) -> dict[str, object]:
    """{images, classes, listed (images a list names; = images where nothing is listed),
    where (what was counted, for the message)}."""
    paths = [root / entry for entry in size.where]
    if size.count == "class_folders":
        images, classes = _count_class_folders(paths[0], size=size, source=source)
        return {
            "images": images,
            "classes": classes,
            "listed": images,
            "where": f"under {paths[0]}",
        }
    if size.count == "records":
        # Whole 3073-byte records only: a truncated file counts its complete records.
        images = sum(path.stat().st_size // 3073 for path in paths)
        where = f"(3073-byte records) in {paths[0].parent}"
        return {"images": images, "classes": None, "listed": images, "where": where}
    if size.count == "stl_labels":
        images = paths[0].stat().st_size  # one label byte per image
        return {"images": images, "classes": None, "listed": images, "where": f"in {paths[0]}"}
    if size.count == "npy_rows":
        import numpy as np

        rows = len(np.load(paths[0], mmap_mode="r", allow_pickle=False))  # header only
        return {"images": rows, "classes": None, "listed": rows, "where": f"in {paths[0]}"}
    if size.count == "sentry_list":
        lines = [line.split() for line in paths[0].read_text(encoding="utf-8").splitlines()]
        lines = [parts for parts in lines if parts]
        exist = sum(1 for parts in lines if (root / parts[0]).is_file())
        return {
            "images": exist,
            "classes": len({parts[-1] for parts in lines}),
            "listed": len(lines),
            "where": f"listed in {paths[0]} and present under {root}",
        }
    if size.count == "fmow_rows":
        return _count_fmow(size, root=root, memo=memo)
    if size.count == "class_map":
        classes = _count_class_map(paths[0])
        return {"images": None, "classes": classes, "listed": None, "where": f"in {paths[0]}"}
    raise ValueError(f"{source}: unknown way of counting {size.count!r}")


def is_hidden(name: str) -> bool:
    """A hidden file or folder, or macOS's `__MACOSX`: never part of a dataset."""
    return name.startswith(".") or name in NOT_CLASS_FOLDERS


def flat_layout_message(folder: Path, *, images: int, what: str = "") -> str:
    """One line for a split folder that holds images but no class folders."""
    return (
        f"{what + ' ' if what else ''}{folder}: {images:,} images but no class folders: the "
        "flat layout (ImageNet's official val tar unpacks so); sort the images into <class>/ "
        "folders (ImageNet val: by the devkit's ground truth, as torchvision.datasets.ImageNet "
        "does)"
    )


def _count_class_folders(folder: Path, *, size: Size, source: str) -> tuple[int, int]:
    """(images, class folders) under `folder`, from directory listings only."""
    official = set(official_classes(size.names)) if size.names else None
    images = classes = 0
    with os.scandir(folder) as entries:
        listed = list(entries)
    # Hidden folders (.ipynb_checkpoints) and __MACOSX are not classes, as for the readers.
    folders = sorted(
        (e for e in listed if e.is_dir() and not is_hidden(e.name)), key=lambda e: e.name
    )
    loose = sum(1 for e in listed if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not folders and loose:
        raise SizeMismatch(flat_layout_message(folder, images=loose, what=SOURCES[source].short))
    for entry in folders:
        if official is not None and entry.name not in official:
            raise SizeMismatch(
                f"{SOURCES[source].short} {size.split}: {Path(entry.path)} is not one of the "
                f"{len(official)} official classes: a different dataset or version?"
            )
        classes += 1
        with os.scandir(entry.path) as files:
            images += sum(
                1 for f in files if f.name.lower().endswith(IMAGE_EXTENSIONS) and f.is_file()
            )
    return images, classes


def _wilds_fmow_split(original: str, timestamp: str) -> str:
    """WILDS FMoW's split of a metadata row (official scheme: OOD years from 2013, OOD test
    from 2016), as readers.read_fmow_split computes it."""
    time = datetime.fromisoformat(timestamp)
    year = (time.astimezone(UTC) if time.tzinfo else time).year
    if year >= 2016:
        return "test" if original == "test" else ""
    if year >= 2013:
        return "val" if original == "val" else ""
    return {"train": "train", "val": "id_val", "test": "id_test"}.get(original, "")


def _count_fmow(size: Size, *, root: Path, memo: dict) -> dict[str, object]:
    if "fmow" not in memo:  # one pass over the metadata for every split
        rows: dict[str, list[tuple[int, str]]] = {}
        with open(root / "rgb_metadata.csv", newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle)):
                try:
                    split = _wilds_fmow_split(row["split"], row["timestamp"])
                except (KeyError, TypeError, ValueError) as error:
                    raise ValueError(
                        f"{root / 'rgb_metadata.csv'}: row {number}: no split or ISO timestamp "
                        f"({error}); not WILDS FMoW v1.1 metadata?"
                    ) from None
                rows.setdefault(split, []).append((number, row["category"]))
        with os.scandir(root / "images") as entries:
            present = {entry.name for entry in entries}
        memo["fmow"] = (rows, present)
    rows, present = memo["fmow"]
    listed = rows.get(size.split, [])
    exist = sum(1 for number, _ in listed if f"rgb_img_{number}.png" in present)
    return {
        "images": exist,
        "classes": len({category for _, category in listed}),
        "listed": len(listed),
        "where": f"listed in {root / 'rgb_metadata.csv'} and present under {root / 'images'}",
    }


def _count_class_map(path: Path) -> int:
    """Classes of a BREEDS map; each subclass must be an ImageNet class (wnid or index)."""
    wnids = set(official_classes("imagenet"))
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["classes"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a BREEDS class map ({error})") from None
    for number, entry in enumerate(entries):
        for item in (*entry.get("source", []), *entry.get("target", [])):
            known = 0 <= item < 1000 if isinstance(item, int) else item in wnids
            if not known:
                raise ValueError(f"{path}: class {number}: {item!r} is not an ImageNet class")
    return len(entries)
