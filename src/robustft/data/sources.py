"""Data sources: the download units the settings read, where they come from, their layout.

A source is one folder (`resources/datasets/<source>`, or an existing copy named under
`paths:` in the config). `download_dataset` fills the folder from public URLs; ImageNet has no
public URL and is always an existing copy. `check_layout` says, in one line, which file or
folder is missing and what would provide it.

Checksums: `md5` is the value the dataset's authors (or torchvision) publish. Where none is
published, the SHA-256 of the first download is recorded (trust on first use) and every later
download of the same file must match it.

Imported by the workflow at parse time: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA_ROOT = "resources/datasets"
DOMAINNET_DOMAINS = ("sketch", "real", "painting", "clipart")
SENTRY_LISTS = "https://raw.githubusercontent.com/virajprabhu/SENTRY/main/data/DomainNet/txt"
BREEDS_INFO = (
    "https://github.com/MadryLab/BREEDS-Benchmarks/blob/master/imagenet_class_hierarchy/modified"
)
BREEDS_INFO_FILES = ("dataset_class_info.json", "class_hierarchy.txt", "node_names.txt")


@dataclass(frozen=True)
class Download:
    url: str
    filename: str  # name in the download cache (and, for plain files, in the source folder)
    md5: str | None = None  # published checksum; None → trust on first use (SHA-256)
    extract: bool = True  # an archive (tar, tar.gz, zip) unpacked into the source folder
    dest: str = ""  # plain files: the subfolder they go into


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    downloads: tuple[Download, ...]  # empty: cannot be downloaded by script
    layout: tuple[str, ...]  # files (and folders, ending in /) that must exist
    image_folder: str = ""  # class folders of an OOD image set, relative to the root
    how_to_get: str = ""  # for sources without downloads


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source(
            name="cifar10",
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
            title="BREEDS class maps (living17.json, entity30.json)",
            downloads=tuple(
                Download(url=f"{BREEDS_INFO}/{name}?raw=true", filename=name, extract=False)
                for name in BREEDS_INFO_FILES
            ),
            layout=("living17.json", "entity30.json"),
        ),
        Source(
            name="fmow",
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


def describe_copy(*, source: str, root: str | Path) -> dict[str, object]:
    """Check an existing copy's layout (one-line error if incomplete) and describe it."""
    check_layout(source, root)
    root = Path(root)
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
    }
