"""The toyshift variants of configs/variants/ (docs/variants.md): each changes the default
experiment's ID domain and generator seed and nothing else, by the command its comment gives."""

import shlex
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_workflow import ROOT, planned_jobs, snakemake

from robustft.estimate import planned_jobs as plan

pytestmark = pytest.mark.workflow
VARIANTS = sorted((ROOT / "configs" / "variants").glob("*.yaml"))
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def documented_command(path: Path) -> list[str]:
    """The snakemake command of the file's leading comment, continuation lines joined."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if text.startswith(".venv/bin/snakemake") or (lines and lines[-1].endswith("\\")):
            lines.append(text)
    assert lines, f"{path.name} gives no command"
    return shlex.split(" ".join(line.rstrip("\\") for line in lines))


@pytest.fixture(scope="module")
def default_plan(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(tmp_path_factory.mktemp("default"))
    return plan(snakefile=ROOT / "Snakefile", configfiles=[ROOT / "config.yaml"], forceall=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_each_variant_has_its_own_id_domain_and_seed():
    assert len(VARIANTS) >= 2
    pairs = set()
    for path in VARIANTS:
        variant = yaml.safe_load(path.read_text())
        assert set(variant) == {"toyshift"}, "a variant changes only toyshift keys"
        toyshift = variant["toyshift"]
        assert toyshift["id_domain"] != DEFAULT["toyshift"]["id_domain"]
        assert toyshift["seed"] != DEFAULT["toyshift"]["seed"]
        pairs.add((toyshift["id_domain"], toyshift["seed"]))
    assert len({domain for domain, _ in pairs}) == len(VARIANTS)
    assert len({seed for _, seed in pairs}) == len(VARIANTS)


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.stem)
def test_variant_keeps_every_other_key_of_the_default(path, default_plan, tmp_path, monkeypatch):
    """A dry run from another directory, as the documented command does: the variant's keys
    replace the default's, every other key (the other toyshift keys too) stays config.yaml's,
    and the schema accepts the result (the Snakefile validates it)."""
    variant = yaml.safe_load(path.read_text())["toyshift"]
    monkeypatch.chdir(tmp_path)
    jobs, config = plan(
        snakefile=ROOT / "Snakefile", configfiles=[ROOT / "config.yaml", path], forceall=True
    )
    default_jobs, default_config = default_plan
    assert config["toyshift"] == {**default_config["toyshift"], **variant}
    assert {k: v for k, v in config.items() if k != "toyshift"} == {
        k: v for k, v in default_config.items() if k != "toyshift"
    }
    # The generator job gets the merged settings: the images are the variant's.
    (generate,) = [job for job in jobs if job.rule == "generate_toyshift"]
    assert generate.params["settings"] == config["toyshift"]
    assert Counter(job.rule for job in jobs) == Counter(job.rule for job in default_jobs)


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.stem)
def test_documented_command_plans_the_whole_dag_in_its_own_directory(path, default_plan, tmp_path):
    """The command of the file's comment, as a dry run into --directory tmp_path: it names
    config.yaml too (from another directory Snakemake would not find it and would run on the
    schema's defaults alone: 3 methods, 3 seeds) and plans the default's DAG there."""
    command = documented_command(path)
    assert command[0] == ".venv/bin/snakemake"
    args = command[1:]
    assert args[args.index("--configfile") + 1] == "config.yaml"
    args[args.index("--directory") + 1] = str(tmp_path)
    result = snakemake("-n", *args, cwd=ROOT)
    assert f"Working directory: {tmp_path}" in result.stdout
    assert planned_jobs(result.stdout) == dict(Counter(job.rule for job in default_plan[0]))
