"""View recipes and MultiView: shapes, requested views only, exact normalisation, augmentation behaviour."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from slip.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    MultiView,
    RandomGaussianBlur,
    build_multiview,
    clip_view,
    eval_view,
    ssl_view,
)
from slip.tokenizer import tokenize

MEAN = torch.tensor(CLIP_MEAN)[:, None, None]
STD = torch.tensor(CLIP_STD)[:, None, None]
CAPTION = "a small red circle above a large blue square"


def noise_image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """A random RGB image, so that different crops give different pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def red_left_blue_right(size: int = 64) -> Image.Image:
    """Left half pure red, right half pure blue: a flip or grayscale is visible in any large crop."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2, 0] = 255
    pixels[:, size // 2 :, 2] = 255
    return Image.fromarray(pixels)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised CLIP-statistics tensor -> RGB in [0, 1]."""
    return x * STD + MEAN


def is_flipped_or_gray(view_output: torch.Tensor) -> tuple[bool, bool]:
    """Whether a view of `red_left_blue_right` shows blue on the left, and whether it lost its colour."""
    rgb = unnormalize(view_output)
    left, right = rgb[:, :, 0].mean(dim=1), rgb[:, :, -1].mean(dim=1)
    spread = (rgb.max(dim=0).values - rgb.min(dim=0).values).mean().item()
    return bool(left[2] > left[0] and right[0] > right[2]), spread < 0.05


@pytest.mark.parametrize(
    "inputs",
    [("image", "text"), ("aug1", "aug2"), ("image", "text", "aug1", "aug2"), ("image",), ("text",), ("aug2",),
     ("text", "aug2", "image")],
)
def test_multiview_produces_exactly_the_requested_views(inputs):
    multiview = build_multiview(inputs, 24, CLIP_MEAN, CLIP_STD, context_length=20)
    sample = multiview(noise_image(), CAPTION)
    assert set(sample) == set(inputs)
    assert set(multiview.keys) == set(inputs)
    for name, tensor in sample.items():
        assert type(tensor) is torch.Tensor  # plain tensors, not tv_tensors subclasses
        if name == "text":
            assert tensor.shape == (20,) and tensor.dtype == torch.int64
            assert torch.equal(tensor, tokenize(CAPTION, 20)[0])
        else:
            assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32
            assert torch.isfinite(tensor).all()


def test_views_accept_non_square_and_non_rgb_images():
    multiview = build_multiview(("image", "aug1"), 16, CLIP_MEAN, CLIP_STD)
    gray = Image.fromarray(np.arange(30 * 70, dtype=np.uint32).reshape(30, 70).astype(np.uint8), mode="L")
    sample = multiview(gray, "a gray ramp")
    assert sample["image"].shape == sample["aug1"].shape == (3, 16, 16)
    assert eval_view(16, CLIP_MEAN, CLIP_STD)(noise_image(70, 30)).shape == (3, 16, 16)


@pytest.mark.parametrize("color", [(200, 100, 50), (0, 0, 0), (255, 255, 255), (13, 250, 128)])
def test_eval_view_normalises_a_constant_image_exactly(color):
    out = eval_view(20, CLIP_MEAN, CLIP_STD)(Image.new("RGB", (57, 31), color))
    mean, std = torch.tensor(CLIP_MEAN, dtype=torch.float64), torch.tensor(CLIP_STD, dtype=torch.float64)
    expected = (torch.tensor(color, dtype=torch.float64) / 255 - mean) / std
    assert out.shape == (3, 20, 20)
    torch.testing.assert_close(out.double(), expected[:, None, None].expand(3, 20, 20), atol=1e-6, rtol=0)


def test_eval_view_resizes_the_shorter_side_and_crops_the_centre():
    stripes = np.zeros((30, 90, 3), dtype=np.uint8)  # red | green | blue, 30 px each
    stripes[:, :30, 0] = stripes[:, 30:60, 1] = stripes[:, 60:, 2] = 255
    rgb = unnormalize(eval_view(10, CLIP_MEAN, CLIP_STD)(Image.fromarray(stripes)))
    # 90x30 -> 30x10, whose centre 10x10 is the green stripe; blending can only touch the outer columns.
    torch.testing.assert_close(rgb[:, :, 2:8], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 10, 6),
                               atol=1e-5, rtol=0)


def test_clip_view_never_flips_or_grays_but_ssl_view_does():
    image = red_left_blue_right()
    clip = clip_view(16, CLIP_MEAN, CLIP_STD)
    ssl = ssl_view(16, CLIP_MEAN, CLIP_STD, scale=(0.5, 1.0))
    torch.manual_seed(0)
    clip_flags = [is_flipped_or_gray(clip(image)) for _ in range(60)]
    ssl_flags = [is_flipped_or_gray(ssl(image)) for _ in range(60)]
    assert not any(flip or gray for flip, gray in clip_flags)
    assert any(flip for flip, _ in ssl_flags) and any(gray for _, gray in ssl_flags)


