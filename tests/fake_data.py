"""Small copies of the real datasets, in their exact on-disk formats, for the tests.

Every writer returns the root folder of one data source (as `paths:` in the config names it).
Pixel values encode the label, so that tests can check that images and labels stay paired.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from robustft.data.sources import official_classes

CIFAR_PER_CLASS_PER_BATCH = 2
CIFAR_TEST_PER_CLASS = 3


def cifar_image(label: int, index: int) -> np.ndarray:
    """32×32×3: red = 20·label, green = index, blue = a row ramp (orientation check)."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., 0] = 20 * label
    image[..., 1] = index % 256
    image[..., 2] = np.arange(32, dtype=np.uint8)[:, None] * 4  # varies along rows (H)
    return image


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    index = 0
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        per_class = CIFAR_TEST_PER_CLASS if name == "test_batch.bin" else CIFAR_PER_CLASS_PER_BATCH
        records = []
        for label in range(10):
            for _ in range(per_class):
                image = cifar_image(label, index)
                index += 1
                # 1 label byte, then the R, G, B planes (channel-major, row-major inside).
                records.append(bytes([label]) + image.transpose(2, 0, 1).tobytes())
        (folder / name).write_bytes(b"".join(records))
    return root


STL_PER_CLASS = 2


def write_stl10(root: Path) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images, labels = [], []
    for stl_label in range(1, 11):  # file labels are 1..10
        for k in range(STL_PER_CLASS):
            image = np.zeros((96, 96, 3), dtype=np.uint8)
            image[..., 0] = 20 * stl_label
            image[..., 1] = k
            image[:, :, 2] = np.arange(96, dtype=np.uint8)[:, None]  # varies along rows (H)
            images.append(image)
            labels.append(stl_label)
    array = np.stack(images)
    # The official loader reads (-1, 3, 96, 96) and transposes (0, 3, 2, 1): write the inverse.
    (folder / "test_X.bin").write_bytes(array.transpose(0, 3, 2, 1).tobytes())
    (folder / "test_y.bin").write_bytes(np.asarray(labels, dtype=np.uint8).tobytes())
    return root


def write_cifar101(root: Path, *, per_class: int = 2) -> Path:
    root.mkdir(parents=True)
    labels = np.repeat(np.arange(10), per_class)
    images = np.stack([cifar_image(int(label), i) for i, label in enumerate(labels)])
    np.save(root / "cifar10.1_v6_data.npy", images)
    np.save(root / "cifar10.1_v6_labels.npy", labels.astype(np.int64))
    return root


