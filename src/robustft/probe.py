"""Linear probe: multinomial L2 logistic regression over a grid of C, chosen on ID val.

Following Kumar et al. 2022, features are standardised by one scalar mean and standard
deviation over the training features before the fit.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from robustft.data.registry import split_column
from robustft.features import read_features
from robustft.io import atomic_path, write_csv, write_json

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    C: float
    weight: np.ndarray  # (K, D), on standardised features
    bias: np.ndarray  # (K,)
    mean: float
    std: float
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    def raw_scale_head(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) acting on raw features: W·(f − m)/s + b = (W/s)·f + (b − m/s·ΣW)."""
        weight = self.weight / self.std
        bias = self.bias - (self.mean / self.std) * self.weight.sum(axis=1)
        return weight.astype(np.float32), bias.astype(np.float32)


def scalar_standardization(features: np.ndarray) -> tuple[float, float]:
    mean, std = float(features.mean()), float(features.std())
    return mean, (std if std > 0 else 1.0)


def fit_probe(
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    c_grid: list[float],
    num_classes: int,
    max_iter: int = 1000,
    tol: float = 1e-4,
    progress: bool = False,
    solver: str = "torch",
    device: str = "cpu",
) -> ProbeResult:
    """The best probe over `c_grid` by val accuracy, fitted by `solver`.

    `torch` (`fit_probe_torch`): full-batch L-BFGS in float32 on `device`, warm-started along
    the grid and refined coarse-to-fine around the best val accuracy. `sklearn`
    (`fit_probe_sklearn`): scikit-learn's lbfgs on every C, the reference.
    """
    settings = dict(
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        c_grid=c_grid,
        num_classes=num_classes,
        max_iter=max_iter,
        tol=tol,
        progress=progress,
    )
    if solver == "torch":
        return fit_probe_torch(**settings, device=device)
    if solver == "sklearn":
        return fit_probe_sklearn(**settings)
    raise ValueError(f"config key 'probe.solver': expected torch or sklearn, got {solver!r}")


def fit_probe_sklearn(
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    c_grid: list[float],
    num_classes: int,
    max_iter: int = 1000,
    tol: float = 1e-4,
    progress: bool = False,
) -> ProbeResult:
    """Fit one model per C (ascending), each from zero, and keep the best by val accuracy.

    Each fit starts from zero rather than warm-starting: with a warm start, fits at large C
    stop after zero iterations (the previous solution already meets `tol`), so they are
    never really fitted. Ties go to the smallest C (the most regularised model).
    """
    if len(c_grid) == 0:
        raise ValueError("empty C grid")
    mean, std = scalar_standardization(train_x)
    train_z, _val_z = (train_x - mean) / std, (val_x - mean) / std
    best: ProbeResult | None = None
    best_val = -1.0
    sweep = []
    for c_value in tqdm(sorted(c_grid), disable=not progress, desc="C sweep", ascii=True):
        model = LogisticRegression(C=c_value, max_iter=max_iter, tol=tol)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(train_z, train_y)
        n_iter = int(np.max(model.n_iter_))
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        weight, bias = _full_head(model, num_classes=num_classes, dim=train_x.shape[1])
        candidate = ProbeResult(C=c_value, weight=weight, bias=bias, mean=mean, std=std)
        train_acc = float((candidate.predict(train_x) == train_y).mean())
        val_acc = float((candidate.predict(val_x) == val_y).mean())
        sweep.append(
            {
                "C": c_value,
                "train_acc": train_acc,
                "val_acc": val_acc,
                "n_iter": n_iter,
                "converged": converged,
            }
        )
        if not converged:
            log.warning("C=%g did not converge in %d iterations", c_value, max_iter)
        if val_acc > best_val:
            best, best_val = candidate, val_acc
    assert best is not None
    best.sweep = sweep
    return best


def coarse_to_fine(count: int, *, points: int = 8) -> tuple[list[int], int]:
    """The first grid indices to fit (every `step`-th, and the last) and that `step`.

    `step` is the largest power of two that still leaves `points` coarse values; a grid of
    at most `points` values is fitted whole (step 1).
    """
    step = 1
    while math.ceil((count - 1) / (2 * step)) + 1 >= points:
        step *= 2
    first = sorted({*range(0, count, step), count - 1})
    return first, step


