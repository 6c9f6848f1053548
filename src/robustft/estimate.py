"""What a planned run will cost, from its dry run: jobs, images, GPU-hours and CPU-hours.

`planned_jobs` asks Snakemake for the jobs of a config's DAG (its own DAG building, the one
`snakemake --dry-run` and `--summary` use) with each job's wildcards, params, threads and
resources. `job_work` turns one job into the images it pushes through a backbone: training
images (forward and backward: epochs × the training split) and evaluation images (forward
only: every evaluation of every split, the KD teacher's forward passes, feature extraction),
plus the probe's floating-point operations. `job_seconds` divides those by a throughput
table (`load_throughput`): images/s per backbone and device, measured on the user's machine by
`benchmarks/finetune.py` and `benchmarks/extract.py` (they write `results/throughput.csv`),
else published figures (`DEFAULT_THROUGHPUT`, with their sources). `cost_table` sums per
rule and dataset.

The model of one job's wall time:

    start-up + train images / train rate + eval images / eval rate + probe FLOP / FLOP rate

where a rate is the backbone's (CPU rows scaled by the job's threads over the measured
threads), capped by JPEG decoding for datasets read from image files (`DECODE_IMG_S`
per DataLoader worker). GPU-hours: wall hours × the job's GPUs; CPU-hours: wall hours × its
threads (what the job reserves). Rules that push no images (selection, tables, plots,
manifests) count their start-up only; downloads are not estimated (network-bound).

Imports nothing heavy at the top (no torch); Snakemake only inside `planned_jobs`.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from robustft.config import parse_hparam_folder
from robustft.data.registry import (
    GENERATED,
    ID_SPLITS,
    SETTINGS,
    dataset_options,
    source_splits,
)
from robustft.data.sources import IMAGE_EXTENSIONS, SOURCES, source_root
from robustft.data.splits import TRAIN_PER_CLASS_KEY
from robustft.io import write_csv

THROUGHPUT_FILE = "results/throughput.csv"
DEVICES = ("cpu", "gpu")

# --- published figures and constants -------------------------------------------------------

# JPEG decode + resize on one CPU thread (pytorch/vision PR 8496: about 390 img/s per thread,
# against about 7,800 img/s batched on one A100's decoder). A DataLoader worker is a thread's
# worth of decoding, so a job with w workers reads at most w × this from image files.
DECODE_IMG_S = 390.0
# Fixed cost of a job: interpreter, imports, reading the data, loading the weights. CPU:
# fitted to two runs of the default experiment on the 2-core machine of docs/estimate.md
# (`--compare`: short jobs took 1.9 s and 2.75 s each on two days); GPU: plus CUDA start-up
# and cuDNN autotuning, a rough figure (a few seconds against hours at paper scale).
START_S = {"cpu": 2.2, "gpu": 15.0}
LIGHT_START_S = 2.0  # rules that push no images (select_run, tables, plots, manifests)
# The probe (`robustft.probe.fit_probe_torch`): L-BFGS passes over the training features per
# value of C on the grid (78 passes for the 50-value grid on the benchmark mixture of
# benchmarks/probe.py), each pass 4·n·d·K FLOP for each of the `together` = 2 values fitted
# at once; sustained float32 FLOP/s: CPU per thread measured by that benchmark here (about
# 53 GFLOP/s on 2 threads), GPU a round 15 TFLOP/s (an A100's float32 peak is 19.5). On CPUs
# with AVX512-BF16 its cheap bfloat16 evaluations make it about 1.4× faster: not modelled, so
# the estimate errs high there.
PROBE_PASSES_PER_C = 1.6
PROBE_TOGETHER = 2
PROBE_FLOP_S = {"cpu": 26e9, "gpu": 15e12}
# What a value of C costs besides its FLOP (solver set-up, the polish of the chosen candidates,
# scoring val): the toy's 13-value sweep takes about 2 s of its 6 s job on one thread here, with
# negligible FLOP; nothing next to the FLOP of a real backbone's features.
PROBE_OVERHEAD_PER_C_S = 0.15
# A probe job's start-up beyond another job's: SciPy's import, reading the feature files, the
# features' eigendecomposition (about 2 s of the toy's 7 s probe jobs here).
PROBE_START_S = 2.0
DEFAULT_FEATURE_DIM = 2048  # a backbone the table does not know
# generate_toyshift draws and renders on the CPU: images per second on one thread (measured
# on the machine of docs/estimate.md).
TOYSHIFT_GENERATE_IMG_S = 4000.0
TOY_BACKBONE = "toyresnet"
# The toy's per-image time that does not scale with the width (data movement, BatchNorm,
# the optimiser, Python): fitted to the baseline models of width 8 (0.37 ms per training
# image) against the width-16 row (0.56 ms) on the machine of docs/estimate.md; the rest
# grows with the square of the width, as a convolution's multiply-accumulates do.
TOY_WIDTH_FIXED_SHARE = 0.55


@dataclass(frozen=True)
class Throughput:
    """Images per second of one backbone on one kind of device.

    `train_img_s`: a fine-tuning step (forward, backward, optimiser) per image; `eval_img_s`:
    the forward pass of evaluation and feature extraction; `threads`: the CPU threads it was
    measured with (a CPU row is scaled by a job's threads over these); `feature_dim`: the
    backbone's feature width (the probe's d)."""

    backbone: str
    device: str
    train_img_s: float
    eval_img_s: float
    threads: int = 1
    feature_dim: int = 2048
    source: str = ""


# Published anchors (../shared REFERENCES.md, "Throughput anchors"): ResNet-50 AMP training
# at 2,470 img/s on one A100 (NVIDIA DeepLearningExamples). The forward pass alone is taken as
# 3× a training step's rate (forward ≈ a third of a step's FLOPs). Other backbones are scaled
# by their multiply-accumulates per 224-px image against ResNet-50's 4.1 G (timm's tables:
# ViT-B/16 17.6 G). CLIP's ResNet-50 is counted as a ResNet-50.
_A100_RESNET50_TRAIN = 2470.0
_VIT_B16_FACTOR = 4.1 / 17.6
_PUBLISHED = "published: ResNet-50 AMP 2,470 img/s on one A100 (NVIDIA DeepLearningExamples)"
DEFAULT_THROUGHPUT: dict[tuple[str, str], Throughput] = {
    (row.backbone, row.device): row
    for row in (
        *(
            Throughput(
                backbone=name,
                device="gpu",
                train_img_s=_A100_RESNET50_TRAIN,
                eval_img_s=3 * _A100_RESNET50_TRAIN,
                feature_dim=dim,
                source=_PUBLISHED,
            )
            for name, dim in (
                ("resnet50", 2048),
                ("moco_v2_resnet50", 2048),
                ("resnet50_clip.openai", 1024),
            )
        ),
        Throughput(
            backbone="vit_base_patch16_clip_224.openai",
            device="gpu",
            train_img_s=_A100_RESNET50_TRAIN * _VIT_B16_FACTOR,
            eval_img_s=3 * _A100_RESNET50_TRAIN * _VIT_B16_FACTOR,
            feature_dim=768,
            source=f"{_PUBLISHED}, × 4.1/17.6 GMAC (ViT-B/16)",
        ),
        # The toy at config.yaml's width 16, 32 px, one thread: measured on the 2-core machine
        # of docs/estimate.md with benchmarks/finetune.py and benchmarks/extract.py.
        Throughput(
            backbone="toyresnet",
            device="cpu",
            train_img_s=1800.0,
            eval_img_s=5200.0,
            threads=1,
            feature_dim=128,
            source="measured: benchmarks/finetune.py, extract.py (docs/estimate.md)",
        ),
    )
}


# --- the throughput table ---------------------------------------------------------------------

THROUGHPUT_FIELDS = (
    "backbone",
    "device",
    "kind",
    "images_per_s",
    "threads",
    "feature_dim",
    "device_name",
    "measured",
    "source",
)


def record_throughput(
    *,
    path: str | Path = THROUGHPUT_FILE,
    backbone: str,
    device: str,
    kind: str,
    images_per_s: float,
    threads: int,
    feature_dim: int | None = None,
    device_name: str = "",
    source: str = "",
) -> None:
    """Write one measurement into the table at `path` (CSV), replacing the row of the same
    backbone, device (cpu | gpu) and kind (train | eval); the file is rewritten atomically."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be train or eval, got {kind!r}")
    if not images_per_s > 0:
        raise ValueError(f"images_per_s must be positive, got {images_per_s}")
    path = Path(path)
    rows = _read_rows(path) if path.exists() else []
    rows = [r for r in rows if (r["backbone"], r["device"], r["kind"]) != (backbone, device, kind)]
    rows.append(
        {
            "backbone": backbone,
            "device": device,
            "kind": kind,
            "images_per_s": f"{images_per_s:.1f}",
            "threads": int(threads),
            "feature_dim": "" if feature_dim is None else int(feature_dim),
            "device_name": device_name,
            "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "source": source,
        }
    )
    rows.sort(key=lambda r: (r["backbone"], r["device"], r["kind"]))
    write_csv(path, rows)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows, start=2):
        missing = [
            name for name in ("backbone", "device", "kind", "images_per_s") if not row.get(name)
        ]
        if missing:
            raise ValueError(f"{path}: line {number}: no {missing[0]}")
        if row["device"] not in DEVICES or row["kind"] not in ("train", "eval"):
            raise ValueError(
                f"{path}: line {number}: device must be cpu or gpu and kind train or eval"
            )
        try:
            if not float(row["images_per_s"]) > 0:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{path}: line {number}: images_per_s must be a positive number, "
                f"got {row['images_per_s']!r}"
            ) from None
    return rows


