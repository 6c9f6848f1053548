import h5py
import numpy as np
import pytest
import torch

from robustft.features import read_features, write_features
from robustft.models import (
    ImageClassifier,
    Preprocess,
    build_backbone,
    load_backbone,
    save_backbone,
)
from robustft.stages import load_probe_head

ATTRS = {"backbone": "toyresnet", "weights_sha256": "ab" * 32, "preprocessing": "none"}


def test_hdf5_round_trip_keeps_arrays_and_attributes(tmp_path):
    features = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    labels = np.arange(10) % 3
    path = tmp_path / "f" / "train.h5"
    write_features(path, features=features, labels=labels, attrs=ATTRS)
    loaded = read_features(path, num_classes=3)
    np.testing.assert_array_equal(loaded.features, features)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.labels.dtype == np.int64
    assert loaded.attrs["backbone"] == "toyresnet"
    assert loaded.attrs["count"] == 10
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.h5"]  # no temp left


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "train.h5"
    with pytest.raises(ValueError):
        write_features(path, features=np.zeros((3, 2), np.float32), labels=np.zeros(4), attrs=ATTRS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "problem", ["missing_labels", "wrong_shape", "label_range", "nan", "not_hdf5", "absent"]
)
def test_bad_feature_files_are_rejected_naming_the_file(tmp_path, problem):
    path = tmp_path / "val.h5"
    features = np.ones((4, 3), np.float32)
    labels = np.array([0, 1, 2, 0])
    if problem == "not_hdf5":
        path.write_bytes(b"not an hdf5 file at all")
    elif problem != "absent":
        with h5py.File(path, "w") as handle:
            handle["features"] = {
                "wrong_shape": np.ones(4, np.float32),
                "nan": np.full((4, 3), np.nan, np.float32),
            }.get(problem, features)
            if problem != "missing_labels":
                handle["labels"] = labels + (5 if problem == "label_range" else 0)
    with pytest.raises((ValueError, FileNotFoundError), match=r"val\.h5"):
        read_features(path, num_classes=3)


def test_backbone_round_trip_and_checksum(tmp_path):
    backbone = build_backbone(architecture="toyresnet", kwargs={"width": 4})
    pre = Preprocess(input_size=32, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    save_backbone(
        backbone=backbone,
        out_dir=tmp_path,
        architecture="toyresnet",
        kwargs={"width": 4},
        preprocess=pre,
    )
    loaded, loaded_pre, _ = load_backbone(tmp_path)
    assert loaded_pre == pre
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors: checksum"):
        load_backbone(tmp_path)


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    save_backbone(
        backbone=build_backbone(architecture="toyresnet", kwargs={"width": 8}),
        out_dir=tmp_path,
        architecture="toyresnet",
        kwargs={"width": 8},
        preprocess=Preprocess(input_size=32, mean=(0, 0, 0), std=(1, 1, 1)),
    )
    import json

    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["kwargs"] = {"width": 4}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit this architecture"):
        load_backbone(tmp_path)


def test_lpft_head_from_the_probe_reproduces_the_probe(tmp_path):
    """LP-FT starts exactly where LP ended: the model before fine-tuning predicts as the probe."""
    from safetensors.numpy import save_file

    from robustft.probe import fit_probe

    torch.manual_seed(0)
    backbone = build_backbone(architecture="toyresnet", kwargs={"width": 4})
    pre = Preprocess(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    model = ImageClassifier(backbone=backbone, num_classes=3, preprocess=pre).eval()
    images = torch.rand(90, 3, 16, 16)
    labels = np.arange(90) % 3
    images[labels == 1, 0] += 0.5
    images[labels == 2, 2] += 0.5
    with torch.no_grad():
        features = model.features(images).numpy()
    probe = fit_probe(
        train_x=features, train_y=labels, val_x=features, val_y=labels, c_grid=[10.0], num_classes=3
    )
    weight, bias = probe.raw_scale_head()
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "head.safetensors"))
    head_weight, head_bias = load_probe_head(tmp_path)
    with torch.no_grad():
        model.head.weight.copy_(head_weight)
        model.head.bias.copy_(head_bias)
        predictions = model(images).argmax(1).numpy()
    np.testing.assert_array_equal(predictions, probe.predict(features))


