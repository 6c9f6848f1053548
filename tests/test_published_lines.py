"""The published effective-robustness lines of configs/paper.yaml: recomputed from the
committed extract of imagenet-testbed, so they cannot drift from their source, and used by the
ER table as the workflow uses them."""

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from robustft.analysis import (
    MEAN,
    baseline_lines,
    effective_robustness_table,
    line_from_settings,
    write_effective_robustness,
)
from robustft.config import ConfigError, load_schema, validate_config
from robustft.data.registry import SETTINGS
from robustft.published import (
    TESTBED_EXTRACT,
    extract_testbed,
    fit_testbed_lines,
    line_fit_models,
    published_line_settings,
    read_testbed_extract,
    read_testbed_model_types,
)
from robustft.robustness import effective_robustness

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper.yaml"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def paper_config():
    return yaml.safe_load(PAPER.read_text())


@pytest.fixture(scope="module")
def imagenet_lines(paper_config):
    return paper_config["baseline"]["lines"]["imagenet"]


@pytest.fixture(scope="module")
def extract():
    return read_testbed_extract(TESTBED_EXTRACT)


def test_every_imagenet_ood_split_has_a_published_line(imagenet_lines):
    assert set(imagenet_lines) == set(SETTINGS["imagenet"].ood_sources)


def test_the_paper_lines_are_the_fit_of_the_committed_extract(imagenet_lines, extract):
    refit = published_line_settings(extract=extract)
    assert set(refit) == set(imagenet_lines)
    for split, written in imagenet_lines.items():
        # Written to 4 decimals: any edit of the config or the extract shows here.
        for key in ("slope", "intercept", "r"):
            assert written[key] == pytest.approx(refit[split][key], abs=6e-5), (split, key)
        assert written["n_models"] == refit[split]["n_models"], split
        assert written["id_range"] == pytest.approx(refit[split]["id_range"], abs=6e-5), split


def test_the_lines_are_fitted_over_standard_imagenet_models_only(extract):
    for split in ("v2", "sketch", "r", "a", "objectnet"):
        models = line_fit_models(extract, split=split)
        assert set(models["model_type"]) == {"standard"}
        assert not models["model"].str.contains("subsample|aws|batch64").any()
        assert len(models) >= 80
    # ImageNet-A was built against ResNet-50, which scores 0 there: left out of A's fit only.
    assert "resnet50" in set(line_fit_models(extract, split="v2")["model"])
    assert "resnet50" not in set(line_fit_models(extract, split="a")["model"])


def test_torchvision_resnet50_sits_on_the_v2_sketch_and_r_lines(imagenet_lines, extract):
    resnet50 = extract.set_index("model").loc["resnet50"]
    assert resnet50["imagenet"] == pytest.approx(76.13, abs=0.01)  # torchvision's weights
    for split in ("v2", "sketch", "r"):
        er_points = 100 * effective_robustness(
            id_accuracy=resnet50["imagenet"] / 100,
            ood_accuracy=resnet50[split] / 100,
            line=line_from_settings(imagenet_lines[split]),
        )
        assert abs(er_points) < 1.0, (split, float(er_points))


def test_models_trained_with_more_data_lie_above_the_lines(imagenet_lines, extract):
    """What the lines are for (Taori et al.): standard models centre on them, models trained
    with more data are effectively robust on R and Sketch."""

    def median_er(model_type, split):
        models = extract[extract["model_type"] == model_type]
        return np.nanmedian(
            100
            * effective_robustness(
                id_accuracy=models["imagenet"].to_numpy() / 100,
                ood_accuracy=models[split].to_numpy() / 100,
                line=line_from_settings(imagenet_lines[split]),
            )
        )

    for split in imagenet_lines:
        assert abs(median_er("standard", split)) < 1.0, split
    assert median_er("more_data", "r") > 3.0
    assert median_er("more_data", "sketch") > 2.0


def test_the_paper_config_validates_and_a_broken_line_is_named(paper_config):
    schema = load_schema(SCHEMA)
    validate_config(copy.deepcopy(paper_config), schema)
    broken = copy.deepcopy(paper_config)
    del broken["baseline"]["lines"]["imagenet"]["sketch"]["intercept"]
    with pytest.raises(ConfigError, match=r"baseline\.lines\.imagenet\.sketch.*intercept"):
        validate_config(broken, schema)
    misspelt = copy.deepcopy(paper_config)
    misspelt["baseline"]["lines"]["imagenet"]["r"]["slop"] = 1.0
    with pytest.raises(ConfigError, match=r"'slop' under 'baseline\.lines\.imagenet\.r'"):
        validate_config(misspelt, schema)


def test_one_published_line_still_serves_every_split_and_the_mean():
    lines = baseline_lines(
        baseline=None, ood_splits=["x", "y"], published={"slope": 1.0, "intercept": -0.5}
    )
    assert set(lines) == {"x", "y", MEAN}
    assert lines["x"] == lines[MEAN]
    assert lines["x"].slope == 1.0 and lines["x"].intercept == -0.5


def test_per_split_lines_must_cover_every_scored_split(imagenet_lines):
    with pytest.raises(ValueError, match=r"baseline\.lines\.imagenet: no line .*\['c'\]"):
        baseline_lines(
            baseline=None,
            ood_splits=["v2", "c"],
            published=imagenet_lines,
            key="baseline.lines.imagenet",
        )


def _metrics(folder: Path, accuracies: dict) -> Path:
    folder.mkdir(parents=True)
    path = folder / "metrics.json"
    path.write_text(json.dumps({**accuracies, "data_fingerprint": "aa" * 32}))
    return path


def test_the_er_table_uses_each_splits_published_line(imagenet_lines, extract, tmp_path):
    """A probe scored like torchvision's ResNet-50: its ER per split is its distance to that
    split's line, and the mean's ER the mean of those (no `mean` line is published)."""
    splits = ["v2", "sketch", "r", "a"]
    resnet50 = extract.set_index("model").loc["resnet50"]
    probe = _metrics(
        tmp_path / "seed0",
        {"id_test": resnet50["imagenet"] / 100}
        | {f"ood_{split}": resnet50[split] / 100 for split in splits},
    )
    table, lines = effective_robustness_table(
        dataset="imagenet",
        ood_splits=splits,
        baseline_files=[],
        probe_files={"vit": [probe]},
        selection_files={},
        published_line=imagenet_lines,
    )
    assert MEAN not in lines
    row = table.iloc[0]
    for split in splits:
        expected = 100 * effective_robustness(
            id_accuracy=resnet50["imagenet"] / 100,
            ood_accuracy=resnet50[split] / 100,
            line=line_from_settings(imagenet_lines[split]),
        )
        assert row[f"er_pts_{split}"] == pytest.approx(float(expected))
    assert abs(row["er_pts_v2"]) < 1.0
    assert row["er_pts"] == pytest.approx(np.mean([row[f"er_pts_{s}"] for s in splits]))
    write_effective_robustness(
        table=table,
        lines=lines,
        csv_path=tmp_path / "er.csv",
        line_path=tmp_path / "line.json",
        er_plot=tmp_path / "er.png",
        scatter_plot=tmp_path / "scatter.png",
    )
    written = json.loads((tmp_path / "line.json").read_text())
    assert written["v2"]["models"] == imagenet_lines["v2"]["n_models"]
    assert (tmp_path / "scatter.png").stat().st_size > 1000


MODEL_TYPES_PY = """from enum import Enum
class ModelTypes(Enum):
    STANDARD = ('Standard training', 'tab:blue')
    MORE_DATA = ('Trained with more data', 'tab:green')
    LOW_ACCURACY_CNN = ('Low Accuracy CNN', 'tab:cyan')

model_types_map = {
'alexnet': ModelTypes.STANDARD,
'resnet50': ModelTypes.STANDARD,
'resnet50_aws_baseline': ModelTypes.STANDARD,
'big_model': ModelTypes.MORE_DATA
}

for i in range(2):
    model_types_map[f"resnet18_{i}_epochs"] =  ModelTypes.LOW_ACCURACY_CNN
"""

COLUMNS = [
    "val",
    "imagenetv2-matched-frequency-format-val",
    "imagenet-sketch",
    "imagenet-r",
    "imagenet-a",
    "objectnet-1.0-beta",
    "val-on-imagenet-r-classes",
    "val-on-imagenet-a-classes",
    "val-on-objectnet-classes",
]


def _testbed_files(tmp_path, models):
    types = tmp_path / "model_types.py"
    types.write_text(MODEL_TYPES_PY)
    top1s = tmp_path / "robustness_top1s.csv"
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        rng.uniform(10, 90, size=(len(models), len(COLUMNS) + 1)),
        index=pd.Index(models, name="model"),
        columns=[*COLUMNS, "greyscale"],
    )
    frame.to_csv(top1s)
    return top1s, types


def test_the_extract_reads_the_testbeds_own_files(tmp_path):
    models = ["alexnet", "resnet50", "resnet50_aws_baseline", "big_model", "resnet18_1_epochs"]
    top1s, types = _testbed_files(tmp_path, models)
    assert read_testbed_model_types(types)["resnet18_1_epochs"] == "low_accuracy_cnn"
    extract = extract_testbed(top1s_csv=top1s, model_types_py=types)
    assert set(extract["model"]) == set(models)
    assert "greyscale" not in extract.columns
    source = pd.read_csv(top1s, index_col=0)
    row = extract.set_index("model").loc["big_model"]
    assert row["model_type"] == "more_data"
    assert row["imagenet"] == source.loc["big_model", "val"]
    assert row["v2"] == source.loc["big_model", "imagenetv2-matched-frequency-format-val"]
    # The fit leaves out the testbed's repeated ResNet-50 runs and every non-standard model.
    fitted = line_fit_models(extract, split="r")
    assert sorted(fitted["model"]) == ["alexnet", "resnet50"]
    assert fit_testbed_lines(extract=extract, splits=["r"])["r"].models == 2


def test_a_testbed_model_without_a_type_is_named(tmp_path):
    top1s, types = _testbed_files(tmp_path, ["alexnet", "mystery_net"])
    with pytest.raises(ValueError, match=r"model_types\.py: no model type for \['mystery_net'\]"):
        extract_testbed(top1s_csv=top1s, model_types_py=types)
