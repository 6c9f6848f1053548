"""WiSE-FT: interpolate between the pretrained model with the probe head and a fine-tuned run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustft import provenance
from robustft.data.registry import split_column
from robustft.evaluate import ece_column, score
from robustft.io import write_csv
from robustft.models import HEAD_FILE, ImageClassifier, load_backbone
from robustft.robustness import chance_record
from robustft.stages.common import eval_sets, eval_transform, load_splits, run_splits, set_head
from robustft.stages.finetune import check_probe_head, load_probe_head, probe_head_provenance

log = logging.getLogger("robustft.stages")


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
    prepared: Mapping[str, str | Path] | None = None,
) -> list[dict[str, Any]]:
    """WiSE-FT curve of one seed: for each selected method's run of that seed (θ₁) and each α,
    evaluate θ_α = (1 − α)·θ₀ + α·θ₁ on ID val, ID test and every OOD split, where θ₀ is the
    pretrained backbone with the probe head of the same seed. Writes one row per (method, α).

    The probe head and the selected runs must record this backbone's weights and the same
    data: `data_fingerprint` (the data manifest's), or without it the probe head's.
    `prepared`: {split: prepared-image cache file} read instead of the split's images.
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
    splits = load_splits(
        dataset=dataset,
        data_root=data_root,
        splits=run_splits(ood_splits, train=False),
        data_options=data_options,
    )
    num_classes = len(splits["val"].class_names)
    model = ImageClassifier(backbone=backbone, num_classes=num_classes, preprocess=preprocess)
    set_head(model, *load_probe_head(probe_dir))
    theta0 = {key: value.detach().clone() for key, value in model.state_dict().items()}
    evaluated = eval_sets(
        splits,
        preprocess=preprocess,
        transform=eval_transform(data_options),
        prepared=prepared,
        data_fingerprint=data_fingerprint,
    )
    # On every row, so that a table can flag an interpolation at chance (`report.wiseft_row`).
    chance = chance_record(
        id_val=splits["val"].labels,
        id_test=splits["test"].labels if "test" in splits else None,
    )
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
            scored = {
                name: score(
                    model, data, batch_size=batch_size, device=device, num_workers=num_workers
                )
                for name, data in evaluated.items()
            }
            scores = {name: value.accuracy for name, value in scored.items()}
            ood = [scores[split_column(split)] for split in ood_splits]
            rows.append(
                {
                    "method": method,
                    "run": selection.get("run", ""),
                    "seed": int(seed),
                    "alpha": float(alpha),
                    **scores,
                    "ood": float(np.mean(ood)) if ood else float("nan"),
                    **{ece_column(name): value.ece for name, value in scored.items()},
                    **chance,
                }
            )
            log.info("%s α=%.2f: %s", method, alpha, {k: round(v, 4) for k, v in scores.items()})
    write_csv(out_path, rows)
    return rows
