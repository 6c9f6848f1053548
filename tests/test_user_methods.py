"""A researcher's own fine-tuning methods, from the config only: one defined in the tests
(outside the package) and the example in examples/, each with its row in every output."""

import base64
import re

import pandas as pd
import pytest
import yaml
from test_workflow import ROOT, TINY, snakemake

pytestmark = pytest.mark.workflow
USER_METHODS = ("smoothed", "freeze_early")


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("user_methods")
    config = yaml.safe_load(TINY.read_text())
    config["methods"] = ["lp", "ft", *USER_METHODS, "wiseft"]
    config["finetune"].update(
        smoothed={
            "entry": f"{ROOT}/tests/method_fixtures.py:smoothed",
            "lr_grid": [1e-2],
            "smoothing": 0.2,
            "bn": "frozen",
        },
        freeze_early={
            "entry": f"{ROOT}/examples/freeze_early.py:make_method",
            "lr_grid": [1e-2],
            "frozen_grid": [0.5],
            "bn": "frozen",
        },
    )
    config["wiseft"]["methods"] = ["ft"]
    config_file = workdir / "user.yaml"
    config_file.write_text(yaml.safe_dump(config))
    snakemake("--cores", "2", "--configfile", str(config_file), cwd=workdir)
    snakemake("--configfile", str(config_file), "--report", "results/report.html", cwd=workdir)
    return workdir


def test_user_methods_have_a_row_in_every_table(user_run):
    summary = pd.read_csv(user_run / "results/tables/summary.csv")
    assert list(summary["method"]) == ["lp", "ft", *USER_METHODS, "wiseft"]
    rows = summary.set_index("method")
    assert rows.loc["freeze_early", "hparam"] == "lr=0.01, frozen=0.5"
    er = pd.read_csv(user_run / "results/analysis/er/toyshift.csv")
    distortion = pd.read_csv(user_run / "results/analysis/distortion/toyshift.csv")
    for method in USER_METHODS:
        assert (er["method"] == method).any(), method
        assert (distortion["method"] == method).any(), method


def test_user_methods_run_their_own_hooks(user_run):
    import json

    runs = user_run / "results/finetune"
    config = json.loads((runs / "smoothed/toyresnet/toyshift/lr0.01/seed0/config.json").read_text())
    assert config["method_options"]["smoothing"] == 0.2
    frozen = runs / "freeze_early/toyresnet/toyshift/lr0.01-frozen0.5/seed0/model.safetensors"
    pretrained = user_run / "resources/models/toyresnet/model.safetensors"
    from safetensors.torch import load_file

    tuned, before = load_file(str(frozen)), load_file(str(pretrained))
    first = next(name for name in before if name.endswith("weight"))
    assert (tuned[f"backbone.{first}"] == before[first]).all()  # frozen: as pretrained


def test_the_report_holds_the_user_methods(user_run):
    html = (user_run / "results/report.html").read_text()
    decoded = "".join(
        base64.b64decode(chunk + "=" * (-len(chunk) % 4)).decode("utf-8", "ignore")
        for chunk in re.findall(r"base64,([A-Za-z0-9+/=]+)", html)
    )
    for method in USER_METHODS:
        assert method in html + decoded, method
