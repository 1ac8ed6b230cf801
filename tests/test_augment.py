"""The photometric reference applies torchvision's uint8 ops in the recipe's order, each sample with
its own params; normalize produces the Views contract's layout and values."""
import pytest
import torch
import torchvision.transforms.v2.functional as F

from fastbyol.kernels.augment import normalize, photometric_reference, photometric_reference_batch
from fastbyol.pipelines.views import (IMAGENET_MEAN, IMAGENET_STD, JITTER_OPS, ViewParams, ViewSpec,
                                      sample_view_params)

SPEC = ViewSpec(size=64)  # blur kernel 7
SIZE = 64


def image(seed: int) -> torch.Tensor:
    """A uint8 (3, 64, 64) image with smooth colour gradients and noise, so every op changes it."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, SIZE)
    base = torch.stack([ramp[None, :].expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE),
                        1 - ramp[None, :] * ramp[:, None]])
    noisy = base * 200 + 30 + 25 * torch.randn(3, SIZE, SIZE, generator=gen)
    return noisy.clamp(0, 255).round().to(torch.uint8)


def one_sample(**changes) -> ViewParams:
    """One sample's params (a ViewParams row) with every op off, then `changes`."""
    fields = dict(crop=[0, 0, SIZE, SIZE], flip=False, jitter=False, factors=[1.0, 1.0, 1.0, 0.0],
                  order=[0, 1, 2, 3], gray=False, blur=False, sigma=1.0, solarize=False)
    fields.update(changes)
    return ViewParams(**{name: torch.tensor(value) for name, value in fields.items()})


# Exact binary fractions, so the float32 factors in the params equal these Python floats.
FACTORS = {"brightness": 1.25, "contrast": 0.625, "saturation": 1.125, "hue": 0.0625}


def jitter_by_hand(img: torch.Tensor, order_names: list[str]) -> torch.Tensor:
    ops = {"brightness": lambda x: F.adjust_brightness(x, FACTORS["brightness"]),
           "contrast": lambda x: F.adjust_contrast(x, FACTORS["contrast"]),
           "saturation": lambda x: F.adjust_saturation(x, FACTORS["saturation"]),
           "hue": lambda x: F.adjust_hue(x, FACTORS["hue"])}
    for name in order_names:
        img = ops[name](img)
    return img


def jittered(order_names: list[str]) -> ViewParams:
    factors = [FACTORS[name] for name in JITTER_OPS]
    return one_sample(jitter=True, factors=factors, order=[JITTER_OPS.index(n) for n in order_names])


def test_jitter_follows_the_sample_order():
    img = image(0)
    orders = [["brightness", "contrast", "saturation", "hue"],
              ["hue", "saturation", "contrast", "brightness"],
              ["contrast", "hue", "brightness", "saturation"]]
    outputs = []
    for names in orders:
        out = photometric_reference(img, jittered(names), SPEC)
        assert out.dtype == torch.uint8 and out.shape == img.shape
        assert torch.equal(out, jitter_by_hand(img, names)), names
        outputs.append(out)
    # The test means something only if the order changes the result.
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def test_jitter_off_ignores_the_factors():
    img = image(1)
    params = jittered(["hue", "contrast", "brightness", "saturation"])._replace(jitter=torch.tensor(False))
    assert torch.equal(photometric_reference(img, params, SPEC), img)


def test_grayscale_blur_solarize_match_torchvision():
    img = image(2)
    gray = photometric_reference(img, one_sample(gray=True), SPEC)
    assert torch.equal(gray, F.rgb_to_grayscale(img, num_output_channels=3))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])

    sigma = 1.75
    blurred = photometric_reference(img, one_sample(blur=True, sigma=sigma), SPEC)
    assert torch.equal(blurred, F.gaussian_blur(img, [SPEC.blur_kernel] * 2, [sigma, sigma]))
    assert not torch.equal(blurred, img)

    solarized = photometric_reference(img, one_sample(solarize=True), SPEC)
    assert torch.equal(solarized, F.solarize(img, threshold=128))


def test_solarize_inverts_exactly_the_upper_half():
    # The recipe: x -> 1 - x where x >= 0.5 on [0, 1]; on uint8 that is x >= 128.
    img = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    out = photometric_reference(img, one_sample(solarize=True), SPEC)
    assert torch.equal(out[img < 128], img[img < 128])
    assert torch.equal(out[img >= 128], 255 - img[img >= 128])


def test_stage_order_is_jitter_gray_blur_solarize():
    img = image(3)
    names = ["saturation", "brightness", "hue", "contrast"]
    sigma = 0.875
    params = jittered(names)._replace(gray=torch.tensor(True), blur=torch.tensor(True),
                                      sigma=torch.tensor(sigma), solarize=torch.tensor(True))
    expected = F.solarize(F.gaussian_blur(F.rgb_to_grayscale(jitter_by_hand(img, names), 3),
                                          [SPEC.blur_kernel] * 2, [sigma, sigma]), 128)
    assert torch.equal(photometric_reference(img, params, SPEC), expected)


def stack_rows(rows: list[ViewParams]) -> ViewParams:
    return ViewParams(*(torch.stack(field) for field in zip(*rows)))


def test_samples_keep_their_own_params():
    n = 6
    spec = ViewSpec(size=SIZE, blur_p=0.5, solarize_p=0.5, gray_p=0.5)
    params = sample_view_params(torch.Generator().manual_seed(4), spec, torch.full((n,), SIZE),
                                torch.full((n,), SIZE))
    images = torch.stack([image(10 + i) for i in range(n)])
    batch = photometric_reference_batch(images, params, spec)
    for i in range(n):
        assert torch.equal(batch[i], photometric_reference(images[i], params.row(i), spec)), i

    j = 2
    rows = [params.row(i) for i in range(n)]
    rows[j] = rows[j]._replace(jitter=~rows[j].jitter, gray=~rows[j].gray, solarize=~rows[j].solarize)
    changed = photometric_reference_batch(images, stack_rows(rows), spec)
    assert not torch.equal(changed[j], batch[j])
    assert all(torch.equal(changed[i], batch[i]) for i in range(n) if i != j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize(dtype):
    batch = torch.stack([image(20), image(21)])
    batch[0, :, 0, 0] = 0
    batch[0, :, 0, 1] = 255
    out = normalize(batch, dtype)
    assert out.shape == batch.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (batch.float() / 255 - mean) / std
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 keeps 8 significant bits
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out[0, :, 0, 0].float(), -mean.flatten() / std.flatten(),
                               atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out[0, :, 0, 1].float(), (1 - mean.flatten()) / std.flatten(),
                               atol=tolerance, rtol=tolerance)
