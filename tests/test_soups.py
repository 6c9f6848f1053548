"""Model soups, expected calibration error and stored predictions."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robustft.evaluate import subset_accuracy
from robustft.robustness import expected_calibration_error
from robustft.soups import greedy_soup, state_dict_sha256, uniform_soup

# --- expected calibration error ------------------------------------------------------------


def logits_with_confidence(confidences, classes=3):
    """Logits whose softmax puts `p` on class 0 and the rest evenly on the others."""
    rows = []
    for p in confidences:
        rest = (1 - p) / (classes - 1)
        rows.append(np.log([p, *([rest] * (classes - 1))]))
    return np.array(rows)


def test_ece_is_zero_when_confidence_equals_accuracy_in_every_bin():
    # 10 predictions at 70% confidence, 7 of them right; 20 at 95%, 19 of them right.
    confidences = [0.7] * 10 + [0.95] * 20
    labels = [0] * 7 + [1] * 3 + [0] * 19 + [2]
    ece = expected_calibration_error(
        logits=logits_with_confidence(confidences), labels=np.array(labels)
    )
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_a_hand_computed_value():
    # (confidence, right?): bins of width 1/15: 0.9 → (0.867, 0.933]; 0.62 and 0.64 →
    # (0.6, 0.667]; 0.55 → (0.533, 0.6].
    confidences = [0.9, 0.9, 0.62, 0.64, 0.55]
    labels = np.array([0, 1, 0, 2, 1])  # class 0 is always the prediction
    expected = 2 / 5 * abs(0.5 - 0.9) + 2 / 5 * abs(0.5 - 0.63) + 1 / 5 * abs(0.0 - 0.55)
    ece = expected_calibration_error(logits=logits_with_confidence(confidences), labels=labels)
    assert ece == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.322)
    # One bin: the gap of the means, |2/5 − mean confidence|.
    one_bin = expected_calibration_error(
        logits=logits_with_confidence(confidences), labels=labels, num_bins=1
    )
    assert one_bin == pytest.approx(abs(2 / 5 - np.mean(confidences)), abs=1e-12)


def test_ece_over_a_class_subset_uses_the_subset_softmax():
    # Class 2 is outside the subset: its huge logit must not lower the confidence.
    logits = np.array([[np.log(0.9), np.log(0.1), 50.0]])
    ece = expected_calibration_error(logits=logits, labels=np.array([0]), class_subset=[0, 1])
    assert ece == pytest.approx(0.1, abs=1e-12)


# --- soups: pure functions -----------------------------------------------------------------


def toy_state(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_greedy_soup_of_one_run_is_that_run():
    state = toy_state(0)
    soup = greedy_soup(val_accuracy={"lr0.1": 0.5}, load=lambda name: state, evaluate=lambda s: 0.5)
    assert soup.ingredients == ["lr0.1"]
    assert state_dict_sha256(soup.state_dict) == state_dict_sha256(state)


def test_uniform_soup_of_identical_runs_equals_each_of_them():
    state = toy_state(1)
    soup = uniform_soup(state_dicts=[toy_state(1) for _ in range(5)])
    for key, value in state.items():
        assert soup[key].dtype == value.dtype
        assert torch.equal(soup[key], value), key


def test_uniform_soup_is_the_mean_and_keeps_integer_entries_of_the_first():
    first, second = toy_state(2), toy_state(3)
    second["1.num_batches_tracked"] = torch.tensor(7)
    soup = uniform_soup(state_dicts=[first, second])
    torch.testing.assert_close(soup["0.weight"], (first["0.weight"] + second["0.weight"]) / 2)
    assert soup["1.num_batches_tracked"] == first["1.num_batches_tracked"]
    with pytest.raises(ValueError, match="shapes"):
        uniform_soup(state_dicts=[first, {**second, "0.weight": torch.zeros(2, 2)}])


def two_blobs(seed, n=200):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    return centres[labels] + torch.randn(n, 4, generator=generator), labels


def test_greedy_soup_scores_at_least_its_best_member_on_id_val():
    """Runs trained from one start at several learning rates, as a sweep's runs of one seed."""
    train_x, train_y = two_blobs(0)
    val_x, val_y = two_blobs(1, n=100)
    start = toy_state(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    runs = {}
    for lr in (0.3, 0.1, 0.03, 0.01):
        model.load_state_dict(start)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        for _ in range(20):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(train_x), train_y).backward()
            optimizer.step()
        runs[f"lr{lr}"] = {key: value.clone() for key, value in model.state_dict().items()}

    def val_accuracy(state):
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            return float((model(val_x).argmax(1) == val_y).float().mean())

    member_scores = {name: val_accuracy(state) for name, state in runs.items()}
    soup = greedy_soup(val_accuracy=member_scores, load=runs.__getitem__, evaluate=val_accuracy)
    assert soup.ingredients[0] == max(member_scores, key=member_scores.get)
    assert soup.val_accuracy >= max(member_scores.values())
    assert soup.val_accuracy == val_accuracy(soup.state_dict)
    # Every step kept exactly the runs that did not lower the soup's ID val.
    best = soup.steps[0]["val_accuracy"]
    for step in soup.steps[1:]:
        assert step["kept"] == (step["val_accuracy"] >= best)
        best = max(best, step["val_accuracy"]) if step["kept"] else best
    assert [step["run"] for step in soup.steps if step["kept"]] == soup.ingredients


