"""FLYP, "finetune like you pretrain" (Goyal et al., CVPR 2023; github locuslab/FLYP).

Both CLIP towers train with CLIP's own contrastive loss (open_clip's `ClipLoss`, learned logit
scale included) between the images of a batch and one prompt of each image's class, the
template drawn at random per image (FLYP's training file lists every image with every template).
The classifier is the zero-shot head of the text tower as it is then (`zeroshot.zeroshot_head`,
the same function as the zero-shot stage), rebuilt whenever the model is put in eval mode after
training steps, as FLYP rebuilds it before each evaluation.

In the one training loop this is the classifier's head: `ZeroShotHead` holds the text tower
(so its parameters train and are saved with the model), the current zero-shot weights, and the
image features of the last training batch, from which `extra_loss` forms the contrastive loss;
`loss_fn` adds nothing. The saved model is the plain image classifier with the zero-shot head as
its linear head (`plain_classifier`), which every later rule reads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustft.zeroshot import TextTower, prompt_templates, zeroshot_head


class ZeroShotHead(nn.Module):
    """A linear head whose weights are the zero-shot head of a trainable text tower."""

    def __init__(
        self, *, text: TextTower, templates: Sequence[Any], num_features: int, method: str
    ) -> None:
        super().__init__()
        self.text_model = text.model
        self.tokenizer = text.tokenizer
        self.class_names = list(text.class_names)
        self.templates = list(templates)
        names = [name.replace("_", " ") for name in self.class_names]
        prompts = [template(name) for name in names for template in self.templates]
        tokens = self.tokenizer(prompts)  # (C·T, context length)
        self.register_buffer(
            "tokens", tokens.view(len(names), len(self.templates), -1), persistent=False
        )
        weight, bias = self._zeroshot_weights()
        if weight.shape[1] != num_features:
            raise ValueError(
                f"method {method!r}: the image tower gives {num_features}-d features but its text "
                f"tower {weight.shape[1]}-d (set backbone_options.<backbone>.embedding: projected)"
            )
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stale = False  # training steps since the weights were built
        self.last_features: torch.Tensor | None = None

    def _zeroshot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.tokens.device
        weight, bias = zeroshot_head(
            model=self.text_model,
            tokenizer=self.tokenizer,
            class_names=self.class_names,
            templates=self.templates,
            device=str(device),
        )
        return weight.to(device), bias.to(device)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the zero-shot weights from the text tower as it is now."""
        was_training = self.text_model.training
        self.text_model.eval()
        weight, bias = self._zeroshot_weights()
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        self.text_model.train(was_training)
        self.stale = False

    def train(self, mode: bool = True) -> ZeroShotHead:
        super().train(mode)
        if mode:
            self.stale = True
        elif self.stale:
            self.refresh()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.last_features = features
        return F.linear(features, self.weight.to(features.dtype), self.bias.to(features.dtype))

    def contrastive_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """CLIP's loss between the last training batch's image features and a prompt of each
        image's class (template drawn from the global torch RNG, which resumable state keeps)."""
        from open_clip.loss import ClipLoss

        if self.last_features is None:
            raise RuntimeError("contrastive_loss needs the image features of a training batch")
        choice = torch.randint(len(self.templates), (len(labels),)).to(labels.device)
        tokens = self.tokens[labels, choice]
        text_features = self.text_model.encode_text(tokens, normalize=True)
        image_features = F.normalize(self.last_features.float(), dim=-1)
        scale = self.text_model.logit_scale.exp()
        self.last_features = None
        return ClipLoss()(image_features, text_features.float(), scale)


class _NoLoss(nn.Module):
    """FLYP's loss is all in `extra_loss`; the classification loss adds nothing."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.new_zeros(())


def _contrastive(*, model: nn.Module, labels: torch.Tensor, **_: Any) -> torch.Tensor:
    return model.head.contrastive_loss(labels)


def plain_classifier(model: nn.Module) -> nn.Module:
    """A copy of the FLYP model as a plain image classifier: its zero-shot head as a linear
    head, no text tower (the architecture every later rule loads)."""
    head: ZeroShotHead = model.head
    plain = copy.deepcopy(model)
    linear = nn.Linear(head.weight.shape[1], head.weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(head.weight)
        linear.bias.copy_(head.bias)
    plain.head = linear.to(head.weight.device)
    return plain


def apply_flyp(model: nn.Module, *, text: TextTower, templates: str, method: str = "flyp"):
    """Put a `ZeroShotHead` on `model` (in place); returns (loss_fn, extra_loss, finalize)."""
    model.head = ZeroShotHead(
        text=text,
        templates=prompt_templates(templates),
        num_features=model.head.in_features,
        method=method,
    )
    return _NoLoss(), _contrastive, plain_classifier
