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


def _history(losses, val, start_val=0.5):
    rows = [{"epoch": 0, "train_loss": float("nan"), "val": start_val}]
    rows += [
        {"epoch": i + 1, "train_loss": loss, "val": acc}
        for i, (loss, acc) in enumerate(zip(losses, val, strict=True))
    ]
    return rows


@pytest.mark.parametrize(
    ("losses", "val", "start_val", "expected"),
    [
        ([0.9, 0.5, 0.3], [0.7, 0.8, 0.9], 0.5, None),  # learns: healthy
        ([0.4, 0.3, 0.2], [0.8, 0.85, 0.86], 0.8, None),  # LP-FT start: healthy
        ([8.3, 297.0, 250.0], [0.5, 0.5, 0.5], 0.5, "over 10×"),  # loss explodes
        ([30.0, 2.0, 1.0], [0.5, 0.5, 0.5], 0.5, "over 10×"),  # explodes in epoch 1 (10 × ln 2)
        ([0.7, 0.69, 0.69], [0.5, 0.49, 0.5], 0.9, "fell to chance"),  # LP-FT lost the probe
        ([0.69, 0.69, 0.69], [0.5, 0.52, 0.5], 0.5, None),  # never learnt: weak, not collapsed
        ([0.5, 0.5, 0.5], [0.56, 0.6, 0.52], 0.56, None),  # a small drop near chance: noise
        ([0.5, float("nan"), 0.5], [0.9, 0.5, 0.5], 0.5, "not finite|nan"),
    ],
)
def test_collapse_reason_flags_blow_ups_and_chance_but_not_learning(
    losses, val, start_val, expected
):
    from robustft.training import collapse_reason

    reason = collapse_reason(
        history=_history(losses, val, start_val),
        select_on="val",
        num_classes=2,
        chance=0.5,
        eval_size=400,
    )
    if expected is None:
        assert reason is None
    else:
        assert reason is not None
        assert any(part in reason for part in expected.split("|")), reason


def test_gradient_clipping_bounds_the_update_and_is_recorded():
    """The same run at a huge lr: unclipped it blows up and is flagged; clipped it trains."""
    train, val = synthetic_images(256, seed=0), synthetic_images(128, seed=1)
    results = {}
    for clip in (None, 1.0):
        torch.manual_seed(0)
        model = ImageClassifier(backbone=ToyResNet(width=4), num_classes=2, preprocess=PRE)
        results[clip] = train_classifier(
            model=model,
            train_set=train,
            eval_sets={"val": val},
            select_on="val",
            settings=TrainSettings(
                epochs=3, lr=3.0, batch_size=32, momentum=0.0, bn="frozen", clip_grad_norm=clip
            ),
            progress=False,
        )
    assert results[None].diverged and results[None].collapse
    clipped = results[1.0]
    assert not clipped.diverged, clipped.collapse
    assert max(row["val"] for row in clipped.history) > 0.9
    assert 0 < clipped.history[1]["clipped"] <= 1
    assert clipped.history[1]["grad_norm_max"] > 1.0  # the norm before clipping


def test_eval_every_scores_the_other_splits_at_scored_and_best_epochs_only():
    train, val = synthetic_images(256, seed=0), synthetic_images(64, seed=1)
    test = synthetic_images(64, seed=2)
    torch.manual_seed(0)
    model = ImageClassifier(backbone=ToyResNet(width=4), num_classes=2, preprocess=PRE)
    result = train_classifier(
        model=model,
        train_set=train,
        eval_sets={"val": val, "test": test},
        select_on="val",
        settings=TrainSettings(epochs=5, lr=0.05, batch_size=32, eval_every=3),
        progress=False,
    )
    scored = [row["epoch"] for row in result.history if not math.isnan(row["test"])]
    assert set(scored) == {0, 3, 5, result.best_epoch}
    assert all(not math.isnan(row["val"]) for row in result.history)
    best_weights = {k: v.clone() for k, v in result.best_state.items()}
    model.load_state_dict(best_weights)
    from robustft.evaluate import accuracy

    assert accuracy(model, test) == pytest.approx(result.history[result.best_epoch]["test"])