def test_features_record_the_resolved_preprocessing_as_text_and_json(tmp_path):
    import json

    from fake_data import write_tiny_toyshift_job

    from robustft.stages import extract_split

    root = write_tiny_toyshift_job(tmp_path, train_per_class=4, width=4)
    paths = {}
    for size in (None, 40):
        paths[size] = tmp_path / f"val{size}.h5"
        extract_split(
            dataset="toyshift",
            split="val",
            data_root=root / "data",
            model_dir=root / "backbone",
            out_path=paths[size],
            backbone_name="toyresnet",
            progress=False,
            preprocess_overrides={"input_size": size, "interpolation": "bicubic"},
        )
    default, resized = (read_features(paths[size]).attrs for size in (None, 40))
    assert json.loads(default["preprocess"]) == {
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "transform": "resize",
    }
    assert json.loads(resized["preprocess"])["input_size"] == 40
    assert "to 40px" in resized["preprocessing"] and "to 32px" in default["preprocessing"]
    # The toy's 32 px images pass through at 32 px, and are resized at 40 px.
    assert not np.allclose(read_features(paths[None]).features, read_features(paths[40]).features)


def test_a_finetuning_run_records_its_preprocessing_and_drop_rate(tmp_path):
    import json

    from fake_data import write_tiny_toyshift_job

    from robustft.stages import run_finetune

    root = write_tiny_toyshift_job(tmp_path, train_per_class=4, width=4)
    run_finetune(
        method="ft",
        dataset="toyshift",
        data_root=root / "data",
        model_dir=root / "backbone",
        out_dir=tmp_path / "run",
        ood_splits=["real"],
        lr=1e-2,
        seed=0,
        epochs=1,
        batch_size=8,
        momentum=0.9,
        weight_decay=0.0,
        bn="train",
        augment=False,
        progress=False,
        preprocess_overrides={"input_size": 24},
        backbone_kwargs={"drop_rate": 0.2},
        data_fingerprint="da7a" * 16,
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["backbone"]["preprocess"]["input_size"] == 24
    assert config["backbone"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert config["backbone"]["kwargs"] == {"drop_rate": 0.2}
    # Provenance: the pretrained weights, the data, no probe head (ft).
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    sha = json.loads((root / "backbone" / "meta.json").read_text())["sha256"]
    expected = {
        "backbone": "backbone",  # the folder's name, as resources/models/{backbone}
        "weights_sha256": sha,
        "data_fingerprint": "da7a" * 16,
        "probe_head_sha256": None,
    }
    assert config["provenance"] == expected
    assert {key: metrics[key] for key in expected} == expected


def test_features_record_their_provenance(tmp_path):
    import json

    from fake_data import write_tiny_toyshift_job

    from robustft.stages import extract_split

    root = write_tiny_toyshift_job(tmp_path, train_per_class=4, width=4)
    for fingerprint, name in (("da7a" * 16, "known.h5"), (None, "unknown.h5")):
        extract_split(
            dataset="toyshift",
            split="val",
            data_root=root / "data",
            model_dir=root / "backbone",
            out_path=tmp_path / name,
            backbone_name="toyresnet",
            progress=False,
            data_fingerprint=fingerprint,
        )
    sha = json.loads((root / "backbone" / "meta.json").read_text())["sha256"]
    known, unknown = (read_features(tmp_path / name).attrs for name in ("known.h5", "unknown.h5"))
    assert known["backbone"] == "toyresnet" and known["weights_sha256"] == sha
    assert known["data_fingerprint"] == "da7a" * 16
    assert unknown["data_fingerprint"] == ""  # made without a data manifest: unknown


def test_a_write_removes_the_temporaries_a_killed_write_left(tmp_path):
    """A SIGKILL during a write leaves `.<name>.<random>.tmp`; the next write of that output
    removes those, and only those of its own name."""
    from robustft.io import write_text

    stale = tmp_path / ".train.h5.x7k2m9q1.tmp"
    stale.write_bytes(b"partial")
    others = [tmp_path / ".train.h5.old.x7k2m9q1.tmp", tmp_path / ".val.h5.x7k2m9q1.tmp"]
    for other in others:
        other.write_bytes(b"another output's")
    write_features(
        tmp_path / "train.h5",
        features=np.zeros((2, 3), np.float32),
        labels=np.zeros(2, np.int64),
        attrs=ATTRS,
    )
    assert not stale.exists()
    assert all(other.exists() for other in others)
    (tmp_path / ".x.json.abcd_123.tmp").write_text("{")
    write_text(tmp_path / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["train.h5", "x.json", *(other.name for other in others)]
    )


def test_a_multiline_write_error_names_the_feature_file(tmp_path, monkeypatch):
    """HDF5's I/O errors (disk full) span lines and name the temporary, if anything."""

    def disk_full(*args, **kwargs):
        raise OSError("Can't write data (file write failed)\n  errno = 28, 'No space left'")

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    path = tmp_path / "val.h5"
    with pytest.raises(OSError, match=r"^\S*val\.h5: writing the feature file failed \(Can't"):
        write_features(path, features=np.zeros((2, 3), np.float32), labels=np.zeros(2), attrs={})
    assert list(tmp_path.iterdir()) == []
