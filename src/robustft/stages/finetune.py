"""Fine-tuning: one run of one method of the method table, and the probe head it may start from.

`run_finetune` is a sequence of steps: load the backbone and check the probe head's provenance,
build the model from the method's start, the method's setup (teacher, `prepare` hook), the
datasets, the checkpointing identity, then train and write the outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from robustft import distributed, provenance
from robustft.config import hparam_folder
from robustft.data.datasets import train_transform
from robustft.data.splits import TRAIN_PER_CLASS_KEY, ImageArrays, first_per_class
from robustft.features import resolve_precision
from robustft.io import sha256_file, write_csv, write_json
from robustft.methods import Method
from robustft.methods import resolve as resolve_method
from robustft.models import (
    HEAD_FILE,
    ImageClassifier,
    Preprocess,
    load_backbone,
    load_head,
    save_model,
)
from robustft.robustness import chance_record
from robustft.runtime import sigterm_deferred
from robustft.soups import state_dict_sha256
from robustft.stages.common import (
    environment_info,
    eval_sets,
    eval_transform,
    load_splits,
    run_splits,
    set_head,
    split_dataset,
)
from robustft.tracking import TrackingSettings, finetune_run, log_run
from robustft.training import (
    Checkpointing,
    TrainResult,
    TrainSettings,
    raise_if_stop_requested,
    train_classifier,
)

log = logging.getLogger("robustft.stages")


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
    set_head(model, weight, bias)


def _check_processes(
    *,
    processes: int,
    batch_size: int,
    bn: str = "train",
    sync_batchnorm: bool = True,
    device: str = "cpu",
    **_: Any,
) -> None:
    distributed.check_settings(
        processes=processes,
        batch_size=batch_size,
        bn=bn,
        sync_batchnorm=sync_batchnorm,
        device=device,
    )


@distributed.data_parallel(check=_check_processes)
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
    processes: int = 1,
    sync_batchnorm: bool = True,
    text_cache: str | Path | None = None,
    prepared: Mapping[str, str | Path] | None = None,
    tracking: TrackingSettings | None = None,
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

    `processes` > 1: one run on that many data-parallel processes (one per GPU; gloo processes
    on a CPU), `batch_size` being the global batch (`robustft.distributed`, docs/multi-gpu.md);
    rank 0 writes the outputs and the state. `sync_batchnorm`: see `TrainSettings`.
    `text_cache`: the Hugging Face cache holding the backbone's CLIP text tower, for a method
    that needs one (FLYP); the backbone is named by `model_dir`'s folder.
    `prepared`: {split: prepared-image cache file} (train under the train transform, the
    others under the eval transform); splits it names are read from there.
    `tracking`: also log the run (config, history, metrics) to W&B or MLflow once its files
    are written (`robustft.tracking`; a tracker that fails only warns).
    """
    backbone, preprocess, backbone_meta = load_backbone(  # first: fail at once
        model_dir, preprocess=preprocess_overrides, backbone_kwargs=backbone_kwargs
    )
    spec = resolve_method(method, method_options)
    probe_head_sha256 = _checked_probe_head(
        spec,
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
    splits = load_splits(
        dataset=dataset,
        data_root=data_root,
        splits=run_splits(ood_splits),
        data_options=data_options,
    )
    if (hparams or {}).get(TRAIN_PER_CLASS_KEY) is not None:
        splits["train"] = _larger_train(
            dataset=dataset,
            data_root=data_root,
            train=splits["train"],
            per_class=int(hparams[TRAIN_PER_CLASS_KEY]),
            data_options=data_options,
            prepared=prepared,
        )
    num_classes = len(splits["train"].class_names)
    model = _start_model(
        spec,
        method=method,
        backbone=backbone,
        preprocess=preprocess,
        num_classes=num_classes,
        seed=seed,
        probe_dir=probe_dir,
    )
    # Which runs share an initialisation (model soups average only those): the start's hash.
    init_sha256 = state_dict_sha256(model.state_dict())
    hparams = {key: float(value) for key, value in (hparams or {}).items()}
    # The training-set size is the data's, not the method's: not one of its options.
    options = {
        **(method_options or {}),
        **{key: value for key, value in hparams.items() if key != TRAIN_PER_CLASS_KEY},
    }
    teacher = None
    if spec.teacher:
        teacher = _teacher(
            method=method,
            model_dir=model_dir,
            preprocess=preprocess,
            num_classes=num_classes,
            probe_dir=probe_dir,
        )
    needs = {}
    if spec.text_tower:
        needs["text"] = _text_tower(
            method=method,
            backbone=Path(model_dir).name,
            cache_dir=text_cache,
            class_names=splits["train"].class_names,
        )
    setup = spec.hook()(model=model, options=options, teacher=teacher, **needs)
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
        sync_batchnorm=sync_batchnorm,
    )
    parallel = distributed.current()  # None in a one-process job
    writes = parallel is None or parallel.is_main  # rank 0 writes; the others only train
    evaluated = eval_sets(
        splits,
        preprocess=preprocess,
        transform=eval_transform(data_options),
        prepared=prepared,
        data_fingerprint=data_fingerprint,
    )
    train_set = split_dataset(
        "train",
        splits["train"],
        preprocess=preprocess,
        transform=(data_options or {}).get("train_transform", "resize"),
        prepared=prepared,
        data_fingerprint=data_fingerprint,
    )
    # What both the resume identity and config.json record of the run.
    described = {
        "method": method,
        "dataset": dataset,
        "settings": asdict(settings),
        "augment": augment,
        "method_options": options,
        "data_options": dict(data_options or {}),
        "backbone": {"preprocess": preprocess.to_dict(), "kwargs": dict(backbone_kwargs or {})},
    }
    checkpointing = None
    if state_dir is not None:
        checkpointing = _checkpointing(
            state_dir=state_dir,
            every_minutes=checkpoint_minutes,
            identity={
                **described,
                "save_epochs": sorted(save_epochs),
                "backbone_sha256": backbone_meta["sha256"],
                "probe_head_sha256": (
                    probe_head_sha256 or sha256_file(Path(probe_dir) / HEAD_FILE)
                    if probe_dir
                    else None
                ),
                "split_sizes": {split: len(arrays.labels) for split, arrays in splits.items()},
            },
            data_fingerprint=data_fingerprint,
        )
    out_dir = Path(out_dir)

    def plain(trained: torch.nn.Module) -> torch.nn.Module:
        # What is saved: e.g. LoRA's adapters merged into the plain architecture.
        return setup.finalize(trained) if setup.finalize is not None else trained

    def keep_checkpoint(epoch: int, trained: torch.nn.Module) -> None:
        if epoch in save_epochs and writes:
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
            eval_sets=evaluated,
            settings=settings,
            select_on="id_val",
            device=device,
            progress=progress,
            batch_transform=train_transform(augment=augment),
            checkpointing=checkpointing,
            on_epoch_end=keep_checkpoint,
            loss_fn=setup.loss_fn,
            extra_loss=setup.extra_loss,
            lr_factors=setup.lr_factors,
            parallel=parallel,
            frozen_statistics=setup.frozen_statistics,
        )
        if not writes:
            return _metrics(
                result, method=method, lr=lr, hparams=hparams, seed=seed, recorded=recorded
            )
        raise_if_stop_requested(checkpointing, when="after training")
        model.load_state_dict(result.best_state)
        save_model(plain(model), out_dir / "model.safetensors")
        write_csv(out_dir / "history.csv", result.history)
        metrics = _metrics(
            result, method=method, lr=lr, hparams=hparams, seed=seed, recorded=recorded
        )
        metrics[provenance.INIT_SHA256] = init_sha256
        metrics["train_images"] = len(splits["train"].labels)
        # So that a table can flag a run at chance.
        test = splits["test"].labels if "test" in splits else None
        metrics.update(chance_record(id_val=splits["val"].labels, id_test=test))
        write_json(
            out_dir / "config.json",
            {
                **described,
                "model_dir": str(model_dir),
                "probe_dir": str(probe_dir) if probe_dir else None,
                "ood_splits": list(ood_splits),
                "device": device,
                "processes": parallel.world_size if parallel else 1,
                "resolved_config": dict(resolved_config or {}),
                "environment": environment_info(),
                "provenance": recorded,
                "prepared_images": {split: str(path) for split, path in (prepared or {}).items()},
            },
        )
        write_json(out_dir / "metrics.json", metrics)
        raise_if_stop_requested(checkpointing, when="while the outputs were written")
    if checkpointing is not None:
        checkpointing.discard()
    if tracking is not None:
        run = finetune_run(
            dataset=dataset,
            backbone=Path(model_dir).name,
            method=method,
            run=metrics["run"],
            hparams=metrics["hparams"],
            seed=seed,
            config=described,
            history=result.history,
            metrics=metrics,
        )
        log_run(run, settings=tracking)
    return metrics


