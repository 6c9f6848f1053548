"""The prepared-image cache of one split under one transform (`robustft.data.prepared`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustft.data.prepared import cache_plan, prepare_split
from robustft.data.registry import load_split
from robustft.io import read_json
from robustft.models import META_FILE, Preprocess, merge_preprocess

log = logging.getLogger("robustft.stages")


def prepare_images(
    *,
    dataset: str,
    split: str,
    transform: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    out_path: str | Path,
    data_options: Mapping[str, Any] | None = None,
    preprocess_overrides: Mapping[str, Any] | None = None,
    shorter_side: int | None = None,
    compression: str = "none",
    threads: int = 1,
    progress: bool = True,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Decode and resize every image of `split` once, to what `transform` needs at the
    backbone's preprocessing (meta.json in `model_dir` with `preprocess_overrides` over it;
    the weights are not read), into the HDF5 file `out_path`. With `threads` > 1, that many
    DataLoader workers decode."""
    model_dir = Path(model_dir)
    meta = read_json(model_dir / META_FILE)
    preprocess = merge_preprocess(
        Preprocess.from_dict(meta["preprocess"]),
        preprocess_overrides,
        key=f"{model_dir.name}: preprocess",
    )
    plan = cache_plan(transform, preprocess=preprocess, shorter_side=shorter_side)
    images = load_split(dataset=dataset, split=split, root=data_root, options=data_options)
    started = time.perf_counter()
    summary = prepare_split(
        split=images,
        out_path=out_path,
        plan=plan,
        data_fingerprint=data_fingerprint,
        compression=compression,
        num_workers=threads if threads > 1 else 0,
        progress=progress,
        attrs={"dataset": dataset, "split": split, "backbone": model_dir.name},
    )
    seconds = time.perf_counter() - started
    log.info(
        "%s/%s (%s): %d images, %s, %.1f MB in %.1f s (%.0f images/s)",
        dataset,
        split,
        transform,
        summary["images"],
        plan.describe(),
        summary["bytes"] / 1e6,
        seconds,
        summary["images"] / max(seconds, 1e-9),
    )
    return summary
