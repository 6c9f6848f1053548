"""The `prepare` hooks of the built-in methods (the table in `spec.BUILTIN` names them).

Each takes the classifier (pretrained backbone, head already in place), the run's options
(its fixed options and the swept values of its run folder) and the teacher (KD only), and
returns a `Setup`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from robustft.methods.objectives import (
    WeightPenalty,
    apply_lora,
    distillation_objective,
    merged_copy,
)
from robustft.methods.spec import Setup


def option(options: Mapping[str, Any], key: str, method: str) -> float:
    if options.get(key) is None:
        raise ValueError(f"method {method!r} needs config key 'finetune.{method}.{key}'")
    return float(options[key])


def prepare_ft(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    return Setup()


def prepare_lpft(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    return Setup()  # its start (the probe head) is all that differs from ft


def prepare_l2sp(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    penalty = WeightPenalty(
        model=model,
        kind="l2",
        alpha=option(options, "alpha", "l2sp"),
        beta=float(options.get("beta", 0.0)),
    )
    return Setup(extra_loss=penalty)


def prepare_l1sp(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    return Setup(
        extra_loss=WeightPenalty(model=model, kind="l1", alpha=option(options, "alpha", "l1sp"))
    )


def prepare_kd(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    if teacher is None:
        raise ValueError("method 'kd' needs the probe's head (probe_dir) for its teacher")
    loss_fn, extra_loss = distillation_objective(
        teacher=teacher,
        weight=option(options, "lambda", "kd"),
        temperature=option(options, "temperature", "kd"),
    )
    return Setup(loss_fn=loss_fn, extra_loss=extra_loss)


def prepare_lora(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    apply_lora(
        model,
        rank=int(option(options, "rank", "lora")),
        alpha=option(options, "lora_alpha", "lora"),
        target=str(options.get("target", "auto")),
    )
    # Saved merged: the plain architecture every later rule loads.
    return Setup(finalize=merged_copy)
