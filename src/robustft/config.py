"""Configuration: validation against the JSON schema, and canonical hyper-parameter spelling.

Imported by the Snakefile at parse time, so it must stay light (no torch, no sklearn).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from robustft.methods.spec import BUILTIN, STAGE_METHODS, Method, MethodError, method_table

# Backbone names become folder names and Snakemake wildcards: timm names with their
# pretrained tag (`resnet50.tv_in1k`), no slashes, no `..`.
BACKBONE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class ConfigError(ValueError):
    """A config key or value is wrong. The message is one line and names the key."""


NAME_PATTERN = "^[A-Za-z0-9_]+$"  # the schema's pattern for dataset and split names


def format_hparam(value: float | int | str) -> str:
    """One spelling per value, so that `1e-3`, `0.001` and "1.0e-3" name the same folder."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"not a number: {value!r}") from None
    return f"{number:g}"


# Hyper-parameters a fine-tuning method sweeps besides lr come from its entry in the method
# table (`robustft.methods`, `Method.swept`): {folder key: config key of its grid under
# finetune.<method>}. A run folder is "lr{lr}" then "-{key}{value}" for each, e.g.
# lr0.01-alpha0.1, every value in its format_hparam spelling.
_FOLDER_PART = re.compile(r"([a-z]+)([0-9][0-9.e+-]*?)(?=-[a-z]|$)")


def hparam_folder(hparams: Mapping[str, float | int | str]) -> str:
    """The run folder name of one point of a sweep: lr first, then the others in given order."""
    if "lr" not in hparams:
        raise ValueError(f"hyper-parameters {dict(hparams)} lack 'lr'")
    others = [key for key in hparams if key != "lr"]
    return "-".join(f"{key}{format_hparam(hparams[key])}" for key in ["lr", *others])


def parse_hparam_folder(name: str) -> dict[str, float]:
    """Inverse of `hparam_folder`: "lr0.01-alpha0.1" → {"lr": 0.01, "alpha": 0.1}."""
    parts = _FOLDER_PART.findall(name)
    if not parts or "-".join(key + value for key, value in parts) != name:
        raise ValueError(f"{name!r} is not a run folder name such as lr0.01 or lr0.01-alpha0.1")
    values = {key: float(value) for key, value in parts}
    if "lr" not in values:
        raise ValueError(f"{name!r}: run folder names start with lr")
    return values


