"""Synthetic features with a known Bayes rate, for probe tests and benchmarks.

K classes with means a·e_k along K orthonormal directions of R^D (a fixed random basis) and
unit isotropic Gaussian noise, then a fixed per-dimension scale (log-uniform over 0.2–5) and an
offset, as a network's features have. Before that map the Bayes classifier picks the largest
coordinate along the K directions; an invertible linear map leaves its accuracy unchanged, so
that is ∫ φ(t) Φ(t + a)^(K−1) dt (one-dimensional quadrature). The map makes the mean
directions suboptimal, so that the L2 strength matters as with real features.
"""

from __future__ import annotations

import math

import numpy as np


def bayes_accuracy(*, separation: float, classes: int) -> float:
    """Accuracy of the Bayes classifier of `gaussian_mixture` (equal class priors)."""
    from scipy.special import ndtr

    t = np.linspace(-10.0, 10.0, 20001)
    density = np.exp(-0.5 * t**2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(density * ndtr(t + separation) ** (classes - 1), t))


def separation_for(*, bayes: float, classes: int) -> float:
    """The separation a whose Bayes accuracy is `bayes` (bisection; accuracy grows with a)."""
    low, high = 0.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        if bayes_accuracy(separation=middle, classes=classes) < bayes:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def gaussian_mixture(
    *,
    n: int,
    dim: int,
    classes: int,
    separation: float,
    seed: int,
    basis_seed: int = 0,
    scale: float = 1.0,
    offset: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 n×dim, labels int64 n); the same `basis_seed` gives the same means,
    so train, val and test come from one mixture with different `seed`s."""
    if classes > dim:
        raise ValueError(f"classes ({classes}) must not exceed dim ({dim})")
    basis_rng = np.random.default_rng(basis_seed)
    directions = np.linalg.qr(basis_rng.standard_normal((dim, classes)))[0].T  # (K, D)
    scales = (scale * np.exp(basis_rng.uniform(np.log(0.2), np.log(5.0), dim))).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    # In chunks, so that an ImageNet-size set needs no float64 copy.
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        features[start:stop] += (separation * directions[labels[start:stop]]).astype(np.float32)
    features *= scales
    features += offset
    return features, labels.astype(np.int64)
