"""Fine-tuning methods: the method table (`spec`), the built-in hooks (`builtin`) and the
losses and adapters they use (`objectives`).

A face that only re-exports. The table is read at parse time, so the torch-backed names are
imported on first use (PEP 562), not when the package is.
"""

from robustft.methods.spec import BUILTIN as BUILTIN
from robustft.methods.spec import STAGE_METHODS as STAGE_METHODS
from robustft.methods.spec import Method as Method
from robustft.methods.spec import MethodError as MethodError
from robustft.methods.spec import Setup as Setup
from robustft.methods.spec import method_table as method_table
from robustft.methods.spec import resolve as resolve

_OBJECTIVES = (
    "LORA_TARGETS",
    "Distillation",
    "WeightPenalty",
    "apply_lora",
    "distillation_objective",
    "lora_target_modules",
    "merged_copy",
    "method_summary",
)


def __getattr__(name: str):
    if name in _OBJECTIVES:
        from robustft.methods import objectives

        return getattr(objectives, name)
    raise AttributeError(f"module 'robustft.methods' has no attribute {name!r}")
