"""The torch steps of the workflow: pretraining, feature extraction, fine-tuning.

One function per step; each takes paths and settings, writes its outputs atomically, and knows
nothing of Snakemake (the scripts in workflow/scripts call these). The probe and the tables,
which need no torch, live in probe.py and report.py so that their jobs start fast.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustft import __version__, provenance
from robustft.config import hparam_folder
from robustft.data.datasets import ArrayImageDataset, as_torch_dataset, train_transform
from robustft.data.registry import ID_SPLITS, ImageArrays, load_split, split_column, take
from robustft.evaluate import accuracy
from robustft.features import (
    extract_features,
    resolve_num_workers,
    resolve_precision,
    write_features,
)
from robustft.io import sha256_file, write_csv, write_json
from robustft.methods import resolve as resolve_method
from robustft.models import (
    HEAD_FILE,
    ImageClassifier,
    Preprocess,
    build_backbone,
    load_backbone,
    load_head,
    save_backbone,
    save_head,
    save_model,
    weights_path,
)
from robustft.runtime import sigterm_deferred
from robustft.training import (
    Checkpointing,
    TrainSettings,
    raise_if_stop_requested,
    train_classifier,
)

log = logging.getLogger(__name__)


def environment_info() -> dict[str, Any]:
    """Library versions and the git commit, for the `config.json` of every run."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "robustft": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        # From the package metadata: importing scikit-learn costs a fine-tuning job seconds.
        "scikit-learn": importlib.metadata.version("scikit-learn"),
        "python": platform.python_version(),
        "git_commit": commit,
    }


def _dataset(arrays: ImageArrays) -> ArrayImageDataset:
    return ArrayImageDataset(arrays.images, arrays.labels)


def preprocess_of(images: np.ndarray) -> Preprocess:
    """Input size and per-channel mean/std of uint8 images (N, H, W, 3) scaled to [0, 1]."""
    scaled = images.astype(np.float32) / 255.0
    return Preprocess(
        input_size=int(images.shape[1]),
        mean=tuple(float(x) for x in scaled.mean(axis=(0, 1, 2))),
        std=tuple(float(x) for x in scaled.std(axis=(0, 1, 2))),
    )