def load_throughput(path: str | Path | None = THROUGHPUT_FILE) -> dict[tuple[str, str], Throughput]:
    """The published defaults, overridden by the rows measured into `path` (if it exists).

    A backbone measured for one kind only (train or eval) keeps the other from the default
    row, or, without one, takes it as 3× (eval) or a third (train) of the measured one."""
    table = dict(DEFAULT_THROUGHPUT)
    if path is None or not Path(path).exists():
        return table
    measured: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in _read_rows(Path(path)):
        measured.setdefault((row["backbone"], row["device"]), {})[row["kind"]] = row
    for key, kinds in measured.items():
        base = table.get(key)
        train, evaluation = kinds.get("train"), kinds.get("eval")
        any_row = train or evaluation
        assert any_row is not None
        train_rate = float(train["images_per_s"]) if train else None
        eval_rate = float(evaluation["images_per_s"]) if evaluation else None
        if train_rate is None:
            train_rate = base.train_img_s if base else eval_rate / 3  # type: ignore[operator]
        if eval_rate is None:
            eval_rate = base.eval_img_s if base else 3 * train_rate
        dim = next((int(r["feature_dim"]) for r in kinds.values() if r.get("feature_dim")), None)
        table[key] = Throughput(
            backbone=key[0],
            device=key[1],
            train_img_s=train_rate,
            eval_img_s=eval_rate,
            threads=int(any_row.get("threads") or 1),
            feature_dim=dim or (base.feature_dim if base else 2048),
            source=f"measured: {Path(path)} ({any_row.get('device_name') or key[1]})",
        )
    return table


