"""Published effective-robustness lines, recomputed from a committed extract of their source.

ImageNet: the per-model top-1 accuracies of modestyachts/imagenet-testbed (Taori et al. 2020,
`robustness_top1s.csv`, model types in `plotting/model_types.py`). The line of each OOD split
is fitted as the testbed fits its own: logit(OOD top-1) on logit(ImageNet top-1) with
`scipy.stats.linregress` over its "standard training" models (trained on ImageNet only).

`extract_testbed` builds the small extract (`data/published/imagenet_testbed_top1.csv`) from
the testbed's two files; `fit_testbed_lines` fits the lines from it, so the lines written in
configs/paper.yaml can be checked against the numbers they came from.

    python -m robustft.published    # the lines from the committed extract, as YAML
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from robustft.io import atomic_path
from robustft.robustness import BaselineLine, fit_baseline

TESTBED_REPO = "modestyachts/imagenet-testbed"
# The files' commit (2023-08-05) the committed extract was read from.
TESTBED_COMMIT = "0170eec658d664289d9f61de8f90f967f49abca0"
TESTBED_EXTRACT = Path(__file__).parent / "data" / "published" / "imagenet_testbed_top1.csv"

# The workflow's ID accuracy of the imagenet setting is 1000-way ImageNet val top-1, so every
# line's x axis is the testbed's `val`. Its OOD splits as the testbed names its columns: V2
# is the released matched-frequency folder (`-format-val` is the name of that release); R and
# A are scored over their 200 classes, ObjectNet over its 113 ImageNet classes, as here.
TESTBED_ID_COLUMN = "val"
TESTBED_OOD_COLUMNS = {
    "v2": "imagenetv2-matched-frequency-format-val",
    "sketch": "imagenet-sketch",
    "r": "imagenet-r",
    "a": "imagenet-a",
    "objectnet": "objectnet-1.0-beta",
}
# ImageNet accuracy on each split's own classes: the x axis of the testbed's own R, A and
# ObjectNet plots. Kept in the extract for reference; the workflow has no such ID accuracy.
TESTBED_CLASS_SUBSET_COLUMNS = {
    "r": "val-on-imagenet-r-classes",
    "a": "val-on-imagenet-a-classes",
    "objectnet": "val-on-objectnet-classes",
}
STANDARD = "standard"  # the testbed's ModelTypes.STANDARD, "Standard training"
# Substrings of model names the testbed leaves out of every line fit (`use_for_line_fit` and
# `show_in_plot` of its plotting/paper_*.py): models trained on subsets of ImageNet and
# repeated runs of ResNet-50 (`_aws`, `batch64`).
TESTBED_FIT_EXCLUDED = ("subsample", "aws", "batch64")

_MODEL_TYPE_ENTRY = re.compile(r"^\s*'([^']+)'\s*:\s*ModelTypes\.([A-Z_]+)\b", re.MULTILINE)
# Entries added in loops: `for i in range(N):` then `model_types_map[f"name_{i}_x"] = ...`.
_MODEL_TYPE_LOOP = re.compile(
    r"^for i in range\((\d+)\):\s*\n"
    r"\s*model_types_map\[f\"([^\"]+)\"\]\s*=\s*ModelTypes\.([A-Z_]+)",
    re.MULTILINE,
)


def read_testbed_model_types(path: str | Path) -> dict[str, str]:
    """{model name: type} from the testbed's plotting/model_types.py (parsed, not imported):
    the literal entries of `model_types_map` and those its `for i in range(N)` loops add."""
    text = Path(path).read_text()
    types = {name: kind.lower() for name, kind in _MODEL_TYPE_ENTRY.findall(text)}
    for count, pattern, kind in _MODEL_TYPE_LOOP.findall(text):
        for i in range(int(count)):
            types[pattern.replace("{i}", str(i))] = kind.lower()
    if not types:
        raise ValueError(f"{path}: no `'name': ModelTypes.X` entries found")
    return types


def extract_testbed(*, top1s_csv: str | Path, model_types_py: str | Path) -> pd.DataFrame:
    """One row per testbed model: name, type, ImageNet top-1 and each OOD top-1 (percent)."""
    top1s = pd.read_csv(top1s_csv, index_col=0)
    columns = [
        TESTBED_ID_COLUMN,
        *TESTBED_OOD_COLUMNS.values(),
        *TESTBED_CLASS_SUBSET_COLUMNS.values(),
    ]
    missing = [column for column in columns if column not in top1s.columns]
    if missing:
        raise ValueError(f"{top1s_csv}: no column {missing}")
    types = read_testbed_model_types(model_types_py)
    untyped = [name for name in top1s.index if name not in types]
    if untyped:
        raise ValueError(f"{model_types_py}: no model type for {untyped[:5]} ({len(untyped)})")
    extract = top1s[columns].rename(
        columns={
            TESTBED_ID_COLUMN: "imagenet",
            **{column: split for split, column in TESTBED_OOD_COLUMNS.items()},
            **{
                column: f"imagenet_on_{split}_classes"
                for split, column in TESTBED_CLASS_SUBSET_COLUMNS.items()
            },
        }
    )
    extract.insert(0, "model_type", [types[name] for name in extract.index])
    extract.index.name = "model"
    return extract.sort_values(["model_type", "model"]).reset_index()


def write_testbed_extract(*, extract: pd.DataFrame, out_path: str | Path) -> None:
    """The extract as CSV, its source named in `#` lines above the header."""
    header = (
        f"# Top-1 accuracies (percent) from github.com/{TESTBED_REPO} at commit {TESTBED_COMMIT}:\n"
        "# robustness_top1s.csv (columns val, imagenetv2-matched-frequency-format-val,\n"
        "# imagenet-sketch, imagenet-r, imagenet-a, objectnet-1.0-beta, val-on-*-classes) and\n"
        "# model_type from plotting/model_types.py (model_types_map). Built by\n"
        "# robustft.published.extract_testbed; see docs/published-lines.md.\n"
    )
    with atomic_path(out_path) as tmp:
        # 8 significant digits: the testbed's accuracies carry float32 precision (about 7).
        tmp.write_text(header + extract.to_csv(index=False, float_format="%.8g"))


def read_testbed_extract(path: str | Path = TESTBED_EXTRACT) -> pd.DataFrame:
    return pd.read_csv(path, comment="#")


def line_fit_models(extract: pd.DataFrame, *, split: str) -> pd.DataFrame:
    """The models a split's line is fitted over: standard training (ImageNet only), without
    the testbed's excluded runs, with an accuracy on that split above 0 (ImageNet-A was
    filtered against ResNet-50, which scores 0 there; the testbed drops it from A too)."""
    if split not in TESTBED_OOD_COLUMNS:
        raise ValueError(f"no testbed split {split!r}; known: {sorted(TESTBED_OOD_COLUMNS)}")
    names = extract["model"].str.lower()
    excluded = np.logical_or.reduce([names.str.contains(part) for part in TESTBED_FIT_EXCLUDED])
    chosen = (extract["model_type"] == STANDARD) & ~excluded & (extract[split] > 0)
    return extract[chosen & extract[["imagenet", split]].notna().all(axis=1)]


def fit_testbed_lines(
    *, extract: pd.DataFrame, splits: Sequence[str] = tuple(TESTBED_OOD_COLUMNS)
) -> dict[str, BaselineLine]:
    """{split: line of logit(OOD top-1) on logit(ImageNet top-1)} over the standard models."""
    lines = {}
    for split in splits:
        models = line_fit_models(extract, split=split)
        lines[split] = fit_baseline(
            id_accuracy=models["imagenet"].to_numpy() / 100,
            ood_accuracy=models[split].to_numpy() / 100,
        )
    return lines


def published_line_settings(*, extract: pd.DataFrame, digits: int = 4) -> dict[str, dict]:
    """{split: the line as `baseline.lines` holds it}: slope, intercept, r, n_models and the
    ImageNet accuracy range (fractions) of the models it was fitted over."""
    settings = {}
    for split, line in fit_testbed_lines(extract=extract).items():
        id_accuracy = line_fit_models(extract, split=split)["imagenet"] / 100
        settings[split] = {
            "slope": round(line.slope, digits),
            "intercept": round(line.intercept, digits),
            "r": round(line.r_value, digits),
            "n_models": line.models,
            "id_range": [
                round(float(id_accuracy.min()), digits),
                round(float(id_accuracy.max()), digits),
            ],
        }
    return settings


def format_lines(settings: Mapping[str, Mapping]) -> str:
    """Lines as the YAML flow mappings of configs/paper.yaml's baseline.lines.imagenet."""
    rows = []
    for split, line in settings.items():
        body = ", ".join(f"{key}: {value}" for key, value in line.items())
        rows.append(f"{split}: {{{body}}}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(format_lines(published_line_settings(extract=read_testbed_extract())))
