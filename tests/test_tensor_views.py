"""The tensor views against the plain paths: torchvision's float-tensor functions (to float rounding) and the
torchvision PIL pipelines of slip.data.transforms (same draws; pixels within stated bounds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from slip.data import tensor_views
from slip.data.synthetic import photo_like
from slip.data.loader import collate
from slip.data.tensor_views import (
    SSL_OPERATIONS,
    DeferredView,
    TensorClipView,
    TensorSSLView,
    adjust_hue,
    apply_ssl_operations,
    color_jitter,
    finish_views,
    gaussian_blur,
    image_to_tensor,
    sample_crop,
    sample_jitter,
)
from slip.data.transforms import CLIP_MEAN, CLIP_STD, MultiView, build_multiview, clip_view, ssl_view

STD_255 = torch.tensor(CLIP_STD).view(3, 1, 1) * 255  # normalised units -> levels of 0..255


def photo(width: int = 160, height: int = 112, seed: int = 0) -> Image.Image:
    """A small photo-like RGB image."""
    return photo_like(width, height, seed)


def random_float_image(seed: int, size: int = 24) -> torch.Tensor:
    """Random colours in [0, 1], with grey pixels, pure primaries and ties between channels mixed in."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=generator)
    image[:, 0, :4] = torch.tensor([0.5, 0.0, 1.0, 0.25]).expand(3, 4)  # greys: zero chroma
    image[:, 1, 0] = torch.tensor([1.0, 0.0, 0.0])
    image[:, 1, 1] = torch.tensor([0.2, 0.7, 0.7])  # max tied between g and b
    image[:, 1, 2] = torch.tensor([0.7, 0.7, 0.2])  # max tied between r and g
    image[:, 1, 3] = torch.tensor([0.0, 0.0, 1.0])
    if size > 4:
        image[:, 1, 4] = torch.tensor([0.7, 0.2, 0.7])  # max tied between r and b
    return image


@pytest.mark.parametrize(("height", "width", "scale"), [(430, 640, (0.08, 1.0)), (224, 224, (0.5, 1.0)),
                                                        (7, 900, (0.9, 1.0)), (900, 7, (0.9, 1.0)),
                                                        (50, 60, (1.0, 1.0))])
def test_crops_are_drawn_exactly_as_torchvision_draws_them(height, width, scale):
    reference = v2.RandomResizedCrop(16, scale=scale)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for seed in range(40):
        torch.manual_seed(seed)
        params = reference.make_params([image])
        torch.manual_seed(seed)
        assert sample_crop(height, width, scale) == (params["top"], params["left"], params["height"], params["width"])


@pytest.mark.parametrize("strengths", [(0.4, 0.4, 0.4, 0.1), (0.0, 0.2, 0.0, 0.0), (1.2, 0.0, 1.5, 0.5)])
def test_jitter_factors_and_order_are_drawn_exactly_as_torchvision_draws_them(strengths):
    reference = v2.ColorJitter(*strengths)
    names = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
    for seed in range(20):
        torch.manual_seed(seed)
        params = reference.make_params([])
        expected = [(int(op), params[names[op]]) for op in params["fn_idx"] if params[names[op]] is not None]
        after_reference = torch.rand(1)
        torch.manual_seed(seed)
        assert sample_jitter(*strengths) == expected
        assert torch.equal(torch.rand(1), after_reference)  # no more and no fewer draws


@pytest.mark.parametrize("shift", [-0.5, -0.23, -0.01, 0.0, 0.07, 0.3, 0.5])
def test_hue_matches_torchvision(shift):
    image = random_float_image(int(shift * 100) + 50)
    torch.testing.assert_close(adjust_hue(image, shift), TF.adjust_hue(image, shift), atol=2e-6, rtol=0)


def test_jitter_matches_torchvision_op_by_op():
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for seed in range(20):
        image = random_float_image(seed)
        torch.manual_seed(seed)
        operations = sample_jitter(0.8, 0.8, 0.8, 0.2)
        expected = image
        for op, factor in operations:
            expected = functions[op](expected, factor)
        torch.testing.assert_close(color_jitter(image, operations), expected, atol=1e-5, rtol=0)  # 0.003 levels


def test_the_public_colour_functions_leave_their_input_alone():
    image = random_float_image(7)
    before = image.clone()
    adjust_hue(image, 0.2)
    color_jitter(image, [(0, 1.3), (1, 0.7), (2, 1.2), (3, -0.1)])
    assert torch.equal(image, before)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.3, 2.0])
def test_blur_matches_torchvision(sigma):
    image = random_float_image(3, size=32)
    kernel = 2 * int(np.ceil(3 * sigma)) + 1
    torch.testing.assert_close(gaussian_blur(image, sigma), TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma]),
                               atol=2e-6, rtol=0)