def _larger_train(
    *,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    train: Any,
    per_class: int,
    data_options: Mapping[str, Any] | None,
    prepared: Mapping[str, str | Path] | None,
) -> ImageArrays:
    """The ID training set of a run whose folder names `TRAIN_PER_CLASS_KEY`: the first
    `per_class` images of each class of `train` and then of the dataset's pool of extra ID
    training images (`baseline_pool_splits`: the images the ER baselines train on, never a
    val, test or OOD image), so that the same baseline line applies to the run."""
    from robustft.stages.pretrain import baseline_pool_splits

    if "train" in (prepared or {}):
        raise ValueError(
            f"{TRAIN_PER_CLASS_KEY}: the prepared-image cache holds the train split only"
        )
    pools = baseline_pool_splits(dataset=dataset, data_root=data_root)
    parts = [
        train,
        *load_splits(
            dataset=dataset, data_root=data_root, splits=pools, data_options=data_options
        ).values(),
    ]
    if not all(isinstance(part, ImageArrays) for part in parts):
        raise ValueError(f"dataset {dataset!r}: {TRAIN_PER_CLASS_KEY} needs in-memory splits")
    larger = first_per_class(parts, per_class=per_class)
    log.info(
        "train: %d images (%d per class) from train and %s",
        len(larger.labels),
        per_class,
        pools or "no pool",
    )
    return larger


