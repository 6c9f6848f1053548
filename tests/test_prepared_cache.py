"""The prepared-image cache: the images it serves are the uncached path's, bit for bit, for
every deterministic transform; a cache made from other data or preprocessing is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import fake_data
import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from robustft.data.datasets import (
    ContiguousRandomResizedCrop,
    as_torch_dataset,
    decode_image,
    image_transform,
)
from robustft.data.prepared import cache_plan, open_prepared, prepare_split
from robustft.data.splits import ImageArrays, ImageFiles
from robustft.models import Preprocess

FINGERPRINT = "a" * 64
# Downscaled, upscaled, portrait, landscape, odd sizes; RGB JPEG, PNG, grayscale, 16-bit.
SIZES = [(500, 375), (375, 500), (67, 45), (300, 200), (120, 480), (225, 224)]


def preprocess(size=40, crop_pct=0.875, interpolation="bicubic"):
    return Preprocess(
        input_size=size,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        crop_pct=crop_pct,
        interpolation=interpolation,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files of several sizes and formats, as a file split (ImageFolder-like)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for k, (width, height) in enumerate(SIZES):
        image = fake_data.photo_like(rng, width=width, height=height)
        path = root / f"c{k % 2}" / f"{k}.{('jpg', 'png')[k % 2]}"
        path.parent.mkdir(exist_ok=True)
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(str(path))
    grey = root / "c0" / "grey.png"
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), mode="L").save(grey)
    deep = root / "c1" / "deep.png"
    Image.fromarray(rng.integers(0, 4096, (50, 80), dtype=np.uint16)).save(deep)  # 12-bit
    paths += [str(grey), str(deep)]
    labels = np.arange(len(paths), dtype=np.int64) % 2
    return ImageFiles(paths=tuple(paths), labels=labels, class_names=("c0", "c1"))


@pytest.fixture(scope="module")
def arrays():
    """In-memory images (as CIFAR and STL are held), not at the input size."""
    rng = np.random.default_rng(1)
    images = np.stack(
        [np.asarray(fake_data.photo_like(rng, width=32, height=32)) for _ in range(6)]
    )
    return ImageArrays(images=images, labels=np.arange(6) % 3, class_names=("a", "b", "c"))


def prepared(tmp_path, split, transform, pre, **options):
    path = tmp_path / f"{transform}.h5"
    plan = cache_plan(transform, preprocess=pre, shorter_side=options.pop("shorter_side", None))
    prepare_split(split=split, out_path=path, plan=plan, data_fingerprint=FINGERPRINT, **options)
    return open_prepared(
        path, split=split, transform=transform, preprocess=pre, data_fingerprint=FINGERPRINT
    )


def items(dataset):
    return [dataset[i] for i in range(len(dataset))]


def assert_same(expected, found):
    assert len(expected) == len(found)
    for (image, label), (cached, cached_label) in zip(expected, found, strict=True):
        assert image.dtype == cached.dtype == torch.uint8
        assert image.shape == cached.shape
        assert torch.equal(image, cached)
        assert int(label) == int(cached_label)


DETERMINISTIC = ["resize", "resize_center_crop"]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("transform", DETERMINISTIC)
@pytest.mark.parametrize("source", ["files", "arrays", "border"])
def test_cached_images_equal_the_uncached_path_bit_for_bit(
    tmp_path, request, files, arrays, source, transform, interpolation
):
    split = {"files": files, "arrays": arrays, "border": replace(files, border=2)}[source]
    pre = preprocess(interpolation=interpolation)
    uncached = as_torch_dataset(split, preprocess=pre, transform=transform)
    for options in ({}, {"compression": "lzf", "num_workers": 2, "batch_size": 3}):
        cached = prepared(tmp_path, split, transform, pre, **options)
        assert_same(items(uncached), items(cached))


def test_in_memory_images_at_the_input_size_pass_through_as_before(tmp_path, arrays):
    pre = preprocess(size=32)
    uncached = as_torch_dataset(arrays, preprocess=pre, transform="resize")
    assert_same(items(uncached), items(prepared(tmp_path, arrays, "resize", pre)))


@pytest.mark.parametrize("source", ["files", "arrays"])
def test_domainnet_training_crops_equal_the_uncached_path_under_the_same_seed(
    tmp_path, files, arrays, source
):
    """resize_random_crop: the squash is cached; the random crop and flip draw the same
    numbers on the cached image, so every training image is the uncached one."""
    split = files if source == "files" else arrays
    pre = preprocess(size=40, crop_pct=0.875)
    uncached = as_torch_dataset(split, preprocess=pre, transform="resize_random_crop")
    cached = prepared(tmp_path, split, "resize_random_crop", pre)
    assert tuple(cached.image(0).shape) == (3, 45, 45)  # int(40 / 0.875)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = items(uncached)
        torch.manual_seed(seed)
        assert_same(expected, items(cached))


def test_loader_workers_give_the_uncached_batches(tmp_path, files):
    """As the training loop reads: shuffled, two workers, the loader's own seeded generator."""
    pre = preprocess(size=40)
    uncached = as_torch_dataset(files, preprocess=pre, transform="resize_random_crop")
    cached = prepared(tmp_path, files, "resize_random_crop", pre)

    def batches(dataset):
        loader = DataLoader(
            dataset,
            batch_size=3,
            shuffle=True,
            num_workers=2,
            generator=torch.Generator().manual_seed(7),
        )
        return [(images, labels) for images, labels in loader]

    for (images, labels), (cached_images, cached_labels) in zip(
        batches(uncached), batches(cached), strict=True
    ):
        assert torch.equal(images, cached_images) and torch.equal(labels, cached_labels)


def test_random_resized_crops_are_cut_from_images_at_most_the_shorter_side(tmp_path, files):
    pre = preprocess(size=40)
    cached = prepared(tmp_path, files, "random_resized_crop", pre, shorter_side=64)
    for index, path in enumerate(files.paths):
        decoded = torch.from_numpy(np.array(decode_image(path))).permute(2, 0, 1)
        stored = cached.image(index)
        height, width = decoded.shape[1:]
        if min(height, width) <= 64:  # small images are kept as they are
            assert torch.equal(stored, decoded)
        else:
            assert min(stored.shape[1:]) == 64
            ratio = (stored.shape[2] / stored.shape[1]) / (width / height)
            assert abs(ratio - 1) < 0.02  # aspect kept
        image, _ = cached[index]
        assert image.shape == (3, 40, 40) and image.dtype == torch.uint8
    # The default cap: the size the eval transform resizes to (256 for 224).
    assert cache_plan("random_resized_crop", preprocess=preprocess(size=224)).shorter_side == 256


def test_contiguous_random_resized_crop_draws_and_gives_what_torchvisions_does():
    from torchvision.transforms import InterpolationMode, v2

    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    for mode in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
        ours = ContiguousRandomResizedCrop(224, interpolation=mode)
        theirs = v2.RandomResizedCrop(224, interpolation=mode, antialias=True)
        for seed in range(20):
            torch.manual_seed(seed)
            expected = theirs(image)
            torch.manual_seed(seed)
            assert torch.equal(ours(image), expected)


def test_cached_images_are_read_without_the_source_files(tmp_path, files):
    copies = []
    for k, path in enumerate(files.paths):
        copy = tmp_path / "copy" / f"{k}{path[path.rindex('.') :]}"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(Path(path).read_bytes())
        copies.append(str(copy))
    split = replace(files, paths=tuple(copies))
    pre = preprocess()
    expected = items(as_torch_dataset(split, preprocess=pre, transform="resize"))
    cached = prepared(tmp_path, split, "resize", pre)
    for copy in copies:
        (tmp_path / "copy" / copy.rsplit("/", 1)[1]).unlink()
    assert_same(expected, items(cached))


def refusal(path, split, **expected):
    settings = {
        "transform": "resize",
        "preprocess": preprocess(),
        "data_fingerprint": FINGERPRINT,
        **expected,
    }
    with pytest.raises(ValueError) as error:
        open_prepared(path, split=split, **settings)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_cache_of_other_data_or_preprocessing_is_refused(tmp_path, files):
    prepared(tmp_path, files, "resize", preprocess())
    path = tmp_path / "resize.h5"
    message = refusal(path, files, data_fingerprint="b" * 64)
    assert "data_fingerprint" in message and "aaaaaaaaaaaa" in message
    assert "input_size" in refusal(path, files, preprocess=preprocess(size=48))
    assert "interpolation" in refusal(path, files, preprocess=preprocess(interpolation="bilinear"))
    assert "transform" in refusal(path, files, transform="resize_center_crop")
    fewer = replace(files, paths=files.paths[:-1], labels=files.labels[:-1])
    assert "count" in refusal(path, fewer)
    relabelled = replace(files, labels=1 - files.labels)
    assert "split_sha256" in refusal(path, relabelled)
    reordered = replace(files, paths=files.paths[::-1], labels=files.labels[::-1])
    assert "split_sha256" in refusal(path, reordered)
    with h5py.File(path, "a") as handle:
        handle.attrs["torchvision"] = "0.1.0"
    assert "torchvision" in refusal(path, files)
    # The same split from a moved copy of the data is the same split.
    moved = replace(files, paths=tuple("/elsewhere" + p for p in files.paths))
    with h5py.File(path, "a") as handle:
        handle.attrs["torchvision"] = __import__("torchvision").__version__
    open_prepared(
        path, split=moved, transform="resize", preprocess=preprocess(), data_fingerprint=FINGERPRINT
    )


def test_a_failed_preparation_leaves_no_file(tmp_path, files):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(files.paths[0]).read_bytes()[:300])  # truncated JPEG
    split = replace(files, paths=(*files.paths[:2], str(broken)), labels=files.labels[:3])
    out = tmp_path / "out" / "resize.h5"
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        prepare_split(
            split=split,
            out_path=out,
            plan=cache_plan("resize", preprocess=preprocess()),
            data_fingerprint=FINGERPRINT,
        )
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_shorter_side_below_the_input_size_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"prepared_cache\.shorter_side: 30 is below"):
        cache_plan("random_resized_crop", preprocess=preprocess(size=40), shorter_side=30)


def test_image_transform_is_the_deterministic_steps_then_the_random_ones(files):
    """What the cache splits apart composes back to the uncached transform."""
    pre = preprocess()
    plan = cache_plan("resize_random_crop", preprocess=pre)
    whole = image_transform("resize_random_crop", size=40, crop_pct=0.875, interpolation="bicubic")
    image = decode_image(files.paths[0])
    torch.manual_seed(3)
    expected = whole(image)
    torch.manual_seed(3)
    assert torch.equal(plan.remaining()(plan.stored()(image)), expected)