def _carry_curvature(state: dict[str, Any], *, extra_penalty: float, size: int) -> None:
    """Make torch LBFGS's stored curvature pairs (s, y) those of the objective at a new C.

    Only the penalty λ/2·‖W‖² changes with C, and its gradient is linear, so each y = Δgrad
    gains exactly Δλ·s on the weight entries (the first `size` of the flat vector; the
    intercept is unpenalised). The last step direction is zeroed so that the first iteration
    at the new C, which starts elsewhere, adds no pair that straddles two objectives.
    """
    if not state.get("old_dirs"):
        return
    dirs, steps = state["old_dirs"], state["old_stps"]
    for y, s in zip(dirs, steps, strict=True):
        y[:size].add_(s[:size], alpha=extra_penalty)
    keep = [k for k in range(len(dirs)) if float(dirs[k].dot(steps[k])) > 1e-10]
    state["old_dirs"] = [dirs[k] for k in keep]
    state["old_stps"] = [steps[k] for k in keep]
    state["ro"] = [1.0 / dirs[k].dot(steps[k]) for k in keep]
    if keep:
        y, s = state["old_dirs"][-1], state["old_stps"][-1]
        state["H_diag"] = y.dot(s) / y.dot(y)
    state["d"].zero_()


def fit_probe_torch(
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    c_grid: list[float],
    num_classes: int,
    max_iter: int = 1000,
    tol: float = 1e-4,
    progress: bool = False,
    device: str = "cpu",
    coarse_points: int = 8,
    history_size: int = 20,
    share_curvature: bool = True,
) -> ProbeResult:
    """Full-batch L-BFGS in float32 over the C grid, sharing work between values of C.

    Objective per C: the mean log-loss over the n training examples + ‖W‖²/(2·C·n), the
    intercept unpenalised — scikit-learn's (sum of log-losses + ‖W‖²/(2C)) divided by n,
    so the same minimiser with gradients of order one. Converged means the largest absolute
    gradient entry is at most `tol`, scikit-learn's (scipy's pgtol) test; each fit is
    warm-started from the solution at the nearest smaller C already fitted.

    Only part of the grid is fitted: a coarse subset (`coarse_to_fine`), in ascending order
    until one is worse than the best so far, then the neighbours of the best val accuracy at
    halving distances down to one grid step (the refinement of CLIP_benchmark and DINOv2).
    Ties go to the smallest C. The sweep lists the fitted C only.
    """
    import torch

    if len(c_grid) == 0:
        raise ValueError("empty C grid")
    grid = sorted(float(value) for value in c_grid)
    present = np.unique(train_y)
    if len(present) < 2:
        raise ValueError(f"probe needs at least 2 classes in the training labels, got {present}")
    mean, std = scalar_standardization(train_x)
    # Fit the classes present only, as scikit-learn does: an absent class's unpenalised
    # intercept would run off to -inf and never converge.
    index = np.full(num_classes, -1, dtype=np.int64)
    index[present] = np.arange(len(present))
    x = torch.as_tensor(train_x, dtype=torch.float32, device=device).sub(mean).div_(std)
    y = torch.as_tensor(index[train_y], device=device)
    val_z = torch.as_tensor(val_x, dtype=torch.float32, device=device).sub(mean).div_(std)
    val_t = torch.as_tensor(val_y, device=device)
    n, dim = x.shape
    classes = len(present)
    rows = torch.arange(n, device=device)
    # Binary: scikit-learn fits one vector w under ‖w‖²/(2C); the softmax pair (w/2, -w/2)
    # has ‖W‖² = ‖w‖²/2, so the same optimum needs twice the penalty.
    penalty = 2.0 if classes == 2 else 1.0
    weight = torch.zeros(classes, dim, device=device, requires_grad=True)
    bias = torch.zeros(classes, device=device, requires_grad=True)
    counts = torch.bincount(y, minlength=classes).double()
    log_prior = (counts / n).log().float()
    log_prior -= log_prior.mean()
    solutions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    sweep: dict[int, dict[str, Any]] = {}

    # One optimizer for the whole grid: its curvature pairs carry over from one C to the next.
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    previous = {"lam": 0.0}

    def fit(i: int) -> None:
        c_value = grid[i]
        lam = penalty / (c_value * n)
        below = [j for j in solutions if j < i]
        with torch.no_grad():
            if below:
                weight.copy_(solutions[max(below)][0])
                bias.copy_(solutions[max(below)][1])
            else:
                # The optimum as C → 0: no weights, log class frequencies as intercepts. From
                # zero, L-BFGS would meet intercepts 1/(C·n) times less curved than the weights.
                weight.zero_()
                bias.copy_(log_prior)
        # What each evaluation saw, so that the gradient and training accuracy at the point
        # L-BFGS returns need no extra pass over the data (its line search leaves .grad at
        # the last trial point, which need not be the accepted one).
        seen: list[tuple[torch.Tensor, ...]] = []

        def closure() -> torch.Tensor:
            with torch.no_grad():
                logits = torch.addmm(bias, x, weight.T)
                log_p = torch.log_softmax(logits, dim=1)
                # Summed in float64: at small C the loss is log(K) plus changes far below
                # float32's resolution there, which the line search must still see.
                loss = -log_p[rows, y].double().mean() + 0.5 * lam * weight.double().square().sum()
                residual = log_p.exp_()
                residual[rows, y] -= 1.0
                residual.div_(n)
                weight.grad = torch.addmm(weight, residual.T, x, beta=lam)
                bias.grad = residual.sum(dim=0)
                grad_max = torch.maximum(weight.grad.abs().max(), bias.grad.abs().max())
                correct = (logits.argmax(dim=1) == y).sum()
                seen.append((weight.detach().clone(), bias.detach().clone(), grad_max, correct))
                del seen[:-8]
            return loss

        state = optimizer.state[weight]  # LBFGS keeps its state under the first parameter
        before = {key: state.get(key, 0) for key in ("n_iter", "func_evals")}
        if share_curvature:
            _carry_curvature(state, extra_penalty=lam - previous["lam"], size=weight.numel())
        previous["lam"] = lam
        optimizer.step(closure)
        final = next(
            (s for s in reversed(seen) if torch.equal(s[0], weight) and torch.equal(s[1], bias)),
            None,
        )
        if final is None:
            closure()
            final = seen[-1]
        with torch.no_grad():
            val_correct = (torch.addmm(bias, val_z, weight.T).argmax(dim=1) == val_t).sum()
        grad_max = float(final[2])
        solutions[i] = (weight.detach().clone(), bias.detach().clone())
        sweep[i] = {
            "C": c_value,
            "train_acc": int(final[3]) / n,
            "val_acc": int(val_correct) / len(val_y),
            "n_iter": int(state.get("n_iter", 0) - before["n_iter"]),
            "func_evals": int(state.get("func_evals", 0) - before["func_evals"]),
            "grad_max": grad_max,
            "converged": grad_max <= tol,
        }
        if grad_max > tol:
            log.warning(
                "C=%g did not converge in %d iterations (largest gradient entry %.2g > tol %g)",
                c_value,
                max_iter,
                grad_max,
                tol,
            )
        bar.update()

    def best_index() -> int:
        # Highest val accuracy; ties to the smallest C, as in the sklearn sweep.
        return max(sorted(sweep), key=lambda i: (sweep[i]["val_acc"], -i))

    first, step = coarse_to_fine(len(grid), points=coarse_points)
    with tqdm(disable=not progress, desc="C sweep", ascii=True, unit="C") as bar:
        for i in first:
            fit(i)
            # Past the peak: the larger C of the coarse grid (the slowest fits) are skipped;
            # val accuracy is taken as unimodal in log C, as the bisection of CLIP_benchmark
            # does. The refinement still looks one coarse step either side of the best.
            if sweep[i]["val_acc"] < sweep[best_index()]["val_acc"]:
                break
        while step > 1:
            step //= 2
            centre = best_index()
            for i in (centre - step, centre + step):
                if 0 <= i < len(grid) and i not in sweep:
                    fit(i)
    chosen = best_index()
    weight_k = np.zeros((num_classes, dim), dtype=np.float64)
    bias_k = np.full(num_classes, -1e9 if len(present) < num_classes else 0.0)
    weight_k[present] = solutions[chosen][0].double().cpu().numpy()
    bias_k[present] = solutions[chosen][1].double().cpu().numpy()
    return ProbeResult(
        C=grid[chosen],
        weight=weight_k,
        bias=bias_k,
        mean=mean,
        std=std,
        sweep=[sweep[i] for i in sorted(sweep)],
    )