def pretrain_toy_backbone(
    *,
    pretrain_file: str | Path,
    out_dir: str | Path,
    width: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the toy ResNet on the toyshift pretraining pool; save the backbone only."""
    from robustft.data import toyshift

    train = toyshift.read_split(pretrain_file, "train")
    val = toyshift.read_split(pretrain_file, "val")
    num_classes = len(toyshift.class_names(pretrain_file))
    # The toy backbone's own "pretrained config": the statistics of its pretraining data.
    preprocess = preprocess_of(train.images)
    torch.manual_seed(seed)
    kwargs = {"width": width}
    backbone = build_backbone(architecture="toyresnet", kwargs=kwargs)
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, preprocess=preprocess)
    settings = TrainSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=0.9,
        weight_decay=weight_decay,
        seed=seed,
    )
    result = train_classifier(
        model=model,
        train_set=_dataset(train),
        eval_sets={"val": _dataset(val)},
        settings=settings,
        select_on="val",
        device=device,
        progress=progress,
    )
    # Keep the last epoch: pretraining has no early stopping.
    val_accuracy = result.history[-1]["val"]
    model.cpu()
    save_backbone(
        backbone=model.backbone,
        out_dir=out_dir,
        architecture="toyresnet",
        kwargs=kwargs,
        preprocess=preprocess,
        extra={
            "pretrain": {
                "val_accuracy": val_accuracy,
                "settings": asdict(settings),
                "classes": num_classes,
            }
        },
    )
    write_csv(Path(out_dir) / "history.csv", result.history)
    return {"val_accuracy": val_accuracy}


def extract_split(
    *,
    dataset: str,
    split: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    out_path: str | Path,
    backbone_name: str,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int | str = "auto",
    precision: str = "auto",
    threads: int = 1,
    progress: bool = True,
    data_options: Mapping[str, Any] | None = None,
    preprocess_overrides: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> None:
    """Frozen, eval-mode penultimate features of one split into an HDF5 file.

    `data_root`: the toyshift folder or {source: folder}; `data_options`:
    `registry.dataset_options` (eval transform, val carving, imagefolder layout);
    `preprocess_overrides`: config overrides of the backbone's pretrained preprocessing
    (`load_backbone`). The file's attrs record the resolved preprocessing, as text
    (`preprocessing`) and as JSON (`preprocess`), and the provenance (`provenance.record`:
    backbone, weights_sha256, `data_fingerprint` of the data manifest). Non-finite features
    are refused, naming the weights, and nothing is written.
    """
    # The backbone first: a missing weight cache fails at once, before a dataset is read.
    backbone, preprocess, meta = load_backbone(model_dir, preprocess=preprocess_overrides)
    arrays = load_split(dataset=dataset, split=split, root=data_root, options=data_options)
    model = ImageClassifier(
        backbone=backbone, num_classes=len(arrays.class_names), preprocess=preprocess
    )
    transform = (data_options or {}).get("eval_transform", "resize")
    precision = resolve_precision(precision, device)
    features, labels = extract_features(
        model,
        as_torch_dataset(arrays, preprocess=preprocess, transform=transform),
        batch_size=batch_size,
        device=device,
        num_workers=resolve_num_workers(num_workers, device=device, threads=threads),
        precision=precision,
        progress=progress,
    )
    bad = int((~np.isfinite(features).all(axis=1)).sum())
    if bad:
        raise ValueError(
            f"{weights_path(model_dir, meta)}: backbone {backbone_name!r} gives non-finite "
            f"features for {bad} of {len(features)} images of {dataset}/{split} "
            f"({_non_finite_weights(backbone)}); nothing written"
        )
    # Scoring hooks for the probe (ImageNet-R/A subsets, ObjectNet groups).
    subset = {
        key: list(value)
        for key in ("class_subset", "class_groups")
        if (value := getattr(arrays, key, None)) is not None
    }
    write_features(
        out_path,
        features=features,
        labels=labels,
        attrs={
            **provenance.record(
                backbone=backbone_name,
                weights_sha256=meta["sha256"],
                data_fingerprint=data_fingerprint,
            ),
            "dataset": dataset,
            "split": split,
            "num_classes": len(arrays.class_names),
            "preprocessing": f"{transform} to {preprocess.input_size}px (crop_pct "
            f"{preprocess.crop_pct}, {preprocess.interpolation}); to float in [0,1]; normalise "
            f"mean={list(preprocess.mean)} std={list(preprocess.std)}; no augmentation",
            "preprocess": json.dumps(
                {**preprocess.to_dict(), "transform": transform}, sort_keys=True
            ),
            "precision": precision,
            **subset,
        },
    )


def _non_finite_weights(backbone: torch.nn.Module) -> str:
    """Which weight tensor holds NaN or infinity (the first), for the error message."""
    for key, value in backbone.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"tensor '{key}' holds NaN or infinity"
    return "no weight tensor holds NaN or infinity: an overflow? try precision fp32"


def load_probe_head(probe_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    head = load_head(Path(probe_dir) / HEAD_FILE, what="probe head")
    return head.weight, head.bias


def probe_head_provenance(probe_dir: str | Path) -> dict[str, str]:
    """The provenance the probe recorded in its head's safetensors metadata (`run_probe`)."""
    return load_head(Path(probe_dir) / HEAD_FILE, what="probe head").metadata


def check_probe_head(
    *,
    probe_dir: str | Path,
    model_dir: str | Path,
    meta: Mapping[str, Any],
    data_fingerprint: str | None,
) -> str:
    """Refuse a probe head fitted on another backbone's weights or other data; its SHA-256."""
    path = Path(probe_dir) / HEAD_FILE
    provenance.check_backbone(
        path=path,
        recorded=probe_head_provenance(probe_dir),
        meta=meta,
        meta_path=Path(model_dir) / "meta.json",
        backbone_name=None,
        data_fingerprint=data_fingerprint,
        data_source="this job's data manifest",
        rerun="fit_probe",
    )
    return sha256_file(path)


def copy_probe_head(model: ImageClassifier, *, probe_dir: str | Path | None, method: str) -> None:
    """Put the linear probe's head into `model` (LP-FT's start, KD's teacher)."""
    if probe_dir is None:
        raise ValueError(f"method {method!r} needs the probe's head (probe_dir)")
    weight, bias = load_probe_head(probe_dir)
    if tuple(weight.shape) != tuple(model.head.weight.shape):
        raise ValueError(
            f"{probe_dir}: probe head {tuple(weight.shape)} does not fit the "
            f"model head {tuple(model.head.weight.shape)}"
        )
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)


