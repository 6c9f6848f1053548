from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from robustft import synthetic
from robustft.config import ConfigError, load_schema, validate_config
from robustft.probe import (
    coarse_to_fine,
    fit_probe,
    fit_probe_torch,
    polish_candidates,
    refinement,
    run_probe,
    scalar_standardization,
)
from robustft.synthetic import bayes_accuracy, separation_for

ROOT = Path(__file__).resolve().parents[1]


def gaussian_mixture(n_per_class, *, classes=3, dim=20, separation=1.0, seed=0):
    """Features on an arbitrary scale and offset, as a network's are."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, separation, (classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    features = centers[labels] + rng.normal(0, 1, (len(labels), dim))
    return (5.0 * features + 3.0).astype(np.float32), labels


def test_probe_picks_the_c_with_the_best_val_accuracy():
    # Imbalanced training classes, balanced val: strong regularisation predicts the majority
    # class (val accuracy 1/3), so the right C is well inside the grid.
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 0.35, (3, 100))

    def sample(counts, seed):
        labels = np.repeat(np.arange(3), counts)
        noise = np.random.default_rng(seed).normal(0, 1, (len(labels), 100))
        return (5 * (centers[labels] + noise) + 3).astype(np.float32), labels

    train_x, train_y = sample([60, 15, 15], 1)
    val_x, val_y = sample([200, 200, 200], 2)
    grid = list(np.logspace(-6, 3, 10))
    result = fit_probe(
        train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, c_grid=grid, num_classes=3
    )
    val_accs = [row["val_acc"] for row in result.sweep]
    assert grid[int(np.argmax(val_accs))] == result.C
    assert val_accs[0] == pytest.approx(1 / 3)
    assert result.C >= 0.1
    assert (result.predict(val_x) == val_y).mean() == max(val_accs) > 0.85


def test_probe_on_a_separable_problem_is_perfect_and_converged():
    train_x, train_y = gaussian_mixture(50, separation=5.0, seed=1)
    val_x, val_y = gaussian_mixture(50, separation=5.0, seed=1)
    result = fit_probe(
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        c_grid=[1e-3, 1e-1, 10.0],
        num_classes=3,
    )
    assert (result.predict(val_x) == val_y).mean() == 1.0
    assert all(row["converged"] for row in result.sweep)


def test_probe_matches_scikit_learn_on_scalar_standardised_features():
    train_x, train_y = gaussian_mixture(40, seed=2)
    result = fit_probe(
        train_x=train_x,
        train_y=train_y,
        val_x=train_x,
        val_y=train_y,
        c_grid=[0.1],
        num_classes=3,
        solver="sklearn",
    )
    mean, std = scalar_standardization(train_x)
    reference = LogisticRegression(C=0.1, max_iter=1000).fit((train_x - mean) / std, train_y)
    np.testing.assert_allclose(result.weight, reference.coef_, rtol=1e-6)
    assert np.isscalar(result.mean) and np.isscalar(result.std)


def test_raw_scale_head_gives_the_same_logits_on_raw_features():
    train_x, train_y = gaussian_mixture(40, seed=3)
    result = fit_probe(
        train_x=train_x, train_y=train_y, val_x=train_x, val_y=train_y, c_grid=[1.0], num_classes=3
    )
    weight, bias = result.raw_scale_head()
    np.testing.assert_allclose(
        train_x @ weight.T + bias, result.logits(train_x), rtol=1e-4, atol=1e-3
    )


def test_a_class_missing_from_training_never_wins():
    train_x, train_y = gaussian_mixture(30, classes=3, seed=4)
    keep = train_y != 1
    result = fit_probe(
        train_x=train_x[keep],
        train_y=train_y[keep],
        val_x=train_x,
        val_y=train_y,
        c_grid=[1.0],
        num_classes=3,
    )
    assert result.weight.shape == (3, train_x.shape[1])
    assert (result.predict(train_x) != 1).all()


def test_empty_grid_is_an_error():
    x, y = gaussian_mixture(5)
    with pytest.raises(ValueError, match="empty C grid"):
        fit_probe(train_x=x, train_y=y, val_x=x, val_y=y, c_grid=[], num_classes=3)


def mixture_splits(*, classes=5, dim=64, n_train=2000, n_eval=5000, bayes=0.8):
    settings = dict(
        dim=dim, classes=classes, separation=separation_for(bayes=bayes, classes=classes)
    )
    return [
        synthetic.gaussian_mixture(n=n, seed=seed, **settings)
        for n, seed in ((n_train, 1), (n_eval, 2), (n_eval, 3))
    ]


def test_mixture_bayes_accuracy_is_what_a_bayes_classifier_gets():
    assert bayes_accuracy(separation=0.0, classes=10) == pytest.approx(0.1, abs=1e-6)
    assert bayes_accuracy(separation=separation_for(bayes=0.85, classes=10), classes=10) == (
        pytest.approx(0.85, abs=1e-6)
    )


@pytest.mark.parametrize("classes", [2, 5])
def test_torch_and_sklearn_agree_at_a_given_c(classes):
    (train_x, train_y), (val_x, val_y), _ = mixture_splits(classes=classes)
    fits = {
        solver: fit_probe(
            train_x=train_x,
            train_y=train_y,
            val_x=val_x,
            val_y=val_y,
            c_grid=[0.01],
            num_classes=classes,
            solver=solver,
        )
        for solver in ("torch", "sklearn")
    }
    ours, reference = fits["torch"], fits["sklearn"]
    assert ours.sweep[0]["converged"] and ours.sweep[0]["grad_max"] <= 1e-4
    # Same objective (binary included: one sklearn vector = a symmetric softmax pair).
    scale = np.abs(reference.weight).max()
    np.testing.assert_allclose(
        ours.weight, reference.weight, atol=5e-3 * scale
    )  # both stop at gradient 1e-4
    agree = (ours.predict(val_x) == reference.predict(val_x)).mean()
    assert agree >= 0.995
    accuracy = {name: (fit.predict(val_x) == val_y).mean() for name, fit in fits.items()}
    assert abs(accuracy["torch"] - accuracy["sklearn"]) <= 0.002


def test_torch_and_sklearn_choose_the_same_c_on_the_paper_grid():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = mixture_splits()
    grid = [float(c) for c in np.logspace(-7, 2, 50)]
    fits = {
        solver: fit_probe(
            train_x=train_x,
            train_y=train_y,
            val_x=val_x,
            val_y=val_y,
            c_grid=grid,
            num_classes=5,
            solver=solver,
            max_iter=500,
        )
        for solver in ("torch", "sklearn")
    }
    ours, reference = fits["torch"], fits["sklearn"]
    assert len(ours.sweep) < len(grid) == len(reference.sweep)  # coarse-to-fine
    # At the smallest C float32 cannot resolve the last digits of the loss; the chosen fit
    # must have converged.
    assert next(row for row in ours.sweep if row["C"] == ours.C)["converged"]
    steps_apart = abs(grid.index(ours.C) - grid.index(reference.C))
    test_acc = {name: (fit.predict(test_x) == test_y).mean() for name, fit in fits.items()}
    assert steps_apart <= 1
    assert abs(test_acc["torch"] - test_acc["sklearn"]) <= 0.002


def test_refine_tol_chooses_among_fits_converged_to_it():
    (train_x, train_y), (val_x, val_y), _ = mixture_splits()
    grid = [float(c) for c in np.logspace(-7, 2, 50)]
    settings = dict(
        train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, c_grid=grid, num_classes=5
    )
    loose = fit_probe_torch(**settings, refine_tol=1e-4)
    assert all(row["polished"] == row["converged"] for row in loose.sweep)  # refine_tol = tol
    tight = fit_probe_torch(**settings)  # the default: the choice among fits to 1e-5
    polished = [row for row in tight.sweep if row["polished"]]
    assert 2 <= len(polished) < len(tight.sweep)
    assert all(row["grad_max"] <= 1e-5 for row in polished)
    best = max(tight.sweep, key=lambda row: row["val_acc"])
    assert best["C"] == tight.C and best["polished"]
    # No fit within polish_reach (0.003) of the chosen one is left at tol.
    assert all(row["polished"] for row in tight.sweep if row["val_acc"] >= best["val_acc"] - 0.003)
    assert abs(grid.index(tight.C) - grid.index(loose.C)) <= 2


def test_coarse_to_fine_fits_the_ends_and_every_step():
    assert coarse_to_fine(50, points=8) == ([0, 8, 16, 24, 32, 40, 48, 49], 8)
    assert coarse_to_fine(50) == ([*range(0, 50, 4), 49], 4)
    assert coarse_to_fine(13, points=8) == (list(range(13)), 1)
    assert coarse_to_fine(1, points=8) == ([0], 1)


def test_unknown_solver_is_a_one_line_error_naming_the_key():
    x, y = synthetic.gaussian_mixture(n=20, dim=4, classes=2, separation=1.0, seed=0)
    with pytest.raises(ValueError, match=r"probe\.solver"):
        fit_probe(train_x=x, train_y=y, val_x=x, val_y=y, c_grid=[1.0], num_classes=2, solver="x")


def test_solver_key_defaults_to_torch_and_reaches_the_metrics(tmp_path):
    schema = load_schema(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    assert validate_config({}, schema)["probe"]["solver"] == "torch"
    with pytest.raises(ConfigError, match="solver"):
        validate_config({"probe": {"solver": "liblinear"}}, schema)
    from robustft.features import write_features

    splits = mixture_splits(classes=3, dim=8, n_train=200, n_eval=100)
    files = {}
    for name, (x, y) in zip(("train", "val", "test"), splits, strict=True):
        files[name] = tmp_path / f"{name}.h5"
        write_features(files[name], features=x, labels=y, attrs={"num_classes": 3})
    for solver in ("torch", "sklearn"):
        metrics = run_probe(
            feature_files=files,
            out_dir=tmp_path / solver,
            c_grid=[0.01, 1.0],
            max_iter=200,
            progress=False,
            solver=solver,
        )
        assert metrics["solver"] == solver and metrics["converged"]
        assert (tmp_path / solver / "head.safetensors").exists()


def two_peak_problem(*, first=40, second=60, margin=0.05):
    """Train set with a 240/30/30 class imbalance, and a val set whose accuracy over the
    paper's grid has two peaks: `first` examples right at small C, `second` at large C.

    Every C of the grid is fitted with scikit-learn (tol 1e-10) on the standardised train
    set, and candidate val points are kept by their predictions along the path, each decided
    by at least `margin` in logits (so that any solver's fit to tol 1e-4 predicts the same):

    - the first group: labelled 0, the majority class that every C up to grid index 26
      predicts; from index 28 on another class wins. Right at C ≤ index 26 only.
    - the second group: labelled with the class predicted from grid index 34 on, which no
      C up to index 33 predicts. Right at C ≥ index 34 only.

    Val accuracy is then 0.4 up to index 26, 0 from 28 to 33, 0.6 from 34 on: the full
    sweep chooses index 34 (ties to the smallest C), which is not on the coarse grid
    (every 4th index).
    """
    rng = np.random.default_rng(0)
    centers = 1.5 * rng.normal(0, 1, (3, 4))
    train_y = np.repeat(np.arange(3), [240, 30, 30])
    train_x = (5 * (centers[train_y] + rng.normal(0, 1, (len(train_y), 4))) + 3).astype(np.float32)
    candidates = (5 * rng.normal(0, 2.5, (20000, 4)) + 3).astype(np.float32)
    grid = [float(c) for c in np.logspace(-7, 2, 50)]
    mean, std = scalar_standardization(train_x)
    logits = np.stack(
        [
            LogisticRegression(C=c, tol=1e-10, max_iter=10000)
            .fit((train_x - mean) / std, train_y)
            .decision_function((candidates - mean) / std)
            for c in grid
        ]
    )  # (C, candidate, class)

    def lead(label):  # logit of `label` minus the best other class's, per C and candidate
        others = np.delete(logits, label, axis=2).max(axis=2)
        return logits[:, :, label] - others

    majority = lead(0)
    in_first = (majority[:27] >= margin).all(axis=0) & (majority[28:] <= -margin).all(axis=0)
    final = logits[-1].argmax(axis=1)
    final_lead = np.stack([lead(k) for k in range(3)])[final, :, np.arange(len(final))].T
    in_second = (final_lead[34:] >= margin).all(axis=0) & (final_lead[:34] <= -margin).all(axis=0)
    chosen_first = np.flatnonzero(in_first)[:first]
    chosen_second = np.flatnonzero(in_second)[:second]
    assert len(chosen_first) == first and len(chosen_second) == second
    val_x = candidates[np.concatenate([chosen_first, chosen_second])]
    val_y = np.concatenate([np.zeros(first, dtype=np.int64), final[chosen_second]])
    return train_x, train_y, val_x, val_y, grid


def test_a_higher_second_peak_between_coarse_values_is_chosen_as_the_full_sweep_chooses():
    train_x, train_y, val_x, val_y, grid = two_peak_problem()
    settings = dict(
        train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, c_grid=grid, num_classes=3
    )
    full = fit_probe(**settings, solver="sklearn")
    curve = [row["val_acc"] for row in full.sweep]
    # Not unimodal: a first peak, a dip to zero, a higher second peak that starts between
    # the coarse values 32 and 36.
    assert curve[:27] == [0.4] * 27 and curve[28:34] == [0.0] * 6 and curve[34:] == [0.6] * 16
    assert grid[34] == full.C
    # The old coarse pass stopped at the dip (index 28 worse than index 0) and chose index 0.
    ours = fit_probe(**settings, solver="torch")
    assert ours.C == full.C
    assert (ours.predict(val_x) == val_y).mean() == 0.6
    assert len(ours.sweep) < len(grid)


def test_refinement_bisects_the_gaps_that_could_hold_the_full_sweeps_choice():
    val_acc = {0: 0.4, 4: 0.4, 8: 0.0, 12: 0.6, 16: 0.6, 17: 0.3}
    # Reach 0: only a tie at a smaller C could win, to the left of the best.
    assert refinement(val_acc, 12, reach=0.0) == [10]
    # Reach 0.01: also a peak up to 0.01 above the better end of a gap.
    assert refinement(val_acc, 12, reach=0.01) == [10, 14]
    # Reach 0.2: the first peak could be within reach too.
    assert refinement(val_acc, 12, reach=0.2) == [2, 6, 10, 14]


def test_polish_candidates_are_the_fits_and_gaps_that_could_still_win():
    val_acc = {0: 0.40, 4: 0.70, 8: 0.795, 9: 0.80, 10: 0.798, 12: 0.70, 16: 0.799}
    # Nothing polished yet: every fit within reach of the best (not 8, 0.005 below it), and
    # the gaps that `refinement` would bisect at that reach.
    assert polish_candidates(val_acc, set(), reach=0.003) == [9, 10, 11, 14, 16]
    # Polishing the best dropped it: the one now best must be polished in turn.
    val_acc |= {9: 0.790, 10: 0.797, 11: 0.796, 14: 0.70, 16: 0.799}
    assert polish_candidates(val_acc, {9, 10, 11, 14}, reach=0.003) == [15, 16]
    # Done once the best fit and everything within reach of it are polished.
    val_acc |= {15: 0.79, 16: 0.795, 8: 0.79}
    assert polish_candidates(val_acc, {8, 9, 10, 11, 14, 15, 16}, reach=0.003) == []


def test_the_probe_records_its_features_provenance_in_metrics_and_head(tmp_path):
    """The head carries the backbone, weights and data it was fitted on (safetensors
    metadata), so that LP-FT, KD and WiSE-FT can check them; metrics.json the same."""
    from robustft.features import write_features
    from robustft.models import load_head

    provenance = {"backbone": "toyresnet", "weights_sha256": "ab" * 32, "data_fingerprint": "f0"}
    files = {}
    splits = mixture_splits(classes=3, dim=8, n_train=100, n_eval=50)
    for name, (x, y) in zip(("train", "val", "test"), splits, strict=True):
        files[name] = tmp_path / f"{name}.h5"
        write_features(files[name], features=x, labels=y, attrs={"num_classes": 3, **provenance})
    metrics = run_probe(
        feature_files=files, out_dir=tmp_path / "probe", c_grid=[1.0], max_iter=100, progress=False
    )
    assert {key: metrics[key] for key in provenance} == provenance
    assert load_head(tmp_path / "probe" / "head.safetensors").metadata == provenance


def objective_gradient_max(probe, train_x, train_y, *, classes):
    """The largest entry of the probe objective's gradient at `probe`'s head, in float64."""
    z = (train_x.astype(np.float64) - probe.mean) / probe.std
    logits = z @ probe.weight.T + probe.bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(train_y)), train_y] -= 1.0
    lam = 1.0 / (probe.C * len(train_y)) * (2.0 if classes == 2 else 1.0)
    grad_weight = p.T @ z / len(train_y) + lam * probe.weight
    grad_bias = p.mean(axis=0)
    return max(np.abs(grad_weight).max(), np.abs(grad_bias).max())


def test_cheap_bfloat16_evaluations_choose_as_float32_ones_and_end_on_an_exact_gradient(
    monkeypatch,
):
    from robustft.probe import solver

    (train_x, train_y), (val_x, val_y), _ = mixture_splits(dim=128, n_train=3000)
    grid = [float(c) for c in np.logspace(-7, 2, 50)]
    settings = dict(
        train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, c_grid=grid, num_classes=5
    )
    counts = {"exact": 0, "exact_gradient": 0, "cheap": 0}
    path_fit = solver._PathProblem.fit

    def counted(self, **kwargs):
        result = path_fit(self, **kwargs)
        for kind, count in result["evaluations"].items():
            counts[kind] += count
        return result

    monkeypatch.setattr(solver._PathProblem, "fit", counted)
    monkeypatch.setattr(solver, "_bf16_cpu", lambda: False)  # float32 products only
    exact = fit_probe_torch(**settings)
    assert counts["cheap"] == 0
    counts.update(exact=0, exact_gradient=0)
    monkeypatch.setattr(solver, "_bf16_cpu", lambda: True)  # as on a CPU with AVX512-BF16
    cheap = fit_probe_torch(**settings)
    # Most evaluations are cheap; the float32 ones start and confirm fits.
    assert counts["cheap"] > counts["exact"] + counts["exact_gradient"]
    chosen = {
        probe.C: row for probe in (exact, cheap) for row in probe.sweep if row["C"] == probe.C
    }
    assert abs(grid.index(cheap.C) - grid.index(exact.C)) <= 1
    assert chosen[cheap.C]["val_acc"] == pytest.approx(chosen[exact.C]["val_acc"], abs=0.002)
    # Every polished fit, the chosen one included, was confirmed by a float32 gradient.
    assert all(row["grad_max"] <= 1e-5 for row in cheap.sweep if row["polished"])
    assert objective_gradient_max(cheap, train_x, train_y, classes=5) <= 1.1e-5
    fitted = {row["C"]: row for row in exact.sweep}
    for row in cheap.sweep:
        if row["C"] in fitted and row["polished"] and fitted[row["C"]]["polished"]:
            assert row["val_acc"] == pytest.approx(fitted[row["C"]]["val_acc"], abs=0.002)
    # With room for only 2 fits' results (large features), fits whose starts need an older
    # one begin with a float32 evaluation instead; the choice is the same.
    path_init = solver._PathProblem.__init__

    def cramped(self, **kwargs):
        path_init(self, **kwargs)
        self.results_kept = 2

    monkeypatch.setattr(solver._PathProblem, "__init__", cramped)
    counts.update(exact=0, exact_gradient=0, cheap=0)
    tight = fit_probe_torch(**settings)
    assert counts["cheap"] > 0 and tight.C == cheap.C
    assert objective_gradient_max(tight, train_x, train_y, classes=5) <= 1.1e-5


def test_the_sweep_flushes_denormals_and_leaves_the_flag_as_torch_has_it(monkeypatch):
    """Dead feature dimensions (zero on every image, as ReLU features often are) and fewer
    images than dimensions leave directions where only the penalty acts: their weights decay
    into denormal floats, which slowed real-feature sweeps 6× on x86. The sweep runs with
    denormals flushed to zero, and afterwards the flag is torch's default again."""
    import torch

    from robustft.probe import solver

    denormal = torch.tensor([1e-40])
    if not torch.set_flush_denormal(False) or not bool(denormal * 1.0):
        pytest.skip("this CPU cannot flush denormals (not x86 with SSE3)")
    rng = np.random.default_rng(0)
    train_y, val_y = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    means = rng.normal(size=(3, 200)).astype(np.float32)
    train_x = np.maximum(rng.normal(size=(60, 200)).astype(np.float32) + means[train_y], 0)
    val_x = np.maximum(rng.normal(size=(60, 200)).astype(np.float32) + means[val_y], 0)
    train_x[:, 100:] = 0.0  # dead dimensions; 60 images in 200 dimensions
    val_x[:, 100:] = 0.0
    seen = []
    fit = solver._PathProblem.fit

    def watched(self, **kwargs):
        seen.append(float(denormal * 1.0))
        return fit(self, **kwargs)

    monkeypatch.setattr(solver._PathProblem, "fit", watched)
    result = fit_probe_torch(
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        c_grid=[float(c) for c in np.logspace(-4, 2, 13)],
        num_classes=3,
    )
    assert seen and all(value == 0.0 for value in seen)  # flushed during every fit
    assert float(denormal * 1.0) > 0.0  # and not after
    assert all(row["converged"] for row in result.sweep)
    assert np.all(result.weight[:, 100:] == 0.0) or np.abs(result.weight[:, 100:]).max() < 1e-30