# --- split sizes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSize:
    images: int
    exact: bool = True  # False: an approximation (see `split_sizes`)
    missing: str = ""  # why nothing could be counted (an imagefolder split not there)


# BREEDS (Santurkar et al. 2021): classes × ImageNet subclasses per class, half of them the
# source (ID), half the target (OOD). Images per subclass: ImageNet's mean per class in train
# (1,281,167 / 1000), exactly 50 in val.
BREEDS_SUBCLASSES = {"living17": (17, 4), "entity30": (30, 8)}
IMAGENET_TRAIN_PER_CLASS = 1_281_167 / 1000
IMAGENET_VAL_PER_CLASS = 50
# WILDS FMoW v1.1 split sizes (Koh et al. 2021): the region subsets are counted from
# rgb_metadata.csv when a copy is present; without one the whole split stands in (an upper
# bound, marked approximate).
FMOW_WILDS_SIZES = {"train": 76_863, "id_val": 11_483, "val": 19_915}
# ObjectNet: of its 313 classes, the 113 that overlap ImageNet are read (in proportion).
OBJECTNET_SCORED = 113 / 313
STL_KEPT = 9 / 10  # the monkey class (800 of 8,000 test images) has no CIFAR-10 class
CLASSES = {
    "cifar10_stl": 10,
    "cifar10_cifar101": 10,
    "living17": 17,
    "entity30": 30,
    "domainnet": 40,
    "fmow": 62,
    "imagenet": 1000,
}


def _carve(total: int, fraction: float) -> tuple[int, int]:
    """(train, val) of a split whose val is carved out (`registry.carve_val`, per class)."""
    val = round(fraction * total)
    return total - val, val


def split_sizes(*, dataset: str, config: Mapping[str, Any]) -> dict[str, SplitSize]:
    """{split: expected images} of every split a dataset's jobs read, in_distribution first.

    From the published sizes of `sources.SOURCES` (`Size`), the toyshift generator's config,
    or a listing of an imagefolder's split folders. Approximate (`exact` False) where no
    size is recorded: BREEDS (from its class structure), FMoW without a copy (the whole WILDS
    split), ObjectNet (the overlapping classes' share).
    """
    options = dataset_options(config, dataset)
    ood = list(options["ood_splits"] or [])
    fraction = float(options["val_fraction"])
    if dataset in GENERATED:
        toy = config.get(dataset) or {}
        classes = int(toy.get("task_classes", 12))
        return {
            "train": SplitSize(classes * int(toy.get("train_per_class", 150))),
            "val": SplitSize(classes * int(toy.get("val_per_class", 50))),
            "test": SplitSize(classes * int(toy.get("test_per_class", 100))),
            **{split: SplitSize(classes * int(toy.get("ood_per_class", 100))) for split in ood},
        }
    if options["type"] == "imagefolder":
        return _imagefolder_sizes(options, fraction=fraction)
    setting = SETTINGS[dataset]
    sizes: dict[str, SplitSize] = {}
    if dataset in BREEDS_SUBCLASSES:
        classes, per_class = BREEDS_SUBCLASSES[dataset]
        half = classes * per_class // 2
        train, val = _carve(round(half * IMAGENET_TRAIN_PER_CLASS), fraction)
        sizes = {
            "train": SplitSize(train, exact=False),
            "val": SplitSize(val, exact=False),
            "test": SplitSize(half * IMAGENET_VAL_PER_CLASS, exact=False),
            "target": SplitSize(half * IMAGENET_VAL_PER_CLASS, exact=False),
        }
        return {split: sizes[split] for split in [*ID_SPLITS, *ood]}
    if dataset == "fmow":
        return _fmow_sizes(config, ood=ood)
    for split in [*ID_SPLITS, *ood]:
        source, part = source_splits(dataset, split)[0]
        size = next(s for s in SOURCES[source].sizes if s.split == part)
        assert size.images is not None, (source, part)  # recorded for every source used here
        images, exact = size.images, True
        if split == "stl":
            images = round(images * STL_KEPT)
        if split == "objectnet":
            images, exact = round(images * OBJECTNET_SCORED), False
        if split in ("train", "val") and not setting.has_val:
            images = _carve(images, fraction)[0 if split == "train" else 1]
        sizes[split] = SplitSize(images, exact)
    return sizes


def _fmow_sizes(config: Mapping[str, Any], *, ood: Sequence[str]) -> dict[str, SplitSize]:
    from robustft.data.registry import FMOW_SPLITS

    root = Path(source_root("fmow", paths=config.get("paths") or {}))
    splits = [*ID_SPLITS, *ood]
    if (root / "rgb_metadata.csv").is_file() and (root / "country_code_mapping.csv").is_file():
        from robustft.data.readers import read_fmow_split

        return {
            split: SplitSize(len(read_fmow_split(root, wilds_split=wilds, region=region).paths))
            for split, (wilds, region) in FMOW_SPLITS.items()
            if split in splits
        }
    return {
        split: SplitSize(FMOW_WILDS_SIZES[FMOW_SPLITS[split][0]], exact=False) for split in splits
    }


def _count_images(folder: Path) -> int:
    count = 0
    for _, _, files in os.walk(folder):
        count += sum(name.lower().endswith(IMAGE_EXTENSIONS) for name in files)
    return count


