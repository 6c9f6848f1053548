"""Feature extraction throughput: the whole step against the model's forward pass alone.

The whole step is what the `extract_features` rule does after loading the backbone: batching
uint8 images through the DataLoader, the copy to the device, normalisation, the forward pass,
the copy back and the HDF5 write. The forward pass alone runs the same model on batches already
on the device, at the same batch size and precision. A ratio near 1 means the device is kept
busy (target: at least 0.9). Weights are random (no download); images are synthetic.

    python benchmarks/extract.py                                  # ResNet-50 on the CPU
    python benchmarks/extract.py --model toyresnet --images 4096  # the toy backbone
    python benchmarks/extract.py --device cuda --images 4096 --batch-size 256
    python benchmarks/extract.py --model toyresnet --images 4096 --threads 1  # the toy's rate

The whole step's images/s is written into the throughput table that `make estimate` reads
(`--throughput-file`, default results/throughput.csv; `--no-record` to skip): the row of this
model on this kind of device, kind `eval`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robustft.data.datasets import ArrayImageDataset, to_float
from robustft.estimate import THROUGHPUT_FILE, record_throughput
from robustft.features import (
    extract_features,
    resolve_num_workers,
    resolve_precision,
    write_features,
)
from robustft.models import ImageClassifier, Preprocess, build_backbone, timm_preprocess


def build(name: str) -> tuple[ImageClassifier, Preprocess]:
    if name == "toyresnet":
        backbone = build_backbone(architecture=name, kwargs={"width": 16})
        preprocess = Preprocess(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    else:
        backbone = build_backbone(architecture=name, kwargs={})
        preprocess = timm_preprocess(backbone.model)
    return ImageClassifier(backbone=backbone, num_classes=10, preprocess=preprocess), preprocess


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def whole_step(model, dataset, *, batch_size, device, num_workers, precision, out: Path) -> float:
    synchronize(device)
    started = time.perf_counter()
    features, labels = extract_features(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        precision=precision,
        progress=False,
    )
    write_features(out, features=features, labels=labels, attrs={"backbone": "benchmark"})
    synchronize(device)
    return time.perf_counter() - started


def forward_only(model, images: torch.Tensor, *, batch_size, device, precision) -> float:
    batches = [batch.to(device) for batch in images.split(batch_size)]
    autocast = torch.autocast(
        device_type="cuda" if device.startswith("cuda") else "cpu",
        dtype=torch.bfloat16,
        enabled=precision == "bf16",
    )
    with torch.inference_mode(), autocast:
        synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            model.features(to_float(batch))
        synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50.tv_in1k", help="toyresnet or a timm name")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--num-workers", default="auto", help="DataLoader workers, or auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings of each")
    parser.add_argument("--throughput-file", default=THROUGHPUT_FILE)
    parser.add_argument("--no-record", action="store_true", help="do not write the table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, preprocess = build(args.model)
    model.eval().to(args.device)
    precision = resolve_precision(args.precision, args.device)
    workers = resolve_num_workers(args.num_workers, device=args.device, threads=args.threads)
    size = preprocess.input_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    dataset = ArrayImageDataset(images, np.arange(args.images) % 10)

    settings = dict(batch_size=args.batch_size, device=args.device, precision=precision)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "features.h5"
        # Warm-up: allocator, cuDNN autotuning, thread pools.
        warm = ArrayImageDataset(images[: args.batch_size], np.zeros(args.batch_size, np.int64))
        whole_step(model, warm, num_workers=0, out=out, **settings)
        forward_only(model, dataset.images[: args.batch_size], **settings)
        whole, alone = [], []
        for _ in range(args.repeats):  # interleaved, so that drift affects both alike
            whole.append(whole_step(model, dataset, num_workers=workers, out=out, **settings))
            alone.append(forward_only(model, dataset.images, **settings))
    whole_rate, alone_rate = args.images / min(whole), args.images / min(alone)

    print(
        f"model {args.model}, {size}×{size} px, {args.images} images, batch {args.batch_size}, "
        f"device {args.device}, {precision}, {args.threads} threads, {workers} workers"
    )
    print()
    print("| measurement | images/s | seconds |")
    print("|---|---:|---:|")
    print(
        f"| whole extraction step (loader + model + HDF5) | {whole_rate:.1f} | {min(whole):.2f} |"
    )
    print(f"| forward pass alone | {alone_rate:.1f} | {min(alone):.2f} |")
    print(f"| ratio (whole / forward) | {whole_rate / alone_rate:.3f} | |")
    if not args.no_record:
        on_gpu = args.device.startswith("cuda")
        record_throughput(
            path=args.throughput_file,
            backbone=args.model,
            device="gpu" if on_gpu else "cpu",
            kind="eval",
            images_per_s=whole_rate,
            threads=args.threads,
            feature_dim=model.backbone.num_features,
            device_name=torch.cuda.get_device_name() if on_gpu else "cpu",
            source=f"benchmarks/extract.py, {size} px, batch {args.batch_size}, {precision}",
        )
        print(f"\nwrote the eval row of {args.model} into {args.throughput_file}")


if __name__ == "__main__":
    main()
