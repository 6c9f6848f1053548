from pathlib import Path

import pytest
import yaml

from robustft.config import ConfigError, format_hparam, load_schema, validate_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(ROOT / "workflow" / "schemas" / "config.schema.yaml")


def default_config():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid():
    validate_config(default_config(), SCHEMA)


def test_missing_keys_get_schema_defaults():
    config = validate_config({}, SCHEMA)
    assert config["methods"] == ["lp", "ft", "lpft"]
    assert config["finetune"]["lpft"]["bn"] == "frozen"
    # Kumar et al.: FT trains the statistics, LP-FT freezes them (and is clipped, docs/methods.md).
    assert config["finetune"]["ft"]["bn"] == "train"
    assert config["finetune"]["ft"]["clip_grad_norm"] is None
    assert config["finetune"]["lpft"]["clip_grad_norm"] == 5.0
    assert config["toyshift"]["pretrain_images_per_class"]["sketch"] == 150


def test_every_key_has_a_description_and_a_default():
    def walk(schema, path):
        for name, sub in schema.get("properties", {}).items():
            assert "description" in sub, f"{path}{name} has no description"
            assert "default" in sub, f"{path}{name} has no default"
            walk(sub, f"{path}{name}.")

    walk(SCHEMA, "")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"bogus": 1}, "'bogus'"),
        ({"finetune": {"epochs": 3, "lr": 0.1}}, "'lr' under 'finetune'"),
        ({"finetune": {"ft": {"lr_grid": [-0.1]}}}, "finetune.ft.lr_grid[0]"),
        ({"finetune": {"ft": {"lr_grid": ["-1e-3"]}}}, "finetune.ft.lr_grid[0]"),
        ({"finetune": {"ft": {"lr_grid": [0]}}}, "finetune.ft.lr_grid[0]"),
        ({"seeds": []}, "'seeds'"),
        ({"methods": ["ft", "sft"]}, "methods[1]"),
        ({"toyshift": {"id_domain": "photo"}}, "toyshift.id_domain"),
        ({"finetune": {"epochs": "ten"}}, "finetune.epochs"),
        ({"finetune": {"ft": {"lr_grid": [1e-3, 0.001]}}}, "finetune.ft.lr_grid"),
        # Names become paths, wildcards and table columns: said as such, not "a number".
        ({"datasets": ["my-data"]}, "'datasets[0]': 'my-data' is not a name of letters"),
        ({"dataset_settings": {"my-data": {"type": "imagefolder"}}}, "'dataset_settings': 'my"),
        (
            {"dataset_settings": {"mine": {"type": "imagefolder", "splits": {"night time": "n"}}}},
            "'dataset_settings.mine.splits': 'night time' is not a name",
        ),
    ],
)
def test_bad_values_raise_one_line_naming_the_key(change, named):
    config = default_config()
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            for sub_key, sub_value in value.items():
                if isinstance(sub_value, dict):
                    config[key].setdefault(sub_key, {}).update(sub_value)
                else:
                    config[key][sub_key] = sub_value
        else:
            config[key] = value
    with pytest.raises(ConfigError) as raised:
        validate_config(config, SCHEMA)
    message = str(raised.value)
    assert named in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("value", "spelling"),
    [
        (1e-3, "0.001"),
        ("1e-3", "0.001"),
        ("0.001", "0.001"),
        ("1.0e-3", "0.001"),
        (3e-5, "3e-05"),
        ("3e-05", "3e-05"),
        (0.03, "0.03"),
        (1, "1"),
    ],
)
def test_hyperparameters_have_one_spelling(value, spelling):
    assert format_hparam(value) == spelling


def test_command_line_strings_become_the_types_the_schema_asks_for():
    # What `snakemake --config seeds='[0, 1]' finetune='{epochs: 3}'` passes in.
    config = validate_config(
        {"seeds": ["0", "1"], "finetune": {"epochs": "3", "augment": "false"}}, SCHEMA
    )
    assert config["seeds"] == [0, 1]
    assert config["finetune"]["epochs"] == 3
    assert config["finetune"]["augment"] is False
    with pytest.raises(ConfigError, match=r"toyshift\.seed"):
        validate_config({"toyshift": {"seed": "x1"}}, SCHEMA)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"finetune": {"lpft": {"freeze_bn": True}}}, "'finetune.lpft.freeze_bn' was replaced"),
        (
            {"dataset_settings": {"mine": {"finetune": {"ft": {"freeze_bn": False}}}}},
            "'dataset_settings.mine.finetune.ft.freeze_bn' was replaced by "
            "'dataset_settings.mine.finetune.ft.bn' (train, frozen, frozen_adapt): write bn: train",
        ),
        ({"finetune": {"ft": {"bn": "eval"}}}, "'finetune.ft.bn': 'eval' is not one of"),
        ({"finetune": {"lpft": {"clip_grad_norm": -1}}}, "'finetune.lpft.clip_grad_norm'"),
        ({"finetune": {"eval_every": 0}}, "'finetune.eval_every'"),
        (
            {"dataset_settings": {"mine": {"finetune": {"kd": {"bn": "frozen_adapt", "x": 1}}}}},
            "'x' under 'dataset_settings.mine.finetune.kd'",
        ),
    ],
)
def test_batchnorm_and_clipping_keys_are_checked_in_one_line(config, named):
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    message = str(error.value)
    assert named in message and "\n" not in message