def _full_head(
    model: LogisticRegression, *, num_classes: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (K, D) head over all `num_classes`, also when the training set lacks a class."""
    weight = np.zeros((num_classes, dim), dtype=np.float64)
    bias = np.full(num_classes, -1e9 if len(model.classes_) < num_classes else 0.0)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2 and coef.shape[0] == 1:
        # Binary problems come back as one row; make them a symmetric two-row softmax.
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight[model.classes_] = coef
    bias[model.classes_] = intercept
    return weight, bias


def _accuracy(result: ProbeResult, data: Any) -> float:
    """Argmax over the split's `class_subset` attribute when its feature file has one; with
    `class_groups`, right when the prediction is in the label's group (ObjectNet)."""
    subset = data.attrs.get("class_subset")
    if subset is None or len(subset) == 0:
        predicted = result.predict(data.features)
    else:
        subset = np.asarray(subset, dtype=np.int64)
        predicted = subset[result.logits(data.features)[:, subset].argmax(axis=1)]
    groups = data.attrs.get("class_groups")
    if groups is not None and len(groups):
        groups = np.asarray(groups, dtype=np.int64)
        return float((groups[predicted] == groups[data.labels]).mean())
    return float((predicted == data.labels).mean())


def run_probe(
    *,
    feature_files: Mapping[str, str | Path],
    out_dir: str | Path,
    c_grid: Sequence[float],
    max_iter: int,
    progress: bool = True,
    solver: str = "torch",
    device: str = "cpu",
) -> dict[str, Any]:
    """Fit the probe on `train`, choose C on `val`, report accuracy on every split.

    `solver` and `device` as in `fit_probe`."""
    missing = [split for split in ("train", "val") if split not in feature_files]
    if missing:
        raise ValueError(f"probe needs feature files for splits {missing}")
    first = read_features(feature_files["train"])
    num_classes = int(first.attrs.get("num_classes", first.labels.max() + 1))
    sets = {
        split: read_features(path, num_classes=num_classes) for split, path in feature_files.items()
    }
    # Every split must come from the same backbone weights and the same label space.
    for key in ("num_classes", "weights_sha256"):
        expected = first.attrs.get(key)
        for split, data in sets.items():
            if data.attrs.get(key) != expected:
                raise ValueError(
                    f"{feature_files[split]}: attribute {key}={data.attrs.get(key)!r} differs "
                    f"from the train features' {expected!r} ({feature_files['train']})"
                )
    dims = {split: data.features.shape[1] for split, data in sets.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"feature dimensions differ between splits: {dims}")
    result = fit_probe(
        train_x=sets["train"].features,
        train_y=sets["train"].labels,
        val_x=sets["val"].features,
        val_y=sets["val"].labels,
        c_grid=list(c_grid),
        num_classes=num_classes,
        max_iter=max_iter,
        progress=progress,
        solver=solver,
        device=device,
    )
    accuracies = {
        split_column(split): _accuracy(result, data)
        for split, data in sets.items()
        if split != "train"
    }
    out_dir = Path(out_dir)
    weight, bias = result.raw_scale_head()
    from safetensors.numpy import save_file

    with atomic_path(out_dir / "head.safetensors") as tmp:
        save_file({"weight": weight, "bias": bias}, str(tmp))
    write_csv(out_dir / "sweep.csv", result.sweep)
    chosen = next(row for row in result.sweep if row["C"] == result.C)
    metrics = {
        "solver": solver,
        "C": result.C,
        "converged": chosen["converged"],
        "n_iter": chosen["n_iter"],
        "train_acc": chosen["train_acc"],
        "feature_mean": result.mean,
        "feature_std": result.std,
        **accuracies,
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics
