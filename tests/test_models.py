"""Backbones behind one interface: timm architectures with random weights (no download),
MoCo-v2 checkpoints, local weights files, and LP-FT starting exactly at the probe."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from robustft.data import toyshift
from robustft.models import (
    BackboneNotFetchedError,
    Preprocess,
    TimmBackbone,
    build_backbone,
    create_timm_backbone,
    default_embedding,
    load_backbone,
    merge_preprocess,
    save_backbone,
    timm_preprocess,
)
from robustft.models.fetch import (
    MOCO_PREFIX,
    BackboneOptions,
    fetch_backbone,
    moco_v2_state_dict,
)
from robustft.models.keymap import read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.mark.parametrize(
    ("name", "dim", "mean"),
    [
        ("resnet50.tv_in1k", 2048, (0.485, 0.456, 0.406)),
        ("resnet50_clip.openai", 1024, CLIP_MEAN),
        ("vit_base_patch16_clip_224.openai", 512, CLIP_MEAN),
        ("vit_base_patch16_clip_quickgelu_224.openai", 512, CLIP_MEAN),
    ],
)
def test_each_architecture_gives_its_feature_dimension(name, dim, mean):
    torch.manual_seed(0)
    backbone = build_backbone(architecture=name, kwargs={}).eval()
    assert backbone.num_features == dim
    with torch.inference_mode():
        features = backbone(torch.rand(1, 3, 224, 224))
    assert features.shape == (1, dim)
    preprocess = timm_preprocess(backbone.model)
    assert preprocess.input_size == 224
    assert preprocess.mean == pytest.approx(mean)
    assert preprocess.interpolation in {"bilinear", "bicubic"}
    assert 0.8 <= preprocess.crop_pct <= 1.0


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        ("resnet50.tv_in1k", 1000, "pooled"),
        ("resnet50_clip.openai", 1024, "projected"),
        ("vit_base_patch16_clip_224.openai", 512, "projected"),
        ("vit_base_patch16_clip_224.openai_ft_in1k", 1000, "pooled"),
        ("convnext_base.clip_laion2b_augreg_ft_in1k", 1000, "pooled"),
        ("vit_base_patch16_siglip_224.webli", 0, "pooled"),
    ],
)
def test_clip_image_towers_keep_their_projection(name, num_classes, expected):
    assert default_embedding(name, num_classes) == expected


def test_pooled_embedding_can_be_asked_for_explicitly():
    backbone = create_timm_backbone(name="vit_base_patch16_clip_224.openai", embedding="pooled")
    assert backbone.num_features == 768


def test_an_unknown_timm_name_is_one_line_naming_it():
    with pytest.raises(ValueError, match="no_such_net") as info:
        build_backbone(architecture="no_such_net.x", kwargs={})
    assert "\n" not in str(info.value)


def test_a_toy_meta_json_from_before_this_change_still_loads(tmp_path):
    backbone = build_backbone(architecture="toyresnet", kwargs={"width": 4})
    pre = Preprocess(input_size=32, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    save_backbone(
        backbone=backbone,
        out_dir=tmp_path,
        architecture="toyresnet",
        kwargs={"width": 4},
        preprocess=pre,
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["weights"], meta["preprocess"]["crop_pct"], meta["preprocess"]["interpolation"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    _, loaded, _ = load_backbone(tmp_path)
    assert loaded == pre and loaded.crop_pct == 1.0 and loaded.interpolation == "bilinear"


# --- MoCo-v2 -----------------------------------------------------------------------------


def moco_checkpoint(path: Path, resnet: torch.nn.Module) -> None:
    """A checkpoint with the layout of moco_v2_800ep_pretrain.pth.tar: {"state_dict": ...}
    with `module.encoder_q.*` (incl. the projection MLP fc.0/fc.2), `module.encoder_k.*` and
    the queue, beside epoch, arch and optimizer state."""
    backbone_state = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state = {f"{MOCO_PREFIX}{k}": v for k, v in backbone_state.items()}
    state |= {
        f"{MOCO_PREFIX}fc.0.weight": torch.randn(2048, 2048),
        f"{MOCO_PREFIX}fc.0.bias": torch.zeros(2048),
        f"{MOCO_PREFIX}fc.2.weight": torch.randn(128, 2048),
        f"{MOCO_PREFIX}fc.2.bias": torch.zeros(128),
        "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7),
        "module.queue": torch.randn(128, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    torch.save(
        {
            "epoch": 800,
            "arch": "resnet50",
            "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9}]},
        },
        path,
    )


def test_a_moco_checkpoint_loads_with_no_missing_keys(tmp_path):
    torch.manual_seed(0)
    resnet = timm.create_model("resnet50", pretrained=False).eval()
    # Non-trivial BatchNorm statistics, so that a key left at its default would show.
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    moco_checkpoint(path, resnet)
    checkpoint = torch.load(path, weights_only=True)
    state = moco_v2_state_dict(checkpoint, source=path)
    own = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    assert set(state) == own  # nothing missing, nothing extra (no MLP, no key encoder)

    out_dir = tmp_path / "resources" / "models" / "moco_v2_resnet50"
    meta = fetch_backbone(
        name="moco_v2_resnet50",
        out_dir=out_dir,
        cache_dir=tmp_path / "hub",
        options={"weights": str(path)},
    )
    assert meta["num_features"] == 2048 and meta["source"]["kind"] == "local"
    assert meta["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    backbone, _, _ = load_backbone(out_dir)
    resnet.reset_classifier(0)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(backbone.eval()(images), resnet(images), atol=1e-5)


def test_a_checkpoint_without_the_query_encoder_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "other.pth.tar"
    torch.save({"state_dict": {"module.encoder_k.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"other\.pth\.tar: no 'module\.encoder_q\.\*' keys"):
        fetch_backbone(
            name="moco_v2_resnet50",
            out_dir=tmp_path / "out",
            cache_dir=tmp_path / "hub",
            options={"weights": str(path)},
        )
    assert not (tmp_path / "out" / "meta.json").exists()


# --- local weights files and the offline cache --------------------------------------------


def test_local_weights_file_of_any_timm_architecture(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18.tv_in1k", pretrained=False).eval()
    path = tmp_path / "rn18.pth"
    torch.save(source.state_dict(), path)  # a plain state dict, read with weights_only=True
    out_dir = tmp_path / "models" / "resnet18.tv_in1k"
    meta = fetch_backbone(
        name="resnet18.tv_in1k",
        out_dir=out_dir,
        cache_dir=tmp_path / "hub",
        options={"weights": str(path)},
    )
    assert meta["weights"] == {"file": str(path.resolve()), "format": "timm"}
    backbone, preprocess, _ = load_backbone(out_dir)
    assert isinstance(backbone, TimmBackbone) and backbone.num_features == 512
    assert preprocess.crop_pct == 0.875
    source.reset_classifier(0)
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(backbone.eval()(images), source(images), atol=1e-6)


def test_local_weights_of_another_architecture_fail_with_one_line(tmp_path):
    path = tmp_path / "rn18.safetensors"
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match=r"rn18\.safetensors: weights do not fit") as info:
        fetch_backbone(
            name="resnet34.tv_in1k",
            out_dir=tmp_path / "out",
            cache_dir=tmp_path / "hub",
            options={"weights": str(path)},
        )
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def fake_hub_cache(hub: Path, name: str) -> tuple[torch.nn.Module, str]:
    """What `hf_hub_download` leaves behind: models--timm--NAME/{refs/main, snapshots/REV/}."""
    model = timm.create_model(name, pretrained=False).eval()
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--timm--{name}"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(repo / "snapshots" / revision / "model.safetensors"))
    return model, revision


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test only (huggingface_hub reads it once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_fetch_uses_the_hugging_face_cache_layout_and_jobs_load_it_offline(tmp_path, offline):
    hub = tmp_path / "resources" / "models" / "hub"
    model, revision = fake_hub_cache(hub, "resnet18.tv_in1k")
    out_dir = tmp_path / "resources" / "models" / "resnet18.tv_in1k"
    meta = fetch_backbone(name="resnet18.tv_in1k", out_dir=out_dir, cache_dir=hub)
    assert meta["source"] == {
        "kind": "hf-hub",
        "repo": "timm/resnet18.tv_in1k",
        "file": "model.safetensors",
        "revision": revision,
    }
    # Relative, so that resources/ can be copied to another machine.
    assert meta["weights"]["file"].startswith("../hub/models--timm--resnet18.tv_in1k/")
    backbone, _, _ = load_backbone(out_dir)
    model.reset_classifier(0)
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(backbone.eval()(images), model(images), atol=1e-6)


def test_fetch_without_network_fails_with_one_line(tmp_path, offline):
    with pytest.raises(RuntimeError, match=r"cannot download backbone 'resnet18\.tv_in1k'") as info:
        fetch_backbone(
            name="resnet18.tv_in1k",
            out_dir=tmp_path / "m" / "resnet18.tv_in1k",
            cache_dir=tmp_path / "hub",
        )
    assert "\n" not in str(info.value) and "weights" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_an_empty_cache_fails_at_once_naming_the_backbone_and_the_fetch_command(tmp_path, offline):
    models = tmp_path / "resources" / "models"
    with pytest.raises(BackboneNotFetchedError) as info:
        load_backbone(models / "resnet50.tv_in1k")
    message = str(info.value)
    assert "\n" not in message and "'resnet50.tv_in1k'" in message
    assert "snakemake fetch_backbones --cores 1 --config backbones='[resnet50.tv_in1k]'" in message

    # meta.json there, but the cache emptied (e.g. a scratch file system purged).
    fake_hub_cache(models / "hub", "resnet18.tv_in1k")
    fetch_backbone(
        name="resnet18.tv_in1k", out_dir=models / "resnet18.tv_in1k", cache_dir=models / "hub"
    )
    for blob in (models / "hub").rglob("model.safetensors"):
        blob.unlink()
    with pytest.raises(BackboneNotFetchedError, match="--forcerun fetch_backbone") as info:
        load_backbone(models / "resnet18.tv_in1k")
    assert "\n" not in str(info.value) and "'resnet18.tv_in1k'" in str(info.value)


def test_a_replaced_weights_file_is_caught_by_its_checksum(tmp_path, offline):
    hub = tmp_path / "hub"
    fake_hub_cache(hub, "resnet18.tv_in1k")
    fetch_backbone(name="resnet18.tv_in1k", out_dir=tmp_path / "rn18", cache_dir=hub)
    (file,) = hub.rglob("model.safetensors")
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    with pytest.raises(ValueError, match="checksum differs"):
        load_backbone(tmp_path / "rn18")


# --- LP-FT starts where LP ended, with a timm backbone ---------------------------------------

TINY_TOYSHIFT = {
    "image_size": 32,
    "pretrain_classes": 2,
    "task_classes": 3,
    "pretrain_images_per_class": {"real": 2, "clipart": 2, "painting": 2, "sketch": 2},
    "train_per_class": 12,
    "val_per_class": 8,
    "test_per_class": 8,
    "ood_per_class": 6,
}


def test_lpft_starts_with_the_accuracy_of_the_probe(tmp_path):
    """The LP-FT model before any update (history row 0) has the probe's accuracy on every
    split: the probe's head, mapped back to the raw feature scale, is copied into the model.
    ResNet-50 (random weights) as in the paper; 32×32 toyshift images keep it fast."""
    from robustft.data.registry import ID_SPLITS
    from robustft.probe import run_probe
    from robustft.stages import extract_split, run_finetune

    data = tmp_path / "resources" / "datasets" / "toyshift"
    toyshift.write_toyshift(
        pretrain_path=data / "pretrain.h5", task_path=data / "task.h5", seed=0, **TINY_TOYSHIFT
    )
    torch.manual_seed(0)
    weights = tmp_path / "rn50.pth"
    torch.save(timm.create_model("resnet50.tv_in1k", pretrained=False).state_dict(), weights)
    model_dir = tmp_path / "resources" / "models" / "resnet50.tv_in1k"
    fetch_backbone(
        name="resnet50.tv_in1k",
        out_dir=model_dir,
        cache_dir=tmp_path / "hub",
        options={"weights": str(weights)},
    )
    ood = ["real", "clipart", "painting"]
    features = {}
    for split in [*ID_SPLITS, *ood]:
        features[split] = tmp_path / "features" / f"{split}.h5"
        extract_split(
            dataset="toyshift",
            split=split,
            data_root=data,
            model_dir=model_dir,
            out_path=features[split],
            backbone_name="resnet50.tv_in1k",
            batch_size=16,
            progress=False,
        )
    probe = run_probe(
        feature_files=features,
        out_dir=tmp_path / "probe",
        c_grid=[0.1, 1.0],
        max_iter=500,
        progress=False,
    )
    run_finetune(
        method="lpft",
        dataset="toyshift",
        data_root=data,
        model_dir=model_dir,
        out_dir=tmp_path / "lpft",
        ood_splits=ood,
        lr=1e-4,
        seed=0,
        epochs=1,
        batch_size=16,
        momentum=0.9,
        weight_decay=0.0,
        bn="frozen",
        augment=False,
        probe_dir=tmp_path / "probe",
        progress=False,
    )
    before = pd.read_csv(tmp_path / "lpft" / "history.csv").iloc[0]
    for column in ["id_val", "id_test", *(f"ood_{split}" for split in ood)]:
        assert before[column] == pytest.approx(probe[column]), column
    assert np.isfinite(before["id_val"])


# --- configuration -------------------------------------------------------------------------


def validate(**overrides):
    from robustft.config import load_schema, validate_config

    root = Path(__file__).resolve().parents[1]
    schema = load_schema(root / "workflow" / "schemas" / "config.schema.yaml")
    return validate_config({"backbones": ["toyresnet"], **overrides}, schema)


def test_backbone_options_get_their_defaults():
    config = validate(
        backbones=["toyresnet", "resnet50.tv_in1k"],
        backbone_options={"resnet50.tv_in1k": {"weights": "/w/rn50.safetensors"}},
    )
    assert config["backbone_options"]["resnet50.tv_in1k"] == {
        "weights": "/w/rn50.safetensors",
        "url": None,
        "sha256": None,
        "embedding": "auto",
        "key_map": [],
        "drop_keys": [],
        "preprocess": dict.fromkeys(["input_size", "interpolation", "crop_pct", "mean", "std"]),
        "drop_rate": None,
        "drop_path_rate": None,
    }
    assert config["features"]["num_workers"] == "auto"
    assert config["features"]["precision"] == "auto"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"backbone_options": {"x": {"weight": "/w"}}}, "'weight' under 'backbone_options.x'"),
        ({"backbone_options": {"x": {"embedding": "cls"}}}, "backbone_options.x.embedding"),
        ({"backbones": ["resnet50/../../etc"]}, "backbones[0]"),
        ({"features": {"num_workers": -1}}, "features.num_workers"),
        ({"backbone_options": {"x": {"preprocess": {"size": 3}}}}, "under 'backbone_options.x.pr"),
        (
            {"dataset_settings": {"d": {"preprocess": {"mean": [0.5, 0.5]}}}},
            "dataset_settings.d.preprocess.mean",
        ),
        (
            {"dataset_settings": {"d": {"preprocess": {"interpolation": "cubic"}}}},
            "dataset_settings.d.preprocess.interpolation",
        ),
        ({"backbone_options": {"x": {"key_map": [["^a"]]}}}, "backbone_options.x.key_map[0]"),
        ({"backbone_options": {"x": {"drop_rate": 1.5}}}, "backbone_options.x.drop_rate"),
    ],
)
def test_bad_backbone_config_is_one_line_naming_the_key(overrides, named):
    from robustft.config import ConfigError

    with pytest.raises(ConfigError) as info:
        validate(**overrides)
    assert named in str(info.value) and "\n" not in str(info.value)


# --- preprocessing from the config ---------------------------------------------------------

PRETRAINED = Preprocess(
    input_size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.875
)


def test_preprocess_overrides_merge_over_the_pretrained_config():
    merged = merge_preprocess(
        PRETRAINED, {"input_size": 32, "interpolation": "bicubic", "crop_pct": None}
    )
    assert merged == Preprocess(
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        crop_pct=0.875,
        interpolation="bicubic",
    )
    # Later layers win: backbone_options, then dataset_settings.
    layered = merge_preprocess(merge_preprocess(PRETRAINED, {"input_size": 64}), {"input_size": 96})
    assert layered.input_size == 96
    assert merge_preprocess(PRETRAINED, {"mean": [0, 0.1, 1]}).mean == (0.0, 0.1, 1.0)
    assert merge_preprocess(PRETRAINED, None) == PRETRAINED


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"input_size": 0}, "dataset_settings.d.preprocess.input_size"),
        ({"input_size": 32.5}, "dataset_settings.d.preprocess.input_size"),
        ({"interpolation": "cubic"}, "dataset_settings.d.preprocess.interpolation"),
        ({"crop_pct": 1.5}, "dataset_settings.d.preprocess.crop_pct"),
        ({"mean": [0.5, 0.5]}, "dataset_settings.d.preprocess.mean"),
        ({"std": [0.5, 0.0, 0.5]}, "dataset_settings.d.preprocess.std"),
        ({"grayscale": True}, "dataset_settings.d.preprocess: unknown key(s) ['grayscale']"),
    ],
)
def test_bad_preprocess_overrides_are_one_line_naming_the_key(overrides, named):
    with pytest.raises(ValueError) as info:
        merge_preprocess(PRETRAINED, overrides, key="dataset_settings.d.preprocess")
    assert named in str(info.value) and "\n" not in str(info.value)


def toy_backbone_dir(path: Path) -> Path:
    torch.manual_seed(0)
    save_backbone(
        backbone=build_backbone(architecture="toyresnet", kwargs={"width": 4}),
        out_dir=path,
        architecture="toyresnet",
        kwargs={"width": 4},
        preprocess=Preprocess(input_size=32, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)),
    )
    return path


def test_load_backbone_resolves_the_overrides_and_leaves_meta_json_alone(tmp_path):
    model_dir = toy_backbone_dir(tmp_path / "toyresnet")
    before = (model_dir / "meta.json").read_bytes()
    _, preprocess, meta = load_backbone(
        model_dir, preprocess={"input_size": 48, "std": [0.5, 0.5, 0.5]}
    )
    assert preprocess.input_size == 48 and preprocess.std == (0.5, 0.5, 0.5)
    assert preprocess.mean == (0.1, 0.2, 0.3)  # from meta.json
    assert meta["preprocess"]["input_size"] == 32
    assert (model_dir / "meta.json").read_bytes() == before
    with pytest.raises(ValueError, match=r"toyresnet: preprocess\.input_size"):
        load_backbone(model_dir, preprocess={"input_size": "big"})


# --- drop rates ----------------------------------------------------------------------------


def test_drop_rates_reach_the_timm_model_and_only_act_in_training(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "rn18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    model_dir = tmp_path / "resnet18"
    fetch_backbone(
        name="resnet18",
        out_dir=model_dir,
        cache_dir=tmp_path / "hub",
        options={"weights": str(path)},
    )
    plain, _, _ = load_backbone(model_dir)
    backbone, _, _ = load_backbone(
        model_dir, backbone_kwargs={"drop_rate": 0.5, "drop_path_rate": 0.2}
    )
    assert backbone.model.drop_rate == 0.5 and plain.model.drop_rate == 0.0
    drop_paths = [m for m in backbone.model.modules() if isinstance(m, timm.layers.DropPath)]
    assert drop_paths and drop_paths[-1].drop_prob == pytest.approx(0.2)
    images = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(backbone.eval()(images), plain.eval()(images), atol=1e-6)
        torch.manual_seed(1)
        assert not torch.allclose(backbone.train()(images), plain.train()(images), atol=1e-4)
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["kwargs"] == {"embedding": "pooled"}  # never part of the fetched backbone


def test_the_toy_takes_drop_rate_and_refuses_drop_path_rate_in_one_line(tmp_path):
    model_dir = toy_backbone_dir(tmp_path / "toyresnet")
    backbone, _, _ = load_backbone(model_dir, backbone_kwargs={"drop_rate": 0.5})
    images = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    assert not torch.equal(backbone.train()(images), backbone.train()(images))
    with torch.inference_mode():
        assert torch.equal(backbone.eval()(images), backbone.eval()(images))
    with pytest.raises(ValueError, match=r"backbone_options\.toyresnet\.drop_path_rate") as info:
        load_backbone(model_dir, backbone_kwargs={"drop_path_rate": 0.1})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"backbone_options\.toyresnet\.drop_rate"):
        load_backbone(model_dir, backbone_kwargs={"drop_rate": 1.0})


# --- foreign weights: key maps and what a mismatch says ------------------------------------

KEY_MAP = [[r"^module\.encoder\.", ""], [r"(^|\.)norm(\d)", r"\1bn\2"]]


def foreign_checkpoint(path: Path) -> torch.nn.Module:
    """A resnet18 as another code base saves it: {"state_dict": ...} under a DataParallel
    `module.encoder.` prefix, BatchNorms named norm1/norm2, a head, and a queue."""
    torch.manual_seed(2)
    model = timm.create_model("resnet18", pretrained=False).eval()
    state = {}
    for key, value in model.state_dict().items():
        renamed = key.replace("bn1", "norm1").replace("bn2", "norm2")
        state[f"module.encoder.{renamed}"] = value
    state["module.queue"] = torch.randn(128, 8)
    torch.save({"epoch": 100, "state_dict": state}, path)
    return model


def test_a_key_map_loads_a_foreign_checkpoint_and_converts_it_once(tmp_path):
    source = tmp_path / "simclr.pth.tar"
    model = foreign_checkpoint(source)
    model_dir = tmp_path / "models" / "resnet18"
    meta = fetch_backbone(
        name="resnet18",
        out_dir=model_dir,
        cache_dir=tmp_path / "hub",
        options={"weights": str(source), "key_map": KEY_MAP, "drop_keys": [r"^module\.queue$"]},
    )
    assert meta["weights"] == {"file": "model.safetensors", "format": "state_dict"}
    assert meta["source"]["path"] == str(source.resolve())
    assert meta["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["source"]["key_map"] == KEY_MAP
    assert meta["source"]["dropped_head_keys"] == ["fc.bias", "fc.weight"]
    source.unlink()  # jobs read the converted file only
    backbone, preprocess, _ = load_backbone(model_dir, preprocess={"input_size": 32})
    assert preprocess.input_size == 32 and backbone.num_features == 512
    model.reset_classifier(0)
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(backbone.eval()(images), model(images), atol=1e-6)


def test_a_missing_key_map_names_the_first_keys_of_both_sides(tmp_path):
    source = tmp_path / "simclr.pth.tar"
    foreign_checkpoint(source)
    with pytest.raises(ValueError) as info:
        fetch_backbone(
            name="resnet18",
            out_dir=tmp_path / "out",
            cache_dir=tmp_path / "hub",
            options={"weights": str(source), "key_map": KEY_MAP[:1]},  # norm1 still unmapped
        )
    text = str(info.value)
    assert "\n" not in text and not (tmp_path / "out").exists()
    assert "simclr.pth.tar: weights do not fit" in text
    # Counts and names on both sides, not cut off.
    assert "missing (in the model, not the file): ['bn1.bias'" in text
    assert "unexpected (in the file, not the model): ['layer1.0.norm1.bias'" in text
    assert "file's keys start ['module.encoder.conv1.weight'" in text
    assert "backbone_options.resnet18.key_map" in text


def test_timms_own_loader_error_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "prefixed.safetensors"
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({f"encoder.{k}": v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError) as info:
        fetch_backbone(
            name="resnet18",
            out_dir=tmp_path / "out",
            cache_dir=tmp_path / "hub",
            options={"weights": str(path)},
        )
    text = str(info.value)
    assert "\n" not in text
    assert "missing (in the model, not the file): ['conv1.weight'" in text
    assert "unexpected (in the file, not the model): ['encoder." in text
    assert "backbone_options.resnet18.key_map" in text


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"key_map": [["(", "x"]]}, "backbone_options.resnet18.key_map[0]"),
        ({"key_map": [["a", r"\2"]]}, "backbone_options.resnet18.key_map[0]"),
        ({"drop_keys": ["["]}, "backbone_options.resnet18.drop_keys[0]"),
        ({"key_map": [[".*", ""]]}, "to the empty string"),
        ({"key_map": [[r"^module\.encoder\.", ""], [r"\d", "0"]]}, "renames both"),
    ],
)
def test_bad_key_maps_are_one_line_naming_the_key(tmp_path, options, named):
    source = tmp_path / "simclr.pth.tar"
    foreign_checkpoint(source)
    with pytest.raises(ValueError) as info:
        fetch_backbone(
            name="resnet18",
            out_dir=tmp_path / "out",
            cache_dir=tmp_path / "hub",
            options={"weights": str(source), **options},
        )
    assert named in str(info.value) and "\n" not in str(info.value)


def test_a_key_map_needs_a_local_file(tmp_path):
    with pytest.raises(ValueError, match=r"set backbone_options\.resnet18\.weights"):
        fetch_backbone(
            name="resnet18",
            out_dir=tmp_path / "out",
            cache_dir=tmp_path / "hub",
            options={"key_map": KEY_MAP},
        )


def test_read_state_dict_unwraps_model_and_reads_safetensors(tmp_path):
    state = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    torch.save({"model": state, "optimizer": {}, "epoch": 1}, tmp_path / "ckpt.pth")
    assert set(read_state_dict(tmp_path / "ckpt.pth")) == {"a.weight", "b.bias"}
    save_file(state, str(tmp_path / "w.safetensors"))
    assert set(read_state_dict(tmp_path / "w.safetensors")) == {"a.weight", "b.bias"}
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable weights file"):
        read_state_dict(tmp_path / "junk.pth")


def test_fetch_options_ignore_the_job_time_keys():
    options = BackboneOptions.from_mapping(
        {
            "weights": "/w.pth",
            "preprocess": {"input_size": 32},
            "drop_rate": 0.1,
            "key_map": KEY_MAP,
        }
    )
    assert options.weights == "/w.pth" and options.key_map[0] == tuple(KEY_MAP[0])
    with pytest.raises(ValueError, match="unknown backbone option"):
        BackboneOptions.from_mapping({"weigths": "/w.pth"})


def test_weights_files_follow_the_umask_like_every_other_output(tmp_path):
    """safetensors recreates the temporary file 0600; collaborators on a shared cluster
    filesystem must be able to read the weights (umask 022 → 0644)."""
    import os
    import stat

    from robustft.io import write_json
    from robustft.models import save_model

    previous = os.umask(0o022)
    try:
        save_model(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
        write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"model.safetensors": 0o644, "metrics.json": 0o644}


def test_a_head_reads_back_as_written_with_its_metadata(tmp_path):
    """`save_head` is the one writer of head files (numpy from the probe, torch from the
    zero-shot step), `load_head` the one reader; both kinds give the same bytes as
    safetensors' own writers, as before there was one writer."""
    from safetensors.numpy import save_file as save_numpy

    from robustft.models import load_head, save_head

    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    bias = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    metadata = {"backbone": "toyresnet", "weights_sha256": "ab" * 32, "data_fingerprint": "cd"}
    save_head(tmp_path / "np/head.safetensors", weight=weight, bias=bias, metadata=metadata)
    head = load_head(tmp_path / "np/head.safetensors")
    assert head.metadata == metadata
    np.testing.assert_array_equal(head.weight.numpy(), weight)
    np.testing.assert_array_equal(head.bias.numpy(), bias)

    save_head(
        tmp_path / "pt/head.safetensors", weight=torch.from_numpy(weight), bias=torch.tensor(bias)
    )
    assert load_head(tmp_path / "pt/head.safetensors").metadata == {}
    save_numpy({"weight": weight, "bias": bias}, str(tmp_path / "direct.safetensors"))
    save_file({"weight": torch.from_numpy(weight), "bias": torch.tensor(bias)}, str(tmp_path / "t"))
    direct = (tmp_path / "direct.safetensors").read_bytes()
    assert (tmp_path / "pt/head.safetensors").read_bytes() == direct
    assert (tmp_path / "t").read_bytes() == direct
    # With metadata, safetensors 0.8 writes several entries in no fixed order (a Rust
    # HashMap): the metadata is one entry of sorted JSON, so the same head has the same bytes.
    save_head(tmp_path / "again/head.safetensors", weight=weight, bias=bias, metadata=metadata)
    again = (tmp_path / "again/head.safetensors").read_bytes()
    assert again == (tmp_path / "np/head.safetensors").read_bytes()
    header, tensors = _split_safetensors(tmp_path / "np/head.safetensors")
    assert header["__metadata__"] == {"robustft": json.dumps(metadata, sort_keys=True)}
    assert tensors == _split_safetensors(tmp_path / "direct.safetensors")[1]
    assert not list(tmp_path.glob("*/.*.tmp"))  # written through atomic_path


