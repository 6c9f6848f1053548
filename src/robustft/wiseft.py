"""WiSE-FT (Wortsman et al. 2022): interpolate the weights of two models of one architecture.

θ_α = (1 − α)·θ₀ + α·θ₁ for every floating-point entry of the state dict, head included; θ₀ is
the pretrained model (backbone + LP head, or the zero-shot head), θ₁ the fine-tuned one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def interpolate_state_dicts(
    *, theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """θ_α = (1 − α)·θ₀ + α·θ₁. α = 0 and α = 1 return exact copies of θ₀ and θ₁.

    Integer entries (BatchNorm's step counters) cannot be interpolated: they are taken from
    the nearer end (θ₀ for α < 0.5).
    """
    if set(theta0) != set(theta1):
        only0 = sorted(set(theta0) - set(theta1))[:2]
        only1 = sorted(set(theta1) - set(theta0))[:2]
        raise ValueError(f"state dicts differ in keys (only in θ₀: {only0}, only in θ₁: {only1})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = {}
    for key, start in theta0.items():
        end = theta1[key]
        if start.shape != end.shape:
            raise ValueError(f"'{key}': shapes {tuple(start.shape)} and {tuple(end.shape)} differ")
        if alpha == 0.0 or alpha == 1.0 or not start.is_floating_point():
            out[key] = (start if alpha < 0.5 else end).detach().clone()
        else:
            out[key] = torch.lerp(start.detach(), end.detach().to(start.dtype), alpha)
    return out
