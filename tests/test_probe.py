import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from robustft.probe import fit_probe, scalar_standardization


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
        train_x=train_x, train_y=train_y, val_x=train_x, val_y=train_y, c_grid=[0.1], num_classes=3
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
