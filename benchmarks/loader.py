"""Images per second of a training epoch's data path: raw JPEG folders against the prepared cache.

The data path is what `training.train_classifier` runs every epoch before the model: the
split's torch dataset (decode + transform, or a read of the prepared-image cache + the random
steps of the transform), the DataLoader as the loop builds it (an epoch's random order as the
sampler, `batch_size`, `drop_last`, `num_workers` worker processes, a seeded generator), and
the batches it hands to the loop (uint8, before the copy to the device, where `to_float`
runs). An evaluation pass (`resize_center_crop`, the
ImageNet test transform) reads its loader as `evaluate.predict_logits` does (in order).

The data: ImageNet's real on-disk layout (train/<wnid>/<wnid>_<k>.JPEG), read by the
registry's own ImageNet reader, with photo-like quality-90 JPEGs of 500×375 (one in four
portrait; about 90 KB each, as ImageNet's photographs are) made by `tests/fake_data.py`. The
cache is made by the workflow's own function (`data.prepared.prepare_split`), and its
one-off cost is printed too. Both paths read files the page cache holds (written just
before): the comparison is of CPU work, not of disk speed.

    python benchmarks/loader.py                         # 2,000 JPEGs, 2 workers, 224 px
    python benchmarks/loader.py --images 4000 --workers 8 --data /tmp/photos  # keep the data

Measured on this project's 2-core machine (shared with other jobs), 2,000 JPEGs:
see docs/prepared-cache.md for the table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import fake_data  # noqa: E402

from robustft.data.datasets import as_torch_dataset  # noqa: E402
from robustft.data.prepared import cache_plan, open_prepared, prepare_split  # noqa: E402
from robustft.data.registry import dataset_options, load_split  # noqa: E402
from robustft.models import Preprocess  # noqa: E402

# The training rows are the two random training transforms (ImageNet/BREEDS, DomainNet); the
# evaluation row the ImageNet test transform.
ROWS = (
    ("train", "random_resized_crop"),
    ("train", "resize_random_crop"),
    ("eval", "resize_center_crop"),
)


def write_class(args: tuple[str, int, int]) -> None:
    root, index, count = args
    fake_data.write_imagenet_photos(
        Path(root), classes=1, first_class=index, train=count, seed=index
    )


def make_photos(root: Path, *, images: int, classes: int, workers: int) -> Path:
    """ImageNet-layout JPEGs: `classes` class folders of ⌈images / classes⌉ photos each
    (reused when `root` already holds as many)."""
    per_class = -(-images // classes)
    if sum(1 for _ in root.glob("train/*/*.JPEG")) >= per_class * classes:
        return root
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(write_class, [(str(root), index, per_class) for index in range(classes)])
    (root / "val").mkdir(exist_ok=True)
    return root


def loader(dataset, *, role: str, batch_size: int, workers: int, seed: int) -> DataLoader:
    """The DataLoader of a training epoch (`training._train_epoch`) or of an evaluation pass
    (`evaluate.predict_logits`)."""
    if role == "train":
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=order.tolist(),
            drop_last=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        generator=torch.Generator(),
    )


def images_per_second(dataset, *, role: str, batch_size: int, workers: int, seed: int) -> float:
    """One pass over the loader: batches of uint8 images ready to go to the device."""
    started = time.perf_counter()
    seen = 0
    for images, _ in loader(dataset, role=role, batch_size=batch_size, workers=workers, seed=seed):
        seen += len(images)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the split")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 2],
        help="DataLoader workers, one row each (finetune.num_workers: 0 is the default)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    parser.add_argument("--compression", default="none", choices=["none", "lzf"])
    parser.add_argument("--repeats", type=int, default=2, help="passes of each; the best counts")
    parser.add_argument("--data", type=Path, help="keep (or reuse) the JPEGs here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    processes = max(1, max(args.workers))

    with tempfile.TemporaryDirectory() as scratch:
        data = make_photos(
            args.data or Path(scratch) / "imagenet",
            images=args.images,
            classes=args.classes,
            workers=processes,
        )
        options = dataset_options({"allow_subset": ["imagenet"]}, "imagenet")
        # ID train and the val carved from it: every JPEG of the folder, as one split.
        parts = [
            load_split(dataset="imagenet", split=name, root={"imagenet": data}, options=options)
            for name in ("train", "val")
        ]
        split = replace(
            parts[0],
            paths=parts[0].paths + parts[1].paths,
            labels=np.concatenate([part.labels for part in parts]),
        )
        jpeg_bytes = sum(Path(path).stat().st_size for path in split.paths)
        preprocess = Preprocess(
            input_size=args.input_size,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            crop_pct=0.875,
            interpolation=args.interpolation,
        )
        print(
            f"{len(split.paths)} JPEGs of about 500×375 ({jpeg_bytes / len(split.paths) / 1024:.0f}"
            f" KB each, {jpeg_bytes / 1e6:.0f} MB), batch {args.batch_size}, {args.input_size} px "
            f"{args.interpolation}, cache compression {args.compression}, best of "
            f"{args.repeats} passes\n"
        )
        header = (
            "| pass  | transform           | workers | raw JPEG img/s | prepared img/s | ratio |"
        )
        print(header)
        print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
        prepared_rows = []
        for role, transform in ROWS:
            plan = cache_plan(transform, preprocess=preprocess)
            path = Path(scratch) / f"{transform}.h5"
            started = time.perf_counter()
            prepare_split(
                split=split,
                out_path=path,
                plan=plan,
                data_fingerprint=None,
                compression=args.compression,
                num_workers=processes,
            )
            prepared_rows.append(
                (transform, plan.describe(), path.stat().st_size, time.perf_counter() - started)
            )
            raw = as_torch_dataset(split, preprocess=preprocess, transform=transform)
            cached = open_prepared(
                path, split=split, transform=transform, preprocess=preprocess, data_fingerprint=None
            )
            for workers in args.workers:
                settings = {"role": role, "batch_size": args.batch_size, "workers": workers}
                # Alternating passes, best of each: other jobs on the machine slow both alike.
                raw_rate = cached_rate = 0.0
                for seed in range(args.repeats):
                    raw_rate = max(raw_rate, images_per_second(raw, seed=seed, **settings))
                    cached_rate = max(cached_rate, images_per_second(cached, seed=seed, **settings))
                print(
                    f"| {role:<5} | {transform:<19} | {workers:>7} | {raw_rate:>14.0f} | "
                    f"{cached_rate:>14.0f} | {cached_rate / raw_rate:>4.1f}× |"
                )
            path.unlink()
        print(f"\nThe caches ({processes} processes decode):\n")
        print("| transform | cached | size MB | KB per image | prepared in s |")
        print("|---|---|---|---|---|")
        for transform, cached, size, seconds in prepared_rows:
            per_image = size / len(split.paths) / 1024
            print(
                f"| {transform} | {cached} | {size / 1e6:.0f} | {per_image:.0f} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