def run_finetune(
    *,
    method: str,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    out_dir: str | Path,
    ood_splits: Sequence[str],
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    augment: bool,
    bn: str = "train",
    bn_momentum: float | None = None,
    clip_grad_norm: float | None = None,
    eval_every: int = 1,
    collapse_loss_factor: float | None = 10.0,
    save_epochs: Sequence[int] = (),
    hparams: Mapping[str, float] | None = None,
    method_options: Mapping[str, Any] | None = None,
    probe_dir: str | Path | None = None,
    state_dir: str | Path | None = None,
    checkpoint_minutes: float = 5.0,
    device: str = "cpu",
    progress: bool = True,
    resolved_config: Mapping[str, Any] | None = None,
    data_options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    precision: str = "auto",
    preprocess_overrides: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, float] | None = None,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Fine-tune with one method of the method table (`robustft.methods`), all through the
    one training loop: the entry's start (a new head or the probe's), its teacher (the
    pretrained model with the probe head) and its `prepare` hook (loss, extra loss term,
    trainable parameters, post-processing). `hparams` are the swept values besides lr (they
    name the run folder), `method_options` the method's fixed settings (and a user method's
    `entry`).

    `bn`, `bn_momentum`, `clip_grad_norm`, `eval_every`, `collapse_loss_factor`: see
    `training.TrainSettings`. A run that collapses is written like any other, with
    `diverged: true` and the reason (`collapse`) in metrics.json, so that selection skips it.

    `precision`: auto = bf16 autocast on a GPU, fp32 on a CPU (see `resolve_precision`).

    `preprocess_overrides` (config overrides of the pretrained preprocessing) and
    `backbone_kwargs` (drop_rate, drop_path_rate) go to `load_backbone`; config.json records
    the resolved preprocessing and the kwargs under `backbone`.

    With `state_dir`, resumable state (`last.pt`) is saved there every epoch, every
    `checkpoint_minutes` and on SIGTERM; a rerun resumes from it, and it is deleted once the
    outputs are written. Keep it out of the job's declared outputs (Snakemake deletes those
    when a job fails).

    `data_fingerprint` (the data manifest's): recorded in config.json and metrics.json with
    the backbone's weights_sha256 and the probe head's SHA-256; a probe head (a method's start
    or its teacher's head) must record the same weights and data (`check_probe_head`).
    """
    backbone, preprocess, backbone_meta = load_backbone(  # first: fail at once
        model_dir, preprocess=preprocess_overrides, backbone_kwargs=backbone_kwargs
    )
    spec = resolve_method(method, method_options)
    probe_head_sha256 = None
    if probe_dir is not None and spec.needs_probe_head:
        probe_head_sha256 = check_probe_head(
            probe_dir=probe_dir,
            model_dir=model_dir,
            meta=backbone_meta,
            data_fingerprint=data_fingerprint,
        )
    recorded = {
        **provenance.record(
            backbone=Path(model_dir).name,
            weights_sha256=backbone_meta["sha256"],
            data_fingerprint=data_fingerprint,
        ),
        provenance.PROBE_HEAD_SHA256: probe_head_sha256,
    }
    splits = {
        split: load_split(dataset=dataset, split=split, root=data_root, options=data_options)
        for split in (*ID_SPLITS, *ood_splits)
    }
    data_opts = data_options or {}
    num_classes = len(splits["train"].class_names)
    torch.manual_seed(seed)  # the new head's initialisation depends on the seed only
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, preprocess=preprocess)
    if spec.start == "probe_head":
        copy_probe_head(model, probe_dir=probe_dir, method=method)
    hparams = {key: float(value) for key, value in (hparams or {}).items()}
    options = {**(method_options or {}), **hparams}
    teacher = None
    if spec.teacher:
        if probe_dir is None:
            raise ValueError(
                f"method {method!r} needs the probe's head (probe_dir) for its teacher"
            )
        teacher_backbone, _, _ = load_backbone(model_dir)
        teacher = ImageClassifier(
            backbone=teacher_backbone, num_classes=num_classes, preprocess=preprocess
        )
        copy_probe_head(teacher, probe_dir=probe_dir, method=method)
    setup = spec.hook()(model=model, options=options, teacher=teacher)
    loss_fn, extra_loss = setup.loss_fn, setup.extra_loss
    settings = TrainSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        bn=bn,
        bn_momentum=bn_momentum,
        clip_grad_norm=clip_grad_norm,
        eval_every=eval_every,
        collapse_loss_factor=collapse_loss_factor,
        seed=seed,
        num_workers=num_workers,
        precision=resolve_precision(precision, device),
    )
    eval_transform = data_opts.get("eval_transform", "resize")
    eval_sets = {
        split_column(split): as_torch_dataset(
            arrays, preprocess=preprocess, transform=eval_transform
        )
        for split, arrays in splits.items()
        if split != "train"
    }
    train_set = as_torch_dataset(
        splits["train"], preprocess=preprocess, transform=data_opts.get("train_transform", "resize")
    )
    checkpointing = None
    if state_dir is not None:
        identity = {
            "method": method,
            "dataset": dataset,
            "settings": asdict(settings),
            "augment": augment,
            "save_epochs": sorted(save_epochs),
            "method_options": options,
            "data_options": dict(data_opts),
            "backbone_sha256": backbone_meta["sha256"],
            "backbone": {"preprocess": preprocess.to_dict(), "kwargs": dict(backbone_kwargs or {})},
            "probe_head_sha256": (
                probe_head_sha256 or sha256_file(Path(probe_dir) / HEAD_FILE) if probe_dir else None
            ),
            "split_sizes": {split: len(arrays.labels) for split, arrays in splits.items()},
        }
        if data_fingerprint is not None:  # only then: state saved before it stays resumable
            identity["data_fingerprint"] = data_fingerprint
        checkpointing = Checkpointing(
            path=Path(state_dir) / "last.pt",
            fingerprint=hashlib.sha256(
                json.dumps(identity, sort_keys=True).encode("utf-8")
            ).hexdigest(),
            every_seconds=60.0 * checkpoint_minutes,
        )
    out_dir = Path(out_dir)

    def plain(trained: torch.nn.Module) -> torch.nn.Module:
        # What is saved: e.g. LoRA's adapters merged into the plain architecture.
        return setup.finalize(trained) if setup.finalize is not None else trained

    def keep_checkpoint(epoch: int, trained: torch.nn.Module) -> None:
        if epoch in save_epochs:
            save_model(plain(trained), out_dir / "checkpoints" / f"epoch{epoch}.safetensors")

    if 0 in save_epochs:
        keep_checkpoint(0, model)
    # SIGTERM stays deferred from the loop to the last output (the loop polls it at points
    # where it can save), so that it cannot fall between the two with the state unnamed; it
    # is honoured before the first write or after the last, and the state is kept either way,
    # so a rerun only writes the outputs again.
    with sigterm_deferred():
        result = train_classifier(
            model=model,
            train_set=train_set,
            eval_sets=eval_sets,
            settings=settings,
            select_on="id_val",
            device=device,
            progress=progress,
            batch_transform=train_transform(augment=augment),
            checkpointing=checkpointing,
            on_epoch_end=keep_checkpoint,
            loss_fn=loss_fn,
            extra_loss=extra_loss,
        )
        raise_if_stop_requested(checkpointing, when="after training")
        model.load_state_dict(result.best_state)
        save_model(plain(model), out_dir / "model.safetensors")
        write_csv(out_dir / "history.csv", result.history)
        best = result.history[result.best_epoch]
        metrics = {
            "method": method,
            "lr": lr,
            "hparams": {"lr": lr, **hparams},
            "run": hparam_folder({"lr": lr, **hparams}),
            "seed": seed,
            "best_epoch": result.best_epoch,
            "diverged": result.diverged,
            "collapse": result.collapse,
            **{key: value for key, value in best.items() if key.startswith(("id_", "ood_"))},
            **recorded,
        }
        write_json(
            out_dir / "config.json",
            {
                "method": method,
                "dataset": dataset,
                "model_dir": str(model_dir),
                "probe_dir": str(probe_dir) if probe_dir else None,
                "settings": asdict(settings),
                "augment": augment,
                "method_options": options,
                "ood_splits": list(ood_splits),
                "data_options": dict(data_opts),
                "backbone": {
                    "preprocess": preprocess.to_dict(),
                    "kwargs": dict(backbone_kwargs or {}),
                },
                "device": device,
                "resolved_config": dict(resolved_config or {}),
                "environment": environment_info(),
                "provenance": recorded,
            },
        )
        write_json(out_dir / "metrics.json", metrics)
        raise_if_stop_requested(checkpointing, when="while the outputs were written")
    if checkpointing is not None:
        checkpointing.discard()
    return metrics


def run_wiseft(
    *,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    probe_dir: str | Path,
    selection_files: Mapping[str, str | Path],
    seed: int,
    alphas: Sequence[float],
    ood_splits: Sequence[str],
    out_path: str | Path,
    batch_size: int = 512,
    device: str = "cpu",
    data_options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    preprocess_overrides: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> list[dict[str, Any]]:
    """WiSE-FT curve of one seed: for each selected method's run of that seed (θ₁) and each α,
    evaluate θ_α = (1 − α)·θ₀ + α·θ₁ on ID val, ID test and every OOD split, where θ₀ is the
    pretrained backbone with the probe head of the same seed. Writes one row per (method, α).

    The probe head and the selected runs must record this backbone's weights and the same
    data: `data_fingerprint` (the data manifest's), or without it the probe head's.
    """
    from safetensors.torch import load_file

    from robustft.io import read_json
    from robustft.wiseft import interpolate_state_dicts

    backbone, preprocess, meta = load_backbone(model_dir, preprocess=preprocess_overrides)
    head_sha256 = check_probe_head(
        probe_dir=probe_dir, model_dir=model_dir, meta=meta, data_fingerprint=data_fingerprint
    )
    head_path = Path(probe_dir) / HEAD_FILE
    data_source = "this job's data manifest"
    if data_fingerprint is None:
        data_fingerprint = probe_head_provenance(probe_dir).get(provenance.DATA_FINGERPRINT) or None
        data_source = f"the probe head {head_path}"
    selections = {}
    for method, selection_file in selection_files.items():
        selection = selections[method] = read_json(selection_file)
        for run in selection.get("runs", []):
            if int(run["seed"]) != int(seed):
                continue
            provenance.check_backbone(
                path=run["path"],
                recorded=run,
                meta=meta,
                meta_path=Path(model_dir) / "meta.json",
                backbone_name=None,
                data_fingerprint=data_fingerprint,
                data_source=data_source,
                rerun="finetune",
            )
            if run.get(provenance.PROBE_HEAD_SHA256):
                provenance.check(
                    path=run["path"],
                    recorded=run,
                    name=provenance.PROBE_HEAD_SHA256,
                    expected=head_sha256,
                    source=str(head_path),
                    rerun="finetune",
                )
    splits = {
        split: load_split(dataset=dataset, split=split, root=data_root, options=data_options)
        for split in (*ID_SPLITS, *ood_splits)
        if split != "train"
    }
    num_classes = len(splits["val"].class_names)
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, preprocess=preprocess)
    weight, bias = load_probe_head(probe_dir)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    theta0 = {key: value.detach().clone() for key, value in model.state_dict().items()}
    eval_transform = (data_options or {}).get("eval_transform", "resize")
    eval_sets = {
        split_column(split): as_torch_dataset(
            arrays, preprocess=preprocess, transform=eval_transform
        )
        for split, arrays in splits.items()
    }
    rows: list[dict[str, Any]] = []
    for method, selection_file in selection_files.items():
        selection = selections[method]
        if selection.get("all_diverged"):
            log.warning("%s: every run diverged; no WiSE-FT curve toward it", method)
            continue
        runs = [run for run in selection["runs"] if int(run["seed"]) == int(seed)]
        if not runs:
            raise ValueError(f"{selection_file}: no selected run with seed {seed}")
        weights = Path(runs[0]["path"]).parent / "model.safetensors"
        theta1 = load_file(str(weights))
        for alpha in alphas:
            model.load_state_dict(
                interpolate_state_dicts(theta0=theta0, theta1=theta1, alpha=float(alpha))
            )
            scores = {
                name: accuracy(
                    model, data, batch_size=batch_size, device=device, num_workers=num_workers
                )
                for name, data in eval_sets.items()
            }
            ood = [scores[split_column(split)] for split in ood_splits]
            rows.append(
                {
                    "method": method,
                    "run": selection.get("run", ""),
                    "seed": int(seed),
                    "alpha": float(alpha),
                    **scores,
                    "ood": float(np.mean(ood)) if ood else float("nan"),
                }
            )
            log.info("%s α=%.2f: %s", method, alpha, {k: round(v, 4) for k, v in scores.items()})
    write_csv(out_path, rows)
    return rows


def run_zeroshot(
    *,
    backbone_name: str,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    text_cache: str | Path,
    ood_splits: Sequence[str],
    out_dir: str | Path,
    batch_size: int = 512,
    device: str = "cpu",
    data_options: Mapping[str, Any] | None = None,
    preprocess_overrides: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The zero-shot CLIP model of a setting: the pretrained image tower with the text tower's
    head for the dataset's class names (`zeroshot.zeroshot_head`), evaluated on ID val, ID test
    and every OOD split. Writes `head.safetensors` (weight, bias) and `metrics.json`."""
    from robustft.zeroshot import load_text_tower, text_tower_name, zeroshot_head

    backbone, preprocess, backbone_meta = load_backbone(model_dir, preprocess=preprocess_overrides)
    splits = {
        split: load_split(dataset=dataset, split=split, root=data_root, options=data_options)
        for split in (*ID_SPLITS, *ood_splits)
        if split != "train"
    }
    class_names = splits["val"].class_names
    text_model, tokenizer = load_text_tower(backbone=backbone_name, cache_dir=text_cache)
    weight, bias = zeroshot_head(
        model=text_model, tokenizer=tokenizer, class_names=class_names, device=device
    )
    if weight.shape[1] != backbone.num_features:
        raise ValueError(
            f"backbone {backbone_name!r} gives {backbone.num_features}-d features but its text "
            f"tower {weight.shape[1]}-d: set backbone_options.{backbone_name}.embedding: projected"
        )
    model = ImageClassifier(backbone=backbone, num_classes=len(class_names), preprocess=preprocess)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    eval_transform = (data_options or {}).get("eval_transform", "resize")
    metrics: dict[str, Any] = {
        split_column(split): accuracy(
            model,
            as_torch_dataset(arrays, preprocess=preprocess, transform=eval_transform),
            batch_size=batch_size,
            device=device,
        )
        for split, arrays in splits.items()
    }
    out_dir = Path(out_dir)
    save_head(out_dir / HEAD_FILE, weight=weight, bias=bias)
    name, tag = text_tower_name(backbone_name)
    metrics.update(
        method="zeroshot",
        text_tower=f"{name}/{tag}",
        classes=len(class_names),
        backbone=backbone_name,
        weights_sha256=backbone_meta["sha256"],
        data_fingerprint=data_fingerprint or "",
    )
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def train_baseline(
    *,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    out_dir: str | Path,
    ood_splits: Sequence[str],
    architecture: str,
    width: int,
    epochs: int,
    fraction: float,
    lr: float,
    batch_size: int,
    weight_decay: float,
    augment: bool,
    seed: int,
    data_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A model trained from scratch on (a fraction of) the ID training data only.

    Such models define the baseline line of effective robustness. The best epoch by ID val
    is kept; ID test and the OOD splits are evaluated on it once, at the end. Images are
    used at the training images' own size (in-memory settings: toyshift, the CIFAR ones).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    splits = {
        split: load_split(dataset=dataset, split=split, root=data_root, options=data_options)
        for split in (*ID_SPLITS, *ood_splits)
    }
    train = splits["train"]
    if not isinstance(train, ImageArrays):
        raise ValueError(
            f"dataset {dataset!r}: baseline models are trained on in-memory settings only; "
            f"give its published line as config key 'baseline.lines.{dataset}'"
        )
    count = min(len(train.labels), max(batch_size, round(fraction * len(train.labels))))
    keep = np.sort(np.random.default_rng(seed).permutation(len(train.labels))[:count])
    train = take(train, keep)
    # From scratch, so the model's normalisation is that of its own training data.
    preprocess = preprocess_of(train.images)
    torch.manual_seed(seed)
    backbone = build_backbone(architecture=architecture, kwargs={"width": width})
    model = ImageClassifier(
        backbone=backbone, num_classes=len(train.class_names), preprocess=preprocess
    )
    settings = TrainSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=0.9,
        weight_decay=weight_decay,
        seed=seed,
    )

    def torch_dataset(split: str) -> torch.utils.data.Dataset:
        arrays = train if split == "train" else splits[split]
        return as_torch_dataset(arrays, preprocess=preprocess, transform="resize")

    result = train_classifier(
        model=model,
        train_set=torch_dataset("train"),
        eval_sets={"id_val": torch_dataset("val")},
        settings=settings,
        select_on="id_val",
        device=device,
        progress=progress,
        batch_transform=train_transform(augment=augment),
    )
    model.load_state_dict(result.best_state)
    scores = {
        split_column(split): accuracy(model, torch_dataset(split), device=device)
        for split in splits
        if split not in ("train", "val")
    }
    out_dir = Path(out_dir)
    write_csv(out_dir / "history.csv", result.history)
    metrics = {
        "dataset": dataset,
        "architecture": architecture,
        "width": width,
        "epochs": epochs,
        "fraction": fraction,
        "train_images": count,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "id_val": result.history[result.best_epoch]["id_val"],
        **scores,
        "data_fingerprint": data_fingerprint or "",
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def feature_distortion(
    *,
    dataset: str,
    data_root: str | Path,
    model_dir: str | Path,
    pretrained_features: Mapping[str, str | Path],
    runs: Sequence[Mapping[str, Any]],
    data_options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    num_workers: int | str = "auto",
    precision: str = "auto",
    threads: int = 1,
    device: str = "cpu",
    progress: bool = True,
    preprocess_overrides: Mapping[str, Any] | None = None,
    backbone_name: str | None = None,
    data_fingerprint: str | None = None,
) -> list[dict[str, Any]]:
    """How far fine-tuning moved the penultimate features, per run and split.

    `pretrained_features` maps a split to the pretrained backbone's feature file (from the
    features rule, same images in the same order); `runs` are dicts with `method`, `seed`,
    `lr` and `path` (a run's metrics.json, beside its model.safetensors). Returns rows with
    the mean relative L2 change and the linear CKA between pretrained and fine-tuned features.
    The feature files and the runs must record the weights in `model_dir`'s meta.json, the
    feature files also `backbone_name` and `data_fingerprint` where given.
    """
    from safetensors.torch import load_file

    from robustft.features import read_features
    from robustft.io import read_json
    from robustft.models import META_FILE, load_state
    from robustft.robustness import linear_cka, relative_change

    meta_path = Path(model_dir) / META_FILE
    meta = read_json(meta_path)
    before = {split: read_features(path) for split, path in pretrained_features.items()}
    for split, path in pretrained_features.items():
        provenance.check_backbone(
            path=path,
            recorded=before[split].attrs,
            meta=meta,
            meta_path=meta_path,
            backbone_name=backbone_name,
            data_fingerprint=data_fingerprint,
            data_source="this job's data manifest",
            rerun="extract_features",
        )
    for run in runs:
        provenance.check_backbone(
            path=run["path"],
            recorded=run,
            meta=meta,
            meta_path=meta_path,
            backbone_name=None,
            data_fingerprint=data_fingerprint,
            data_source="this job's data manifest",
            rerun="finetune",
        )
    splits = {
        split: load_split(dataset=dataset, split=split, root=data_root, options=data_options)
        for split in before
    }
    eval_transform = (data_options or {}).get("eval_transform", "resize")
    rows = []
    for run in runs:
        weights = Path(run["path"]).parent / "model.safetensors"
        backbone, preprocess, _ = load_backbone(model_dir, preprocess=preprocess_overrides)
        model = ImageClassifier(
            backbone=backbone,
            num_classes=len(next(iter(splits.values())).class_names),
            preprocess=preprocess,
        )
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: fine-tuned model missing")
        load_state(model, load_file(str(weights)), source=weights)
        for split, arrays in splits.items():
            after, _ = extract_features(
                model,
                as_torch_dataset(arrays, preprocess=preprocess, transform=eval_transform),
                batch_size=batch_size,
                device=device,
                num_workers=resolve_num_workers(num_workers, device=device, threads=threads),
                precision=resolve_precision(precision, device),
                progress=progress,
            )
            if after.shape != before[split].features.shape:
                raise ValueError(
                    f"{pretrained_features[split]}: {before[split].features.shape} features, but "
                    f"the model gives {after.shape} on split {split!r}"
                )
            rows.append(
                {
                    "method": run["method"],
                    "lr": run["lr"],
                    "seed": run["seed"],
                    "split": split_column(split),
                    "relative_change": relative_change(before[split].features, after),
                    "cka": linear_cka(before[split].features, after),
                }
            )
    return rows