def _split_safetensors(path):
    """(header as parsed JSON, tensor bytes) of a safetensors file."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def test_a_bad_head_file_is_one_line_naming_it(tmp_path):
    from robustft.models import load_head

    path = tmp_path / "head.safetensors"
    with pytest.raises(FileNotFoundError, match=r"head.safetensors: probe head missing$"):
        load_head(path, what="probe head")
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"head.safetensors: not a readable safetensors file"):
        load_head(path)
    save_file({"weight": torch.zeros(3), "bias": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match=r"expected a 2-d 'weight' and a 'bias', found"):
        load_head(path)


def test_the_models_package_only_re_exports_and_needs_no_timm():
    """`robustft.models` is a face: every name is defined in a submodule. Importing it must
    not import timm (the probe and report jobs import it)."""
    import ast
    import os
    import subprocess
    import sys

    import robustft
    import robustft.models

    tree = ast.parse(Path(robustft.models.__file__).read_text(encoding="utf-8"))
    docstring, *statements = tree.body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    assert all(isinstance(node, ast.Import | ast.ImportFrom) for node in statements)
    for node in statements:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            assert node.module.startswith("robustft.models.")
            assert all(alias.asname == alias.name for alias in node.names)  # re-exported

    src = str(Path(robustft.__file__).parents[1])
    paths = [src, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import robustft.models, sys; assert 'timm' not in sys.modules, 'timm imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_a_misspelt_backbone_is_refused_with_timm_names_close_to_it(tmp_path):
    from robustft.models.fetch import _download_timm

    with pytest.raises(ValueError, match=r"unknown backbone 'resnet51' .*did you mean .*resnet50"):
        _download_timm(name="resnet51", cache_dir=tmp_path)
