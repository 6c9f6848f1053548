"""One reader per on-disk format of the real datasets.

Each reader returns labels in the dataset's own label space; the registry maps them into a
setting's ID label space. Errors are one line naming the file. Nothing here unpickles a
downloaded file: CIFAR-10 is read from its binary version, `.npy` with allow_pickle=False.
Images of small datasets (CIFAR, STL) are held in memory as uint8 arrays; large ones are
lists of file paths decoded later, in DataLoader workers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustft.data.sources import IMAGE_EXTENSIONS, flat_layout_message, is_hidden

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
# STL-10 label (1..10, file order: airplane, bird, car, cat, deer, dog, horse, monkey, ship,
# truck) minus one → CIFAR-10 label; -1 drops the class (monkey has no CIFAR-10 counterpart).
STL_TO_CIFAR = (0, 2, 1, 3, 4, 5, 7, -1, 8, 9)

# The 62 FMoW categories in WILDS's order (wilds/datasets/fmow_dataset.py: `categories`).
FMOW_CATEGORIES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility",
    "park", "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison",
    "race_track", "railway_bridge", "recreational_facility", "road_bridge", "runway",
    "shipyard", "shopping_mall", "single-unit_residential", "smokestack", "solar_farm",
    "space_facility", "stadium", "storage_tank", "surface_mine", "swimming_pool", "toll_booth",
    "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
)  # fmt: skip


@dataclass(frozen=True)
class ImageList:
    """Image files and their labels (in the reader's own label space)."""

    paths: tuple[str, ...]
    labels: np.ndarray  # int64 (N,)


def _require(path: Path, *, what: str = "file") -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} missing")
    return path


# --- CIFAR-10 (binary version) and STL-10 -------------------------------------------------


def read_cifar10_bin(files: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32×32) → NHWC uint8."""
    images, labels = [], []
    for name in files:
        path = _require(Path(name))
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte records")
        records = raw.reshape(-1, 3073)
        if records[:, 0].max() > 9:
            raise ValueError(f"{path}: label {records[:, 0].max()} out of range 0..9")
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_stl10(images_file: str | Path, labels_file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`*_X.bin` (uint8, each image 3×96×96 column-major) and `*_y.bin` (uint8 labels 1..10)."""
    images_path, labels_path = _require(Path(images_file)), _require(Path(labels_file))
    raw = np.fromfile(images_path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (3 * 96 * 96):
        raise ValueError(f"{images_path}: {raw.size} bytes is not a whole number of 96×96 images")
    # The official loader: reshape (-1, 3, 96, 96), then transpose (0, 3, 2, 1) to N×H×W×C.
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"{labels_path}: labels must be 1..10")
    return np.ascontiguousarray(images), labels - 1


