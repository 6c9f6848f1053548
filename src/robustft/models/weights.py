"""Backbone weights on disk: `resources/models/{name}/meta.json` and the weights file it names.

meta.json records the architecture, its kwargs, the feature size, the pretrained
preprocessing, the weights file (beside it or absolute) with its format and SHA-256.
`save_backbone` writes a folder, `load_backbone` reads it and never touches the network; a
backbone missing from the cache is a one-line `BackboneNotFetchedError` naming the command
that fetches it. `load_state` loads a state dict strictly; `save_model` writes a whole model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustft.io import atomic_path, read_json, sha256_file, write_json
from robustft.models.backbone import (
    TOY_BACKBONE,
    build_backbone,
    check_backbone_kwargs,
    create_timm_backbone,
)
from robustft.models.keymap import describe_mismatch
from robustft.models.preprocess import Preprocess, merge_preprocess

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
# Weight formats recorded in meta.json: our own safetensors state dict of the backbone module
# (toy, MoCo), or a file timm's pretrained loader reads (hub cache, user file), which applies
# the model's own checkpoint filter (e.g. OpenAI CLIP → timm key names).
FORMAT_STATE_DICT = "state_dict"
FORMAT_TIMM = "timm"


def fetch_command(name: str, *, force: bool = False) -> str:
    """The command that puts backbone `name` into the weight cache (run where there is internet)."""
    force_flag = " --forcerun fetch_backbone" if force else ""
    return (
        f"snakemake fetch_backbones --cores 1 --config backbones='[{name}]'{force_flag}"
        " (with this run's --configfile)"
    )


class BackboneNotFetchedError(FileNotFoundError):
    """A backbone's weights are not in the local cache. The message is one line."""


def save_backbone(
    *,
    backbone: nn.Module,
    out_dir: str | Path,
    architecture: str,
    kwargs: dict[str, Any],
    preprocess: Preprocess,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `model.safetensors` and `meta.json` (architecture, preprocessing, checksum)."""
    out_dir = Path(out_dir)
    weights = out_dir / WEIGHTS_FILE
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_meta(
        out_dir,
        architecture=architecture,
        kwargs=kwargs,
        num_features=int(backbone.num_features),
        preprocess=preprocess,
        weights_file=WEIGHTS_FILE,
        weights_format=FORMAT_STATE_DICT,
        sha256=sha256_file(weights),
        extra=extra,
    )


def write_meta(
    out_dir: str | Path,
    *,
    architecture: str,
    kwargs: dict[str, Any],
    num_features: int,
    preprocess: Preprocess,
    weights_file: str | Path,
    weights_format: str,
    sha256: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the `meta.json` every backbone folder has; `weights_file` is relative to
    `out_dir` when it lies beside it (the folder can move), absolute otherwise."""
    meta = {
        "architecture": architecture,
        "kwargs": kwargs,
        "num_features": int(num_features),
        "preprocess": asdict(preprocess),
        "weights": {"file": str(weights_file), "format": weights_format},
        "sha256": sha256,
        **(extra or {}),
    }
    write_json(Path(out_dir) / META_FILE, meta)
    return meta


def weights_path(model_dir: str | Path, meta: dict[str, Any]) -> Path:
    """The weights file a meta.json names (toy meta.json files before this key: the default)."""
    file = Path(meta.get("weights", {}).get("file", WEIGHTS_FILE))
    # normpath: `models/x/../hub/...` → `models/hub/...`, for readable error messages.
    return file if file.is_absolute() else Path(os.path.normpath(Path(model_dir) / file))


def load_backbone(
    model_dir: str | Path,
    *,
    preprocess: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """Load a backbone saved by `save_backbone` or `fetch_backbone`; check its checksum and keys.

    `preprocess`: config overrides of the pretrained preprocessing in meta.json (see
    `merge_preprocess`; the workflow passes `backbone_options.<b>.preprocess` with
    `dataset_settings.<d>.preprocess` laid over it). `backbone_kwargs`: `drop_rate`,
    `drop_path_rate` for training (see `check_backbone_kwargs`). Returns the backbone, the
    resolved preprocessing and meta.json's contents.

    Reads local files only. A backbone missing from the cache raises
    `BackboneNotFetchedError` with one line naming it and the command that fetches it.
    """
    model_dir = Path(model_dir)
    name = model_dir.name
    meta_path = model_dir / META_FILE
    if not meta_path.exists():
        if name == TOY_BACKBONE:
            raise FileNotFoundError(f"{meta_path}: backbone file missing")
        raise BackboneNotFetchedError(
            f"backbone {name!r} is not in the weight cache ({meta_path} missing); "
            f"on a machine with internet access run: {fetch_command(name)}"
        )
    meta = read_json(meta_path)
    # Config errors before the weights are read: they name the key to fix.
    resolved = merge_preprocess(
        Preprocess.from_dict(meta["preprocess"]), preprocess, key=f"{name}: preprocess"
    )
    extra_kwargs = check_backbone_kwargs(meta["architecture"], backbone_kwargs)
    weights = weights_path(model_dir, meta)
    if not weights.exists():
        if name == TOY_BACKBONE or meta.get("source", {}).get("kind") == "local":
            raise FileNotFoundError(f"{weights}: backbone weights file missing")
        raise BackboneNotFetchedError(
            f"backbone {name!r}: weights {weights} missing from the cache; "
            f"on a machine with internet access run: {fetch_command(name, force=True)}"
        )
    if sha256_file(weights) != meta["sha256"]:
        raise ValueError(f"{weights}: checksum differs from {meta_path} (corrupt or replaced)")
    weights_format = meta.get("weights", {}).get("format", FORMAT_STATE_DICT)
    if weights_format == FORMAT_TIMM:
        backbone = create_timm_backbone(
            name=meta["architecture"], weights_file=weights, **meta["kwargs"], **extra_kwargs
        )
        if backbone.num_features != meta["num_features"]:
            raise ValueError(
                f"{meta_path}: {meta['architecture']} gives {backbone.num_features} features, "
                f"meta.json says {meta['num_features']} (fetched with another timm version?)"
            )
    elif weights_format == FORMAT_STATE_DICT:
        backbone = build_backbone(
            architecture=meta["architecture"], kwargs={**meta["kwargs"], **extra_kwargs}
        )
        try:
            state = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
        load_state(backbone, state, source=weights)
    else:
        raise ValueError(f"{meta_path}: unknown weights format {weights_format!r}")
    return backbone, resolved, meta


def load_state(module: nn.Module, state: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Load a state dict strictly, with one line naming the file on any mismatch: counts and
    the first names of the missing and unexpected keys, and the first keys of each side."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and own[key].shape != value.shape
    ]
    if missing or unexpected or shapes:
        described = describe_mismatch(
            missing=missing,
            unexpected=unexpected,
            shapes=shapes,
            file_keys=list(state) if missing or unexpected else (),
            model_keys=list(own) if missing or unexpected else (),
        )
        raise ValueError(f"{source}: weights do not fit this architecture ({described})")
    module.load_state_dict(state)


def save_model(model: nn.Module, path: str | Path) -> None:
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
