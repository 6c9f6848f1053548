"""Linear probe: multinomial L2 logistic regression over a grid of C, chosen on ID val.

`solver` holds the numerics (standardisation, the torch and scikit-learn solvers, the search
over C). The probe stage (`run_probe`: feature files in, head and metrics out) lives in
`robustft.stages.probe`; it is re-exported here for compatibility, lazily, since that stage
imports the solver from this package (an import at the top would close a cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from robustft.probe.solver import (
    ProbeResult,
    coarse_to_fine,
    fit_probe,
    fit_probe_sklearn,
    fit_probe_torch,
    polish_candidates,
    refinement,
    scalar_standardization,
)

if TYPE_CHECKING:
    from robustft.stages.probe import run_probe

__all__ = [
    "ProbeResult",
    "coarse_to_fine",
    "fit_probe",
    "fit_probe_sklearn",
    "fit_probe_torch",
    "polish_candidates",
    "refinement",
    "run_probe",
    "scalar_standardization",
]


def __getattr__(name: str) -> Any:
    if name == "run_probe":
        from robustft.stages.probe import run_probe

        return run_probe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
