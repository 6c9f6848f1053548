"""The linear probe's numerics: multinomial L2 logistic regression over a grid of C, chosen on
ID val.

Following Kumar et al. 2022, features are standardised by one scalar mean and standard
deviation over the training features before the fit (`scalar_standardization`). `fit_probe`
runs one of two solvers: `fit_probe_torch` (preconditioned full-batch L-BFGS along the
regularisation path, `_PathProblem`, with a coarse-to-fine search of the grid) or
`fit_probe_sklearn` (scikit-learn's lbfgs on every C, the reference). torch is imported inside
the functions that need it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

# The package's logger: job logs name it as they did when the probe was one module.
log = logging.getLogger("robustft.probe")


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
    """One mean and one (population) standard deviation over every entry."""
    import torch

    values = torch.as_tensor(features)  # no copy; a few times faster than NumPy's std
    mean, std = float(values.mean()), float(values.std(correction=0))
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


def coarse_to_fine(count: int, *, points: int = 12) -> tuple[list[int], int]:
    """The first grid indices to fit (every `step`-th, and the last) and that `step`.

    `step` is the largest power of two that still leaves `points` coarse values; a grid of
    at most `points` values is fitted whole (step 1).
    """
    step = 1
    while math.ceil((count - 1) / (2 * step)) + 1 >= points:
        step *= 2
    first = sorted({*range(0, count, step), count - 1})
    return first, step


def refinement(val_acc: Mapping[int, float], best: int, *, reach: float) -> list[int]:
    """The grid indices to fit next: the midpoint of each gap between neighbouring fitted
    indices (`val_acc`: grid index → val accuracy) where the full sweep's choice could lie.

    A gap (a, b) is bisected when a value inside it, at most `reach` above the better of
    val_acc[a] and val_acc[b], would win over `best` by the full sweep's rule: higher val
    accuracy, or the same at a smaller C. With `reach` 0 only the gaps beside the best fits
    are bisected (a peak never stands above both of its fitted neighbours); with `reach` > 0
    also those around every fit within `reach` of the best.
    """
    fitted = sorted(val_acc)
    top = val_acc[best]
    indices = []
    for a, b in itertools.pairwise(fitted):
        bound = max(val_acc[a], val_acc[b]) + reach
        if b - a >= 2 and (bound > top or (bound == top and a < best)):
            indices.append((a + b) // 2)
    return indices


def polish_candidates(
    val_acc: Mapping[int, float], polished: Collection[int], *, reach: float
) -> list[int]:
    """The grid indices to fit to `refine_tol` next (`val_acc`: grid index → val accuracy of
    the fits so far; `polished`: those fitted to `refine_tol`).

    Every fit not yet polished whose val accuracy is within `reach` of the best fit's, and the
    midpoints of the gaps that `refinement` would bisect around the best fit at that `reach`.
    Once none is left, the best fit is a polished one, and no other fit (nor grid value that
    `refinement` reaches) stands within `reach` of it without being polished too: the choice
    is the exact optima's whenever a fit at `tol` is within `reach` of its optimum's val
    accuracy.
    """
    best = max(val_acc, key=lambda i: (val_acc[i], -i))
    top = val_acc[best]
    indices = {i for i, value in val_acc.items() if i not in polished and value >= top - reach}
    indices.update(refinement(val_acc, best, reach=reach))
    return sorted(indices)


def _start_point(i: int, fitted: Collection[int], log_c: np.ndarray) -> list[tuple[int, float]]:
    """A warm start for grid index `i`: (fitted index, coefficient) pairs whose weighted sum
    of solutions is the start; empty when nothing is fitted yet.

    The regularisation path is smooth in log C: between two fitted values it is interpolated,
    beyond the largest it is extrapolated from the last two, linearly in log C; a fit to
    polish starts from itself.
    """
    if i in fitted:
        return [(i, 1.0)]
    below = sorted(j for j in fitted if j < i)
    above = sorted(j for j in fitted if j > i)
    if below and above:
        a, b = below[-1], above[0]
    elif len(below) >= 2:
        a, b = below[-2], below[-1]
    elif below or above:
        return [((below or above)[-1 if below else 0], 1.0)]
    else:
        return []
    share = float((log_c[i] - log_c[a]) / (log_c[b] - log_c[a]))
    return [(a, 1.0 - share), (b, share)]


class _RowBlocks:
    """x·Wᵀ and Rᵀ·x for tall float32 x (n × d) and few columns in W and R.

    On a CPU these go through batched products over blocks of 1024 rows: with MKL on the
    2-core AMD EPYC of docs/performance.md, 1.5× faster than one tall-skinny product.
    On a GPU, one product.
    """

    def __init__(self, x: Any, *, block: int = 1024) -> None:
        self.x = x
        if x.device.type != "cpu" or x.shape[0] < 2 * block:
            self.blocks, self.tail = None, x
            return
        split = x.shape[0] // block * block
        self.blocks = x[:split].view(-1, block, x.shape[1])
        self.tail = x[split:]

    def times_transposed(self, weight: Any, bias: Any) -> Any:
        """x·weightᵀ + bias, (n, columns)."""
        import torch

        if self.blocks is None:
            return torch.addmm(bias, self.x, weight.T)
        head = torch.baddbmm(bias, self.blocks, weight.T.expand(len(self.blocks), -1, -1))
        return torch.cat([head.view(-1, weight.shape[0]), torch.addmm(bias, self.tail, weight.T)])

    def transposed_times(self, residual: Any) -> Any:
        """residualᵀ·x, (columns, d)."""
        import torch

        if self.blocks is None:
            return residual.T @ self.x
        count, block, _ = self.blocks.shape
        head = residual[: count * block].view(count, block, -1).transpose(1, 2)
        return torch.bmm(head, self.blocks).sum(dim=0).add_(residual[count * block :].T @ self.tail)


def _bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16), per torch's own check."""
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def _second_moment_eigenvectors(rows: Any, *, double: bool = False) -> Any:
    """The eigenvectors of rowsᵀ·rows / len(rows), as a tensor on the rows' device.

    On a CPU through SciPy's BLAS and LAPACK: the product as a symmetric rank-k update
    (syrk, half the work of a general product) and the eigenvectors by the divide-and-conquer
    driver (syevd), each about half the time of torch's on the 2-core machine of
    docs/performance.md (2048 features).
    """
    import torch

    if double:
        rows = rows.double()
    if rows.device.type != "cpu":
        return torch.linalg.eigh(rows.T @ rows / len(rows))[1]
    from scipy.linalg import blas, eigh

    update = blas.dsyrk if double else blas.ssyrk
    # A row-major (n, d) array is a column-major (d, n) one: its product with its transpose,
    # in the lower triangle, which is all that eigh reads.
    moment = update(1.0 / len(rows), rows.numpy().T, trans=0, lower=1)
    _, vectors = eigh(moment, lower=True, driver="evd", check_finite=False)
    return torch.from_numpy(vectors)


