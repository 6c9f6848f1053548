"""Config of the real settings: `paths`, `download`, `dataset_settings`, paper.yaml."""

from pathlib import Path

import pytest
import yaml

from robustft.config import ConfigError, load_schema, validate_config
from robustft.data.registry import dataset_options, dataset_sources

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(ROOT / "workflow" / "schemas" / "config.schema.yaml")


def test_paper_config_is_valid_and_names_every_setting():
    config = validate_config(yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text()), SCHEMA)
    assert config["datasets"] == [
        "cifar10_stl",
        "cifar10_cifar101",
        "living17",
        "entity30",
        "domainnet",
        "fmow",
        "imagenet",
    ]
    ood = {d: dataset_options(config, d)["ood_splits"] for d in config["datasets"]}
    # Ten shifts: STL, CIFAR-10.1, two BREEDS, DomainNet, FMoW, ImageNet V2/R/A/Sketch.
    assert sum(1 if d != "imagenet" else len(s) for d, s in ood.items()) == 10
    assert ood["imagenet"] == ["v2", "r", "a", "sketch"]
    assert config["dataset_settings"]["imagenet"]["finetune"]["epochs"] == 10


def test_command_line_strings_in_dataset_settings_are_coerced():
    config = validate_config(
        {"dataset_settings": {"fmow": {"split_seed": "3", "finetune": {"epochs": "5"}}}}, SCHEMA
    )
    assert config["dataset_settings"]["fmow"]["split_seed"] == 3
    assert config["dataset_settings"]["fmow"]["finetune"]["epochs"] == 5


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"dataset_settings": {"fmow": {"bogus": 1}}}, "'bogus' under 'dataset_settings.fmow'"),
        (
            {"dataset_settings": {"fmow": {"val_fraction": 1.5}}},
            "dataset_settings.fmow.val_fraction",
        ),
        ({"dataset_settings": {"fmow": {"train_transform": "zoom"}}}, "train_transform"),
        ({"paths": {"imagenett": "/x"}}, "'imagenett' under 'paths'"),
        ({"datasets": ["bad name"]}, "datasets[0]"),
        ({"allow_subset": ["imagenet", "imagenett"]}, "config key 'allow_subset[1]'"),
        ({"allow_subset": "imagenet"}, "config key 'allow_subset'"),
        (
            {"dataset_settings": {"fmow": {"finetune": {"ft": {"lr_grid": [1e-3, 0.001]}}}}},
            "dataset_settings.fmow.finetune.ft.lr_grid",
        ),
    ],
)
def test_bad_dataset_config_is_one_line_naming_the_key(change, named):
    with pytest.raises(ConfigError) as raised:
        validate_config(change, SCHEMA)
    assert named in str(raised.value) and "\n" not in str(raised.value)


def test_ood_splits_choose_the_sources_a_setting_needs():
    config = {"dataset_settings": {"imagenet": {"ood_splits": ["r"]}}}
    options = dataset_options(config, "imagenet")
    assert dataset_sources("imagenet", ood_splits=options["ood_splits"]) == [
        "imagenet",
        "imagenet_r",
    ]
    assert dataset_sources("living17", ood_splits=["target"]) == ["imagenet", "breeds"]
    with pytest.raises(ValueError, match="not among"):
        dataset_options({"dataset_settings": {"fmow": {"ood_splits": ["asia"]}}}, "fmow")


def test_allow_subset_reaches_the_settings_that_read_the_source():
    config = validate_config({"allow_subset": ["imagenet", "stl10"]}, SCHEMA)
    assert validate_config({}, SCHEMA)["allow_subset"] == []
    assert dataset_options(config, "living17")["allow_subset"] == ["imagenet"]
    assert dataset_options(config, "cifar10_stl")["allow_subset"] == ["stl10"]
    # Not set where no listed source is read: those jobs' params stay as they were.
    assert "allow_subset" not in dataset_options(config, "domainnet")
    assert "allow_subset" not in dataset_options(config, "cifar10_cifar101")