def _imagefolder_sizes(options: Mapping[str, Any], *, fraction: float) -> dict[str, SplitSize]:
    root = Path(options["root"])
    folders = options["splits"]
    sizes = {split: _count_split(root / entry, root=root) for split, entry in folders.items()}
    if "val" not in folders:
        train, val = _carve(sizes["train"].images, fraction)
        missing = sizes["train"].missing
        sizes["train"], sizes["val"] = SplitSize(train, missing=missing), SplitSize(val)
    return {split: sizes[split] for split in [*ID_SPLITS, *options["ood_splits"]]}


def _count_split(path: Path, *, root: Path) -> SplitSize:
    """An imagefolder split's images: a folder's by listing, a list file's entries."""
    if path.is_dir():
        return SplitSize(_count_images(path))
    if path.is_file():
        from robustft.data.readers import read_path_label_csv

        try:
            return SplitSize(len(read_path_label_csv(path, image_root=root, classes=None).paths))
        except ValueError as error:
            return SplitSize(0, missing=str(error))
    return SplitSize(0, missing=f"{path} missing")


def num_classes(*, dataset: str, config: Mapping[str, Any]) -> int:
    """The ID label space's size (the probe's K)."""
    if dataset in GENERATED:
        return int((config.get(dataset) or {}).get("task_classes", 12))
    options = dataset_options(config, dataset)
    if options["type"] == "imagefolder":
        if options.get("classes"):
            return len(options["classes"])
        train = Path(options["root"]) / options["splits"]["train"]
        return sum(1 for entry in train.iterdir() if entry.is_dir()) if train.is_dir() else 0
    return CLASSES[dataset]


def reads_image_files(*, dataset: str, config: Mapping[str, Any]) -> bool:
    """Whether a dataset's images are decoded from files (not held in memory as arrays)."""
    if dataset in GENERATED:
        return False
    if dataset_options(config, dataset)["type"] == "imagefolder":
        return True
    return not SETTINGS[dataset].in_memory


# --- jobs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedJob:
    """One job of the DAG as Snakemake plans it."""

    rule: str
    wildcards: Mapping[str, str]
    params: Mapping[str, Any]
    threads: int
    gpus: int
    benchmark: str | None = None
    needs_run: bool = True


@dataclass(frozen=True)
class Work:
    """What one job computes: images through a backbone, probe FLOP, generated images."""

    rule: str
    dataset: str
    backbone: str | None = None
    train_images: int = 0
    eval_images: int = 0
    probe_flop: float = 0.0
    probe_values: int = 0  # values of C the probe fits
    generated_images: int = 0
    prepared_images: int = 0  # decoded and resized once into the prepared-image cache
    decodes_files: bool = False
    rate_scale: float = 1.0  # the backbone's rates × this (a toy baseline of another width)
    exact: bool = True
    light: bool = False  # pushes no images: start-up only
    not_estimated: bool = False  # downloads


def _sum_sizes(sizes: Mapping[str, SplitSize], splits: Iterable[str]) -> tuple[int, bool]:
    chosen = [sizes[split] for split in splits]
    return sum(s.images for s in chosen), all(s.exact for s in chosen)


def _steps_images(images: int, batch_size: int) -> int:
    """Training images per epoch: whole batches only (the loader drops the last one)."""
    return images // batch_size * batch_size


def toy_variants(config: Mapping[str, Any]) -> dict[str, str]:
    """{backbone: the toy it has the rates of}: the toy backbones pretrained on parts of the
    pool (`er_pretraining.pools`), the same architecture and width as the toy."""
    from robustft.pretraining_pools import pool_backbone_name

    study = config.get("er_pretraining") or {}
    if not study.get("enabled", True):
        return {}
    return {
        pool_backbone_name(base=TOY_BACKBONE, fraction=pool["fraction"], domains=pool["domains"]): (
            TOY_BACKBONE
        )
        for pool in study.get("pools") or []
    }


def baseline_pool_images(*, dataset: str, config: Mapping[str, Any]) -> int:
    """The extra ID images a generated dataset draws for its baseline models (0 elsewhere)."""
    if dataset not in GENERATED:
        return 0
    toy = config.get(dataset) or {}
    return int(toy.get("task_classes", 12)) * int(toy.get("baseline_per_class", 0) or 0)


def toy_width_scale(*, width: float, reference: float) -> float:
    """Rate of a toy ResNet of `width` relative to the measured one of `reference` width."""
    fixed = TOY_WIDTH_FIXED_SHARE
    return 1.0 / (fixed + (1.0 - fixed) * (float(width) / float(reference)) ** 2)


