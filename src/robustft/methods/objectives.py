"""The losses and adapters of the feature-protection methods (Tan et al. 2024).

Each method is an initialisation, a choice of trainable parameters, or an extra loss term for
`training.train_classifier` (its `extra_loss` hook):

- L2-SP: α/2·‖w − w₀‖² over the backbone + β/2·‖w_head‖² (`WeightPenalty(kind="l2")`);
- L1-SP: α·‖w − w₀‖₁ over the backbone (`WeightPenalty(kind="l1")`);
- KD: (1 − λ)·CE(f(x), y) + λ·T²·KL(softmax(f₀(x)/T) ‖ softmax(f(x)/T)), f₀ the frozen
  pretrained model with the probe head (`distillation_objective`);
- LoRA: peft adapters on the backbone, head trained in full (`apply_lora`, `merged_copy`).

w₀ and the teacher are rebuilt from the pretrained weights by the caller, before any resume,
so they are not part of the resumable state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("auto", "qkv", "linear", "conv1x1", "conv")


class WeightPenalty:
    """α/2·‖w − w₀‖² (kind "l2") or α·‖w − w₀‖₁ (kind "l1") over the parameters under
    `anchor_prefix` (the backbone), plus β/2·‖w‖² over those under `head_prefix` (L2-SP's
    term on the new layer; β = 0 turns it off)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        kind: str,
        alpha: float,
        beta: float = 0.0,
        anchor_prefix: str = "backbone.",
        head_prefix: str = "head.",
    ) -> None:
        if kind not in ("l1", "l2"):
            raise ValueError(f"penalty kind must be 'l1' or 'l2', got {kind!r}")
        self.kind, self.alpha, self.beta = kind, float(alpha), float(beta)
        # Parameter objects survive model.to(device); w₀ follows them there lazily.
        self.anchored = [
            (param, param.detach().clone())
            for name, param in model.named_parameters()
            if name.startswith(anchor_prefix) and param.requires_grad
        ]
        self.head = [
            param
            for name, param in model.named_parameters()
            if name.startswith(head_prefix) and param.requires_grad
        ]
        if not self.anchored:
            raise ValueError(f"no trainable parameters under {anchor_prefix!r} to anchor")

    def penalty(self) -> torch.Tensor:
        device = self.anchored[0][0].device
        total = torch.zeros((), device=device)
        for index, (param, anchor) in enumerate(self.anchored):
            if anchor.device != param.device:
                anchor = anchor.to(param.device)
                self.anchored[index] = (param, anchor)
            diff = param - anchor
            if self.kind == "l2":
                total = total + 0.5 * self.alpha * diff.pow(2).sum()
            else:
                total = total + self.alpha * diff.abs().sum()
        if self.beta:
            for param in self.head:
                total = total + 0.5 * self.beta * param.pow(2).sum()
        return total

    def __call__(self, **_: Any) -> torch.Tensor:
        return self.penalty()


class Distillation:
    """λ·T²·KL(softmax(f₀(x)/T) ‖ softmax(f(x)/T)) toward a frozen teacher f₀ (eval mode).

    The T² keeps the gradient scale independent of T (Hinton et al. 2015). Pair it with
    `loss_fn = (1 − λ)·CE` (`distillation_objective`).
    """

    def __init__(self, *, teacher: nn.Module, weight: float, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)

    def __call__(self, *, images: torch.Tensor, logits: torch.Tensor, **_: Any) -> torch.Tensor:
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)
        self.teacher.eval()
        with torch.no_grad():
            targets = F.softmax(self.teacher(images) / self.temperature, dim=1)
        student = F.log_softmax(logits / self.temperature, dim=1)
        kl = F.kl_div(student, targets, reduction="batchmean")
        return self.weight * self.temperature**2 * kl


def distillation_objective(
    *, teacher: nn.Module, weight: float, temperature: float
) -> tuple[nn.Module, Distillation]:
    """(loss_fn, extra_loss) of KD: (1 − λ)·CE and the λ-weighted KL term. With λ = 0 the sum
    is exactly CE (1·CE + 0), so KD at λ = 0 trains exactly as FT."""
    if not 0 <= weight <= 1:
        raise ValueError(f"KD weight lambda must be in [0, 1], got {weight}")
    return (
        _ScaledCrossEntropy(1.0 - float(weight)),
        Distillation(teacher=teacher, weight=weight, temperature=temperature),
    )


class _ScaledCrossEntropy(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.scale * F.cross_entropy(logits, labels)


def lora_target_modules(backbone: nn.Module, *, target: str) -> list[str]:
    """Names of the backbone modules that get LoRA adapters.

    qkv: the fused attention projections of timm ViTs; linear: every nn.Linear; conv1x1: the
    1×1 convolutions (ResNet bottlenecks, shortcuts); conv: every convolution; auto: qkv if the
    backbone has them, else conv1x1, else linear.
    """
    if target not in LORA_TARGETS:
        raise ValueError(f"LoRA target must be one of {list(LORA_TARGETS)}, got {target!r}")
    kinds = {
        "qkv": lambda name, m: isinstance(m, nn.Linear) and name.split(".")[-1] == "qkv",
        "linear": lambda name, m: isinstance(m, nn.Linear),
        "conv1x1": lambda name, m: isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1),
        "conv": lambda name, m: isinstance(m, nn.Conv2d),
    }
    order = ["qkv", "conv1x1", "linear"] if target == "auto" else [target]
    for kind in order:
        names = [name for name, module in backbone.named_modules() if kinds[kind](name, module)]
        if names:
            return names
    raise ValueError(f"LoRA target {target!r}: the backbone has no such layers")


def apply_lora(model: nn.Module, *, rank: int, alpha: float, target: str) -> nn.Module:
    """Wrap `model.backbone` in a peft LoRA model (base weights frozen, adapters trainable);
    `model.head` stays a plain, fully trainable layer. Returns `model`, changed in place."""
    from peft import LoraConfig, get_peft_model

    names = lora_target_modules(model.backbone, target=target)
    config = LoraConfig(
        r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none", target_modules=names
    )
    model.backbone = get_peft_model(model.backbone, config)
    for param in model.head.parameters():
        param.requires_grad_(True)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of a LoRA-wrapped classifier with the adapters merged into the base weights: the
    plain architecture again, loadable by everything downstream."""
    merged = copy.deepcopy(model)
    merged.backbone = merged.backbone.merge_and_unload()
    return merged


def method_summary(method: str, options: Mapping[str, Any]) -> str:
    """A short description for the logs."""
    return f"{method} " + ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
