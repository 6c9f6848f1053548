import numpy as np
import pytest
from scipy.stats import ortho_group

from robustft.robustness import (
    BaselineLine,
    effective_robustness,
    fit_baseline,
    linear_cka,
    logit,
    relative_change,
    sigmoid,
)


def test_logit_and_sigmoid_round_trip_and_stay_finite_at_zero_and_one():
    p = np.array([0.0, 1e-9, 0.1, 0.5, 0.9, 1.0])
    values = logit(p)
    assert np.isfinite(values).all()
    np.testing.assert_allclose(sigmoid(values)[2:5], p[2:5], atol=1e-12)
    assert sigmoid(values)[0] == pytest.approx(0.0, abs=1e-3)
    assert sigmoid(values)[-1] == pytest.approx(1.0, abs=1e-3)
    assert logit(0.5) == 0.0


def test_the_fitted_line_recovers_a_known_line_in_logit_space():
    ids = np.array([0.3, 0.5, 0.7, 0.9])
    oods = sigmoid(0.8 * logit(ids) - 0.5)
    line = fit_baseline(id_accuracy=ids, ood_accuracy=oods)
    assert line.slope == pytest.approx(0.8)
    assert line.intercept == pytest.approx(-0.5)
    assert line.models == 4


def test_effective_robustness_is_zero_on_the_line_and_signed_off_it():
    line = BaselineLine(slope=0.8, intercept=-0.5)
    on_line = float(line.predict(0.75))
    assert effective_robustness(id_accuracy=0.75, ood_accuracy=on_line, line=line) == (
        pytest.approx(0.0, abs=1e-12)
    )
    assert effective_robustness(id_accuracy=0.75, ood_accuracy=on_line + 0.05, line=line) > 0
    assert effective_robustness(id_accuracy=0.75, ood_accuracy=on_line - 0.05, line=line) < 0
    assert float(
        effective_robustness(id_accuracy=0.75, ood_accuracy=on_line + 0.05, line=line)
    ) == pytest.approx(0.05)


def test_an_er_beyond_the_baseline_models_id_range_is_flagged():
    # A line fitted over models at 30-70% ID says nothing measured about a model at 90%.
    ids = np.array([0.3, 0.5, 0.7])
    line = fit_baseline(id_accuracy=ids, ood_accuracy=sigmoid(0.8 * logit(ids) - 0.5))
    assert line.id_range == (0.3, 0.7)
    assert line.outside_range(np.array([0.29, 0.3, 0.5, 0.7, 0.9])).tolist() == [
        True,
        False,
        False,
        False,
        True,
    ]
    # A line with no known range (a published one without id_range) flags nothing.
    assert not BaselineLine(slope=1.0, intercept=0.0).outside_range(0.99)


def test_a_line_needs_two_different_models():
    with pytest.raises(ValueError, match="at least two models"):
        fit_baseline(id_accuracy=[0.5], ood_accuracy=[0.4])
    with pytest.raises(ValueError, match="at least two models"):
        fit_baseline(id_accuracy=[0.5, 0.5], ood_accuracy=[0.4, 0.3])


def test_cka_is_one_for_itself_and_invariant_to_rotation_and_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    rotation = ortho_group.rvs(16, random_state=1)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, x + 7.0) == pytest.approx(1.0)  # centred
    unrelated = rng.normal(size=(200, 16))
    assert linear_cka(x, unrelated) < 0.3


def test_distortion_of_the_model_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert relative_change(x, x) == 0.0
    assert relative_change(x, 2 * x) == pytest.approx(1.0)
