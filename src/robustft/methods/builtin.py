"""The `prepare` hooks of the built-in methods (the table in `spec.BUILTIN` names them).

Each takes the classifier (pretrained backbone, head already in place), the run's options
(its fixed options and the swept values of its run folder), the teacher (KD only) and the
text tower (FLYP only), and returns a `Setup`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from robustft.methods.layers import block_groups, freeze, stem_parameters, timm_model
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


def prepare_freeze_embed(
    *, model: nn.Module, options: Mapping[str, Any], teacher: Any = None
) -> Setup:
    # Kumar et al. 2022b: freezing the embedding lets SGD fine-tune as well as AdamW.
    frozen = freeze(model, stem_parameters(model, method="freeze_embed"))
    return Setup(frozen_statistics=frozen)


def prepare_surgical(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    groups = block_groups(
        model, groups=int(option(options, "groups", "surgical")), method="surgical"
    )
    chosen = option(options, "group", "surgical")
    if chosen != int(chosen) or not 0 <= chosen < len(groups):
        raise ValueError(
            f"config key 'finetune.surgical.group_grid': {chosen:g} is not a group index "
            f"0..{len(groups) - 1} (finetune.surgical.groups = {len(groups)})"
        )
    trained = set(groups[int(chosen)])
    # Everything else stays as it starts, the probe's head included (Lee et al. tune one
    # block group of a model whose head already fits the labels).
    others = [name for name, _ in model.named_parameters() if name not in trained]
    return Setup(frozen_statistics=freeze(model, others))


def prepare_llrd(*, model: nn.Module, options: Mapping[str, Any], teacher: Any = None) -> Setup:
    from timm.optim import param_groups_layer_decay

    decay = option(options, "decay", "llrd")
    if not 0 < decay <= 1:
        raise ValueError(f"config key 'finetune.llrd.decay_grid': {decay:g} is not in (0, 1]")
    inner, prefix = timm_model(model, method="llrd")
    names = {id(param): prefix + name for name, param in inner.named_parameters()}
    # timm's BEiT-style groups: the top layer (what follows the last block) at lr, each layer
    # below it at decay × the one above; the classifier's new head trains at lr.
    groups = param_groups_layer_decay(inner, weight_decay=0.0, layer_decay=decay)
    factors = {names[id(param)]: group["lr_scale"] for group in groups for param in group["params"]}
    return Setup(lr_factors=factors)


def prepare_flyp(
    *, model: nn.Module, options: Mapping[str, Any], teacher: Any = None, text: Any = None
) -> Setup:
    from robustft.methods.flyp import apply_flyp

    if text is None:
        raise ValueError("method 'flyp' needs the backbone's CLIP text tower")
    loss_fn, extra_loss, finalize = apply_flyp(
        model, text=text, templates=str(options.get("templates", "openai_imagenet"))
    )
    return Setup(loss_fn=loss_fn, extra_loss=extra_loss, finalize=finalize)
