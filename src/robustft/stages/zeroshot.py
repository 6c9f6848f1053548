"""The zero-shot CLIP model: the image tower with a head from the text tower."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.data.registry import split_column
from robustft.evaluate import ece_column, score
from robustft.io import write_json
from robustft.models import HEAD_FILE, ImageClassifier, load_backbone, save_head
from robustft.stages.common import (
    eval_transform,
    load_splits,
    run_splits,
    set_head,
    split_dataset,
)

log = logging.getLogger("robustft.stages")


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
    prepared: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:
    """The zero-shot CLIP model of a setting: the pretrained image tower with the text tower's
    head for the dataset's class names (`zeroshot.zeroshot_head`), evaluated on ID val, ID test
    and every OOD split. Writes `head.safetensors` (weight, bias) and `metrics.json`.
    `prepared`: {split: prepared-image cache file} read instead of the split's images."""
    from robustft.zeroshot import load_text_tower, text_tower_name, zeroshot_head

    backbone, preprocess, backbone_meta = load_backbone(model_dir, preprocess=preprocess_overrides)
    splits = load_splits(
        dataset=dataset,
        data_root=data_root,
        splits=run_splits(ood_splits, train=False),
        data_options=data_options,
    )
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
    set_head(model, weight, bias)
    transform = eval_transform(data_options)
    metrics: dict[str, Any] = {}
    for split, arrays in splits.items():
        scores = score(
            model,
            split_dataset(
                split,
                arrays,
                preprocess=preprocess,
                transform=transform,
                prepared=prepared,
                data_fingerprint=data_fingerprint,
            ),
            batch_size=batch_size,
            device=device,
        )
        metrics[split_column(split)] = scores.accuracy
        metrics[ece_column(split_column(split))] = scores.ece
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
