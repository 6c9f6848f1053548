import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from robustft.models import ImageClassifier, Preprocess
from robustft.models.toy import ToyResNet
from robustft.training import TrainSettings, cosine_lr, train_classifier

PRE = Preprocess(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def synthetic_images(n=256, seed=0):
    """Two classes a small CNN separates easily: bright left half vs bright right half."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.uniform(0, 0.3, (n, 3, 16, 16)).astype(np.float32)
    for i, label in enumerate(labels):
        images[i, :, :, :8] += 0.6 if label == 0 else 0.0
        images[i, :, :, 8:] += 0.6 if label == 1 else 0.0
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def test_cosine_schedule_starts_at_base_halves_midway_and_ends_at_zero():
    assert cosine_lr(step=0, total_steps=100, base_lr=0.1) == pytest.approx(0.1)
    assert cosine_lr(step=50, total_steps=100, base_lr=0.1) == pytest.approx(0.05)
    assert cosine_lr(step=100, total_steps=100, base_lr=0.1) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_lr(step=s, total_steps=100, base_lr=1.0) for s in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_optimizer_follows_the_cosine_schedule_per_step():
    data = synthetic_images(128)
    model = ImageClassifier(backbone=ToyResNet(width=4), num_classes=2, preprocess=PRE)
    result = train_classifier(
        model=model,
        train_set=data,
        eval_sets={"val": data},
        select_on="val",
        settings=TrainSettings(epochs=4, lr=0.2, batch_size=32),
        progress=False,
    )
    steps_per_epoch = 128 // 32
    for row in result.history[1:]:
        step = (row["epoch"] - 1) * steps_per_epoch
        assert row["lr"] == pytest.approx(cosine_lr(step=step, total_steps=16, base_lr=0.2))


def test_training_on_synthetic_data_learns_and_keeps_the_best_epoch():
    torch.manual_seed(0)
    train, val = synthetic_images(256, seed=0), synthetic_images(128, seed=1)
    model = ImageClassifier(backbone=ToyResNet(width=4), num_classes=2, preprocess=PRE)
    result = train_classifier(
        model=model,
        train_set=train,
        eval_sets={"val": val},
        select_on="val",
        settings=TrainSettings(epochs=3, lr=0.05, batch_size=32),
        progress=False,
    )
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    best = max(row["val"] for row in result.history)
    assert best > 0.9
    assert result.history[result.best_epoch]["val"] == best
    model.load_state_dict(result.best_state)


def test_frozen_batchnorm_keeps_running_statistics_but_trains_the_rest():
    data = synthetic_images(128)
    backbone = ToyResNet(width=4)
    model = ImageClassifier(backbone=backbone, num_classes=2, preprocess=PRE)
    bn = backbone.stem[1]
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    conv_before = backbone.stem[0].weight.clone()
    train_classifier(
        model=model,
        train_set=data,
        eval_sets={"val": data},
        select_on="val",
        settings=TrainSettings(epochs=1, lr=0.05, batch_size=32, bn="frozen"),
        progress=False,
    )
    assert torch.equal(bn.running_mean, before_mean)
    assert torch.equal(bn.running_var, before_var)
    assert not torch.equal(backbone.stem[0].weight, conv_before)
    # Unfrozen, the same training moves them: the test above can fail.
    train_classifier(
        model=model,
        train_set=data,
        eval_sets={"val": data},
        select_on="val",
        settings=TrainSettings(epochs=1, lr=0.05, batch_size=32, bn="train"),
        progress=False,
    )
    assert not torch.equal(bn.running_mean, before_mean)


def test_a_diverging_run_stops_and_is_reported_not_crashed():
    data = synthetic_images(64)
    model = ImageClassifier(backbone=ToyResNet(width=4), num_classes=2, preprocess=PRE)
    result = train_classifier(
        model=model,
        train_set=data,
        eval_sets={"val": data},
        select_on="val",
        settings=TrainSettings(epochs=3, lr=1e12, batch_size=32),
        progress=False,
    )
    assert result.diverged
    assert not math.isfinite(result.history[-1]["train_loss"])


def test_toy_resnet_has_the_timm_interface():
    model = ToyResNet(width=16)
    assert model.num_features == 128
    assert 0.25e6 < sum(p.numel() for p in model.parameters()) < 0.4e6
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 128)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