def test_blur_of_an_image_smaller_than_the_kernel_keeps_its_size_and_mean():
    image = random_float_image(4, size=4)
    blurred = gaussian_blur(image, 2.0)  # 13 taps on 4 pixels
    assert blurred.shape == image.shape and torch.isfinite(blurred).all()
    assert blurred.std() < image.std()


def test_image_to_tensor_is_the_pixels():
    image = photo(40, 30)
    assert torch.equal(image_to_tensor(image).permute(1, 2, 0), torch.from_numpy(np.array(image)))
    assert torch.equal(image_to_tensor(image.convert("L")), image_to_tensor(image.convert("L").convert("RGB")))


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised views, in levels of 0..255."""
    return ((a - b) * STD_255).abs()


def test_clip_view_equals_torchvision_on_the_uint8_tensor_and_is_within_a_level_of_the_pil_path():
    image = photo()
    fast = TensorClipView(64, CLIP_MEAN, CLIP_STD)
    on_tensor = v2.Compose([v2.RandomResizedCrop(64, scale=(0.5, 1.0), antialias=True),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])
    plain = clip_view(64, CLIP_MEAN, CLIP_STD)
    for seed in range(10):
        torch.manual_seed(seed)
        ours = fast(image_to_tensor(image))
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, on_tensor(image_to_tensor(image)), atol=1e-5, rtol=0)
        torch.manual_seed(seed)
        assert _levels(ours, plain(image)).max() <= 1.0 + 1e-3  # Pillow's and torch's uint8 kernels round apart


def test_ssl_view_follows_the_pil_path_draw_for_draw_within_a_few_levels():
    """Same seed, same recipe: the views agree closely, and both consumed the same random numbers.

    The PIL path rounds to uint8 after every step, rounds the contrast mean to a level, keeps hue, saturation
    and value in 256 levels and blurs with Pillow's box approximation of a Gaussian. Measured over these 40
    seeds: about 1.6 levels (of 255) on average, 1.8 with jitter alone, 0.4 with blur alone, 0.01 for the crop.
    Different draws would differ by tens of levels.
    """
    image = photo()
    fast = TensorSSLView(64, CLIP_MEAN, CLIP_STD)
    plain = ssl_view(64, CLIP_MEAN, CLIP_STD)
    means = []
    for seed in range(40):
        torch.manual_seed(seed)
        ours = fast(image_to_tensor(image))
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        theirs = plain(image)
        assert torch.equal(torch.rand(1), after_ours)
        difference = _levels(ours, theirs)
        means.append(float(difference.mean()))
        assert difference.mean() < 3.0 and torch.quantile(difference.flatten(), 0.99) < 16.0, seed
    assert np.mean(means) < 2.0


def test_ssl_view_without_augmentation_is_the_clip_view_of_the_same_crop():
    image = photo()
    bare = TensorSSLView(48, CLIP_MEAN, CLIP_STD, scale=(0.3, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                         hflip_p=0.0)
    crop_only = TensorClipView(48, CLIP_MEAN, CLIP_STD, scale=(0.3, 1.0))
    torch.manual_seed(5)
    first = bare(image_to_tensor(image))
    torch.manual_seed(5)
    assert torch.equal(first, crop_only(image_to_tensor(image)))


def test_grayscale_and_flip_are_applied_when_drawn():
    image = photo()
    gray = TensorSSLView(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), jitter_p=0.0, grayscale_p=1.0, blur_p=0.0,
                         hflip_p=1.0)(image_to_tensor(image))
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    torch.manual_seed(1)
    flipped = TensorSSLView(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                            hflip_p=1.0)(image_to_tensor(image))
    torch.manual_seed(1)
    plain = TensorSSLView(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                          hflip_p=0.0)(image_to_tensor(image))
    assert torch.equal(flipped, plain.flip(2))


def test_both_backends_of_the_multiview_agree_under_one_seed():
    image, inputs = photo(), ("image", "text", "aug1", "aug2")
    fast = build_multiview(inputs, 48, CLIP_MEAN, CLIP_STD, context_length=16)
    plain = build_multiview(inputs, 48, CLIP_MEAN, CLIP_STD, context_length=16, backend="pil")
    torch.manual_seed(0)
    ours = fast(image, "a photo")
    torch.manual_seed(0)
    theirs = plain(image, "a photo")
    assert ours.keys() == theirs.keys() and torch.equal(ours["text"], theirs["text"])
    for name in ("image", "aug1", "aug2"):
        assert ours[name].shape == theirs[name].shape == (3, 48, 48) and ours[name].dtype == torch.float32
        assert _levels(ours[name], theirs[name]).mean() < 3.0


def test_the_backend_is_checked():
    with pytest.raises(ValueError, match="backend must be one of \\['tensor', 'pil', 'device'\\], got 'cv2'"):
        build_multiview(("image",), 16, CLIP_MEAN, CLIP_STD, backend="cv2")


def test_views_describe_their_recipe():
    assert "scale=(0.5, 1.0)" in repr(TensorClipView(16, CLIP_MEAN, CLIP_STD))
    assert "blur_sigma=(0.1, 2.0)" in repr(TensorSSLView(16, CLIP_MEAN, CLIP_STD))
    assert tensor_views.ASPECT_RATIO == (3 / 4, 4 / 3)


def _deferred_and_direct(view_class, seeds, **recipe):
    """Per seed: the deferred view (uint8 crop and drawn operations) and the finished view, and whether both
    consumed the same random numbers."""
    image = image_to_tensor(photo(96, 72))
    deferred, direct = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        deferred.append(view_class(40, CLIP_MEAN, CLIP_STD, deferred=True, **recipe)(image))
        after_deferred = torch.rand(1)
        torch.manual_seed(seed)
        direct.append(view_class(40, CLIP_MEAN, CLIP_STD, **recipe)(image))
        assert torch.equal(torch.rand(1), after_deferred), seed
    return deferred, direct


@pytest.mark.parametrize("view_class", [TensorClipView, TensorSSLView])
def test_deferred_views_finished_as_a_batch_equal_the_views_finished_one_by_one(view_class):
    """The batch mixes every jitter order, grayscale, blur radii 1-6 and flips, so each operation runs on a
    gathered subset of rows as well as on all of them."""
    deferred, direct = _deferred_and_direct(view_class, range(48))
    assert all(view.pixels.dtype == torch.uint8 and view.pixels.shape == (3, 40, 40) for view in deferred)
    assert all(view.operations.shape == ((SSL_OPERATIONS,) if view_class is TensorSSLView else (0,))
               for view in deferred)
    batch = collate([{"view": view} for view in deferred])["view"]
    assert isinstance(batch, DeferredView) and batch.pixels.shape == (48, 3, 40, 40)
    finished = finish_views(batch, "cpu", CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(finished, torch.stack(direct), atol=1e-5, rtol=0)
    if view_class is TensorSSLView:
        radii = {int(np.ceil(3 * sigma)) for sigma in batch.operations[:, 9].tolist() if sigma > 0}
        assert radii == {1, 2, 3, 4, 5, 6} and 0 < batch.operations[:, 8].sum() < 48  # blur sizes; some gray


def test_ssl_operations_on_a_batch_equal_the_operations_one_view_at_a_time():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(12, 3, 20, 20, generator=generator)
    view = TensorSSLView(20, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(0)
    operations = torch.stack([view.draw(20, 20)[1] for _ in range(12)])
    batched = apply_ssl_operations(images.clone(), operations)
    for row in range(12):
        one = apply_ssl_operations(images[row : row + 1].clone(), operations[row : row + 1])
        torch.testing.assert_close(batched[row], one[0], atol=1e-6, rtol=0)
    assert not torch.allclose(batched, images)


def test_the_device_backend_gives_the_tensor_backends_batch_under_one_seed():
    inputs = ("image", "text", "aug1", "aug2")
    deferring = build_multiview(inputs, 32, CLIP_MEAN, CLIP_STD, context_length=16, backend="device")
    direct = build_multiview(inputs, 32, CLIP_MEAN, CLIP_STD, context_length=16)
    photos = [photo(seed=seed) for seed in range(6)]
    torch.manual_seed(0)
    raw = collate([deferring(image, "a photo") for image in photos])
    torch.manual_seed(0)
    want = collate([direct(image, "a photo") for image in photos])
    assert isinstance(raw["aug1"], DeferredView) and raw["image"].pixels.dtype == torch.uint8
    got = deferring.to_device(raw, torch.device("cpu"))
    assert got.keys() == want.keys() and torch.equal(got["text"], want["text"])
    for name in ("image", "aug1", "aug2"):
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)
    assert direct.to_device(want, "cpu").keys() == want.keys()


def test_a_deferred_view_without_a_finish_function_is_an_error():
    without_finish = MultiView({"image": TensorClipView(16, CLIP_MEAN, CLIP_STD, deferred=True)},
                               prepare=image_to_tensor)
    batch = collate([without_finish(photo(), "a photo")])
    with pytest.raises(ValueError, match="batch\\['image'\\] is a deferred view"):
        without_finish.to_device(batch, "cpu")
