"""Feature-protection methods: penalties, KD, LoRA, WiSE-FT, run folder names, selection."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from robustft.config import ConfigError, hparam_folder, parse_hparam_folder
from robustft.methods import (
    WeightPenalty,
    apply_lora,
    distillation_objective,
    lora_target_modules,
    merged_copy,
)
from robustft.models import ImageClassifier, Preprocess
from robustft.models.toy import ToyResNet
from robustft.selection import select_run
from robustft.training import TrainSettings, train_classifier
from robustft.wiseft import interpolate_state_dicts

PRE = Preprocess(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def tiny_model(seed=0, width=4, classes=3):
    torch.manual_seed(seed)
    return ImageClassifier(backbone=ToyResNet(width=width), num_classes=classes, preprocess=PRE)


def tiny_data(n=64, seed=0, classes=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(images, labels)


def perturb(model, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_penalty_is_zero_at_the_anchor(kind):
    model = tiny_model()
    penalty = WeightPenalty(model=model, kind=kind, alpha=0.3, beta=0.0)
    assert penalty().item() == 0.0


def test_l2sp_gradient_is_alpha_times_distance_and_beta_times_head():
    model = tiny_model()
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    penalty = WeightPenalty(model=model, kind="l2", alpha=0.3, beta=0.2)
    perturb(model)
    model.zero_grad()
    penalty().backward()
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            expected = 0.3 * (param.detach() - anchor[name])
        else:
            expected = 0.2 * param.detach()
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7)
    # The value too: α/2·‖w − w₀‖² + β/2·‖w_head‖².
    value = sum(
        0.15 * (p.detach() - anchor[n]).pow(2).sum()
        if n.startswith("backbone.")
        else 0.1 * p.detach().pow(2).sum()
        for n, p in model.named_parameters()
    )
    assert penalty().item() == pytest.approx(value.item(), rel=1e-5)


def test_l1sp_gradient_is_alpha_times_sign_and_leaves_the_head_alone():
    model = tiny_model()
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    penalty = WeightPenalty(model=model, kind="l1", alpha=0.3)
    perturb(model)
    model.zero_grad()
    penalty().backward()
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            torch.testing.assert_close(param.grad, 0.3 * torch.sign(param.detach() - anchor[name]))
        else:
            assert param.grad is None
    assert penalty().item() == pytest.approx(
        sum(
            0.3 * (p.detach() - anchor[n]).abs().sum().item()
            for n, p in model.named_parameters()
            if n.startswith("backbone.")
        ),
        rel=1e-5,
    )


def test_penalty_pulls_training_toward_the_pretrained_weights():
    data = tiny_data()
    settings = TrainSettings(epochs=2, lr=0.1, batch_size=16, bn="frozen")

    def distance(alpha):
        model = tiny_model()
        start = copy.deepcopy(model.backbone.state_dict())
        extra = WeightPenalty(model=model, kind="l2", alpha=alpha) if alpha else None
        train_classifier(
            model=model,
            train_set=data,
            eval_sets={"val": data},
            select_on="val",
            settings=settings,
            progress=False,
            extra_loss=extra,
        )
        return sum(
            (value.float() - start[key].float()).pow(2).sum().item()
            for key, value in model.backbone.state_dict().items()
        )

    assert distance(5.0) < distance(0.0)


def train(model, *, loss_fn=None, extra_loss=None, epochs=2):
    data = tiny_data(seed=3)
    return train_classifier(
        model=model,
        train_set=data,
        eval_sets={"val": tiny_data(seed=4)},
        select_on="val",
        settings=TrainSettings(epochs=epochs, lr=0.05, batch_size=16, bn="frozen", seed=7),
        progress=False,
        loss_fn=loss_fn,
        extra_loss=extra_loss,
    )


def test_kd_with_lambda_zero_trains_exactly_as_ft():
    teacher = tiny_model(seed=5)
    loss_fn, extra = distillation_objective(teacher=teacher, weight=0.0, temperature=2.0)
    kd_model, ft_model = tiny_model(seed=0), tiny_model(seed=0)
    kd, ft = train(kd_model, loss_fn=loss_fn, extra_loss=extra), train(ft_model)
    # Exactly: losses, accuracies, best epoch and every weight (epoch 0's NaNs compare equal).
    pd.testing.assert_frame_equal(
        pd.DataFrame(kd.history).drop(columns="seconds"),
        pd.DataFrame(ft.history).drop(columns="seconds"),
        check_exact=True,
    )
    assert kd.best_epoch == ft.best_epoch
    for key, value in ft_model.state_dict().items():
        assert torch.equal(kd_model.state_dict()[key], value), key


def test_kd_loss_is_zero_kl_when_student_matches_teacher():
    teacher = tiny_model(seed=5).eval()
    _, extra = distillation_objective(teacher=teacher, weight=1.0, temperature=3.0)
    images = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        logits = teacher(images)
    assert extra(images=images, logits=logits).item() == pytest.approx(0.0, abs=1e-6)
    assert extra(images=images, logits=torch.zeros_like(logits)).item() > 0


def test_wiseft_ends_are_exact_and_the_middle_is_linear():
    theta0, theta1 = tiny_model(seed=0).state_dict(), tiny_model(seed=1).state_dict()
    at0 = interpolate_state_dicts(theta0=theta0, theta1=theta1, alpha=0.0)
    at1 = interpolate_state_dicts(theta0=theta0, theta1=theta1, alpha=1.0)
    for key in theta0:
        assert torch.equal(at0[key], theta0[key]) and torch.equal(at1[key], theta1[key]), key
    for alpha in (0.1, 0.5, 0.7):
        mid = interpolate_state_dicts(theta0=theta0, theta1=theta1, alpha=alpha)
        for key, start in theta0.items():
            if start.is_floating_point():
                expected = (1 - alpha) * start + alpha * theta1[key]
                torch.testing.assert_close(mid[key], expected, rtol=1e-6, atol=1e-7)
    # Linear: the midpoint of two interpolants is the interpolant of the mean α.
    a, b, c = (
        interpolate_state_dicts(theta0=theta0, theta1=theta1, alpha=x) for x in (0.2, 0.6, 0.4)
    )
    for key in theta0:
        if theta0[key].is_floating_point():
            torch.testing.assert_close((a[key] + b[key]) / 2, c[key], rtol=1e-5, atol=1e-6)


def test_wiseft_rejects_mismatched_state_dicts():
    theta0 = tiny_model(width=4).state_dict()
    with pytest.raises(ValueError, match="shapes"):
        interpolate_state_dicts(theta0=theta0, theta1=tiny_model(width=8).state_dict(), alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state_dicts(theta0=theta0, theta1=theta0, alpha=1.5)


def test_lora_targets():
    backbone = ToyResNet(width=4)
    assert lora_target_modules(backbone, target="conv1x1") == [
        "stages.1.downsample.0",
        "stages.2.downsample.0",
        "stages.3.downsample.0",
    ]
    assert lora_target_modules(backbone, target="auto") == lora_target_modules(
        backbone, target="conv1x1"
    )
    assert len(lora_target_modules(backbone, target="conv")) == 12
    with pytest.raises(ValueError, match="no such layers"):
        lora_target_modules(backbone, target="qkv")
    vit_like = nn.Sequential()
    vit_like.add_module("blocks", nn.ModuleDict({"qkv": nn.Linear(4, 12), "proj": nn.Linear(4, 4)}))
    assert lora_target_modules(vit_like, target="auto") == ["blocks.qkv"]


def test_lora_keeps_frozen_weights_and_merges_to_the_same_outputs():
    pytest.importorskip("peft")
    model = tiny_model(seed=0)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    apply_lora(model, rank=2, alpha=4, target="conv")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    train(model, epochs=2)
    # Base weights bit-identical (peft keeps them as base_layer.*); BN statistics frozen too.
    base = {
        key.removeprefix("base_model.model.").replace(".base_layer", ""): value
        for key, value in model.backbone.state_dict().items()
        if "lora_" not in key
    }
    assert set(base) == set(before)
    for key, value in before.items():
        assert torch.equal(base[key], value), key
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters did learn something
    merged = merged_copy(model)
    assert set(merged.state_dict()) == set(tiny_model().state_dict())  # the plain architecture
    images = torch.rand(8, 3, 16, 16)
    model.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(images), model(images), rtol=1e-4, atol=1e-5)
    reloaded = tiny_model(seed=9)
    reloaded.load_state_dict(merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(images), model(images), rtol=1e-4, atol=1e-5)


def test_run_folder_names_round_trip():
    assert hparam_folder({"lr": 1e-2}) == "lr0.01"
    assert hparam_folder({"lr": "1e-5", "alpha": 0.1}) == "lr1e-05-alpha0.1"
    assert hparam_folder({"lr": 0.03, "rank": 4}) == "lr0.03-rank4"
    for name in ("lr0.01", "lr1e-05-alpha0.1", "lr0.03-lambda0.9", "lr3e-07-alpha1e-04"):
        values = parse_hparam_folder(name)
        assert hparam_folder(values) == hparam_folder(parse_hparam_folder(hparam_folder(values)))
    assert parse_hparam_folder("lr1e-05-alpha0.1") == {"lr": 1e-5, "alpha": 0.1}
    for bad in ("alpha0.1", "lr", "lr0.1-", "lr0.1-Alpha2"):
        with pytest.raises((ValueError, ConfigError)):
            parse_hparam_folder(bad)


def test_select_run_chooses_the_best_point_of_a_two_dimensional_sweep(tmp_path):
    files = []
    scores = {(0.01, 0.1): [0.8, 0.82], (0.01, 1.0): [0.85, 0.86], (0.03, 0.1): [0.9, 0.7]}
    for (lr, alpha), values in scores.items():
        for seed, id_val in enumerate(values):
            path = tmp_path / f"{hparam_folder({'lr': lr, 'alpha': alpha})}-{seed}.json"
            path.write_text(
                json.dumps(
                    {
                        "lr": lr,
                        "hparams": {"lr": lr, "alpha": alpha},
                        "seed": seed,
                        "id_val": id_val,
                    }
                )
            )
            files.append(path)
    selection = select_run(metrics_files=files, out_path=tmp_path / "selected.json")
    assert selection["hparams"] == {"lr": 0.01, "alpha": 1.0}
    assert selection["run"] == "lr0.01-alpha1"
    assert [run["seed"] for run in selection["runs"]] == [0, 1]
    assert np.isclose(selection["mean_id_val"], 0.855)


def method_setup(method):
    """(model, loss_fn, extra_loss) of a method, rebuilt from scratch as run_finetune does."""
    model = tiny_model(seed=0)
    if method == "l2sp":
        return model, None, WeightPenalty(model=model, kind="l2", alpha=1.0, beta=0.01)
    if method == "l1sp":
        return model, None, WeightPenalty(model=model, kind="l1", alpha=1e-3)
    if method == "kd":
        return model, *distillation_objective(teacher=tiny_model(seed=5), weight=0.5, temperature=2)
    if method == "lora":
        pytest.importorskip("peft")
        return apply_lora(model, rank=2, alpha=4, target="conv"), None, None
    raise ValueError(method)


@pytest.mark.parametrize("method", ["l2sp", "l1sp", "kd", "lora"])
def test_a_stopped_run_of_each_method_resumes_exactly(tmp_path, method):
    import os
    import signal

    from robustft.runtime import STOPPED_EXIT_CODE, job
    from robustft.training import Checkpointing

    def run(checkpointing=None, stop_at=None):
        model, loss_fn, extra = method_setup(method)
        calls = {"n": 0}

        def transform(images, generator):
            calls["n"] += 1
            if calls["n"] == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return images

        result = train_classifier(
            model=model,
            train_set=tiny_data(seed=3),
            eval_sets={"val": tiny_data(seed=4)},
            select_on="val",
            settings=TrainSettings(epochs=2, lr=0.05, batch_size=16, bn="frozen", seed=7),
            progress=False,
            loss_fn=loss_fn,
            extra_loss=extra,
            batch_transform=transform,
            checkpointing=checkpointing,
        )
        return result, model

    reference, reference_model = run()
    checkpointing = Checkpointing(path=tmp_path / "last.pt", fingerprint=method)
    with pytest.raises(SystemExit) as stopped, job(log_path=None):
        run(checkpointing=checkpointing, stop_at=6)  # in epoch 2 (4 steps per epoch)
    assert stopped.value.code == STOPPED_EXIT_CODE
    resumed, resumed_model = run(checkpointing=checkpointing)
    pd.testing.assert_frame_equal(
        pd.DataFrame(resumed.history).drop(columns="seconds"),
        pd.DataFrame(reference.history).drop(columns="seconds"),
        check_exact=True,
    )
    for key, value in reference_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
