import json
import math

import pandas as pd
import pytest

from robustft.report import aggregate_dataset, interval90, summarize_runs
from robustft.selection import select_run


def run(seed, lr, id_val, id_test, real, clipart):
    return {
        "seed": seed,
        "lr": lr,
        "id_val": id_val,
        "id_test": id_test,
        "ood_real": real,
        "ood_clipart": clipart,
    }


def test_interval_is_1645_standard_errors():
    assert interval90([0.5]) == 0.0
    values = [0.90, 0.92, 0.94]
    assert interval90(values) == pytest.approx(1.645 * 0.02 / math.sqrt(3))


def test_row_means_over_seeds_and_ood_is_the_mean_of_splits():
    row = summarize_runs(
        method="ft",
        runs=[run(0, 0.1, 0.9, 0.8, 0.5, 0.7), run(1, 0.1, 0.9, 1.0, 0.3, 0.5)],
        ood_splits=["real", "clipart"],
        hparam_name="lr",
        hparam_value="0.1",
    )
    assert row["id"] == pytest.approx(0.9)
    assert row["ood"] == pytest.approx(0.5)
    assert row["ood_real"] == pytest.approx(0.4)
    assert row["ood_clipart"] == pytest.approx(0.6)
    assert row["seeds"] == 2 and row["hparam"] == "lr=0.1"


def write_runs(tmp_path, runs):
    paths = []
    for item in runs:
        path = tmp_path / f"lr{item['lr']}" / f"seed{item['seed']}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(item))
        paths.append(path)
    return paths


def test_select_run_takes_the_best_mean_id_val_over_seeds(tmp_path):
    # lr 0.1 has the single best seed, but 0.01 the best mean.
    paths = write_runs(
        tmp_path,
        [
            run(0, 0.1, 0.99, 0, 0, 0),
            run(1, 0.1, 0.50, 0, 0, 0),
            run(0, 0.01, 0.80, 0, 0, 0),
            run(1, 0.01, 0.80, 0, 0, 0),
        ],
    )
    selection = select_run(metrics_files=paths, out_path=tmp_path / "selected.json")
    assert selection["lr"] == 0.01
    assert [r["seed"] for r in selection["runs"]] == [0, 1]
    assert json.loads((tmp_path / "selected.json").read_text())["lr"] == 0.01


