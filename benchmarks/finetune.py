"""Training-loop throughput: our step against a plain fp32 loop, same model, data and batch.

Ours is `robustft.training.train_classifier` with `precision` bf16 (autocast), channels-last
images and weights, pinned-memory copies and no host sync per step (sums stay on the device).
The plain loop is what the papers' scripts do: fp32, default memory layout, `loss.item()` every
step. Both run SGD (momentum 0.9, cosine schedule) for the same epochs from the same weights
on the same synthetic task (a fixed random low-frequency pattern per class plus noise), then
report test accuracy. Target on a GPU: ours ≥ 2× the images/s at the same accuracy.

    python benchmarks/finetune.py --device cuda                   # ResNet-50, 224 px, batch 64
    python benchmarks/finetune.py                                 # CPU: a small smoke run only
    python benchmarks/finetune.py --model toyresnet --threads 1   # the toy's CPU rate

Ours' images/s is written into the throughput table that `make estimate` reads
(`--throughput-file`, default results/throughput.csv; `--no-record` to skip): the row of
this model (toyresnet at `--toy-width`) on this kind of device, kind `train`.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from robustft.data.datasets import ArrayImageDataset, to_float
from robustft.estimate import THROUGHPUT_FILE, record_throughput
from robustft.evaluate import accuracy
from robustft.models import ImageClassifier, Preprocess, build_backbone
from robustft.training import TrainSettings, cosine_lr, train_classifier


def synthetic_task(*, images: int, size: int, classes: int, seed: int) -> ArrayImageDataset:
    """Class-specific smooth colour patterns (fixed across calls) under pixel noise."""
    patterns = np.random.default_rng(0).normal(0, 1, (classes, 4, 4, 3))
    patterns = np.kron(patterns, np.ones((size // 4, size // 4, 1)))  # upsampled to size
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    pixels = 128 + 50 * patterns[labels] + rng.normal(0, 40, (images, size, size, 3))
    return ArrayImageDataset(np.clip(pixels, 0, 255).astype(np.uint8), labels)


def build(name: str, *, classes: int, size: int, toy_width: int = 16) -> ImageClassifier:
    kwargs = {"width": toy_width} if name == "toyresnet" else {}
    backbone = build_backbone(architecture=name, kwargs=kwargs)  # random weights, no download
    preprocess = Preprocess(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return ImageClassifier(backbone=backbone, num_classes=classes, preprocess=preprocess)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_loop(model, dataset, *, epochs, batch_size, lr, device, seed) -> float:
    """The reference loop; returns its seconds."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step=step, total_steps=total, base_lr=1.0)
    )
    loss_fn = nn.CrossEntropyLoss()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(epochs):
        running = 0.0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model(to_float(images).contiguous()), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()  # the per-step host sync of a typical script
    synchronize(device)
    return time.perf_counter() - started


def ours(model, dataset, *, epochs, batch_size, lr, device, seed, precision) -> float:
    settings = TrainSettings(
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, precision=precision
    )
    tiny = ArrayImageDataset(
        dataset.images[:batch_size].numpy().transpose(0, 2, 3, 1),
        dataset.labels[:batch_size].numpy(),
    )
    synchronize(device)
    started = time.perf_counter()
    # One small eval set: the loop evaluates every epoch, which is not what is measured here.
    train_classifier(
        model=model,
        train_set=dataset,
        eval_sets={"val": tiny},
        settings=settings,
        select_on="val",
        device=device,
        progress=False,
    )
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="timm name or toyresnet")
    parser.add_argument("--size", type=int, default=None, help="image side, px")
    parser.add_argument("--images", type=int, default=None, help="training images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="ours")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--toy-width", type=int, default=16, help="toyresnet: config's width")
    parser.add_argument("--throughput-file", default=THROUGHPUT_FILE)
    parser.add_argument("--no-record", action="store_true", help="do not write the table")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    model_name = args.model or ("resnet50" if on_gpu else "toyresnet")
    size = args.size or (224 if on_gpu else 32)
    count = args.images or (4096 if on_gpu else 512)
    precision = args.precision if on_gpu else "fp32"
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # for both loops alike
    train = synthetic_task(images=count, size=size, classes=args.classes, seed=1)
    test = synthetic_task(images=max(512, count // 4), size=size, classes=args.classes, seed=2)
    torch.manual_seed(0)
    start = build(model_name, classes=args.classes, size=size, toy_width=args.toy_width)
    run = dict(batch_size=args.batch_size, lr=args.lr, device=args.device, seed=0)
    # Warm-up of both (allocator, cuDNN autotuning) on copies, then the timed runs.
    warm = synthetic_task(images=4 * args.batch_size, size=size, classes=args.classes, seed=3)
    plain_loop(copy.deepcopy(start), warm, epochs=1, **run)
    ours(copy.deepcopy(start), warm, epochs=1, precision=precision, **run)
    plain_model, our_model = copy.deepcopy(start), copy.deepcopy(start)
    plain_seconds = plain_loop(plain_model, train, epochs=args.epochs, **run)
    our_seconds = ours(our_model, train, epochs=args.epochs, precision=precision, **run)
    steps = args.epochs * (count // args.batch_size)
    rate = {
        "plain": steps * args.batch_size / plain_seconds,
        "ours": steps * args.batch_size / our_seconds,
    }
    acc = {
        name: accuracy(
            model.float().to(memory_format=torch.contiguous_format), test, device=args.device
        )
        for name, model in (("plain", plain_model), ("ours", our_model))
    }
    print(
        f"model {model_name} (random init), {size}×{size} px, {count} images, batch "
        f"{args.batch_size}, {args.epochs} epochs, SGD lr {args.lr}, device {args.device}, "
        f"{args.threads} threads"
    )
    if not on_gpu:
        print(
            "CPU smoke run only: the GPU comparison was not run (no --device cuda); on a CPU "
            "ours runs fp32, as the workflow does (finetune.precision: auto)."
        )
    print()
    layout = "channels-last, " if on_gpu else ""
    print(f"| | ours ({precision}, {layout}no per-step sync) | plain fp32 loop |")
    print("|---|---:|---:|")
    print(f"| images/s | {rate['ours']:.1f} | {rate['plain']:.1f} |")
    print(f"| seconds | {our_seconds:.1f} | {plain_seconds:.1f} |")
    print(f"| speed-up | {rate['ours'] / rate['plain']:.2f}× | 1× |")
    print(f"| test accuracy, % | {100 * acc['ours']:.1f} | {100 * acc['plain']:.1f} |")
    if not args.no_record:
        record_throughput(
            path=args.throughput_file,
            backbone=model_name,
            device="gpu" if on_gpu else "cpu",
            kind="train",
            images_per_s=rate["ours"],
            threads=args.threads,
            feature_dim=start.backbone.num_features,
            device_name=torch.cuda.get_device_name() if on_gpu else "cpu",
            source=f"benchmarks/finetune.py, {size} px, batch {args.batch_size}, {precision}",
        )
        print(f"\nwrote the train row of {model_name} into {args.throughput_file}")


if __name__ == "__main__":
    main()