def load_schema(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _key_path(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    key = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = (
            sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        )
        where = "" if key == "<top level>" else f" under '{key}'"
        names = ", ".join(repr(name) for name in extra) or "?"
        return f"unknown config key {names}{where}; allowed: {', '.join(allowed)}"
    if error.validator == "enum":
        choices = ", ".join(str(choice) for choice in error.validator_value)
        return f"config key '{key}': {error.instance!r} is not one of: {choices}"
    if error.validator == "pattern" and error.validator_value == NAME_PATTERN:
        return (
            f"config key '{key}': {error.instance!r} is not a name of letters, digits and "
            "underscores (names appear in paths, wildcards and table columns)"
        )
    if error.validator == "pattern":
        # The schema's other patterns are for numbers that YAML or --config left as strings.
        return f"config key '{key}': {error.instance!r} is not a positive number"
    if error.validator in {"oneOf", "anyOf"} and error.context:
        # Report the branch that got furthest, not jsonschema's summary of all branches.
        return _describe(jsonschema.exceptions.best_match(error.context))
    return f"config key '{key}': {error.message}"


def _fill_defaults(validator_class: type) -> type:
    """Extend a validator so that missing keys get the schema's `default` (as Snakemake does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = _copy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def coerce_strings(value: Any, schema: Mapping[str, Any]) -> Any:
    """Turn strings into the scalar type the schema asks for.

    Snakemake's `--config` parses nested values with YAML's BaseLoader, so
    `--config seeds='[0, 1]'` arrives as ["0", "1"]. Strings that do not parse stay strings,
    and validation then names them.
    """
    expected = schema.get("type")
    if isinstance(expected, list):  # e.g. [integer, "null"]: coerce to the non-null type
        types = [kind for kind in expected if kind != "null"]
        expected = types[0] if len(types) == 1 else None
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return {
            key: coerce_strings(item, properties.get(key, extra)) for key, item in value.items()
        }
    if isinstance(value, list):
        return [coerce_strings(item, schema.get("items", {})) for item in value]
    if not isinstance(value, str) or not isinstance(expected, str):
        return value
    try:
        if expected == "integer":
            return int(value)
        if expected == "number":
            return float(value)
    except ValueError:
        return value
    if expected == "boolean" and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    return value


def validate_config(config: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults into `config` in place and check it; raise ConfigError (one line) if wrong.

    The method names the schema allows, and the keys of a user's own method, come from the
    method table (`robustft.methods`), with the user's entry points imported first.
    """
    _check_renamed_keys(config)
    schema = with_method_table(schema, finetune=config.get("finetune"))
    config.update(coerce_strings(config, schema))
    validator = _fill_defaults(jsonschema.Draft7Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(jsonschema.exceptions.best_match(errors)))
    _check_cross_references(config)
    return config


def _check_renamed_keys(config: Mapping[str, Any]) -> None:
    """Keys of earlier versions, named with their replacement (more useful than 'unknown')."""
    sections = [("finetune", config.get("finetune"))] + [
        (f"dataset_settings.{name}.finetune", (own or {}).get("finetune"))
        for name, own in (config.get("dataset_settings") or {}).items()
        if isinstance(own, Mapping)
    ]
    for where, section in sections:
        for method, own in (section or {}).items() if isinstance(section, Mapping) else ():
            if isinstance(own, Mapping) and "freeze_bn" in own:
                mode = "frozen" if own["freeze_bn"] in (True, "true", "True") else "train"
                raise ConfigError(
                    f"config key '{where}.{method}.freeze_bn' was replaced by "
                    f"'{where}.{method}.bn' (train, frozen, frozen_adapt): write bn: {mode}"
                )


def _check_cross_references(config: dict[str, Any]) -> None:
    """Checks a JSON schema cannot express: values that must agree with one another."""
    for method in config["methods"]:
        if method in STAGE_METHODS:
            continue
        grid = config["finetune"][method]["lr_grid"]
        spellings = [format_hparam(lr) for lr in grid]
        if any(float(lr) <= 0 for lr in grid):
            raise ConfigError(f"config key 'finetune.{method}.lr_grid': learning rates must be > 0")
        if len(set(spellings)) != len(spellings):
            raise ConfigError(
                f"config key 'finetune.{method}.lr_grid': duplicate learning rate in {grid}"
            )
    if "wiseft" in config["methods"]:
        wiseft = config["wiseft"]
        endpoints = [m for m in wiseft["methods"] if m in config["methods"]]
        if not endpoints:
            raise ConfigError(
                f"config key 'wiseft.methods': none of {wiseft['methods']} is in 'methods'"
            )
        if not any(abs(a - wiseft["report_alpha"]) < 1e-9 for a in wiseft["alpha_grid"]):
            raise ConfigError(
                f"config key 'wiseft.report_alpha': {wiseft['report_alpha']} is not in "
                "wiseft.alpha_grid"
            )
    if "soups" in config["methods"]:
        bases = [m for m in config["soups"]["methods"] if m in config["methods"]]
        if not bases:
            raise ConfigError(
                f"config key 'soups.methods': none of {config['soups']['methods']} is in 'methods'"
            )
    c_grid = config["probe"]["c_grid"]
    if c_grid["log10_min"] > c_grid["log10_max"]:
        raise ConfigError(
            f"config key 'probe.c_grid': log10_min {c_grid['log10_min']} is above "
            f"log10_max {c_grid['log10_max']}"
        )
    for dataset, own in (config.get("dataset_settings") or {}).items():
        for method in method_table(config["finetune"]):
            grid = (((own or {}).get("finetune") or {}).get(method) or {}).get("lr_grid")
            spellings = [format_hparam(lr) for lr in grid or []]
            if len(set(spellings)) != len(spellings):
                raise ConfigError(
                    f"config key 'dataset_settings.{dataset}.finetune.{method}.lr_grid': "
                    f"duplicate learning rate in {grid}"
                )
    for index, name in enumerate(config["backbones"]):
        if not BACKBONE_NAME.fullmatch(name) or ".." in name:
            raise ConfigError(
                f"config key 'backbones[{index}]': {name!r} is not a backbone name (toyresnet, "
                "moco_v2_resnet50, or a timm model name such as resnet50.tv_in1k)"
            )
    if len(set(config["seeds"])) != len(config["seeds"]):
        raise ConfigError(f"config key 'seeds': duplicate seed in {config['seeds']}")
    toyshift = config.get("toyshift")
    if toyshift and "toyshift" in config["datasets"]:
        counts = toyshift["pretrain_images_per_class"]
        if sum(counts.values()) == 0:
            raise ConfigError("config key 'toyshift.pretrain_images_per_class': all counts are 0")


def with_method_table(
    schema: Mapping[str, Any], *, finetune: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The schema with its method enums read from the method table, and a section for each
    user method under `finetune` (and the per-dataset overrides) built from its entry: its
    grids, its fixed options with their defaults, and what every method has."""
    try:
        table = method_table(finetune if isinstance(finetune, Mapping) else None)
    except MethodError as error:
        raise ConfigError(str(error)) from None
    schema = _copy(dict(schema))
    properties = schema["properties"]
    names = [STAGE_METHODS[0], *table, *STAGE_METHODS[1:]]
    properties["methods"]["items"]["enum"] = names
    properties["wiseft"]["properties"]["methods"]["items"]["enum"] = list(table)
    properties["soups"]["properties"]["methods"]["items"]["enum"] = list(table)
    sections = properties["finetune"]["properties"]
    overrides = properties["dataset_settings"]["additionalProperties"]["properties"]["finetune"]
    for name, method in table.items():
        if name not in BUILTIN:
            sections[name] = _user_section(method, template=sections["ft"])
            overrides["properties"][name] = _copy(overrides["properties"]["ft"])
            overrides["properties"][name]["description"] = f"Overrides for {name}."
    return schema


def _user_section(method: Method, *, template: Mapping[str, Any]) -> dict[str, Any]:
    section = _copy(dict(template))
    section["description"] = method.description or f"Settings of the method {method.name!r}."
    section["properties"]["entry"] = {
        "description": "The entry point that returns this method (module:function).",
        "type": "string",
    }
    del section["properties"]["lr_grid"]["default"]
    section["required"] = ["entry", "lr_grid", *method.swept.values()]
    for grid in method.swept.values():
        section["properties"][grid] = {
            "description": f"Values of {grid.removesuffix('_grid')} to try (swept with lr).",
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "number"},
        }
    for key, default in method.options.items():
        section["properties"][key] = {"description": f"Fixed option {key}.", "default": default}
    return section


def grid_keys(method: Method) -> set[str]:
    return {"lr_grid", *method.swept.values()}
