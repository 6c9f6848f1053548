"""Backbones behind one interface: `backbone(x)` returns penultimate features (N, D).

A classifier is `ImageClassifier`: input normalisation (from the backbone's own
preprocessing config), the backbone, and a linear head. Inputs are float images in [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from robustft.io import atomic_path, read_json, sha256_file, write_json
from robustft.models.toy import ToyResNet

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects: input size and the normalisation it was trained with."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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


def build_backbone(*, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """A backbone with random weights and no head (num_classes=0)."""
    if architecture == "toyresnet":
        return ToyResNet(num_classes=0, **kwargs)
    raise ValueError(f"unknown backbone architecture {architecture!r}; known: toyresnet")


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
    meta = {
        "architecture": architecture,
        "kwargs": kwargs,
        "num_features": int(backbone.num_features),
        "preprocess": asdict(preprocess),
        "sha256": sha256_file(weights),
        **(extra or {}),
    }
    write_json(out_dir / META_FILE, meta)


def load_backbone(model_dir: str | Path) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """Load a backbone saved by `save_backbone`; check its checksum and key set."""
    model_dir = Path(model_dir)
    meta_path, weights = model_dir / META_FILE, model_dir / WEIGHTS_FILE
    for path in (meta_path, weights):
        if not path.exists():
            raise FileNotFoundError(f"{path}: backbone file missing")
    meta = read_json(meta_path)
    if sha256_file(weights) != meta["sha256"]:
        raise ValueError(f"{weights}: checksum differs from {meta_path} (corrupt or replaced)")
    backbone = build_backbone(architecture=meta["architecture"], kwargs=meta["kwargs"])
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
    load_state(backbone, state, source=weights)
    preprocess = Preprocess(
        input_size=meta["preprocess"]["input_size"],
        mean=tuple(meta["preprocess"]["mean"]),
        std=tuple(meta["preprocess"]["std"]),
    )
    return backbone, preprocess, meta


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
