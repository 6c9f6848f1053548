"""Methods that choose which layers train and how fast: freeze-embed, surgical fine-tuning and
layer-wise lr decay, on the toy ResNet and on small timm ResNets and ViTs."""

import copy

import pytest
import torch
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import TensorDataset

from robustft.methods import BUILTIN
from robustft.methods.layers import block_groups, layer_ids, stem_parameters
from robustft.models import ImageClassifier, Preprocess, TimmBackbone
from robustft.models.toy import ToyResNet
from robustft.training import TrainSettings, _parameter_groups, train_classifier

PRE = Preprocess(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def toy():
    return ToyResNet(width=4)


def timm_resnet():
    return TimmBackbone(
        ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=10), embedding="pooled"
    )


def timm_vit():
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=10
    )
    return TimmBackbone(model, embedding="pooled")


BACKBONES = {"toy": toy, "resnet": timm_resnet, "vit": timm_vit}


def classifier(backbone, seed=0, classes=3):
    torch.manual_seed(seed)
    return ImageClassifier(backbone=BACKBONES[backbone](), num_classes=classes, preprocess=PRE)


def data(n=64, seed=0, classes=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=generator)
    return TensorDataset(images, torch.randint(0, classes, (n,), generator=generator))


def prepare(method, model, **options):
    return BUILTIN[method].hook()(model=model, options=options, teacher=None)


def train(model, setup, *, bn="train", epochs=2, lr=0.05):
    settings = TrainSettings(epochs=epochs, lr=lr, batch_size=16, bn=bn, seed=0)
    train_classifier(
        model=model,
        train_set=data(),
        eval_sets={"id_val": data(n=32, seed=1)},
        settings=settings,
        select_on="id_val",
        progress=False,
        loss_fn=setup.loss_fn,
        extra_loss=setup.extra_loss,
        lr_factors=setup.lr_factors,
        frozen_statistics=setup.frozen_statistics,
    )
    return model


def unchanged(before, after):
    """Names of the state-dict entries (parameters and buffers) that are bit-identical."""
    state = after.state_dict()
    return {name for name, value in before.state_dict().items() if torch.equal(value, state[name])}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_freeze_embed_leaves_the_stem_bit_identical_and_trains_the_rest(backbone):
    model = classifier(backbone)
    before = copy.deepcopy(model)
    setup = prepare("freeze_embed", model)
    stem = stem_parameters(model, method="freeze_embed")
    # BatchNorm statistics train elsewhere (bn = train), so the stem's must be held by the method.
    train(model, setup, bn="train")
    same = unchanged(before, model)
    stem_modules = {name.rsplit(".", 1)[0] for name in stem}
    stem_state = {n for n in before.state_dict() if n.rsplit(".", 1)[0] in stem_modules}
    assert stem and set(stem) <= stem_state
    assert stem_state <= same, sorted(stem_state - same)
    trained = [n for n, _ in model.named_parameters() if n not in stem]
    assert not any(n in same for n in trained), sorted(set(trained) & same)


def test_the_stem_is_timms_stem_group():
    assert stem_parameters(classifier("toy"), method="m") == [
        "backbone.stem.0.weight",
        "backbone.stem.1.weight",
        "backbone.stem.1.bias",
    ]
    assert set(stem_parameters(classifier("resnet"), method="m")) == {
        "backbone.model.conv1.weight",
        "backbone.model.bn1.weight",
        "backbone.model.bn1.bias",
    }
    vit = stem_parameters(classifier("vit"), method="m")
    assert set(vit) == {
        "backbone.model.cls_token",
        "backbone.model.pos_embed",
        "backbone.model.patch_embed.proj.weight",
        "backbone.model.patch_embed.proj.bias",
    }


@pytest.mark.parametrize("backbone", ["toy", "resnet"])
@pytest.mark.parametrize("group", [0, 2])
def test_surgical_trains_only_its_group(backbone, group):
    model = classifier(backbone)
    before = copy.deepcopy(model)
    setup = prepare("surgical", model, groups=4, group=group)
    train(model, setup, bn="train")
    same = unchanged(before, model)
    if backbone == "toy":
        prefixes = [f"backbone.stages.{group}."] + (["backbone.stem."] if group == 0 else [])
    else:
        stem = ["backbone.model.conv1.", "backbone.model.bn1."] if group == 0 else []
        prefixes = [f"backbone.model.layer{group + 1}.", *stem]
    for name in before.state_dict():
        if not name.endswith("num_batches_tracked"):  # counts BatchNorm calls, even frozen
            assert (name in same) != name.startswith(tuple(prefixes)), name