class _PathProblem:
    """The multinomial log-loss on centred, standardised features, with what every fit shares.

    Objective per C: the mean log-loss over the n training examples + λ/2·‖W‖², λ = 1/(C·n)
    (twice that for two classes), the intercept unpenalised — scikit-learn's objective
    (sum of log-losses + ‖W‖²/(2C)) divided by n, so the same minimiser. Centring each
    feature is exact here: W·(z − μ) + b = W·z + (b − W·μ), and b is not penalised.

    L-BFGS runs in preconditioned coordinates W = (V ∘ q)·Uᵀ, q = (c·s + λ)^(-1/2), where
    U, s are the eigenvectors and variances of the features and c the softmax's mean
    curvature (p(1 − p) over examples and classes) at the nearest C already fitted: the
    Hessian is then close to the identity at every C, so that few iterations are enough at
    large and at small C alike.

    On a CPU with native bfloat16 most evaluations are cheap: see `fit`. Logits are held one
    row per class, (M·K, n), where a CPU's softmax over K is fast.
    """

    def __init__(self, *, x: Any, y: Any, classes: int, seed: int = 0) -> None:
        import torch

        self.x, self.y, self.classes = x, y, classes
        self.n, self.dim = x.shape
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n, generator=generator).to(x.device)
        # With many rows: the eigenvectors from a 4·dim-row sample, each direction's variance
        # measured again on 2·dim other rows, since a sample covariance's small eigenvalues
        # are biased low (and the preconditioner would overshoot along them).
        if self.n <= 6 * self.dim:
            basis_rows = check_rows = x
        else:
            basis_rows, check_rows = x[order[: 4 * self.dim]], x[order[-2 * self.dim :]]
        # In float32 (half the time of float64: a preconditioner needs no more), but float32
        # eigh can fail to converge on real features where most dimensions are exactly zero
        # (an EfficientNet's at 32 px: about 1,000 of 1,280): then in float64.
        try:
            basis = _second_moment_eigenvectors(basis_rows)
            if not bool(torch.isfinite(basis).all()):
                raise torch.linalg.LinAlgError("non-finite eigenvectors")
        except (torch.linalg.LinAlgError, np.linalg.LinAlgError):
            basis = _second_moment_eigenvectors(basis_rows, double=True)
        self.basis = basis.to(x.dtype).contiguous()
        self.variance = (check_rows @ self.basis).square_().mean(dim=0)
        self.products = _RowBlocks(x)
        # A bfloat16 copy for the cheap evaluations of `fit`, on CPUs that multiply bfloat16
        # natively (AVX512-BF16): its products take half the time of float32 ones there.
        self.low = x.to(torch.bfloat16) if x.device.type == "cpu" and _bf16_cpu() else None
        # Each fit's results by key, for later fits to start from cheaply: the latest ones
        # within 256 MB (logits and residuals, 8·K·n bytes each; most starts combine the
        # latest fits).
        self.results: dict[int, dict[str, Any]] = {}
        self.results_kept = 2**28 // (4 * classes * (2 * self.n + self.dim))

    def fit(
        self,
        *,
        lams: Sequence[float],
        weights: Any,
        biases: Any,
        curvatures: Sequence[float],
        tol: float,
        max_iter: int,
        history_size: int,
        keys: Sequence[int] | None = None,
        starts: Sequence[Sequence[tuple[int, float]]] | None = None,
    ) -> dict[str, Any]:
        """Fit len(lams) values of λ together from (M, K, D) weights and (M, K) biases.

        One pass over the data serves every member: the members' objectives are separate,
        so one L-BFGS on their sum minimises each, and a (n, M·K) product costs little more
        than an (n, K) one. It stops at the first point where every member's largest
        absolute gradient entry is at most `tol` (scikit-learn's test, on W and b, not on
        the preconditioned V).

        On a CPU with native bfloat16 (`low`), most evaluations are cheap ones, each going on
        from the one before (`evaluate`); an exact one (float32) confirms convergence, so that
        the gradient this returns is always float32's. `keys` name the members' results for
        later fits, and `starts` say how each member's start combines earlier results ((key,
        coefficient) pairs, as the weights were combined): then the first evaluation needs no
        forward product, its logits those results' combination. The evaluation counts by kind
        come back as "evaluations".
        """
        import torch

        x, y, n, classes, basis = self.x, self.y, self.n, self.classes, self.basis
        device = x.device
        members = len(lams)
        lam = torch.tensor(list(lams), dtype=torch.float32, device=device)
        # Floored: on separable data at large C every prediction is certain, p(1 − p) → 0,
        # and the intercepts' scale √c would be zero.
        curvature = torch.tensor(list(curvatures), dtype=torch.float32, device=device)
        curvature = curvature.clamp_min(1e-6)
        scale = (curvature[:, None] * self.variance + lam[:, None]).rsqrt_()[:, None, :]
        bias_scale = curvature.sqrt()[:, None]
        v = ((weights @ basis) / scale).requires_grad_(True)
        beta = (biases * bias_scale).requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [v, beta],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=0.0,  # the test on W and b is made in the closure
            history_size=history_size,
            line_search_fn="strong_wolfe",
        )
        # Start as if one iteration had run with nothing learned, so that the first step
        # has length 1 (right in these coordinates) rather than torch's 1/‖g‖₁.
        size = v.numel() + beta.numel()
        optimizer.state[v].update(
            n_iter=1,
            d=torch.zeros(size, device=device),
            t=0.0,
            old_dirs=[],
            old_stps=[],
            ro=[],
            H_diag=1.0,
            prev_flat_grad=torch.zeros(size, device=device),
            prev_loss=0.0,
        )
        target = y[None, None, :].expand(members, 1, n)
        minus_one = torch.full((members, 1, n), -1.0, device=device)
        low = self.low
        # The last evaluation, from which the cheap ones go on (with `low` only).
        last: dict[str, Any] = {}
        counts = {"exact": 0, "exact_gradient": 0, "cheap": 0}
        if (
            low is not None
            and starts is not None
            and all(key in self.results for start in starts for key, _ in start)
        ):
            last.update(self._start_state(starts, biases), at_start=True)
            last["flat"] = weights.reshape(members * classes, self.dim)

        def evaluate(
            weight: Any, bias: Any, *, exact: bool, exact_gradient: bool, at_start: bool = False
        ) -> dict[str, Any]:
            """Loss terms, residuals and the data part of the gradient at (weight, bias).

            Exact: float32 products. Cheap: the last evaluation's logits and data gradient
            plus bfloat16 products of the changes since (weights, then residuals): their
            rounding, 2⁻⁸ of each change, shrinks with the steps as L-BFGS converges.
            `exact_gradient` with cheap logits: the gradient of the loss at those logits,
            in float32, so that the line search still compares like with like."""
            flat, bias_flat = weight.reshape(members * classes, self.dim), bias.reshape(-1)
            if exact:
                logits = self.products.times_transposed(flat, bias_flat).T.contiguous()
                exact_logits = True
            elif at_start:
                # L-BFGS evaluates its start first, and these are the logits there, combined
                # from earlier results (its weights, rotated there and back, differ from the
                # start's in float32 rounding only).
                logits, exact_logits = last["logits"], last["exact_logits"]
            else:
                logits = (flat - last["flat"]).to(torch.bfloat16) @ low.T
                logits = (
                    logits.float().add_(last["logits"]).add_((bias_flat - last["bias"])[:, None])
                )
                exact_logits = False
            scores = logits.view(members, classes, n)  # one row per class: fast softmax on a CPU
            correct = (scores.gather(1, target) >= scores.amax(dim=1, keepdim=True)).sum(dim=(1, 2))
            log_p = torch.log_softmax(scores, dim=1)
            if low is None:
                del logits, scores  # kept only to go on from; at ImageNet size each is 10 GB
            # Summed in float64: at small C the loss is log(K) plus changes far below
            # float32's resolution there, which the line search must still see.
            nll = -log_p.gather(1, target).squeeze(1).double().mean(dim=1)
            residual = log_p.exp_()
            curvature_now = residual.mean(dim=(1, 2)) - residual.square().mean(dim=(1, 2))
            residual = residual.scatter_add_(1, target, minus_one).div_(n).view(-1, n)
            if exact or exact_gradient:
                grad_data, error = self.products.transposed_times(residual.T.contiguous()), 0.0
            elif at_start and last["same_point"]:
                grad_data, error = last["grad_data"], last["error"]  # where the results are
            else:
                change = (residual - last["residual"]).to(torch.bfloat16).T.contiguous().T @ low
                error = last["error"] + 2.0**-7 * float(change.abs().max())
                grad_data = change.float().add_(last["grad_data"])
            saved = {}
            if low is not None:  # what the next cheap evaluation goes on from
                saved = {
                    "logits": logits,
                    "exact_logits": exact_logits,
                    "residual": residual,
                    "grad_data": grad_data,
                }
                last.update(saved, flat=flat, bias=bias_flat, error=error)
            counts["exact" if exact else "exact_gradient" if exact_gradient else "cheap"] += 1
            grad_weight = grad_data.view(members, classes, self.dim) + weight * lam[:, None, None]
            grad_bias = residual.view(members, classes, n).sum(dim=2)
            grad_max = torch.maximum(
                grad_weight.abs().amax(dim=(1, 2)), grad_bias.abs().amax(dim=1)
            )
            return {
                "nll": nll,
                "correct": correct,
                "curvature": curvature_now,
                "grad_weight": grad_weight,
                "grad_bias": grad_bias,
                "grad_max": grad_max,
                "error": error,
                "exact": exact_logits and error == 0.0,
                **saved,
            }

        seen: list[dict[str, Any]] = []
        shift = [0.0]  # what the exact evaluations' losses are moved by (see below)
        finishing = [False]  # an exact evaluation at the point L-BFGS returned

        def closure() -> Any:
            with torch.no_grad():
                weight = (v * scale) @ basis.T
                bias = beta / bias_scale
                # Exact with nothing to go on from. At a start whose logits are exact
                # (combined from exact results), an exact gradient makes the evaluation exact,
                # unless the start is where those results are (their gradient is known).
                # Later, the gradient anew whenever the cheap evaluations' rounding may have
                # reached the gradient they measure.
                exact = low is None or not last or finishing[0]
                at_start = not exact and last.pop("at_start", False)
                exact_gradient = not exact and (
                    last["error"] > max(last["grad"], tol)
                    or (at_start and last["exact_logits"] and not last["same_point"])
                )
                result = evaluate(
                    weight, bias, exact=exact, exact_gradient=exact_gradient, at_start=at_start
                )
                if not result["exact"] and bool((result["grad_max"] <= tol).all()):
                    # Converged by the cheap evaluation: confirmed by an exact one. The cheap
                    # logits' rounding shifts the loss a little (at small C by more than
                    # the line search's steps change it): the losses that follow keep the
                    # cheap level, since L-BFGS compares them with the ones before.
                    cheap_nll = result["nll"].sum()
                    result = evaluate(weight, bias, exact=True, exact_gradient=True)
                    shift[0] += float(cheap_nll - result["nll"].sum())
                grad_max = result["grad_max"]
                last["grad"] = float(grad_max.max())
                penalty = 0.5 * lam.double() * weight.double().square().sum(dim=(1, 2))
                if bool((grad_max <= tol).all()):
                    # Converged: a zero gradient ends torch's L-BFGS at this point.
                    v.grad, beta.grad = torch.zeros_like(v), torch.zeros_like(beta)
                else:
                    v.grad = (result["grad_weight"] @ basis) * scale
                    beta.grad = result["grad_bias"] / bias_scale
                seen.append(
                    {
                        "v": v.detach().clone(),
                        "beta": beta.detach().clone(),
                        "weight": weight,
                        "bias": bias,
                        "grad_max": grad_max,
                        "exact": result["exact"],
                        "correct": result["correct"],
                        "curvature": result["curvature"],
                        "state": {
                            key: result[key]
                            for key in ("logits", "exact_logits", "residual", "grad_data", "error")
                            if key in result
                        },
                    }
                )
                del seen[:-4]
            return (result["nll"] + penalty).sum() + shift[0]

        optimizer.step(closure)
        # The line search may end on a trial point it did not accept: take the evaluation
        # at the point L-BFGS returned, or make one.
        final = next(
            (s for s in reversed(seen) if torch.equal(s["v"], v) and torch.equal(s["beta"], beta)),
            None,
        )
        if final is None or not final["exact"]:
            # Not converged (or the line search ended elsewhere): the gradient reported is
            # float32's at the point returned.
            finishing[0] = True
            closure()
            final = seen[-1]
        state = optimizer.state[v]
        final["n_iter"] = int(state.get("n_iter", 1)) - 1
        final["func_evals"] = int(state.get("func_evals", 0))
        final["evaluations"] = counts
        if keys is not None and low is not None and self.results_kept > 0:
            state = final["state"]
            for member, key in enumerate(keys):
                rows = slice(member * classes, (member + 1) * classes)
                self.results.pop(key, None)  # the newest last
                while len(self.results) >= self.results_kept:
                    del self.results[next(iter(self.results))]
                self.results[key] = {
                    "logits": state["logits"][rows],
                    "residual": state["residual"][rows],
                    "grad_data": state["grad_data"][rows],
                    "exact_logits": state["exact_logits"],
                    "error": state["error"],
                }
        return final

    def _start_state(
        self, starts: Sequence[Sequence[tuple[int, float]]], biases: Any
    ) -> dict[str, Any]:
        """The state a first cheap evaluation goes on from: each member's logits combined
        from earlier results as its start was (exact: logits are linear in the weights),
        and the residuals and data gradient of the result with the largest coefficient
        (zero from the origin), which the first evaluation's gradient is a change from."""
        import torch

        logits, residual, grad_data, error, exact_logits = [], [], [], 0.0, True
        for member, start in enumerate(starts):
            if not start:  # the origin: no weights, so the biases are the logits
                logits.append(biases[member][:, None].expand(self.classes, self.n))
                residual.append(torch.zeros(self.classes, self.n, device=self.x.device))
                grad_data.append(torch.zeros(self.classes, self.dim, device=self.x.device))
                error = math.inf  # nothing to go on from: the first gradient is exact
                continue
            logits.append(sum(c * self.results[key]["logits"] for key, c in start))
            nearest = self.results[max(start, key=lambda pair: abs(pair[1]))[0]]
            residual.append(nearest["residual"])
            grad_data.append(nearest["grad_data"])
            exact_logits = exact_logits and all(
                self.results[key]["exact_logits"] for key, _ in start
            )
            error = max(
                error,
                sum(abs(c) for _, c in start) * max(self.results[key]["error"] for key, _ in start),
            )
        return {
            "bias": biases.reshape(-1),
            "logits": torch.cat(logits),
            "residual": torch.cat(residual),
            "grad_data": torch.cat(grad_data),
            "exact_logits": exact_logits,
            "error": error,
            "grad": float("inf"),
            # Every member starts where one earlier result is (a fit polished from itself).
            "same_point": all(len(start) == 1 and start[0][1] == 1.0 for start in starts),
        }


