import torch

from robustft.data.datasets import random_crop_flip, to_float


def test_to_float_scales_uint8_to_unit_range():
    images = torch.tensor([[[[0, 255]]]], dtype=torch.uint8).expand(1, 3, 1, 2)
    out = to_float(images)
    assert out.dtype == torch.float32
    assert out.min() == 0.0 and out.max() == 1.0


def test_crop_without_padding_is_identity_or_a_mirror():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    expected = to_float(images)
    flipped = expected.flip(3)
    same = (out == expected).flatten(1).all(1)
    mirrored = (out == flipped).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()  # both happen in a batch of 64


def test_crop_is_a_shifted_window_of_the_padded_image():
    image = torch.arange(3 * 6 * 6, dtype=torch.float32).reshape(1, 3, 6, 6) / 200
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2), mode="reflect")
    out = random_crop_flip(
        image.expand(32, -1, -1, -1), torch.Generator().manual_seed(1), padding=2
    )
    windows = [padded[0, :, y : y + 6, x : x + 6] for y in range(5) for x in range(5)]
    windows += [w.flip(2) for w in windows]
    for crop in out:
        assert any(torch.equal(crop, w) for w in windows)


def test_same_generator_seed_gives_the_same_augmentation():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(images, torch.Generator().manual_seed(3))
    b = random_crop_flip(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
