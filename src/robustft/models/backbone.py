"""Backbones behind one interface: `backbone(x)` returns penultimate features (N, D).

A backbone is the toy ResNet (pretrained inside the workflow) or any timm model, wrapped in
`TimmBackbone`; both have `num_features` and timm's `num_classes=0` behaviour. A classifier is
`ImageClassifier`: input normalisation (from the backbone's own preprocessing config), the
backbone, and a linear head. Inputs are float images in [0, 1].

Building only: random weights. Reading and writing weights is `robustft.models.weights`.
timm is imported inside functions: the probe and report jobs need no timm.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.models.keymap import parse_load_error
from robustft.models.preprocess import Preprocess
from robustft.models.toy import ToyResNet

TOY_BACKBONE = "toyresnet"
MOCO_V2_BACKBONE = "moco_v2_resnet50"
EMBEDDINGS = ("auto", "pooled", "projected")


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