def job_work(
    *,
    job: PlannedJob,
    config: Mapping[str, Any],
    sizes: Mapping[str, Mapping[str, SplitSize]],
    sweep_runs: Mapping[tuple[str, str, str], int] | None = None,
) -> Work:
    """The images (and FLOP) one job processes; `sizes` = {dataset: `split_sizes`};
    `sweep_runs` = {(method, backbone, dataset): fine-tuning runs planned, all seeds}, which a
    soup's work depends on."""
    rule, wildcards, params = job.rule, job.wildcards, job.params
    dataset = wildcards.get("dataset", "")
    if rule in ("download_dataset", "fetch_backbone", "fetch_text_tower"):
        return Work(rule=rule, dataset=wildcards.get("source", ""), not_estimated=True)
    if rule == "generate_toyshift":
        toy = params["settings"]
        pretrain = sum(int(v) for v in (toy.get("pretrain_images_per_class") or {}).values())
        task = split_sizes(dataset="toyshift", config=config)
        total = pretrain * int(toy.get("pretrain_classes", 20)) + sum(
            s.images for s in task.values()
        )
        return Work(rule=rule, dataset="toyshift", generated_images=total)
    if rule == "pretrain_backbone":
        settings = params["settings"]
        toy = config.get("toyshift") or {}
        classes = int(toy.get("pretrain_classes", 20))
        per_domain = toy.get("pretrain_images_per_class") or {}
        # An er_pretraining pool's backbone trains on its part of the pool.
        fraction = float(settings.get("pool_fraction", 1.0))
        domains = settings.get("pool_domains") or list(per_domain)
        pool = classes * sum(round(fraction * int(per_domain.get(d, 0))) for d in domains)
        val = round(0.05 * pool)  # the generator's pretrain_val_fraction
        epochs = int(settings["epochs"])
        return Work(
            rule=rule,
            dataset="toyshift",
            backbone=wildcards.get("backbone", "toyresnet"),
            train_images=epochs * _steps_images(pool - val, int(settings["batch_size"])),
            eval_images=(epochs + 1) * val,
        )
    if not dataset or dataset not in sizes:
        return Work(rule=rule, dataset=dataset, light=True)
    own = sizes[dataset]
    decodes = reads_image_files(dataset=dataset, config=config)
    eval_splits = [split for split in own if split != "train"]
    if rule == "prepare_images":
        images, exact = _sum_sizes(own, [wildcards["split"]])
        return Work(rule=rule, dataset=dataset, prepared_images=images, exact=exact)
    if rule == "extract_features":
        images, exact = _sum_sizes(own, [wildcards["split"]])
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=wildcards["backbone"],
            eval_images=images,
            decodes_files=decodes,
            exact=exact,
        )
    if rule == "fit_probe":
        train, exact = _sum_sizes(own, ["train"])
        grid = len(params["c_grid"])
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=wildcards["backbone"],
            # d is filled in by `job_seconds` (the backbone's feature width).
            probe_flop=PROBE_PASSES_PER_C
            * grid
            * 4.0
            * train
            * PROBE_TOGETHER
            * num_classes(dataset=dataset, config=config),
            probe_values=grid,
            exact=exact,
        )
    if rule == "finetune":
        from robustft.methods import method_table

        settings = params["settings"]
        epochs, batch = int(settings["epochs"]), int(settings["batch_size"])
        train, exact = _sum_sizes(own, ["train"])
        run = parse_hparam_folder(wildcards["run"]) if wildcards.get("run") else {}
        if TRAIN_PER_CLASS_KEY in run:  # a larger ID training set (analysis.er_large_id)
            train = int(run[TRAIN_PER_CLASS_KEY]) * num_classes(dataset=dataset, config=config)
        evaluated, eval_exact = _sum_sizes(own, eval_splits)
        spec = method_table(config["finetune"])[wildcards["method"]]
        # Row 0 (before training) and every epoch score every eval split (eval_every 1);
        # otherwise val every epoch and the rest every eval_every epochs and at the last.
        every = int(settings.get("eval_every") or 1)
        scored_all = 1 + len({e for e in range(1, epochs + 1) if e % every == 0 or e == epochs})
        val = own["val"].images
        evaluations = scored_all * evaluated + (epochs + 1 - scored_all) * val
        teacher = epochs * _steps_images(train, batch) if spec.teacher else 0
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=wildcards["backbone"],
            train_images=epochs * _steps_images(train, batch),
            eval_images=evaluations + teacher,
            decodes_files=decodes,
            exact=exact and eval_exact,
        )
    if rule == "train_baseline":
        settings = params["settings"]
        epochs, batch = int(settings["epochs"]), int(settings["batch_size"])
        # The ID train split plus the generator's baseline pool (`baseline_pool_splits`).
        train = own["train"].images + baseline_pool_images(dataset=dataset, config=config)
        count = min(train, max(batch, round(float(settings["fraction"]) * train)))
        others, exact = _sum_sizes(own, [s for s in eval_splits if s != "val"])
        width = settings.get("width")
        reference = (config.get("toy_backbone") or {}).get("width")
        scale = toy_width_scale(width=width, reference=reference) if width and reference else 1.0
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=str(settings.get("architecture") or "toyresnet"),
            train_images=epochs * _steps_images(count, batch),
            eval_images=(epochs + 1) * own["val"].images + others,
            decodes_files=decodes,
            rate_scale=scale,
            exact=exact and own["train"].exact,
        )
    if rule == "soups":
        # Per seed: the greedy soup scores ID val once per run, then both soups score every
        # evaluation split.
        evaluated, exact = _sum_sizes(own, eval_splits)
        seeds = max(1, len(params["seeds"]))
        key = (wildcards["method"], wildcards["backbone"], dataset)
        runs = (sweep_runs or {}).get(key, seeds) // seeds
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=wildcards["backbone"],
            eval_images=seeds * (runs * own["val"].images + 2 * evaluated),
            decodes_files=decodes,
            exact=exact,
        )
    if rule == "store_predictions":
        # The selected run of every seed, scored on every evaluation split.
        evaluated, exact = _sum_sizes(own, eval_splits)
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=wildcards["backbone"],
            eval_images=len(config["seeds"]) * evaluated,
            decodes_files=decodes,
            exact=exact,
        )
    if rule == "wiseft":
        evaluated, exact = _sum_sizes(own, eval_splits)
        curves = len(params["methods"]) * len(params["alphas"])
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=wildcards["backbone"],
            eval_images=curves * evaluated,
            decodes_files=decodes,
            exact=exact,
        )
    if rule == "zeroshot":
        evaluated, exact = _sum_sizes(own, eval_splits)
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=wildcards["backbone"],
            eval_images=evaluated,
            decodes_files=decodes,
            exact=exact,
        )
    if rule == "feature_distortion":
        images, exact = _sum_sizes(own, [s for s in own if s != "val"])
        plan = params["plan"]
        runs = sum(len(entry["selections"]) for entry in plan.values()) * len(config["seeds"])
        backbone = next(iter(plan), None)
        return Work(
            rule=rule,
            dataset=dataset,
            backbone=backbone,
            eval_images=runs * images,
            decodes_files=decodes,
            exact=exact,
        )
    return Work(rule=rule, dataset=dataset, light=True)


