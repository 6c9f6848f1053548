"""Peak memory of the probe's GPU path, measured on the CPU at a smaller size, against its count.

On a GPU, `fit_probe_torch` evaluates in float32 with one product per pass over the data (no
cheap bfloat16 evaluations, no row blocks). Its peak, counted in docs/performance.md ("ImageNet
size"), is the standardised features (n × dim float32) and two (4·classes) × n float32 arrays,
4 values of C being fitted together at most. This runs that same path on the CPU (the two
CPU-only switches turned off) and compares the process's peak resident memory, above what it
held before the fit, with that count. The ImageNet-size figure follows from the count:
`PYTHONPATH=src python benchmarks/probe_memory.py`.
"""

import argparse
import resource

import numpy as np
import torch

from robustft.probe import solver


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400_000, help="training examples")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations per C")
    args = parser.parse_args()
    n, dim, classes = args.n, args.dim, args.classes
    # The GPU's path on the CPU: float32 evaluations only, one product over all rows.
    solver._bf16_cpu = lambda: False
    blocked = solver._RowBlocks.__init__
    solver._RowBlocks.__init__ = lambda self, x, block=1024: blocked(self, x, block=n + 1)

    rng = np.random.default_rng(0)
    means = 0.3 * rng.normal(size=(classes, dim)).astype(np.float32)
    train_y = rng.integers(0, classes, n)
    train_x = rng.normal(size=(n, dim)).astype(np.float32) + means[train_y]
    val_y = rng.integers(0, classes, 2000)
    val_x = rng.normal(size=(2000, dim)).astype(np.float32) + means[val_y]
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # its lazy imports, before
    before = resident_bytes()
    solver.fit_probe_torch(
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        c_grid=[float(c) for c in np.logspace(-7, 2, 50)],
        num_classes=classes,
        max_iter=args.max_iter,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    features = n * dim * 4
    array = 4 * classes * n * 4
    counted = features + 2 * array
    gib = 2**30
    print(f"{n} × {dim} features, {classes} classes, float32 path (the GPU's), on the CPU")
    print()
    print("| | measured (peak RSS above the start) | counted (features + 2 arrays) |")
    print("|---|---:|---:|")
    print(f"| peak, GiB | {(peak - before) / gib:.2f} | {counted / gib:.2f} |")
    print(f"| ratio | {(peak - before) / counted:.2f} | 1 |")
    imagenet = 1_281_167 * 2048 * 4 + 2 * (4 * 1000 * 1_281_167 * 4)
    print()
    print(f"the count at ImageNet size (1,281,167 × 2048, 1000 classes): {imagenet / gib:.1f} GiB")


if __name__ == "__main__":
    main()