def save_image(path: Path, *, value: int, size: tuple[int, int] = (20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    Image.fromarray(array).save(path)


# Not alphabetical on purpose: ids come from the list files.
DOMAINNET_CLASSES = {0: "bird", 1: "apple", 2: "cat"}
DOMAINNET_COUNTS = {"train": 4, "test": 2}  # images per class per list


def write_domainnet(root: Path) -> Path:
    (root / "txt").mkdir(parents=True)
    for domain in ("sketch", "real", "painting", "clipart"):
        for part, count in DOMAINNET_COUNTS.items():
            lines = []
            for label, name in DOMAINNET_CLASSES.items():
                for k in range(count):
                    relative = f"{domain}/{name}/{domain}_{part}_{k:03d}.jpg"
                    save_image(root / relative, value=40 * label)
                    lines.append(f"{relative} {label}")
            (root / "txt" / f"{domain}_{part}_mini.txt").write_text("\n".join(lines) + "\n")
    return root


# Real wnids from the official lists (timm's data files), so that labels come out as ImageNet's:
# the first 6 ImageNet classes (labels 0..5), and the first classes of ImageNet-R's and -A's 200.
IMAGENET_WNIDS = official_classes("imagenet")[:6]
R_WNIDS = official_classes("imagenet_r")[:3]  # n01443537, n01484850, n01494475: labels 1, 2, 4
A_WNIDS = official_classes("imagenet_a")[:2]  # n01498041, n01531178: not in the fake ImageNet


def write_imagenet(root: Path, *, train: int = 5, val: int = 2, classes: int = 6) -> Path:
    """ImageNet's first `classes` class folders (an incomplete copy: the real one has 1000)."""
    for split, count in (("train", train), ("val", val)):
        for label, wnid in enumerate(official_classes("imagenet")[:classes]):
            for k in range(count):
                save_image(root / split / wnid / f"{wnid}_{k}.JPEG", value=30 * label)
    return root


def write_imagenet_ood(root: Path, *, folder: str, classes: tuple[str, ...], count: int = 2):
    for name in classes:
        for k in range(count):
            save_image(root / folder / name / f"{k}.jpg", value=7 * k)
    return root


def write_breeds(root: Path) -> Path:
    """living17.json / entity30.json class maps over the fake ImageNet (wnids or indices)."""
    root.mkdir(parents=True)
    living = {
        "classes": [
            {"name": "fish", "source": ["n01440764", "n01443537"], "target": ["n01484850"]},
            {"name": "shark", "source": [3], "target": [4, 5]},  # ImageNet indices
        ]
    }
    entity = {
        "classes": [
            {"name": "a", "source": ["n01440764"], "target": ["n01443537"]},
            {"name": "b", "source": ["n01484850"], "target": ["n01491361"]},
            {"name": "c", "source": ["n01494475"], "target": ["n01496331"]},
        ]
    }
    (root / "living17.json").write_text(json.dumps(living))
    (root / "entity30.json").write_text(json.dumps(entity))
    return root


# (original FMoW split, timestamp, country, category) rows; WILDS splits by year and region.
FMOW_ROWS = [
    ("train", "2010-05-01T10:00:00Z", "USA", "airport"),
    ("train", "2011-05-01T10:00:00.123Z", "BRA", "zoo"),
    ("train", "2012-05-01T10:00:00Z", "CAN", "dam"),
    ("train", "2012-06-01T10:00:00Z", "FRA", "dam"),  # Europe: not ID train
    ("train", "2014-05-01T10:00:00Z", "USA", "dam"),  # 2013+: OOD years, in no train split
    ("seq", "2011-05-01T10:00:00Z", "USA", "barn"),  # 'seq' rows still number the images
    ("val", "2011-02-01T10:00:00Z", "USA", "zoo"),  # id_val Americas
    ("val", "2014-02-01T10:00:00Z", "MEX", "airport"),  # val (OOD years) Americas → ID test
    ("val", "2014-03-01T10:00:00Z", "NGA", "zoo"),  # val Africa
    ("val", "2015-03-01T10:00:00Z", "KEN", "dam"),  # val Africa
    ("val", "2015-04-01T10:00:00Z", "DEU", "barn"),  # val Europe
    ("test", "2017-04-01T10:00:00Z", "NGA", "barn"),  # OOD test (2016+): unused
]
FMOW_REGIONS = {"USA": "Americas", "BRA": "Americas", "CAN": "Americas", "MEX": "Americas",
                "FRA": "Europe", "DEU": "Europe", "NGA": "Africa", "KEN": "Africa"}  # fmt: skip


def write_fmow(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = ["split,img_filename,img_path,category,country_code,timestamp"]
    for row, (split, timestamp, country, category) in enumerate(FMOW_ROWS):
        lines.append(f"{split},x_{row}.jpg,seq/x,{category},{country},{timestamp}")
        save_image(root / "images" / f"rgb_img_{row}.png", value=row * 10, size=(24, 24))
    (root / "rgb_metadata.csv").write_text("\n".join(lines) + "\n")
    mapping = ["alpha-3,region", *(f"{k},{v}" for k, v in FMOW_REGIONS.items())]
    (root / "country_code_mapping.csv").write_text("\n".join(mapping) + "\n")
    return root


def write_all(root: Path) -> dict[str, str]:
    """Every source; returns `paths:` for the config."""
    imagenet = write_imagenet(root / "imagenet")
    return {
        "cifar10": str(write_cifar10(root / "cifar10")),
        "stl10": str(write_stl10(root / "stl10")),
        "cifar101": str(write_cifar101(root / "cifar101")),
        "domainnet": str(write_domainnet(root / "domainnet")),
        "breeds": str(write_breeds(root / "breeds")),
        "fmow": str(write_fmow(root / "fmow")),
        "imagenet": str(imagenet),
        "imagenet_v2": str(
            write_imagenet_ood(
                root / "imagenet_v2",
                folder="imagenetv2-matched-frequency-format-val",
                classes=tuple(str(i) for i in range(len(IMAGENET_WNIDS))),
            )
        ),
        "imagenet_r": str(
            write_imagenet_ood(root / "imagenet_r", folder="imagenet-r", classes=R_WNIDS)
        ),
        "imagenet_a": str(
            write_imagenet_ood(root / "imagenet_a", folder="imagenet-a", classes=A_WNIDS)
        ),
        "imagenet_sketch": str(
            write_imagenet_ood(root / "imagenet_sketch", folder="sketch", classes=IMAGENET_WNIDS)
        ),
    }


# Real ImageNet indices (sorted-wnid order) of the classes the fake ObjectNet maps onto.
OBJECTNET_IMAGENET = {"analog clock": 409, "digital clock": 530, "banana": 954}


def write_objectnet(root: Path, *, per_class: int = 2) -> Path:
    """objectnet-1.0/images/<folder>/*.png and the four mapping files; the 2012 ids (lines of
    imagenet_to_label_2012_v2) are a permutation of the class indices, as in the release."""
    mappings = root / "objectnet-1.0" / "mappings"
    mappings.mkdir(parents=True)
    folders = {"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair"}
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
    to_imagenet = {"Alarm clock": "analog clock; digital clock", "Banana": "banana"}
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet))
    to_2012 = {str(index): (index * 7) % 1000 for index in range(1000)}
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(to_2012))
    names = [f"class {i}" for i in range(1000)]
    for name, index in OBJECTNET_IMAGENET.items():
        names[to_2012[str(index)]] = name
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(names) + "\n")
    for folder in folders:
        for k in range(per_class):
            save_image(root / "objectnet-1.0" / "images" / folder / f"{k}.png", value=k)
    return root


