"""FLYP: both towers trained with CLIP's contrastive loss, classified by the zero-shot head of
the trained text tower; on the CPU with the small stand-in text tower of test_zeroshot."""

import copy
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from robustft.methods import BUILTIN
from robustft.models import ImageClassifier, Preprocess
from robustft.models.toy import ToyResNet
from robustft.training import TrainSettings, train_classifier
from robustft.zeroshot import TextTower, prompt_templates, zeroshot_head

open_clip = pytest.importorskip("open_clip")
from test_zeroshot import FakeTextTower  # noqa: E402  (needs open_clip, as this file does)

PRE = Preprocess(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CLASSES = ("red_square", "green circle", "blue")


def flyp_model(seed=0, text_dim=16):
    torch.manual_seed(seed)
    # ToyResNet(width=2): 16-d features, the stand-in text tower's width.
    model = ImageClassifier(backbone=ToyResNet(width=2), num_classes=3, preprocess=PRE)
    tower = FakeTextTower(dim=text_dim)
    with torch.no_grad():
        # The stand-in towers are not aligned, so they start from CLIP's pretraining
        # temperature (1/0.07), not a trained CLIP's 100 (where the untrained pair first
        # drives the scale to nothing).
        tower.logit_scale.fill_(math.log(1 / 0.07))
    text = TextTower(
        model=tower,
        tokenizer=open_clip.get_tokenizer("ViT-B-16"),
        class_names=CLASSES,
    )
    reference = copy.deepcopy(text.model)
    setup = BUILTIN["flyp"].hook()(
        model=model, options={"templates": "simple_imagenet"}, teacher=None, text=text
    )
    return model, setup, text, reference


def colour_data(n=96, seed=0):
    """Each class is one colour channel, plus noise: a task both towers can learn."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.3 * torch.rand(n, 3, 16, 16, generator=generator)
    images[torch.arange(n), labels] += 0.6
    return TensorDataset(images, labels)


def test_flyp_head_is_the_zero_shot_head_at_step_0():
    model, _, _, pretrained_text = flyp_model()
    model.eval()
    expected, bias = zeroshot_head(
        model=pretrained_text,
        tokenizer=open_clip.get_tokenizer("ViT-B-16"),
        class_names=CLASSES,
        templates=prompt_templates("simple_imagenet"),
    )
    assert torch.equal(model.head.weight, expected) and torch.equal(model.head.bias, bias)


def test_flyp_loss_decreases_both_towers_train_and_the_head_follows_the_text_tower():
    model, setup, text, pretrained_text = flyp_model()
    pretrained_image = copy.deepcopy(model.backbone)
    result = train_classifier(
        model=model,
        train_set=colour_data(),
        eval_sets={"id_val": colour_data(n=48, seed=1)},
        settings=TrainSettings(epochs=4, lr=0.01, batch_size=16, bn="frozen", seed=0),
        select_on="id_val",
        progress=False,
        loss_fn=setup.loss_fn,
        extra_loss=setup.extra_loss,
    )
    losses = [row["train_loss"] for row in result.history[1:]]
    assert losses[-1] < 0.8 * losses[0], losses
    # Not by giving up: below the loss of uniform scores over the batch (ln 16), and the
    # zero-shot head of the trained text tower classifies better than the pretrained one.
    assert losses[-1] < math.log(16) - 0.3, losses
    assert result.history[-1]["id_val"] > result.history[0]["id_val"] + 0.2, result.history
    # Both towers moved, the learned logit scale included.
    assert not torch.equal(text.model.embed.weight, pretrained_text.embed.weight)
    assert text.model.logit_scale.item() != pretrained_text.logit_scale.item()
    changed = [
        not torch.equal(a, b)
        for a, b in zip(model.backbone.parameters(), pretrained_image.parameters(), strict=True)
    ]
    assert all(changed)
    # In eval mode the head is the zero-shot head of the trained text tower.
    model.eval()
    weight, _ = zeroshot_head(
        model=text.model,
        tokenizer=text.tokenizer,
        class_names=CLASSES,
        templates=prompt_templates("simple_imagenet"),
    )
    torch.testing.assert_close(model.head.weight, weight)


def test_the_saved_model_is_the_plain_classifier_with_the_zero_shot_head():
    model, setup, _, _ = flyp_model()
    model.eval()
    plain = setup.finalize(model)
    assert type(plain.head) is torch.nn.Linear
    assert set(plain.state_dict()) == {"mean", "std", "head.weight", "head.bias"} | {
        f"backbone.{key}" for key in model.backbone.state_dict()
    }
    images = colour_data(n=8)[:][0]
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images))


def test_a_text_tower_of_another_width_is_a_one_line_error():
    with pytest.raises(ValueError, match="16-d features but its text tower 8-d"):
        flyp_model(text_dim=8)


def test_flyp_on_a_backbone_without_a_text_tower_is_a_one_line_error(tmp_path):
    from robustft.stages.finetune import _text_tower

    with pytest.raises(ValueError, match="needs a CLIP text tower; backbone 'toyresnet' has none"):
        _text_tower(method="flyp", backbone="toyresnet", cache_dir=tmp_path, class_names=CLASSES)
    assert BUILTIN["flyp"].text_tower and not BUILTIN["ft"].text_tower