def _denormals_flushed(function: Any) -> Any:
    """Run `function` with the CPU flushing denormal floats to zero (torch.set_flush_denormal).

    Real features often have dimensions that are zero on every image (an EfficientNet's at 32
    px: 958 of 1,280 on the digits of docs/performance.md) or more dimensions than images:
    along those directions only the penalty acts, and the weights decay into denormal floats,
    which x86 CPUs multiply about 100 times more slowly. Flushed, that digits case fits 6× faster;
    values below 1.2e-38 change nothing a 1e-5 gradient test can see. The flag is restored to
    torch's default (off) afterwards.
    """

    @functools.wraps(function)
    def flushed(*args: Any, **kwargs: Any) -> Any:
        import torch

        torch.set_flush_denormal(True)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_flush_denormal(False)

    return flushed


@_denormals_flushed
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
    refine_tol: float | None = 1e-5,
    refine_reach: float = 0.005,
    polish_reach: float = 0.003,
    coarse_points: int = 12,
    together: int = 2,
    polish_together: int = 4,
    history_size: int = 10,
) -> ProbeResult:
    """Full-batch, preconditioned L-BFGS in float32 over the C grid (`_PathProblem`).

    Converged means the largest absolute gradient entry is at most `tol`, scikit-learn's
    (scipy's pgtol) test. C is chosen as the full sweep (`fit_probe_sklearn`) chooses it:
    the highest val accuracy, ties to the smallest C. The search: the coarse subset of the
    grid (`coarse_to_fine`), all of it, `together` values at a time in ascending order (val
    accuracy is not assumed unimodal in C); then bisection of every gap between fitted
    neighbours that could hold a better C (`refinement`), down to one grid step. Each fit
    starts from the path interpolated or extrapolated through the fits so far
    (`_start_point`). The sweep lists the fitted C only.

    On these fits' val accuracies, the choice is the full sweep's whenever its C stands at most
    `refine_reach` (val accuracy, a fraction) above the better of the two fits around it at
    each step of the bisection. That holds when, on one side of the best C, val accuracy
    stays within `refine_reach` of the best for one coarse step; a peak narrower than that,
    between two coarse values both more than `refine_reach` below the best, can be missed.
    A larger `refine_reach` refines more of the curve (all of a flat top) at more fits.

    These fits stop at `tol`: near the peak a warm-started fit that just meets 1e-4 can be a
    few tenths of a point of val accuracy from its optimum's, as much as neighbouring C differ
    there, so which near-tied C wins would depend on where each fit stopped. So every fit
    within `polish_reach` of the best val accuracy is polished from itself to `refine_tol`,
    `polish_together` per pass over the data, with the gaps `refinement` would bisect at that
    reach, until the best fit and everything within `polish_reach` of it are polished
    (`polish_candidates`); C is chosen among the polished fits. That is the choice of the exact
    optima whenever a fit at `tol` is within `polish_reach` of its optimum's val accuracy.
    `refine_tol=None` (or `tol`) turns polishing off: every converged fit counts as polished.

    On a CPU with AVX512-BF16 most of the objective's evaluations are cheap bfloat16 updates
    of the one before, and a float32 evaluation confirms each fit's convergence
    (`_PathProblem.fit`): the fits and the choice are float32's, in about two thirds of the
    time (docs/performance.md).
    """
    import torch

    if len(c_grid) == 0:
        raise ValueError("empty C grid")
    grid = sorted(float(value) for value in c_grid)
    log_c = np.log(grid)
    present = np.unique(train_y)
    if len(present) < 2:
        raise ValueError(f"probe needs at least 2 classes in the training labels, got {present}")
    mean, std = scalar_standardization(train_x)
    # Fit the classes present only, as scikit-learn does: an absent class's unpenalised
    # intercept would run off to -inf and never converge.
    index = np.full(num_classes, -1, dtype=np.int64)
    index[present] = np.arange(len(present))
    x = torch.as_tensor(train_x, dtype=torch.float32, device=device)
    raw_centre = x.mean(dim=0)
    x = x.sub(raw_centre).div_(std)  # one pass: standardised, then each feature centred
    centre = (raw_centre - mean) / std
    y = torch.as_tensor(index[train_y], device=device)
    val_z = torch.as_tensor(val_x, dtype=torch.float32, device=device).sub(raw_centre).div_(std)
    val_t = torch.as_tensor(val_y, device=device)
    n, dim = x.shape
    classes = len(present)
    problem = _PathProblem(x=x, y=y, classes=classes)
    # Binary: scikit-learn fits one vector w under ‖w‖²/(2C); the softmax pair (w/2, -w/2)
    # has ‖W‖² = ‖w‖²/2, so the same optimum needs twice the penalty.
    penalty = 2.0 if classes == 2 else 1.0
    # The optimum as C → 0: no weights, log class frequencies as intercepts.
    log_prior = (torch.bincount(y, minlength=classes).double() / n).log().float()
    origin = (torch.zeros(classes, dim, device=device), log_prior - log_prior.mean())
    solutions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    curvature: dict[int, float] = {}
    sweep: dict[int, dict[str, Any]] = {}
    # The choice is made among these: fits that met refine_tol, or were fitted to it.
    refine_tol = tol if refine_tol is None else min(refine_tol, tol)
    polished: set[int] = set()

    def fit(indices: list[int], *, polish: bool) -> None:
        starts, curvatures = [], []
        for i in indices:
            combination = _start_point(i, solutions, log_c)
            starts.append(combination)
            nearest = min(curvature, key=lambda j: abs(j - i), default=None)
            # At C → 0 every class has probability ≈ 1/K: curvature (1 − 1/K)/K.
            guess = curvature[nearest] if nearest is not None else (1 - 1 / classes) / classes
            curvatures.append(guess)

        def combine(combination: list[tuple[int, float]], part: int) -> torch.Tensor:
            if not combination:
                return origin[part]
            return sum(coefficient * solutions[j][part] for j, coefficient in combination)

        result = problem.fit(
            lams=[penalty / (grid[i] * n) for i in indices],
            weights=torch.stack([combine(start, 0) for start in starts]),
            biases=torch.stack([combine(start, 1) for start in starts]),
            curvatures=curvatures,
            keys=indices,
            starts=starts,
            tol=refine_tol if polish else tol,
            max_iter=max_iter,
            history_size=history_size,
        )
        with torch.no_grad():  # every member's val predictions from one product
            flat = result["weight"].reshape(-1, dim)
            val_logits = torch.addmm(result["bias"].reshape(-1), val_z, flat.T)
            val_predictions = val_logits.view(len(val_t), len(indices), classes).argmax(dim=2)
            val_corrects = (val_predictions == val_t[:, None]).sum(dim=0)
        for member, i in enumerate(indices):
            weight, bias = result["weight"][member], result["bias"][member]
            solutions[i] = (weight, bias)
            curvature[i] = float(result["curvature"][member])
            val_correct = val_corrects[member]
            grad_max = float(result["grad_max"][member])
            sweep[i] = {
                "C": grid[i],
                "train_acc": int(result["correct"][member]) / n,
                "val_acc": int(val_correct) / len(val_y),
                "n_iter": result["n_iter"],
                "func_evals": result["func_evals"],
                "fitted_with": len(indices),
                "grad_max": grad_max,
                "converged": grad_max <= tol,
                "polished": polish or grad_max <= refine_tol,
            }
            if sweep[i]["polished"]:
                polished.add(i)
            if grad_max > tol:
                log.warning(
                    "C=%g did not converge in %d iterations (largest gradient entry %.2g > tol %g)",
                    grid[i],
                    max_iter,
                    grad_max,
                    tol,
                )
        bar.update(len(indices))

    def best_index(among: set[int] | None = None) -> int:
        # Highest val accuracy; ties to the smallest C, as in the sklearn sweep.
        candidates = sorted(sweep if among is None else among)
        return max(candidates, key=lambda i: (sweep[i]["val_acc"], -i))

    first, _ = coarse_to_fine(len(grid), points=coarse_points)
    with tqdm(disable=not progress, desc="C sweep", ascii=True, unit="C") as bar:
        # The whole coarse grid, in ascending groups: val accuracy need not be unimodal in C
        # (real features can have a second, higher peak at large C), and nothing seen at
        # small C bounds what larger C reach.
        # The first group is twice as large: the most regularised fits lie close to the origin
        # and take few iterations, so a pass over the data serves more of them.
        groups = [first[: 2 * together]]
        groups += [first[i : i + together] for i in range(2 * together, len(first), together)]
        for group in groups:
            fit(group, polish=False)
        # Then bisect every gap between neighbouring fits that could hold the full sweep's
        # choice (`refinement`), at tol: this only finds where the peak is.
        while indices := refinement(
            {i: row["val_acc"] for i, row in sweep.items()}, best_index(), reach=refine_reach
        ):
            for start in range(0, len(indices), together):
                fit(indices[start : start + together], polish=False)
        # Near the peak neighbouring C differ by tenths of a point of val accuracy, as much as
        # a fit that just meets tol can be from its optimum's: polish to refine_tol, from
        # itself, every fit within polish_reach of the best polished one (`polish_candidates`),
        # a few per pass over the data, until none is left; C is chosen among those.
        while indices := polish_candidates(
            {i: row["val_acc"] for i, row in sweep.items()}, polished, reach=polish_reach
        ):
            for start in range(0, len(indices), polish_together):
                fit(indices[start : start + polish_together], polish=True)
    chosen = best_index(polished)
    weight_k = np.zeros((num_classes, dim), dtype=np.float64)
    bias_k = np.full(num_classes, -1e9 if len(present) < num_classes else 0.0)
    chosen_weight, chosen_bias = solutions[chosen]
    weight_k[present] = chosen_weight.double().cpu().numpy()
    # Back from centred features: b − W·μ.
    chosen_bias = chosen_bias.double() - chosen_weight.double() @ centre.double()
    bias_k[present] = chosen_bias.cpu().numpy()
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
