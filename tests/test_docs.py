"""The documentation: the site builds strictly, the configuration page is the schema, the
examples in it are configs the workflow accepts, and the README stays short."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from robustft.config import load_schema, validate_config, with_method_table
from robustft.methods import BUILTIN

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
# The keywords the schema may use; anything else under a key is a YAML slip (a flow mapping
# `{description: a, b, ...}` cut at its comma makes `b` a key).
KEYWORDS = {
    "$schema", "title", "description", "type", "default", "enum", "properties",
    "additionalProperties", "required", "items", "minItems", "maxItems", "uniqueItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "pattern",
    "anyOf", "propertyNames",
}  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `mkdocs build --strict` writes it; any warning (a broken link or anchor, a
    page missing from the nav or the nav naming a missing page) fails the build."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def builtin_schema() -> dict:
    """The schema as the workflow validates a config of built-in methods."""
    return with_method_table(load_schema(SCHEMA), finetune=None)


def schema_keys(spec: dict, prefix: str = ""):
    """(dotted path, schema) of every key; `<*>` for any key of a mapping, `[]` for list items."""
    for name, child in spec.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        yield from schema_keys(child, path)
        for nested, suffix in (
            (child.get("additionalProperties"), ".<*>"),
            (child.get("items"), "[]"),
        ):
            if isinstance(nested, dict):
                yield from schema_keys(nested, path + suffix)


class _Tables(HTMLParser):
    """Text of the cells of every row of the generated tables, by their `data-robustft`."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self._table = dict(attrs).get("data-robustft") or ""
        elif tag == "tr" and self._table is not None:
            self.rows.setdefault(self._table, []).append([])
        elif tag == "td" and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def page_rows(site: Path, kind: str) -> dict[str, list[str]]:
    parser = _Tables()
    parser.feed((site / "configuration" / "index.html").read_text(encoding="utf-8"))
    rows = [row for row in parser.rows.get(kind, []) if row]
    by_key = {re.sub(r"<[^>]+>", "<*>", row[0]): row for row in rows}
    assert len(by_key) == len(rows), "a key is listed twice"
    return by_key


def json_types(spec: dict) -> list[str]:
    if "anyOf" in spec:
        return [kind for option in spec["anyOf"] for kind in json_types(option)]
    kinds = spec.get("type", [])
    return [kinds] if isinstance(kinds, str) else list(kinds)


def check_row(path: str, spec: dict, row: list[str], *, required: bool) -> None:
    _, type_cell, default_cell, description_cell = row
    for kind in json_types(spec) or ["any"]:
        assert kind in type_cell, f"{path}: type {kind} not in {type_cell!r}"
    for value in spec.get("enum", []):
        assert value is None or str(value) in type_cell, f"{path}: value {value} not listed"
    if "default" in spec:
        expected = json.dumps(spec["default"], ensure_ascii=False)
    else:
        expected = "required" if required else "—"
    assert default_cell == expected, f"{path}: default {default_cell!r}, schema {expected!r}"
    description = " ".join(spec["description"].split()).replace("`", "")
    assert description_cell == description, f"{path}: description differs from the schema"


def required_keys(schema: dict) -> set[str]:
    required = set()
    for path, spec in [("", schema), *schema_keys(schema)]:
        for container, suffix in ((spec, ""), (spec.get("additionalProperties"), ".<*>")):
            if isinstance(container, dict):
                prefix = f"{path}{suffix}." if path else ""
                required |= {prefix + name for name in container.get("required", [])}
        if isinstance(spec.get("items"), dict):
            required |= {f"{path}[].{name}" for name in spec["items"].get("required", [])}
    return required


def test_docs_build_strictly(site: Path) -> None:
    for page in ("configuration", "methods", "reliability", "slurm"):
        assert (site / page / "index.html").is_file()


def test_every_schema_key_has_a_description_and_only_schema_keywords() -> None:
    for path, spec in schema_keys(builtin_schema()):
        assert isinstance(spec.get("description"), str) and spec["description"].strip(), path
        assert set(spec) <= KEYWORDS, f"{path}: {sorted(set(spec) - KEYWORDS)} (YAML slip?)"


def test_configuration_page_lists_every_schema_key_with_type_default_and_description(
    site: Path,
) -> None:
    schema = builtin_schema()
    expected = dict(schema_keys(schema))
    rows = page_rows(site, "config-keys")
    assert sorted(rows) == sorted(expected)
    required = required_keys(schema)
    for path, spec in expected.items():
        check_row(path, spec, rows[path], required=path in required)


def test_configuration_page_lists_the_keys_a_method_of_your_own_adds(site: Path) -> None:
    entry = f"{ROOT / 'examples' / 'freeze_early.py'}:make_method"
    schema = with_method_table(load_schema(SCHEMA), finetune={"freeze_early": {"entry": entry}})
    builtin = dict(schema_keys(builtin_schema()))
    added = {path: spec for path, spec in schema_keys(schema) if path not in builtin}
    rows = page_rows(site, "user-method-keys")
    assert "finetune.freeze_early.frozen_grid" in added
    assert sorted(rows) == sorted(added)
    required = required_keys(schema)
    for path, spec in added.items():
        check_row(path, spec, rows[path], required=path in required)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_method_has_its_documented_section(site: Path, name: str) -> None:
    rows = page_rows(site, "config-keys")
    method = BUILTIN[name]
    for key in ["lr_grid", "bn", "clip_grad_norm", *method.swept.values(), *method.options]:
        assert f"finetune.{name}.{key}" in rows
    assert f"dataset_settings.<*>.finetune.{name}.lr_grid" in rows


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


def config_examples() -> list[tuple[str, dict]]:
    """Every YAML example of the docs and README whose keys are all config keys."""
    top = set(load_schema(SCHEMA)["properties"])
    examples = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for index, block in enumerate(yaml_blocks(page)):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and set(data) <= top:
                examples.append((f"{page.name}#{index}", data))
    return examples


@pytest.mark.parametrize(("where", "example"), config_examples())
def test_config_examples_in_the_docs_are_accepted(
    where: str, example: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # entry points are relative to where snakemake runs
    validate_config(copy.deepcopy(example), load_schema(SCHEMA))


def test_the_docs_hold_config_examples() -> None:
    assert len(config_examples()) >= 5


def test_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("\n") <= 300
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert "docs/configuration.md" in local
    for link in local:
        assert (ROOT / link).exists(), link
