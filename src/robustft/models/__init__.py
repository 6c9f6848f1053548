"""Backbones behind one interface: `backbone(x)` returns penultimate features (N, D).

A backbone is the toy ResNet (pretrained inside the workflow) or any timm model, wrapped in
`TimmBackbone`; both have `num_features` and timm's `num_classes=0` behaviour. A classifier is
`ImageClassifier`: input normalisation (from the backbone's own preprocessing config), the
backbone, and a linear head. Inputs are float images in [0, 1].

A backbone lives in `resources/models/{name}/meta.json` (architecture, preprocessing, weights
file and its SHA-256); `load_backbone` reads it and never touches the network. timm is
imported inside functions: the probe and report jobs import this package and need no timm.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustft.io import atomic_path, read_json, sha256_file, write_json
from robustft.models.keymap import describe_mismatch, parse_load_error
from robustft.models.preprocess import INTERPOLATIONS as INTERPOLATIONS
from robustft.models.preprocess import PREPROCESS_KEYS as PREPROCESS_KEYS
from robustft.models.preprocess import Preprocess as Preprocess
from robustft.models.preprocess import merge_preprocess as merge_preprocess
from robustft.models.preprocess import timm_preprocess as timm_preprocess
from robustft.models.toy import ToyResNet

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TOY_BACKBONE = "toyresnet"
MOCO_V2_BACKBONE = "moco_v2_resnet50"
EMBEDDINGS = ("auto", "pooled", "projected")
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


class ImageClassifier(nn.Module):
    def __init__(self, *, backbone: nn.Module, num_classes: int, preprocess: Preprocess) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class TimmBackbone(nn.Module):
    """A timm model as a backbone: `forward` returns its embedding, `num_features` its size.

    embedding = "pooled": timm's `num_classes=0` output (the pooled pre-logits).
    embedding = "projected": the pretrained head kept as a linear projection, for image towers
    whose "classifier" is the embedding projection (CLIP: 1024-d for RN50, 512-d for ViT-B/16).
    """

    def __init__(self, model: nn.Module, *, embedding: str) -> None:
        super().__init__()
        if embedding not in ("pooled", "projected"):
            raise ValueError(f"embedding must be pooled or projected, got {embedding!r}")
        self.model = model
        self.embedding = embedding
        if embedding == "pooled":
            model.reset_classifier(0)
            self.num_features = int(model.num_features)
        else:
            if not getattr(model, "num_classes", 0):
                name = getattr(model, "pretrained_cfg", {}).get("architecture", "this model")
                raise ValueError(f"{name} has no pretrained head to keep as a projection")
            self.num_features = int(model.num_classes)
        self.num_classes = 0

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return dict(getattr(self.model, "pretrained_cfg", {}) or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def default_embedding(name: str, pretrained_num_classes: int) -> str:
    """`projected` for CLIP-style image towers (their pretrained head is the embedding
    projection), `pooled` for everything else, including CLIP models fine-tuned on labels."""
    architecture, _, tag = name.partition(".")
    fine_tuned = any(part.startswith("ft") for part in tag.split("_"))
    is_clip = "clip" in architecture or "clip" in tag
    return "projected" if is_clip and not fine_tuned and pretrained_num_classes > 0 else "pooled"


def pretrained_num_classes(name: str) -> int:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return int(getattr(cfg, "num_classes", 0) or 0) if cfg is not None else 0


def _resolve_embedding(name: str, embedding: str) -> str:
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
    if embedding == "auto":
        return default_embedding(name, pretrained_num_classes(name))
    return embedding


def create_timm_backbone(
    *,
    name: str,
    embedding: str = "auto",
    weights_file: str | Path | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
) -> TimmBackbone:
    """A timm model as a backbone; random weights, or `weights_file` loaded strictly by timm.

    The model is built with its pretrained head size so that the load is strict (timm drops
    the classifier, and stops checking keys, when the head size differs); the head is removed
    afterwards unless it is the embedding projection. `drop_rate` (dropout before the head)
    and `drop_path_rate` (stochastic depth) act in training mode only; None = timm's default.
    """
    import timm

    embedding = _resolve_embedding(name, embedding)
    kwargs: dict[str, Any] = {"num_classes": pretrained_num_classes(name)}
    kwargs |= {
        key: float(value)
        for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate))
        if value is not None
    }
    if weights_file is not None:
        weights_file = Path(weights_file)
        if not weights_file.is_file():
            raise FileNotFoundError(f"{weights_file}: weights file not found")
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights_file)}}
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as error:
        # A model class without drop_path_rate (or drop_rate) refuses the keyword.
        rates = [key for key in ("drop_rate", "drop_path_rate") if key in kwargs]
        if rates and any(key in str(error) for key in rates):
            raise ValueError(
                f"timm model {name!r} does not take {' or '.join(rates)} "
                f"(set backbone_options.{name}.{rates[0]}: null)"
            ) from None
        raise
    except RuntimeError as error:
        text = " ".join(str(error).split())
        if weights_file is None:
            raise ValueError(f"timm cannot build {name!r}: {text}") from None
        described = parse_load_error(str(error))
        raise ValueError(
            f"{weights_file}: weights do not fit timm model {name!r} ("
            + (
                f"{described}; rename the file's keys with backbone_options.{name}.key_map"
                if described
                else text[:500]
            )
            + ")"
        ) from None
    except Exception as error:  # torch.load / safetensors raise their own types
        if weights_file is None:
            raise
        raise ValueError(
            f"{weights_file}: not a readable weights file for {name!r} "
            f"({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        ) from None
    return TimmBackbone(model, embedding=embedding)


# Options of a backbone that shape training only (eval mode turns them off): they never
# change features, so they are not recorded in meta.json and reach `load_backbone` per job.
BACKBONE_KWARGS = ("drop_rate", "drop_path_rate")


def check_backbone_kwargs(architecture: str, kwargs: Mapping[str, Any] | None) -> dict[str, float]:
    """`kwargs` (drop_rate, drop_path_rate; None = the default) checked, nulls dropped; one-line
    errors naming `backbone_options.<architecture>.<key>`. The toy takes drop_rate only."""
    out: dict[str, float] = {}
    for key, value in (kwargs or {}).items():
        where = f"backbone_options.{architecture}.{key}"
        if key not in BACKBONE_KWARGS:
            raise ValueError(f"{where}: unknown; known: {', '.join(BACKBONE_KWARGS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"{where}: expected a number in [0, 1), got {value!r}")
        if architecture == TOY_BACKBONE and key != "drop_rate":
            raise ValueError(f"{where}: the toy backbone has no stochastic depth (use drop_rate)")
        out[key] = float(value)
    return out


def build_backbone(*, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """A backbone with random weights and no head (num_classes=0).

    `architecture` is `toyresnet` or a timm model name; for timm, `kwargs` may hold
    `embedding` (auto, pooled, projected), `drop_rate` and `drop_path_rate`; the toy takes
    `width` and `drop_rate`.
    """
    if architecture == TOY_BACKBONE:
        return ToyResNet(num_classes=0, **kwargs)
    return create_timm_backbone(name=architecture, **kwargs)


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