def stl_to_cifar(images: np.ndarray, stl_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 labels (0..9) into CIFAR-10's label space; monkey images are dropped."""
    mapped = np.asarray(STL_TO_CIFAR, dtype=np.int64)[stl_labels]
    keep = mapped >= 0
    return images[keep], mapped[keep]


def read_npy_pair(data_file: str | Path, labels_file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10.1: `*_data.npy` uint8 N×32×32×3 and `*_labels.npy`; never unpickled."""
    data_path, labels_path = _require(Path(data_file)), _require(Path(labels_file))
    try:
        images = np.load(data_path, allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{data_path}: not a plain .npy array pair ({error})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{data_path}: expected uint8 N×H×W×3, got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{labels_path}: shape {labels.shape}, expected ({len(images)},)")
    return images, labels.astype(np.int64)


# --- image folders and list files ------------------------------------------------------
#
# A class folder is a visible folder holding at least one image file. Hidden folders (`.x`,
# e.g. `.ipynb_checkpoints`), macOS's `__MACOSX` and empty folders are not classes: they are
# ignored with one warning line, so that a stray folder neither adds a class nor shifts the
# label ids of the classes after it. Hidden files (`.DS_Store`, AppleDouble `._x.jpg`) are not
# images.

LIST_ENCODING = "utf-8-sig"  # a BOM (Excel's "CSV UTF-8") is dropped
_warned: set[str] = set()


def warn_once(message: str, *, logger: logging.Logger = log) -> None:
    """One warning line per distinct message and process: a split read twice in one job
    (class names, then images) warns once."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk(folder: Path):
    """os.walk of a class folder as torchvision's ImageFolder walks it (subfolders and links
    followed), hidden folders skipped, each real folder once (a link cycle ends)."""
    seen: set[str] = set()
    for current, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not is_hidden(name))
        yield current, files


def _has_image(folder: Path) -> bool:
    # Stops at the first image: cheap even for ImageNet's 1300-image folders.
    return any(is_image(Path(name)) for _, files in _walk(folder) for name in files)


def _class_files(folder: Path) -> tuple[list[str], list[str]]:
    """The images anywhere under a class folder (sorted paths), and its other visible files
    (not images by extension: skipped, and named in one warning line by the caller)."""
    images, others = [], []
    for current, files in _walk(folder):
        for name in files:
            if name.startswith("."):
                continue
            (images if is_image(Path(name)) else others).append(os.path.join(current, name))
    return sorted(images), sorted(others)


def _warn_skipped(root: Path, skipped: Sequence[str]) -> None:
    if not skipped:
        return
    kinds = Counter(Path(name).suffix.lower() or "no extension" for name in skipped)
    counted = ", ".join(f"{kind} ×{count}" for kind, count in sorted(kinds.items()))
    warn_once(
        f"{root}: skipping {len(skipped)} files in class folders that are not images by their "
        f"extension ({counted}; e.g. {skipped[0]}); images are {' '.join(IMAGE_EXTENSIONS)}"
    )


def _short(names: Sequence[str], *, limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _class_folders(root: Path) -> list[str]:
    """Sorted class folders of `root`; the others are ignored with one warning line."""
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    hidden = [name for name in folders if is_hidden(name)]
    empty = [name for name in folders if name not in hidden and not _has_image(root / name)]
    if hidden or empty:
        parts = [f"hidden: {_short(hidden)}"] if hidden else []
        parts += [f"without image files: {_short(empty)}"] if empty else []
        warn_once(f"{root}: ignoring folders that are not classes ({'; '.join(parts)})")
    return [name for name in folders if name not in hidden and name not in empty]


def _no_class_folders(root: Path) -> Exception:
    with os.scandir(root) as entries:
        loose = sum(1 for entry in entries if entry.is_file() and is_image(Path(entry.name)))
    if loose:
        return ValueError(flat_layout_message(root, images=loose))
    return FileNotFoundError(f"{root}: no class folders (folders of image files)")


def list_class_folders(root: str | Path) -> list[str]:
    root = _require(Path(root), what="folder")
    names = _class_folders(root)
    if not names:
        raise _no_class_folders(root)
    return names


def read_class_folders(
    root: str | Path, *, class_to_label: dict[str, int], strict: bool = True
) -> ImageList:
    """`root/<class>/<image>` → paths and labels; images in subfolders of a class folder count
    (as in torchvision's ImageFolder). Folders not in `class_to_label` are an error when
    `strict`, else skipped (ImageNet-R/A hold only 200 of the 1000 classes)."""
    root = _require(Path(root), what="folder")
    folders = _class_folders(root)
    if not folders:
        raise _no_class_folders(root)
    paths, labels, skipped = [], [], []
    for name in folders:
        if name not in class_to_label:
            if strict:
                known = _short(sorted(class_to_label))
                raise ValueError(
                    f"{root / name}: class folder not in the label space "
                    f"({len(class_to_label)} classes: {known})"
                )
            continue
        files, others = _class_files(root / name)
        paths += files
        labels += [class_to_label[name]] * len(files)
        skipped += others
    _warn_skipped(root, skipped)
    if not paths:
        raise FileNotFoundError(f"{root}: no images in class folders")
    return ImageList(paths=tuple(paths), labels=np.asarray(labels, dtype=np.int64))


def read_sentry_list(list_file: str | Path, *, image_root: str | Path) -> tuple[ImageList, dict]:
    """SENTRY split list: lines `sketch/airplane/sketch_002_000033.jpg 0`.

    Returns the images and {label id: class name}, the class being the path's folder; the ids
    come from the file (they are not alphabetical).
    """
    path = _require(Path(list_file))
    image_root = Path(image_root)
    paths, labels, names = [], [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected '<relative path> <label id>'")
        relative, label = parts[0], int(parts[1])
        folders = Path(relative).parts
        if len(folders) < 3:
            raise ValueError(f"{path}:{number}: path {relative!r} is not <domain>/<class>/<file>")
        if names.setdefault(label, folders[-2]) != folders[-2]:
            raise ValueError(f"{path}:{number}: id {label} is {names[label]!r} and {folders[-2]!r}")
        paths.append(str(image_root / relative))
        labels.append(label)
    if not paths:
        raise ValueError(f"{path}: empty split list")
    return ImageList(paths=tuple(paths), labels=np.asarray(labels, dtype=np.int64)), names


@dataclass(frozen=True)
class LabelList:
    """The entries of a `path,label` list file, labels as written (the caller maps them)."""

    paths: tuple[str, ...]  # image_root / listed path
    listed: tuple[str, ...]  # the paths as written
    labels: tuple[str, ...]
    lines: tuple[int, ...]  # line number of each entry, for messages
    header: tuple[str, ...] | None = None


def _read_list_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode(LIST_ENCODING)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x}); save the list as UTF-8 "
            "(Excel: 'CSV UTF-8')"
        ) from None