def test_dataset_table_has_a_row_per_method(tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(
        json.dumps({"C": 0.1, "id_val": 0.8, "id_test": 0.8, "ood_real": 0.7, "ood_clipart": 0.6})
    )
    paths = write_runs(tmp_path, [run(0, 0.1, 0.9, 0.9, 0.5, 0.5)])
    select_run(metrics_files=paths, out_path=tmp_path / "ft.json")
    table = aggregate_dataset(
        dataset="toy",
        sources={"lp/bb": [str(probe)], "ft/bb": str(tmp_path / "ft.json")},
        ood_splits=["real", "clipart"],
        csv_path=tmp_path / "t.csv",
        md_path=tmp_path / "t.md",
    )
    assert list(table["method"]) == ["lp", "ft"]
    assert list(table["hparam"]) == ["C=0.1", "lr=0.1"]
    written = pd.read_csv(tmp_path / "t.csv")
    assert written["ood"].tolist() == pytest.approx([0.65, 0.5])
    markdown = (tmp_path / "t.md").read_text()
    assert "| lp " in markdown and "65.0 ± 0.0" in markdown


def test_select_run_never_chooses_a_point_with_a_collapsed_run(tmp_path):
    # lr 0.1 has the best mean ID val, but one of its seeds collapsed (its epoch 0, the probe,
    # is what the run would report): lr 0.01 is chosen, and the collapse is listed.
    collapsed = {**run(1, 0.1, 0.95, 0.9, 0.9, 0.9), "diverged": True, "collapse": "fell"}
    paths = write_runs(
        tmp_path,
        [run(0, 0.1, 0.99, 0, 0, 0), collapsed, run(0, 0.01, 0.8, 0, 0, 0)],
    )
    selection = select_run(metrics_files=paths, out_path=tmp_path / "selected.json")
    assert selection["lr"] == 0.01
    assert not selection["all_diverged"]
    assert [(r["run"], r["seed"]) for r in selection["diverged_runs"]] == [("lr0.1", 1)]


def test_a_sweep_that_collapsed_everywhere_is_reported_as_such_not_as_a_number(tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(
        json.dumps({"C": 0.1, "id_val": 0.8, "id_test": 0.8, "ood_real": 0.7, "ood_clipart": 0.6})
    )
    runs = [
        {**run(seed, lr, 0.8, 0.8, 0.7, 0.6), "diverged": True, "collapse": "fell to chance"}
        for seed in (0, 1, 2)
        for lr in (0.1, 0.01)
    ]
    select_run(metrics_files=write_runs(tmp_path, runs), out_path=tmp_path / "lpft.json")
    table = aggregate_dataset(
        dataset="toy",
        sources={"lp/bb": [str(probe)], "lpft/bb": str(tmp_path / "lpft.json")},
        ood_splits=["real", "clipart"],
        csv_path=tmp_path / "t.csv",
        md_path=tmp_path / "t.md",
    )
    row = table[table["method"] == "lpft"].iloc[0]
    assert math.isnan(row["id"]) and math.isnan(row["ood"])
    assert row["diverged"] == "6/6"
    markdown = (tmp_path / "t.md").read_text()
    assert "all 6 runs diverged" in markdown
    assert "80.0" not in markdown.split("lpft")[1]  # the probe's numbers are not LP-FT's


def test_a_selected_point_at_chance_is_flagged_not_reported_as_a_number(tmp_path):
    """A sweep whose best point never left chance (too few epochs, an lr grid that misses)
    learned nothing: its row says so instead of showing 50.0 as if it were a result."""
    chance = {  # 2σ = 10 points
        "chance_id_val": 0.5,
        "id_val_examples": 100,
        "chance_id_test": 0.5,
        "id_test_examples": 100,
    }
    at_chance = [{**run(seed, 0.01, 0.55, 0.5, 0.5, 0.5), **chance} for seed in (0, 1)]
    learned = [{**run(seed, 0.01, 0.65, 0.6, 0.6, 0.6), **chance} for seed in (0, 1)]
    older = [run(seed, 0.01, 0.55, 0.5, 0.5, 0.5) for seed in (0, 1)]  # no chance recorded
    # A val set too small to tell (2σ = 71 points on 2 images) does not flag a run that
    # scores far above chance on test.
    tiny_val = [
        {**run(seed, 0.01, 1.0, 0.95, 0.5, 0.5), **chance, "id_val_examples": 2} for seed in (0, 1)
    ]
    sources = {}
    for name, runs in (("ft", at_chance), ("lpft", learned), ("kd", older), ("lora", tiny_val)):
        folder = tmp_path / name
        folder.mkdir()
        select_run(metrics_files=write_runs(folder, runs), out_path=folder / "selected.json")
        sources[f"{name}/bb"] = str(folder / "selected.json")
    table = aggregate_dataset(
        dataset="toy",
        sources=sources,
        ood_splits=["real", "clipart"],
        csv_path=tmp_path / "t.csv",
        md_path=tmp_path / "t.md",
    ).set_index("method")
    assert math.isnan(table.loc["ft", "id"]) and math.isnan(table.loc["ft", "ood"])
    assert table.loc["ft", "hparam"] == "lr=0.01" and table.loc["ft", "seeds"] == 2
    assert table.loc["ft", "note"] == (
        "at chance: ID val 55.0% (majority class 50.0%) and ID test 50.0% (majority class "
        "50.0%), within 2σ; it learned nothing"
    )
    assert table.loc["lpft", "id"] == pytest.approx(0.6)
    assert table.loc["kd", "id"] == pytest.approx(0.5)  # results from before: as they were
    assert table.loc["lora", "id"] == pytest.approx(0.95)
    markdown = (tmp_path / "t.md").read_text()
    assert "at chance" in markdown and "50.0 ±" not in markdown.split("| ft")[1].split("\n")[0]


def test_a_wiseft_interpolation_at_chance_is_flagged_not_reported_as_a_number(tmp_path):
    """WiSE-FT's row reads its curves, which record chance as runs do: an interpolation that
    learned nothing says so; one that learned, and curves from before, give their numbers."""
    chance = {
        "chance_id_val": 0.5,
        "id_val_examples": 100,
        "chance_id_test": 0.5,
        "id_test_examples": 100,
    }

    def curves(name: str, accuracy: float, recorded: dict) -> list[str]:
        paths = []
        for seed in (0, 1):
            path = tmp_path / name / f"seed{seed}.csv"
            path.parent.mkdir(exist_ok=True)
            rows = [
                {"method": "ft", "run": "lr0.01", "seed": seed, "alpha": alpha, "id_val": accuracy,
                 "id_test": accuracy, "ood_real": accuracy, "ood_clipart": accuracy, **recorded}
                for alpha in (0.0, 0.5, 1.0)
            ]  # fmt: skip
            pd.DataFrame(rows).to_csv(path, index=False)
            paths.append(str(path))
        return paths

    tables = {}
    for name, accuracy, recorded in (
        ("at_chance", 0.52, chance),
        ("learned", 0.7, chance),
        ("older", 0.52, {}),
    ):
        tables[name] = aggregate_dataset(
            dataset="toy",
            sources={
                "wiseft/bb": {
                    "curves": curves(name, accuracy, recorded),
                    "alpha": 0.5,
                    "endpoint": "ft",
                }
            },
            ood_splits=["real", "clipart"],
            csv_path=tmp_path / f"{name}.csv",
            md_path=tmp_path / f"{name}.md",
        ).iloc[0]
    assert math.isnan(tables["at_chance"]["id"]) and math.isnan(tables["at_chance"]["ood"])
    assert tables["at_chance"]["note"].startswith("at chance: ID val 52.0% (majority class 50.0%)")
    assert "52.0 ±" not in (tmp_path / "at_chance.md").read_text()
    assert tables["learned"]["id"] == pytest.approx(0.7)
    assert tables["older"]["id"] == pytest.approx(0.52)  # results from before: as they were


def test_effective_robustness_refuses_a_baseline_made_from_other_data(tmp_path):
    import pytest

    from robustft.analysis import effective_robustness_table

    def metrics(name, fingerprint, id_test):
        path = tmp_path / name / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(
            json.dumps(
                {
                    "seed": 0,
                    "best_epoch": 1,
                    "id_test": id_test,
                    "ood_x": id_test / 2,
                    "data_fingerprint": fingerprint,
                }
            )
        )
        return path

    baselines = [metrics("b1", "aa" * 32, 0.6), metrics("b2", "aa" * 32, 0.8)]
    probe = metrics("seed0", "aa" * 32, 0.7)
    args = dict(dataset="d", ood_splits=["x"], selection_files={})
    table, _ = effective_robustness_table(
        baseline_files=baselines, probe_files={"b": [probe]}, **args
    )
    assert len(table) == 3
    stale = metrics("b3", "bb" * 32, 0.7)
    with pytest.raises(ValueError, match=r"b3/metrics.json: data_fingerprint bbbbbbbbbbbb differs"):
        effective_robustness_table(
            baseline_files=[*baselines, stale], probe_files={"b": [probe]}, **args
        )