@dataclass(frozen=True)
class JobCost:
    work: Work
    seconds: float | None  # None: not estimated (downloads, or no throughput for the backbone)
    threads: int
    gpus: int
    missing: str = ""  # why it is not estimated, or what stands in


def job_seconds(
    *,
    work: Work,
    threads: int,
    gpus: int,
    num_workers: int | str | None,
    throughput: Mapping[tuple[str, str], Throughput],
    start_s: Mapping[str, float] = START_S,
    decode_img_s: float = DECODE_IMG_S,
) -> tuple[float | None, str]:
    """(estimated wall seconds of one job, or None and why not)."""
    device = "gpu" if gpus > 0 else "cpu"
    if work.not_estimated:
        return None, "download (network-bound, not estimated)"
    if work.light:
        return LIGHT_START_S, ""
    seconds = start_s[device]
    if work.generated_images:
        seconds += work.generated_images / TOYSHIFT_GENERATE_IMG_S
    if work.prepared_images:  # CPU decoding, one image per thread at a time
        return seconds + work.prepared_images / (decode_img_s * max(1, threads)), ""
    if not (work.train_images or work.eval_images or work.probe_flop):
        return seconds, ""
    backbone = work.backbone or ""
    rows = {kind: throughput.get((backbone, kind)) for kind in DEVICES}
    if work.probe_flop and not (work.train_images or work.eval_images):
        # The probe reads features: only the backbone's feature width matters.
        known = rows[device] or rows["cpu"] or rows["gpu"]
        dim = known.feature_dim if known else DEFAULT_FEATURE_DIM
        flop_rate = PROBE_FLOP_S[device] * (max(1, threads) if device == "cpu" else max(1, gpus))
        overhead = PROBE_START_S + work.probe_values * PROBE_OVERHEAD_PER_C_S
        return seconds + overhead + work.probe_flop * dim / flop_rate, ""
    row, note = rows[device], ""
    if row is None and device == "gpu" and rows["cpu"] is not None:
        # A GPU job with only CPU figures (the toy): its threads' CPU rate, an upper bound on
        # its time.
        row, device, note = rows["cpu"], "cpu", f"{backbone}: CPU figures stand in on the GPU"
    if row is None:
        return None, (
            f"no {device} throughput for backbone {backbone}: run benchmarks/finetune.py "
            f"and benchmarks/extract.py --model <its architecture> --device "
            f"{'cuda' if device == 'gpu' else 'cpu'} (writes {THROUGHPUT_FILE})"
        )
    scale = max(1, threads) / max(1, row.threads) if device == "cpu" else max(1, gpus)
    scale *= work.rate_scale
    train_rate, eval_rate = row.train_img_s * scale, row.eval_img_s * scale
    if work.decodes_files:
        if num_workers in (None, "auto"):
            workers = max(1, threads) if device == "gpu" else 0
        else:
            workers = int(num_workers)
        cap = decode_img_s * max(1, workers)
        train_rate, eval_rate = min(train_rate, cap), min(eval_rate, cap)
    seconds += work.train_images / train_rate + work.eval_images / eval_rate
    return seconds, note


def estimate_jobs(
    *,
    jobs: Sequence[PlannedJob],
    config: Mapping[str, Any],
    throughput: Mapping[tuple[str, str], Throughput],
    start_s: Mapping[str, float] = START_S,
    decode_img_s: float = DECODE_IMG_S,
) -> list[JobCost]:
    """The estimate of every job (in the order given)."""
    sizes = {dataset: split_sizes(dataset=dataset, config=config) for dataset in config["datasets"]}
    sweep_runs = Counter(
        (job.wildcards["method"], job.wildcards["backbone"], job.wildcards["dataset"])
        for job in jobs
        if job.rule == "finetune"
    )
    same_rates = toy_variants(config)
    costs = []
    # A dataset whose split could not be counted: its jobs' images are unknown, not 0.
    uncounted = {
        dataset: f"dataset {dataset} split {split}: {size.missing}"
        for dataset, own in sizes.items()
        for split, size in own.items()
        if size.missing
    }
    for job in jobs:
        work = job_work(job=job, config=config, sizes=sizes, sweep_runs=sweep_runs)
        dataset = job.wildcards.get("dataset")
        if dataset in uncounted and not work.light:
            costs.append(
                JobCost(
                    work=work,
                    seconds=None,
                    threads=job.threads,
                    gpus=job.gpus,
                    missing=uncounted[dataset],
                )
            )
            continue
        if work.backbone in same_rates:
            work = replace(work, backbone=same_rates[work.backbone])
        workers = job.params.get("num_workers") if isinstance(job.params, Mapping) else None
        if workers is None and job.rule == "finetune":
            workers = job.params["settings"].get("num_workers")
        seconds, missing = job_seconds(
            work=work,
            threads=job.threads,
            gpus=job.gpus,
            num_workers=workers,
            throughput=throughput,
            start_s=start_s,
            decode_img_s=decode_img_s,
        )
        costs.append(
            JobCost(work=work, seconds=seconds, threads=job.threads, gpus=job.gpus, missing=missing)
        )
    return costs


