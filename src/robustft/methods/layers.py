"""Which layer each parameter of a classifier belongs to, by timm's grouping of its backbone.

timm models say how their parameters form layers (`group_matcher`: the stem, then the blocks,
then what follows them); the toy ResNet says it the same way. The methods that freeze some
layers (freeze-embed, surgical fine-tuning) or scale their learning rates (layer-wise lr decay,
through timm's `param_groups_layer_decay`) read it from here, so that one definition of "the
stem" and "a block" holds for the toy, timm's ResNets and its ViTs.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from robustft.models.backbone import TimmBackbone


def timm_model(model: nn.Module, *, method: str) -> tuple[nn.Module, str]:
    """The timm-style model inside a classifier's backbone (a `TimmBackbone`'s model, or the
    toy itself) and the prefix of its parameter names in the classifier. A backbone without a
    `group_matcher` is a one-line error naming `method`."""
    backbone = model.backbone
    if isinstance(backbone, TimmBackbone):
        inner, prefix = backbone.model, "backbone.model."
    else:
        inner, prefix = backbone, "backbone."
    if not callable(getattr(inner, "group_matcher", None)):
        raise ValueError(
            f"method {method!r} needs a backbone that groups its layers (timm's group_matcher); "
            f"{type(inner).__name__} has none"
        )
    return inner, prefix


def layer_ids(model: nn.Module, *, method: str, coarse: bool = False) -> dict[str, int]:
    """{parameter name in `model`: layer index} over the backbone: 0 is the stem, then the
    blocks in order (`coarse`: timm's stages); a final norm joins the last block (timm's
    rule), and what timm's matcher leaves out (an embedding projection) comes last. The
    classifier's own head is not in it."""
    from timm.models import group_parameters

    inner, prefix = timm_model(model, method=method)
    grouped = group_parameters(inner, inner.group_matcher(coarse=coarse), reverse=True)
    return {prefix + name: int(layer) for name, layer in grouped.items()}


def freeze(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    """Stop the parameters `names` from training (requires_grad off). Returns the BatchNorm
    layers all of whose parameters are now frozen: their running statistics must stay as
    pretrained too (`Setup.frozen_statistics`), so that a frozen layer is exactly unchanged."""
    frozen = set(names)
    parameters = dict(model.named_parameters())
    unknown = sorted(frozen - set(parameters))
    if unknown:
        raise ValueError(f"no parameter {unknown[0]!r} in the model")
    for name in frozen:
        parameters[name].requires_grad_(False)
    return tuple(
        module_name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and any(True for _ in module.parameters())
        and all(f"{module_name}.{p}" in frozen for p, _ in module.named_parameters())
    )


def stem_parameters(model: nn.Module, *, method: str) -> list[str]:
    """The parameters of the backbone's stem (timm's `stem` group): a ViT's patch embedding
    with its class token, position embedding and pre-norm; a ResNet's first convolution and
    its BatchNorm; the toy's `stem`."""
    stem = [name for name, layer in layer_ids(model, method=method).items() if layer == 0]
    if not stem:
        raise ValueError(f"method {method!r}: the backbone's group_matcher names no stem")
    return stem


def block_groups(model: nn.Module, *, groups: int, method: str) -> list[list[str]]:
    """The backbone's parameters in `groups` contiguous groups of timm's coarse layers
    (a ResNet's stages, a ViT's blocks), as equal in number of layers as they divide (the
    first ones one larger); the stem joins the first group and what follows the blocks
    (final norm, projection) the last."""
    layers = layer_ids(model, method=method, coarse=True)
    units = sorted({layer for layer in layers.values() if layer > 0})
    if not 1 <= groups <= len(units):
        raise ValueError(
            f"method {method!r}: groups must be between 1 and {len(units)} (the backbone's "
            f"layers after the stem), got {groups}"
        )
    size, extra = divmod(len(units), groups)
    group_of, start = {0: 0}, 0
    for index in range(groups):
        end = start + size + (1 if index < extra else 0)
        group_of.update({unit: index for unit in units[start:end]})
        start = end
    out: list[list[str]] = [[] for _ in range(groups)]
    for name, layer in layers.items():
        out[group_of[layer]].append(name)
    return out