def test_frozen_adapt_recomputes_batchnorm_statistics_on_the_training_data_then_freezes():
    data = synthetic_images(128)
    backbone = ToyResNet(width=4)
    model = ImageClassifier(backbone=backbone, num_classes=2, preprocess=PRE)
    bn = backbone.stem[1]
    with torch.no_grad():  # statistics of some other data, as pretrained ones are
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(9.0)
    conv = backbone.stem[0]
    images = torch.stack([image for image, _ in data])
    with torch.no_grad():
        pre_bn = conv((images - model.mean) / model.std)
    expected_mean = pre_bn.mean(dim=(0, 2, 3))
    result_states = []

    def keep(epoch, trained):
        result_states.append((bn.running_mean.clone(), bn.running_var.clone()))

    train_classifier(
        model=model,
        train_set=data,
        eval_sets={"val": data},
        select_on="val",
        settings=TrainSettings(epochs=1, lr=1e-9, batch_size=32, bn="frozen_adapt"),
        progress=False,
        on_epoch_end=keep,
    )
    mean, _ = result_states[-1]
    assert torch.allclose(mean, expected_mean, atol=1e-4)
    assert not torch.allclose(mean, torch.full_like(mean, 3.0))


def test_bn_momentum_reaches_every_batchnorm_layer():
    from robustft.training import set_batchnorm_momentum

    model = ToyResNet(width=4)
    set_batchnorm_momentum(model, 0.01)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert layers and all(layer.momentum == 0.01 for layer in layers)


def test_remove_unowned_state_keeps_requested_runs_and_removes_the_rest(tmp_path, caplog):
    from robustft.training import remove_unowned_state

    root = tmp_path / "resume"
    kept = root / "ft" / "lr0.01" / "seed0"
    stale = root / "ft" / "lr0.1" / "seed0"
    for folder in (kept, stale):
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"x" * 10)
    (stale / ".last.pt.123.tmp").write_bytes(b"partial")
    with caplog.at_level("INFO"):
        removed = remove_unowned_state(root=root, owned=[kept])
    assert removed == [stale / "last.pt"]
    assert (kept / "last.pt").exists()
    assert not stale.exists()  # its partial save and the empty folder went too
    assert any(str(stale / "last.pt") in record.message for record in caplog.records)


def test_lr_factors_give_a_parameter_group_its_own_learning_rate(monkeypatch):
    """A method's Setup.lr_factors ({"head.": 10}): the head trains at 10× the backbone's lr,
    at every step of the cosine schedule; without factors there is one group, as before."""
    from robustft import training

    seen = []
    original = training._sgd_with_cosine_schedule

    def spy(params, settings, *, total_steps):
        optimizer, scheduler = original(params, settings, total_steps=total_steps)
        seen.append(optimizer)
        return optimizer, scheduler

    monkeypatch.setattr(training, "_sgd_with_cosine_schedule", spy)
    torch.manual_seed(0)
    pre = Preprocess(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images, labels = torch.rand(16, 3, 8, 8), torch.randint(0, 2, (16,))
    data = TensorDataset(images, labels)
    settings = TrainSettings(epochs=2, lr=0.01, batch_size=8, momentum=0.9, weight_decay=0.0)
    for factors in (None, {"head.": 10.0}):
        model = ImageClassifier(backbone=ToyResNet(width=2), num_classes=2, preprocess=pre)
        train_classifier(
            model=model,
            train_set=data,
            eval_sets={"id_val": data},
            settings=settings,
            select_on="id_val",
            progress=False,
            lr_factors=factors,
        )
    plain, grouped = seen
    assert len(plain.param_groups) == 1
    backbone, head = grouped.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert head["lr"] == pytest.approx(10 * backbone["lr"])  # after the last step, too
    with pytest.raises(ValueError, match=r"no trainable parameter starts with 'neck\.'"):
        train_classifier(
            model=model,
            train_set=data,
            eval_sets={"id_val": data},
            settings=settings,
            select_on="id_val",
            progress=False,
            lr_factors={"neck.": 2.0},
        )