# --- the table --------------------------------------------------------------------------------


@dataclass
class CostRow:
    rule: str
    dataset: str
    jobs: int = 0
    train_images: int = 0
    eval_images: int = 0
    probe_flop: float = 0.0
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    wall_hours: float = 0.0
    exact: bool = True
    not_estimated: int = 0
    notes: set[str] = field(default_factory=set)


def cost_table(costs: Sequence[JobCost]) -> list[CostRow]:
    """One row per (rule, dataset), then one "total" row."""
    rows: dict[tuple[str, str], CostRow] = {}
    total = CostRow(rule="total", dataset="")
    for cost in costs:
        work = cost.work
        if work.rule == "all":
            continue
        row = rows.setdefault(
            (work.rule, work.dataset), CostRow(rule=work.rule, dataset=work.dataset)
        )
        for target in (row, total):
            target.jobs += 1
            target.train_images += work.train_images
            target.eval_images += work.eval_images + work.prepared_images
            target.probe_flop += work.probe_flop
            target.exact &= work.exact
            if cost.seconds is None:
                target.not_estimated += 1
                target.notes.add(cost.missing)
                continue
            hours = cost.seconds / 3600
            target.wall_hours += hours
            target.gpu_hours += hours * cost.gpus
            target.cpu_hours += hours * max(1, cost.threads)
    # The costliest rules first (GPU-hours, then CPU-hours); datasets in the order first seen.
    weight: dict[str, tuple[float, float]] = {}
    for row in rows.values():
        gpu, cpu = weight.get(row.rule, (0.0, 0.0))
        weight[row.rule] = (gpu + row.gpu_hours, cpu + row.cpu_hours)
    rules = sorted(weight, key=lambda rule: (-weight[rule][0], -weight[rule][1]))
    ordered = []
    for rule in rules:
        own = [row for row in rows.values() if row.rule == rule]
        if len(own) > 1 and not any(
            row.train_images or row.eval_images or row.probe_flop for row in own
        ):
            # Rules that push no images (tables, plots, downloads): one row over the datasets.
            merged = CostRow(rule=rule, dataset="(all)")
            for row in own:
                merged.jobs += row.jobs
                merged.gpu_hours += row.gpu_hours
                merged.cpu_hours += row.cpu_hours
                merged.wall_hours += row.wall_hours
                merged.not_estimated += row.not_estimated
                merged.notes |= row.notes
            own = [merged]
        ordered += own
    return [*ordered, total]


def _count(value: int) -> str:
    if value >= 10**9:
        return f"{value / 1e9:.2f}G"
    if value >= 10**6:
        return f"{value / 1e6:.1f}M"
    if value >= 10**4:
        return f"{value / 1e3:.0f}k"
    return str(value)


def _hours(value: float) -> str:
    if value == 0:
        return "0"
    if value < 0.1:
        return f"{value:.3f}"
    return f"{value:,.1f}"


