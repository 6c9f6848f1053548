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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustft.io import atomic_path, read_json, sha256_file, write_json
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


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects: input size, resize/crop, and the normalisation it was trained with.

    Datasets deliver uint8 images of `input_size` (resized so that the centre crop of
    `crop_pct` is `input_size`, with `interpolation`); `ImageClassifier` normalises them.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["mean"] = tuple(float(x) for x in values["mean"])
        values["std"] = tuple(float(x) for x in values["std"])
        return cls(**values)


def timm_preprocess(model: nn.Module) -> Preprocess:
    """The preprocessing in a timm model's own pretrained config."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"non-square input size {height}×{width} is not supported")
    return Preprocess(
        input_size=int(height),
        mean=tuple(float(x) for x in config["mean"]),
        std=tuple(float(x) for x in config["std"]),
        crop_pct=float(config.get("crop_pct") or 1.0),
        interpolation=str(config.get("interpolation") or "bilinear"),
    )


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
    *, name: str, embedding: str = "auto", weights_file: str | Path | None = None
) -> TimmBackbone:
    """A timm model as a backbone; random weights, or `weights_file` loaded strictly by timm.

    The model is built with its pretrained head size so that the load is strict (timm drops
    the classifier, and stops checking keys, when the head size differs); the head is removed
    afterwards unless it is the embedding projection.
    """
    import timm

    embedding = _resolve_embedding(name, embedding)
    kwargs: dict[str, Any] = {"num_classes": pretrained_num_classes(name)}
    if weights_file is not None:
        weights_file = Path(weights_file)
        if not weights_file.is_file():
            raise FileNotFoundError(f"{weights_file}: weights file not found")
        kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights_file)}}
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as error:
        text = " ".join(str(error).split())
        if weights_file is None:
            raise ValueError(f"timm cannot build {name!r}: {text}") from None
        raise ValueError(
            f"{weights_file}: weights do not fit timm model {name!r} ({text[:300]})"
        ) from None
    except Exception as error:  # torch.load / safetensors raise their own types
        if weights_file is None:
            raise
        raise ValueError(
            f"{weights_file}: not a readable weights file for {name!r} "
            f"({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        ) from None
    return TimmBackbone(model, embedding=embedding)


def build_backbone(*, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """A backbone with random weights and no head (num_classes=0).

    `architecture` is `toyresnet` or a timm model name; for timm, `kwargs` may hold
    `embedding` (auto, pooled, projected).
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


def load_backbone(model_dir: str | Path) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """Load a backbone saved by `save_backbone` or `fetch_backbone`; check its checksum and keys.

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
            name=meta["architecture"], weights_file=weights, **meta["kwargs"]
        )
        if backbone.num_features != meta["num_features"]:
            raise ValueError(
                f"{meta_path}: {meta['architecture']} gives {backbone.num_features} features, "
                f"meta.json says {meta['num_features']} (fetched with another timm version?)"
            )
    elif weights_format == FORMAT_STATE_DICT:
        backbone = build_backbone(architecture=meta["architecture"], kwargs=meta["kwargs"])
        try:
            state = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
        load_state(backbone, state, source=weights)
    else:
        raise ValueError(f"{meta_path}: unknown weights format {weights_format!r}")
    return backbone, Preprocess.from_dict(meta["preprocess"]), meta


def load_state(module: nn.Module, state: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Load a state dict strictly, with one line naming the file on any mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit this architecture "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"{source}: weights do not fit this architecture ('{key}' has shape "
                f"{tuple(value.shape)}, expected {tuple(own[key].shape)})"
            )
    module.load_state_dict(state)


def save_model(model: nn.Module, path: str | Path) -> None:
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
