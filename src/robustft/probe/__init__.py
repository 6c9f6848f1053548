"""Linear probe: multinomial L2 logistic regression over a grid of C, chosen on ID val.

`solver` holds the numerics (standardisation, the torch and scikit-learn solvers, the search
over C); `stage` the probe stage (`run_probe`: feature files in, head and metrics out). This
module only re-exports their public names.
"""

from robustft.probe.solver import (
    ProbeResult,
    coarse_to_fine,
    fit_probe,
    fit_probe_sklearn,
    fit_probe_torch,
    refinement,
    scalar_standardization,
)
from robustft.probe.stage import run_probe

__all__ = [
    "ProbeResult",
    "coarse_to_fine",
    "fit_probe",
    "fit_probe_sklearn",
    "fit_probe_torch",
    "refinement",
    "run_probe",
    "scalar_standardization",
]
