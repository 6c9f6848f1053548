"""The steps of the workflow, one module per step; this module only re-exports their names.

Each step takes paths and settings, writes its outputs atomically, and knows nothing of
Snakemake (the scripts in workflow/scripts call these):

- `pretrain`: the toy backbone's pretraining and the from-scratch baseline models;
- `features`: frozen features of a split, and the feature distortion of fine-tuned runs;
- `probe`: the linear probe on those features (needs no torch);
- `finetune`: one fine-tuning run of one method of the method table;
- `wiseft`: WiSE-FT curves between the probe and the selected runs;
- `soups`: model soups of a method's runs (uniform and greedy);
- `predictions`: stored per-example logits of the selected runs;
- `zeroshot`: the zero-shot CLIP model;
- `prepare`: the prepared-image cache of a split (decoded and resized once);
- `common`: what they share (environment, splits, eval transform, heads).

The names are re-exported lazily: a job imports only its own step's module, so that the probe
and the other jobs that need no torch start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "environment_info": "common",
    "extract_split": "features",
    "feature_distortion": "features",
    "distortion_rows": "features",
    "check_probe_head": "finetune",
    "copy_probe_head": "finetune",
    "load_probe_head": "finetune",
    "probe_head_provenance": "finetune",
    "run_finetune": "finetune",
    "preprocess_of": "pretrain",
    "pretrain_toy_backbone": "pretrain",
    "prepare_images": "prepare",
    "train_baseline": "pretrain",
    "run_probe": "probe",
    "run_wiseft": "wiseft",
    "run_soups": "soups",
    "store_predictions": "predictions",
    "run_zeroshot": "zeroshot",
}

__all__ = [
    "check_probe_head",
    "copy_probe_head",
    "distortion_rows",
    "environment_info",
    "extract_split",
    "feature_distortion",
    "load_probe_head",
    "prepare_images",
    "preprocess_of",
    "pretrain_toy_backbone",
    "probe_head_provenance",
    "run_finetune",
    "run_probe",
    "run_soups",
    "run_wiseft",
    "run_zeroshot",
    "store_predictions",
    "train_baseline",
]

if TYPE_CHECKING:
    from robustft.stages.common import environment_info
    from robustft.stages.features import distortion_rows, extract_split, feature_distortion
    from robustft.stages.finetune import (
        check_probe_head,
        copy_probe_head,
        load_probe_head,
        probe_head_provenance,
        run_finetune,
    )
    from robustft.stages.predictions import store_predictions
    from robustft.stages.prepare import prepare_images
    from robustft.stages.pretrain import preprocess_of, pretrain_toy_backbone, train_baseline
    from robustft.stages.probe import run_probe
    from robustft.stages.soups import run_soups
    from robustft.stages.wiseft import run_wiseft
    from robustft.stages.zeroshot import run_zeroshot


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