# --- the stages on a tiny toyshift task ----------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep of FT on the tiny task: two learning rates × two seeds, and its selection."""
    from fake_data import write_tiny_toyshift_job

    from robustft.selection import select_run
    from robustft.stages import run_finetune

    root = write_tiny_toyshift_job(tmp_path_factory.mktemp("sweep"), train_per_class=8, width=4)
    metrics_files = []
    for lr, seed in (("0.01", 0), ("0.03", 0), ("0.01", 1), ("0.03", 1)):
        out = root / "runs" / f"lr{lr}" / f"seed{seed}"
        run_finetune(
            method="ft",
            dataset="toyshift",
            data_root=root / "data",
            model_dir=root / "backbone",
            out_dir=out,
            ood_splits=["real", "clipart"],
            lr=float(lr),
            seed=seed,
            epochs=2,
            batch_size=8,
            momentum=0.9,
            weight_decay=0.0,
            bn="frozen",
            augment=False,
            progress=False,
            data_fingerprint="da7a" * 16,
        )
        metrics_files.append(out / "metrics.json")
    select_run(metrics_files=metrics_files, out_path=root / "selected.json")
    return root, metrics_files


def test_runs_record_ece_in_history_and_metrics(sweep):
    _, metrics_files = sweep
    metrics = json.loads(metrics_files[0].read_text())
    history = pd.read_csv(metrics_files[0].parent / "history.csv")
    for split in ("id_val", "id_test", "ood_real", "ood_clipart"):
        ece = history[f"ece_{split}"]
        assert ((ece >= 0) & (ece <= 1)).all(), split
        assert metrics[f"ece_{split}"] == pytest.approx(ece[metrics["best_epoch"]])


def test_ft_runs_of_one_seed_share_their_start_and_seeds_differ(sweep):
    _, metrics_files = sweep
    init = [json.loads(path.read_text())["init_sha256"] for path in metrics_files]
    assert init[0] == init[1] and init[2] == init[3] and init[0] != init[2]