def test_surgical_groups_split_vit_blocks_contiguously():
    model = classifier("vit")
    groups = block_groups(model, groups=2, method="surgical")
    first, second = ({n.split(".")[3] for n in g if ".blocks." in n} for g in groups)
    assert first == {"0", "1"} and second == {"2", "3"}
    assert "backbone.model.patch_embed.proj.weight" in groups[0]
    assert "backbone.model.norm.weight" in groups[1]
    with pytest.raises(ValueError, match="groups must be between 1 and 4"):
        block_groups(model, groups=6, method="surgical")
    with pytest.raises(ValueError, match=r"not a group index 0\.\.1"):
        prepare("surgical", model, groups=2, group=2)


def lrs(model, setup, lr=0.1):
    settings = TrainSettings(epochs=1, lr=lr)
    groups = _parameter_groups(model, settings=settings, lr_factors=setup.lr_factors)
    by_param = {id(p): group["lr"] for group in groups for p in group["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_llrd_gives_each_toy_layer_lr_times_decay_per_layer_above():
    model = classifier("toy")
    got = lrs(model, prepare("llrd", model, decay=0.5))
    # Layers: stem 0, stages 1–4 (the top); the classifier's head trains at lr.
    for name, lr in got.items():
        if name.startswith("head."):
            expected = 0.1
        elif name.startswith("backbone.stem."):
            expected = 0.1 * 0.5**4
        else:
            stage = int(name.split(".")[2])
            expected = 0.1 * 0.5 ** (3 - stage)
        assert lr == pytest.approx(expected, rel=1e-12), name


def test_llrd_on_a_vit_decays_per_block():
    model = classifier("vit")
    got = lrs(model, prepare("llrd", model, decay=0.8))
    layers = layer_ids(model, method="llrd")
    # stem 0, blocks 1–4 (timm puts the final norm with the last block: the top, at lr).
    assert max(layers.values()) == 4
    for name, layer in layers.items():
        assert got[name] == pytest.approx(0.1 * 0.8 ** (4 - layer), rel=1e-12), name
    assert got["backbone.model.blocks.2.attn.qkv.weight"] == pytest.approx(0.1 * 0.8)
    assert got["head.weight"] == 0.1


def test_a_backbone_without_layer_groups_is_a_one_line_error():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.num_features = 4
    model = ImageClassifier(backbone=backbone, num_classes=3, preprocess=PRE)
    for method in ("freeze_embed", "surgical", "llrd"):
        options = {"groups": 2, "group": 0, "decay": 0.5}
        with pytest.raises(ValueError, match=f"method '{method}' needs a backbone that groups"):
            prepare(method, model, **options)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    from fake_data import write_tiny_toyshift_job

    return write_tiny_toyshift_job(tmp_path_factory.mktemp("job"), train_per_class=8, width=4)


@pytest.mark.parametrize(
    ("method", "hparams"), [("freeze_embed", {}), ("llrd", {"decay": 0.65}), ("flyp", {})]
)
def test_the_finetune_stage_runs_each_method_or_names_what_is_missing(tiny_job, method, hparams):
    from robustft.stages import run_finetune

    out = tiny_job / "out" / method
    run = dict(
        method=method,
        dataset="toyshift",
        data_root=tiny_job / "data",
        model_dir=tiny_job / "backbone",
        out_dir=out,
        ood_splits=["real"],
        lr=0.05,
        seed=0,
        epochs=1,
        batch_size=8,
        momentum=0.9,
        weight_decay=0.0,
        augment=False,
        bn="train",
        hparams=hparams,
        save_epochs=[1],  # the weights after training, whichever epoch is selected
        progress=False,
    )
    if method == "flyp":  # the toy has no text tower: one line, nothing written
        with pytest.raises(ValueError, match="needs a CLIP text tower; backbone 'backbone'"):
            run_finetune(**run)
        assert not out.exists()
        return
    metrics = run_finetune(**run)
    assert metrics["method"] == method and (out / "model.safetensors").is_file()
    if method == "freeze_embed":
        from safetensors.torch import load_file

        pretrained = load_file(tiny_job / "backbone" / "model.safetensors")
        trained = load_file(out / "checkpoints" / "epoch1.safetensors")
        for key, value in pretrained.items():
            if not key.endswith("num_batches_tracked"):
                same = torch.equal(trained[f"backbone.{key}"], value)
                assert same == key.startswith("stem."), key