def test_ssl_views_differ_from_each_other_and_from_the_clip_view():
    multiview = build_multiview(("image", "aug1", "aug2"), 24, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(0)
    sample = multiview(noise_image(), CAPTION)
    assert not torch.allclose(sample["aug1"], sample["aug2"])
    assert not torch.allclose(sample["image"], sample["aug1"])


def test_views_are_reproducible_under_manual_seed():
    multiview = build_multiview(("image", "text", "aug1", "aug2"), 24, CLIP_MEAN, CLIP_STD)
    image = noise_image()
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(multiview(image, CAPTION))
    for key in multiview.keys:
        assert torch.equal(draws[0][key], draws[1][key])
    assert not torch.equal(draws[0]["aug1"], draws[2]["aug1"])
    assert not torch.equal(draws[0]["image"], draws[2]["image"])


def test_multiview_survives_pickling_for_dataloader_workers():
    multiview = build_multiview(("image", "text", "aug1"), 16, CLIP_MEAN, CLIP_STD, context_length=12)
    copy = pickle.loads(pickle.dumps(multiview))
    image = noise_image()
    torch.manual_seed(1)
    expected = multiview(image, CAPTION)
    torch.manual_seed(1)
    got = copy(image, CAPTION)
    for key in expected:
        assert torch.equal(expected[key], got[key])


def _constant_through_ssl(jitter_strength: float) -> torch.Tensor:
    """A constant image through an SSL view that always jitters and never grays or blurs."""
    multiview = build_multiview(("aug1",), 8, CLIP_MEAN, CLIP_STD, jitter_strength=jitter_strength,
                                jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    return unnormalize(multiview(Image.new("RGB", (20, 20), (180, 90, 40)), CAPTION)["aug1"])


def test_jitter_strength_scales_the_colour_jitter():
    torch.manual_seed(0)
    unchanged = [_constant_through_ssl(0.0) for _ in range(5)]
    for out in unchanged:
        torch.testing.assert_close(out, (torch.tensor([180, 90, 40]) / 255)[:, None, None].expand(3, 8, 8),
                                   atol=1e-5, rtol=0)
    def mean_change(strength: float) -> float:
        changes = [(_constant_through_ssl(strength)[:, 0, 0] * 255 - torch.tensor([180, 90, 40])).abs().max()
                   for _ in range(40)]
        return float(torch.stack(changes).mean())

    assert 0 < mean_change(0.25) < mean_change(1.5)


def test_gaussian_blur_tensor_path_matches_pil_path():
    edge = np.zeros((32, 32, 3), dtype=np.uint8)
    edge[:, 16:] = 255
    blur = RandomGaussianBlur((1.5, 1.5))
    from_pil = torch.from_numpy(np.array(blur(Image.fromarray(edge)))).permute(2, 0, 1).float()
    from_tensor = blur(torch.from_numpy(edge).permute(2, 0, 1).contiguous()).float()
    row_pil, row_tensor = from_pil[0, 16], from_tensor[0, 16]
    assert 0 < row_tensor[15] < 128 < row_tensor[16] < 255  # the edge really is blurred
    assert (row_pil - row_tensor)[4:28].abs().max() <= 12  # PIL's box approximation is close to exact


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inputs=()), "inputs"),
        (dict(inputs=("image", "caption")), "inputs"),
        (dict(inputs="image"), "inputs"),
        (dict(image_size=0), "image_size"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(clip_scale=(0.8, 0.5)), "clip_scale"),
        (dict(ssl_crop_scale=(0.0, 1.0)), "ssl_crop_scale"),
        (dict(jitter_strength=-1.0), "jitter_strength"),
        (dict(jitter_p=1.5), "jitter_p"),
        (dict(grayscale_p=-0.1), "grayscale_p"),
        (dict(blur_sigma=(2.0, 0.1)), "blur_sigma"),
        (dict(blur_p=2), "blur_p"),
        (dict(hflip_p=None), "hflip_p"),
        (dict(context_length=1), "context_length"),
    ],
)
def test_build_multiview_rejects_bad_arguments(kwargs, match):
    arguments = dict(inputs=("image", "text", "aug1", "aug2"), image_size=16, mean=CLIP_MEAN, std=CLIP_STD)
    with pytest.raises(ValueError, match=match):
        build_multiview(**{**arguments, **kwargs})


def test_build_multiview_checks_arguments_of_views_it_does_not_build():
    with pytest.raises(ValueError, match="ssl_crop_scale"):
        build_multiview(("image", "text"), 16, CLIP_MEAN, CLIP_STD, ssl_crop_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="blur_p"):
        build_multiview(("image", "text"), 16, CLIP_MEAN, CLIP_STD, blur_p=-1)


def test_multiview_rejects_empty_or_clashing_views():
    with pytest.raises(ValueError, match="at least one"):
        MultiView({})
    with pytest.raises(ValueError, match="text"):
        MultiView({"text": eval_view(8, CLIP_MEAN, CLIP_STD)})


def test_view_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="jitter"):
        ssl_view(16, CLIP_MEAN, CLIP_STD, jitter=(0.4, 0.4, 0.4, 0.6))
    with pytest.raises(ValueError, match="jitter"):
        ssl_view(16, CLIP_MEAN, CLIP_STD, jitter=(0.4, 0.4))
    with pytest.raises(ValueError, match="image_size"):
        eval_view(2.5, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="scale"):
        clip_view(16, CLIP_MEAN, CLIP_STD, scale=(0.5, 1.5))