def format_table(rows: Sequence[CostRow]) -> str:
    """Markdown: rule, dataset, jobs, images (train / eval), GPU-hours, CPU-hours."""
    lines = [
        "| rule | dataset | jobs | train images | eval images | GPU-hours | CPU-hours |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        approx = "" if row.exact else " ~"
        unknown = f" (+{row.not_estimated} not estimated)" if row.not_estimated else ""
        name = f"**{row.rule}**" if row.rule == "total" else row.rule
        lines.append(
            f"| {name} | {row.dataset} | {row.jobs} | {_count(row.train_images)}{approx} "
            f"| {_count(row.eval_images)}{approx} | {_hours(row.gpu_hours)}{unknown} "
            f"| {_hours(row.cpu_hours)} |"
        )
    return "\n".join(lines)


# --- comparing against measured times -----------------------------------------------------


def read_benchmark(path: str | Path) -> tuple[float, float] | None:
    """(wall seconds, CPU seconds) that a Snakemake `benchmark:` file records (means of its
    repeats), or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle, delimiter="\t") if row.get("s")]
    if not rows:
        return None
    wall = sum(float(row["s"]) for row in rows) / len(rows)
    cpu = sum(float(row.get("cpu_time") or 0) for row in rows) / len(rows)
    return wall, cpu


@dataclass(frozen=True)
class Comparison:
    """Per rule, over the jobs with a benchmark file: seconds measured and estimated.

    `measured_cpu_s` is CPU time / the job's threads: what the wall time would have been had
    the job had its cores to itself (on a shared machine the wall time also counts the
    waits for a core)."""

    rule: str
    jobs: int
    measured_s: float
    measured_cpu_s: float
    estimated_s: float

    @property
    def ratio(self) -> float:
        return self.estimated_s / self.measured_s if self.measured_s else math.inf

    @property
    def cpu_ratio(self) -> float:
        return self.estimated_s / self.measured_cpu_s if self.measured_cpu_s else math.inf


def compare_with_benchmarks(
    *, jobs: Sequence[PlannedJob], costs: Sequence[JobCost], root: str | Path = "."
) -> list[Comparison]:
    """Per rule, over its jobs whose `benchmark:` file exists under `root`: the measured and
    the estimated seconds, summed."""
    sums: dict[str, list[float]] = {}
    for job, cost in zip(jobs, costs, strict=True):
        if not job.benchmark or cost.seconds is None:
            continue
        measured = read_benchmark(Path(root) / job.benchmark)
        if measured is None:
            continue
        entry = sums.setdefault(job.rule, [0, 0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += measured[0]
        entry[2] += measured[1] / max(1, job.threads)
        entry[3] += cost.seconds
    return [
        Comparison(
            rule=rule, jobs=int(n), measured_s=wall, measured_cpu_s=cpu, estimated_s=estimated
        )
        for rule, (n, wall, cpu, estimated) in sums.items()
    ]


# --- the DAG ----------------------------------------------------------------------------------


def planned_jobs(
    *,
    snakefile: str | Path = "Snakefile",
    configfiles: Sequence[str | Path] = (),
    config: Mapping[str, Any] | None = None,
    targets: Sequence[str] = (),
    forceall: bool = False,
) -> tuple[list[PlannedJob], dict[str, Any]]:
    """(the jobs of the DAG, the workflow's resolved config), as `snakemake --dry-run` plans
    them from the working directory. `forceall`: every job of the DAG, as from scratch;
    otherwise the DAG's jobs with `needs_run` telling which a run would execute now."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,
    )

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            # As many cores as any job asks for, so that Snakemake keeps every job's threads.
            resource_settings=ResourceSettings(cores=1 << 16, nodes=1 << 16),
            config_settings=ConfigSettings(
                config=dict(config or {}), configfiles=[Path(f) for f in configfiles]
            ),
            snakefile=Path(snakefile),
        )
        workflow_api.dag(DAGSettings(targets=frozenset(targets), forceall=forceall))
        # What `snakemake --summary` does: build the DAG without locking or running it.
        workflow = workflow_api._workflow
        workflow._prepare_dag(
            forceall=forceall, ignore_incomplete=True, lock_warn_only=True, nolock=True
        )
        workflow._build_dag()
        dag = workflow.dag
        pending = set(dag.needrun_jobs())
        jobs = []
        for job in dag.jobs:
            resources = dict(job.resources)
            jobs.append(
                PlannedJob(
                    rule=job.rule.name,
                    wildcards=dict(job.wildcards_dict),
                    params=dict(job.params.items()) if job.params else {},
                    threads=int(job.threads),
                    gpus=int(resources.get("gpu") or 0),
                    benchmark=str(job.benchmark) if job.benchmark else None,
                    needs_run=forceall or job in pending,
                )
            )
        return jobs, dict(workflow.config)


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m robustft.estimate [--configfile F] [--config K=V ...] [targets]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m robustft.estimate",
        description="Jobs, images, GPU-hours and CPU-hours of a config's DAG, per rule and "
        "dataset, before anything runs (see docs/estimate.md).",
    )
    parser.add_argument("targets", nargs="*", help="as for snakemake (default: rule all)")
    parser.add_argument("--configfile", nargs="+", default=[], help="as for snakemake")
    parser.add_argument("--config", nargs="+", default=[], help="KEY=VALUE, as for snakemake")
    parser.add_argument("--snakefile", default="Snakefile")
    parser.add_argument(
        "--pending",
        action="store_true",
        help="only the jobs a run would execute now (default: the whole DAG, as from scratch)",
    )
    parser.add_argument(
        "--throughput",
        default=THROUGHPUT_FILE,
        help=f"measured images/s (default {THROUGHPUT_FILE}; published figures where absent)",
    )
    parser.add_argument(
        "--compare",
        nargs="?",
        const=".",
        metavar="DIR",
        help="also compare, per rule, with the times the jobs' benchmark: files record "
        "(under DIR, default the working directory)",
    )
    args = parser.parse_args(argv)
    try:
        from snakemake.cli import parse_config

        overrides = parse_config(args.config)
        jobs, config = planned_jobs(
            snakefile=args.snakefile,
            configfiles=args.configfile,
            config=overrides,
            targets=args.targets,
            forceall=not args.pending,
        )
        if args.pending:
            jobs = [job for job in jobs if job.needs_run]
        throughput = load_throughput(args.throughput)
        costs = estimate_jobs(jobs=jobs, config=config, throughput=throughput)
    except (ValueError, FileNotFoundError) as error:
        print(f"robustft estimate: {error}", file=sys.stderr)
        return 1
    used = sorted({(c.work.backbone, "gpu" if c.gpus else "cpu") for c in costs if c.work.backbone})
    print(format_table(cost_table(costs)))
    print()
    print("Throughput used (images/s, train / eval):")
    for backbone, device in used:
        row = throughput.get((backbone or "", device))
        if row is not None:
            print(
                f"- {backbone} on {device}: {row.train_img_s:,.0f} / {row.eval_img_s:,.0f} "
                f"({row.source})"
            )
    for note in sorted({c.missing for c in costs if c.missing and c.seconds is None}):
        print(f"- not estimated: {note}")
    for note in sorted({c.missing for c in costs if c.missing and c.seconds is not None}):
        print(f"- {note}")
    if any(not c.work.exact for c in costs):
        print("~ split sizes approximated (no published count recorded; docs/estimate.md)")
    if args.compare is not None:
        print()
        print(
            "| rule | jobs measured | wall, s | CPU / threads, s | estimated, s "
            "| estimated / wall | estimated / CPU |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for item in compare_with_benchmarks(jobs=jobs, costs=costs, root=args.compare):
            print(
                f"| {item.rule} | {item.jobs} | {item.measured_s:.1f} | {item.measured_cpu_s:.1f} "
                f"| {item.estimated_s:.1f} | {item.ratio:.2f} | {item.cpu_ratio:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