def is_label_id(label: str) -> bool:
    return label.isascii() and label.isdigit()


def _list_delimiter(text: str) -> str | None:
    """How a list's lines separate path and label: a comma; else a semicolon (a European
    Excel export) or a tab where every line holds one; else None, whitespace (the
    `path label` .txt lists of DomainNet, Office-Home or VisDA)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or any("," in line for line in lines):
        return ","
    for delimiter in (";", "\t"):
        if all(delimiter in line for line in lines):
            return delimiter
    if all(len(line.split()) >= 2 for line in lines):
        return None
    return ","


def read_path_label_csv(
    list_file: str | Path, *, image_root: str | Path, classes: Sequence[str] | None
) -> LabelList:
    """`path,label` lines, paths relative to `image_root`; blank lines are skipped. Also
    `path;label`, tab-separated and `path label` lines (`_list_delimiter`).

    The first row is a header (e.g. `filepath,class`) when its label is neither a class
    (`classes`; None: a label of another row) nor an integer id and its path is not an image
    file name; a header-like row anywhere else is an error.
    """
    path = _require(Path(list_file))
    image_root = Path(image_root)
    text = _read_list_text(path)
    delimiter = _list_delimiter(text)
    if delimiter is None:  # `path label` lines: the label is the last word
        rows = [
            (number, [cell.strip() for cell in line.rsplit(None, 1)])
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    else:
        try:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
            rows = [
                (number, [cell.strip() for cell in row])
                for number, row in enumerate(reader, start=1)
                if "".join(row).strip()
            ]
        except csv.Error as error:
            raise ValueError(f"{path}: not a CSV list of 'path,label' lines ({error})") from None
    for number, row in rows:
        if len(row) != 2:
            raise ValueError(
                f"{path}:{number}: {len(row)} cells, expected 2: path,label separated by a "
                "comma (quote a path that holds a comma)"
            )
    # Distinct rows per label: a header repeated further down does not make its label a class.
    counts = Counter(label for _, label in {(row[0].lower(), row[1]) for _, row in rows})

    def header_like(row: list[str]) -> bool:
        listed, label = row
        known = label in classes if classes is not None else counts[label] > 1
        return not known and not is_label_id(label) and not is_image(Path(listed))

    header = None
    if rows and header_like(rows[0][1]):
        header = tuple(rows.pop(0)[1])
    for number, row in rows:
        if header_like(row) or (header and [c.lower() for c in row] == [h.lower() for h in header]):
            raise ValueError(
                f"{path}:{number}: {','.join(row)!r} looks like a header line; only the first "
                "line may be one"
            )
    if not rows:
        raise ValueError(f"{path}: no images listed")
    return LabelList(
        paths=tuple(str(image_root / row[0]) for _, row in rows),
        listed=tuple(row[0] for _, row in rows),
        labels=tuple(row[1] for _, row in rows),
        lines=tuple(number for number, _ in rows),
        header=header,
    )


# --- ObjectNet --------------------------------------------------------------------------


def read_objectnet_groups(mappings: str | Path) -> list[tuple[str, list[int]]]:
    """[(image folder, [ImageNet class indices])] for the ObjectNet classes that overlap
    ImageNet, from ObjectNet 1.0's `mappings/` (the files WiSE-FT and CLIP read)."""
    mappings = Path(mappings)
    try:
        folder_to_label = json.loads(
            _require(mappings / "folder_to_objectnet_label.json").read_text()
        )
        to_imagenet = json.loads(_require(mappings / "objectnet_to_imagenet_1k.json").read_text())
        pytorch_to_2012 = json.loads(
            _require(mappings / "pytorch_to_imagenet_2012_id.json").read_text()
        )
    except json.JSONDecodeError as error:
        raise ValueError(f"{mappings}: a mapping file is not valid JSON ({error})") from None
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}
    # ImageNet 2012 id (line number of imagenet_to_label_2012_v2) → class index (sorted wnids).
    index_of_2012 = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    names = _require(mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    index_of_name = {
        name.strip(): index_of_2012[i] for i, name in enumerate(names) if i in index_of_2012
    }
    groups = []
    for label, imagenet_names in to_imagenet.items():
        if label not in label_to_folder:
            raise ValueError(
                f"{mappings / 'folder_to_objectnet_label.json'}: no folder for {label!r}"
            )
        ids = []
        for name in imagenet_names.split("; "):
            if name not in index_of_name:
                raise ValueError(f"{mappings / 'imagenet_to_label_2012_v2'}: no class {name!r}")
            ids.append(index_of_name[name])
        groups.append((label_to_folder[label], ids))
    return groups


# --- BREEDS ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BreedsClassMap:
    names: tuple[str, ...]
    source: tuple[tuple[str, ...], ...]  # ImageNet wnids of each superclass's source subclasses
    target: tuple[tuple[str, ...], ...]


def read_breeds_class_map(path: str | Path, *, imagenet_wnids: Sequence[str]) -> BreedsClassMap:
    """A BREEDS class map (JSON): {"classes": [{"name", "source", "target"}, ...]}.

    Subclasses are ImageNet wnids or ImageNet class indices (sorted-wnid order, as the
    `robustness` package's `make_living17(info_dir, split="rand")` returns them).
    """
    path = _require(Path(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["classes"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a BREEDS class map ({error})") from None
    wnids = list(imagenet_wnids)

    def resolve(items: Iterable, where: str) -> tuple[str, ...]:
        out = []
        for item in items:
            if isinstance(item, int):
                if not 0 <= item < len(wnids):
                    raise ValueError(f"{path}: {where}: ImageNet index {item} out of range")
                out.append(wnids[item])
            else:
                out.append(str(item))
        if not out:
            raise ValueError(f"{path}: {where}: no subclasses")
        return tuple(out)

    names, source, target = [], [], []
    for number, entry in enumerate(entries):
        names.append(str(entry.get("name", f"class_{number}")))
        source.append(resolve(entry.get("source", []), f"class {number} source"))
        target.append(resolve(entry.get("target", []), f"class {number} target"))
    overlap = {w for s in source for w in s} & {w for t in target for w in t}
    if overlap:
        raise ValueError(f"{path}: subclasses in both source and target: {sorted(overlap)[:3]}")
    return BreedsClassMap(names=tuple(names), source=tuple(source), target=tuple(target))


# --- WILDS FMoW --------------------------------------------------------------------------


def read_fmow_split(root: str | Path, *, wilds_split: str, region: str) -> ImageList:
    """FMoW v1.1 as WILDS lays it out (`rgb_metadata.csv`, `country_code_mapping.csv`,
    `images/rgb_img_<row>.png`), one WILDS split (`train`, `id_val`, `id_test`, `val`,
    `test`; official scheme: OOD from 2013 on, OOD test from 2016) within one region.

    Reimplements wilds.datasets.FMoWDataset's split logic with pandas, so that the `wilds`
    package (and its dependencies, ogb among them) is not needed.
    """
    import pandas as pd  # here: only FMoW needs pandas

    root = Path(root)
    metadata_file = _require(root / "rgb_metadata.csv")
    regions_file = _require(root / "country_code_mapping.csv")
    metadata = pd.read_csv(metadata_file)
    for column in ("split", "category", "country_code", "timestamp"):
        if column not in metadata:
            raise ValueError(f"{metadata_file}: no column {column!r}")
    codes = pd.read_csv(regions_file)
    to_region = dict(zip(codes["alpha-3"], codes["region"], strict=True))
    regions = np.asarray([to_region.get(code, "Other") for code in metadata["country_code"]])
    time = pd.to_datetime(metadata["timestamp"], utc=True, format="ISO8601")
    ood_test = np.asarray(time >= pd.Timestamp("2016-01-01", tz="UTC"))
    ood_val = np.asarray(time >= pd.Timestamp("2013-01-01", tz="UTC")) & ~ood_test
    ood = ood_test | ood_val
    original = metadata["split"].to_numpy()
    masks = {
        "train": ~ood & (original == "train"),
        "id_val": ~ood & (original == "val"),
        "id_test": ~ood & (original == "test"),
        "val": ood_val & (original == "val"),
        "test": ood_test & (original == "test"),
    }
    if wilds_split not in masks:
        raise ValueError(f"unknown WILDS FMoW split {wilds_split!r}; known: {sorted(masks)}")
    rows = np.flatnonzero(masks[wilds_split] & (regions == region))
    index = {name: i for i, name in enumerate(FMOW_CATEGORIES)}
    categories = metadata["category"].to_numpy()
    unknown = sorted({c for c in categories[rows] if c not in index})
    if unknown:
        raise ValueError(f"{metadata_file}: unknown categories {unknown[:3]}")
    # Image files are numbered by their row in the metadata ('seq' rows included).
    paths = tuple(str(root / "images" / f"rgb_img_{row}.png") for row in rows)
    labels = np.asarray([index[c] for c in categories[rows]], dtype=np.int64)
    return ImageList(paths=paths, labels=labels)