def _checked_probe_head(
    spec: Method,
    *,
    probe_dir: str | Path | None,
    model_dir: str | Path,
    meta: Mapping[str, Any],
    data_fingerprint: str | None,
) -> str | None:
    """The SHA-256 of the probe head when the method uses one (checked: `check_probe_head`)."""
    if probe_dir is None or not spec.needs_probe_head:
        return None
    return check_probe_head(
        probe_dir=probe_dir, model_dir=model_dir, meta=meta, data_fingerprint=data_fingerprint
    )


def _start_model(
    spec: Method,
    *,
    method: str,
    backbone: torch.nn.Module,
    preprocess: Preprocess,
    num_classes: int,
    seed: int,
    probe_dir: str | Path | None,
) -> ImageClassifier:
    """The model the method starts from: the backbone with a new head or the probe's."""
    torch.manual_seed(seed)  # the new head's initialisation depends on the seed only
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, preprocess=preprocess)
    if spec.start == "probe_head":
        copy_probe_head(model, probe_dir=probe_dir, method=method)
    return model


def _teacher(
    *,
    method: str,
    model_dir: str | Path,
    preprocess: Preprocess,
    num_classes: int,
    probe_dir: str | Path | None,
) -> ImageClassifier:
    """The method's teacher: the pretrained backbone with the probe's head."""
    if probe_dir is None:
        raise ValueError(f"method {method!r} needs the probe's head (probe_dir) for its teacher")
    teacher_backbone, _, _ = load_backbone(model_dir)
    teacher = ImageClassifier(
        backbone=teacher_backbone, num_classes=num_classes, preprocess=preprocess
    )
    copy_probe_head(teacher, probe_dir=probe_dir, method=method)
    return teacher


def _text_tower(
    *, method: str, backbone: str, cache_dir: str | Path | None, class_names: Sequence[str]
) -> Any:
    """The backbone's CLIP text tower for a method that trains it (its image tower dropped:
    the backbone is the image tower); a one-line error for a backbone without one."""
    from robustft.zeroshot import CLIP_TEXT_TOWERS, TextTower, load_text_tower

    if backbone not in CLIP_TEXT_TOWERS:
        raise ValueError(
            f"method {method!r} needs a CLIP text tower; backbone {backbone!r} has none "
            f"(CLIP backbones: {', '.join(sorted(CLIP_TEXT_TOWERS))})"
        )
    if cache_dir is None:
        raise ValueError(f"method {method!r} needs the text tower's cache folder (text_cache)")
    model, tokenizer = load_text_tower(backbone=backbone, cache_dir=cache_dir)
    model.visual = torch.nn.Identity()
    return TextTower(model=model.train(), tokenizer=tokenizer, class_names=tuple(class_names))


def _checkpointing(
    *,
    state_dir: str | Path,
    every_minutes: float,
    identity: Mapping[str, Any],
    data_fingerprint: str | None,
) -> Checkpointing:
    """Resumable state in `state_dir`, fingerprinted by the run's `identity`: a rerun resumes
    only from the state of the same run."""
    identity = dict(identity)
    if data_fingerprint is not None:  # only then: state saved before it stays resumable
        identity["data_fingerprint"] = data_fingerprint
    return Checkpointing(
        path=Path(state_dir) / "last.pt",
        fingerprint=hashlib.sha256(
            json.dumps(identity, sort_keys=True).encode("utf-8")
        ).hexdigest(),
        every_seconds=60.0 * every_minutes,
    )


def _metrics(
    result: TrainResult,
    *,
    method: str,
    lr: float,
    hparams: Mapping[str, float],
    seed: int,
    recorded: Mapping[str, Any],
) -> dict[str, Any]:
    """metrics.json of the run: the best epoch's ID and OOD accuracy, and the provenance."""
    best = result.history[result.best_epoch]
    return {
        "method": method,
        "lr": lr,
        "hparams": {"lr": lr, **hparams},
        "run": hparam_folder({"lr": lr, **hparams}),
        "seed": seed,
        "best_epoch": result.best_epoch,
        "diverged": result.diverged,
        "collapse": result.collapse,
        **{
            key: value
            for key, value in best.items()
            if key.startswith(("id_", "ood_", "ece_id_", "ece_ood_"))
        },
        **recorded,
    }