def write_imagenet_1000(root: Path) -> Path:
    """ImageNet's 1000 class folders (official wnids; empty: ObjectNet only lists them)."""
    for wnid in official_classes("imagenet"):
        (root / "train" / wnid).mkdir(parents=True)
    (root / "val").mkdir()
    return root


def write_tiny_toyshift_job(root: Path, *, train_per_class: int, width: int) -> Path:
    """A small toyshift task (3 classes) in `root/data` and a randomly initialised toy
    backbone in `root/backbone`: the inputs of one fine-tuning job."""
    import torch

    from robustft.data.toyshift import write_toyshift
    from robustft.models import Preprocess, build_backbone, save_backbone

    write_toyshift(
        pretrain_path=root / "data" / "pretrain.h5",
        task_path=root / "data" / "task.h5",
        seed=0,
        pretrain_classes=2,
        task_classes=3,
        pretrain_images_per_class={"real": 4, "clipart": 4, "painting": 4, "sketch": 4},
        train_per_class=train_per_class,
        val_per_class=max(4, train_per_class // 5),
        test_per_class=max(4, train_per_class // 5),
        ood_per_class=max(4, train_per_class // 5),
    )
    torch.manual_seed(0)
    save_backbone(
        backbone=build_backbone(architecture="toyresnet", kwargs={"width": width}),
        out_dir=root / "backbone",
        architecture="toyresnet",
        kwargs={"width": width},
        preprocess=Preprocess(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    )
    return root


def photo_like(rng: np.random.Generator, *, width: int = 500, height: int = 375) -> Image.Image:
    """An RGB image with what makes photographs cost what they cost to decode and store:
    smooth colour regions, texture, edges and sensor noise (about 90 KB as a quality-90
    JPEG at 500×375, as ImageNet's photographs are)."""
    from PIL import ImageDraw, ImageFilter

    base = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    image = base.resize((width, height), Image.BICUBIC)
    grain = rng.integers(0, 256, (max(1, height // 2), max(1, width // 2), 3), dtype=np.uint8)
    image = Image.blend(image, Image.fromarray(grain).resize((width, height), Image.BILINEAR), 0.45)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(width // 25 + 1, width // 2 + 2, 2))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    noise = rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_imagenet_photos(
    root: Path,
    *,
    classes: int,
    train: int,
    val: int = 0,
    first_class: int = 0,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> Path:
    """ImageNet's layout (train/<wnid>/<wnid>_<k>.JPEG, val/<wnid>/...) for `classes` classes
    from ImageNet's `first_class`-th on, with `photo_like` quality-90 JPEGs of `size` (width,
    height), one in four in portrait orientation."""
    rng = np.random.default_rng(seed)
    wnids = official_classes("imagenet")[first_class : first_class + classes]
    for split, count in (("train", train), ("val", val)):
        for wnid in wnids:
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                width, height = size if rng.random() < 0.75 else size[::-1]
                photo_like(rng, width=width, height=height).save(
                    folder / f"{wnid}_{k}.JPEG", quality=90
                )
    return root
