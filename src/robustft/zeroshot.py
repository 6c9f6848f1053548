"""Zero-shot CLIP heads through open_clip (the optional extra `clip`).

For each class, the 80 OpenAI ImageNet prompt templates are encoded by the CLIP text tower,
L2-normalised, averaged and normalised again (open_clip's `build_zero_shot_classifier`), then
multiplied by CLIP's logit scale. The result is a linear head on the backbone's *projected*
image embedding (timm's CLIP image towers with `embedding: projected`). CLIP normalises image
features before this head; our `ImageClassifier` does not, which multiplies each image's logits
by its feature norm: the predicted class, hence every accuracy, is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported in the functions: the Snakefile reads CLIP_TEXT_TOWERS
    import torch

# timm CLIP image towers → the open_clip model (architecture, pretrained tag) of their text tower.
CLIP_TEXT_TOWERS: dict[str, tuple[str, str]] = {
    "vit_base_patch16_clip_224.openai": ("ViT-B-16", "openai"),
    "vit_base_patch16_clip_quickgelu_224.openai": ("ViT-B-16-quickgelu", "openai"),
    "vit_base_patch32_clip_224.openai": ("ViT-B-32", "openai"),
    "vit_large_patch14_clip_224.openai": ("ViT-L-14", "openai"),
    "resnet50_clip.openai": ("RN50", "openai"),
    "resnet101_clip.openai": ("RN101", "openai"),
}


# Prompt template sets of open_clip (`zero_shot_metadata`), by the name the config uses.
TEMPLATE_SETS = {
    "openai_imagenet": "OPENAI_IMAGENET_TEMPLATES",
    "simple_imagenet": "SIMPLE_IMAGENET_TEMPLATES",
}


@dataclass(frozen=True)
class TextTower:
    """What a method that needs a text tower (FLYP) is given: the open_clip model
    (`encode_text`, `logit_scale`), its tokenizer and the dataset's class names."""

    model: Any
    tokenizer: Any
    class_names: tuple[str, ...]


def prompt_templates(name: str) -> list[Any]:
    """One of open_clip's template sets (`TEMPLATE_SETS`), as functions of a class name."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"prompt templates {name!r}: known are {', '.join(TEMPLATE_SETS)}")
    _open_clip()
    from open_clip import zero_shot_metadata

    return list(getattr(zero_shot_metadata, TEMPLATE_SETS[name]))


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise ImportError(
            "zero-shot heads need open_clip: pip install 'robustft[clip]' (open_clip_torch)"
        ) from None
    return open_clip


def text_tower_name(backbone: str) -> tuple[str, str]:
    if backbone not in CLIP_TEXT_TOWERS:
        raise ValueError(
            f"backbone {backbone!r} has no known CLIP text tower; zero-shot heads exist for "
            f"{', '.join(sorted(CLIP_TEXT_TOWERS))}"
        )
    return CLIP_TEXT_TOWERS[backbone]


def load_text_tower(*, backbone: str, cache_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """The open_clip model and tokenizer of `backbone`'s text tower, from (or downloaded into)
    `cache_dir` (a Hugging Face cache; offline when HF_HUB_OFFLINE=1)."""
    open_clip = _open_clip()
    name, tag = text_tower_name(backbone)
    model = open_clip.create_model(
        name, pretrained=tag, cache_dir=str(cache_dir), require_pretrained=True
    )
    return model.eval(), open_clip.get_tokenizer(name)


def zeroshot_head(
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[Any] | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight C×D, bias C) of the zero-shot head: per class, the normalised mean of the
    normalised prompt embeddings, times exp(logit_scale); bias 0. Templates default to the 80
    OpenAI ImageNet ones; underscores in class names become spaces."""
    open_clip = _open_clip()
    import torch
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    names = [name.replace("_", " ") for name in class_names]
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model,
            tokenizer=tokenizer,
            classnames=names,
            templates=list(templates or OPENAI_IMAGENET_TEMPLATES),
            device=device,
        )  # (D, C), columns unit-norm
        scale = model.logit_scale.exp().float().cpu()
    weight = (scale * weights.float().cpu().T).contiguous()
    return weight, torch.zeros(len(names))