def test_stored_logits_reproduce_the_history_accuracy_at_the_best_epoch(sweep, tmp_path):
    from robustft.predictions import read_predictions
    from robustft.stages.predictions import store_predictions

    root, _ = sweep
    out = tmp_path / "ft.h5"
    store_predictions(
        method="ft",
        dataset="toyshift",
        data_root=root / "data",
        model_dir=root / "backbone",
        selection_file=root / "selected.json",
        ood_splits=["real", "clipart"],
        out_path=out,
        data_fingerprint="da7a" * 16,
    )
    selection = json.loads((root / "selected.json").read_text())
    stored = read_predictions(out)
    assert sorted(stored) == [0, 1]
    import h5py

    with h5py.File(out) as handle:
        assert handle["seed0/id_val/logits"].dtype == np.float16
        assert handle.attrs["run"] == selection["run"]
        assert json.loads(handle.attrs["class_names"])
    for run in selection["runs"]:
        history = pd.read_csv(run["path"].replace("metrics.json", "history.csv"))
        best = history.iloc[run["best_epoch"]]
        for split, predictions in stored[run["seed"]].items():
            accuracy = subset_accuracy(predictions.logits, predictions.labels)
            assert accuracy == pytest.approx(best[split], abs=1e-9), (run["seed"], split)
            ece = expected_calibration_error(logits=predictions.logits, labels=predictions.labels)
            assert ece == pytest.approx(best[f"ece_{split}"], abs=2e-3)  # float16 logits


def test_soups_of_each_seed(sweep, tmp_path):
    from robustft.predictions import read_predictions
    from robustft.stages.soups import run_soups

    root, metrics_files = sweep
    summary = run_soups(
        method="ft",
        dataset="toyshift",
        data_root=root / "data",
        model_dir=root / "backbone",
        metrics_files=metrics_files,
        ood_splits=["real", "clipart"],
        seeds=[0, 1],
        out_path=tmp_path / "soups.json",
        weights_dir=tmp_path / "weights",
        predictions_paths={kind: tmp_path / f"{kind}.h5" for kind in ("uniform", "greedy")},
        data_fingerprint="da7a" * 16,
    )
    assert json.loads((tmp_path / "soups.json").read_text())["soups"] == json.loads(
        json.dumps(summary["soups"])
    )
    runs = [json.loads(path.read_text()) for path in metrics_files]
    for record in summary["soups"]["greedy"]:
        steps = record["steps"]
        assert record["id_val"] >= steps[0]["val_accuracy"]  # never below its best run
        own = [run for run in runs if run["seed"] == record["seed"]]
        assert steps[0]["run"] == max(own, key=lambda run: run["id_val"])["run"]
        assert record["ingredients"] == [step["run"] for step in steps if step["kept"]]
    for record in summary["soups"]["uniform"]:
        assert sorted(record["ingredients"]) == ["lr0.01", "lr0.03"]
        assert set(record) >= {"id_val", "id_test", "ood_real", "ece_id_test", "ece_ood_real"}
        assert (tmp_path / "weights" / f"seed{record['seed']}" / "uniform.safetensors").exists()
    stored = read_predictions(tmp_path / "uniform.h5")
    for record in summary["soups"]["uniform"]:
        predictions = stored[record["seed"]]["id_test"]
        accuracy = subset_accuracy(predictions.logits, predictions.labels)
        assert accuracy == pytest.approx(record["id_test"], abs=1e-9)


def test_a_soup_refuses_runs_from_different_starts(sweep, tmp_path):
    from robustft.stages.soups import check_shared_initialisation

    _, metrics_files = sweep
    runs = [{**json.loads(p.read_text()), "path": str(p)} for p in metrics_files]
    with pytest.raises(ValueError, match=r"share an initialisation.*soups\.methods"):
        check_shared_initialisation(method="ft", runs=[runs[0], runs[2]])
    # Beside a run that records it, a run without the hash is stale.
    with pytest.raises(ValueError, match=r"init_sha256.*forcerun finetune"):
        check_shared_initialisation(method="ft", runs=[runs[0], {**runs[1], "init_sha256": None}])
    # Runs from before the hash: their probe heads, where recorded, must agree.
    old = [{**run, "init_sha256": None} for run in runs[:2]]
    assert check_shared_initialisation(method="ft", runs=old) == ""
    heads = [{**old[0], "probe_head_sha256": "a" * 64}, {**old[1], "probe_head_sha256": "b" * 64}]
    with pytest.raises(ValueError, match="probe_head_sha256"):
        check_shared_initialisation(method="lpft", runs=heads)
