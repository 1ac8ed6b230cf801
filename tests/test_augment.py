"""The photometric reference applies torchvision's uint8 ops in the recipe's order, each sample with
its own params; the batched twin is bit-identical to it; normalize produces the Views contract's
layout and values."""
import itertools

import pytest
import torch
import torchvision.transforms.v2.functional as F

from fastbyol.kernels.augment import (normalize, photometric_batched, photometric_reference,
                                      photometric_reference_batch)
from fastbyol.views import (IMAGENET_MEAN, IMAGENET_STD, JITTER_OPS, ViewParams, ViewSpec,
                                      byol_view_specs, sample_view_params)

SPEC = ViewSpec(size=64)  # blur kernel 7
SIZE = 64


def image(seed: int, size: int = SIZE) -> torch.Tensor:
    """A uint8 (3, size, size) image with smooth colour gradients and noise, so every op changes it."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        1 - ramp[None, :] * ramp[:, None]])
    noisy = base * 200 + 30 + 25 * torch.randn(3, size, size, generator=gen)
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
    params = sample_view_params(4, 0, range(n), 0, spec, [SIZE] * n, [SIZE] * n)
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


# ---- The batched twin ----------------------------------------------------------------------------

PERMUTATIONS = list(itertools.permutations(range(4)))


def mixed_images(n: int, size: int, seed: int) -> torch.Tensor:
    """n uint8 images of three kinds, in turn: gradients with noise; gray ones (R = G = B, where hue
    and saturation are degenerate); strong noise, clipped at 0 and 255 in places."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(n):
        smooth = image(seed * 1000 + i, size)
        if i % 3 == 0:
            images.append(smooth)
        elif i % 3 == 1:
            images.append(smooth[1:2].expand(3, -1, -1))
        else:
            noise = 60 * torch.randn(3, size, size, generator=gen) + 128
            images.append(noise.round().clamp(0, 255).to(torch.uint8))
    return torch.stack(images)


def jitter_params(n: int, seed: int) -> ViewParams:
    """Every order of the four ops, n / 24 times; factors over the ops' whole domains, and in every
    fourth sample short binary fractions, whose products land exactly on integers: there, a rounding
    that is not torchvision's changes the uint8 result. Gray and solarize at random."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.tensor(PERMUTATIONS * (n // len(PERMUTATIONS)))
    low, high = torch.tensor([0.0, 0.0, 0.0, -0.5]), torch.tensor([2.0, 2.0, 2.0, 0.5])
    factors = low + (high - low) * torch.rand(n, 4, generator=gen)
    factors[::4] = torch.tensor([1.25, 0.625, 1.375, 0.0625])
    factors[::8, 3] = -0.0625

    def chance(p: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) < p

    return ViewParams(crop=torch.zeros(n, 4, dtype=torch.int64), flip=torch.zeros(n, dtype=torch.bool),
                      jitter=chance(0.9), factors=factors, order=order, gray=chance(0.3),
                      blur=torch.zeros(n, dtype=torch.bool), sigma=torch.ones(n), solarize=chance(0.5))


def assert_equal_per_sample(batched: torch.Tensor, reference: torch.Tensor) -> None:
    assert batched.dtype == torch.uint8 and batched.shape == reference.shape
    differ = (batched != reference).flatten(1).any(dim=1)
    assert not differ.any(), f"samples {differ.nonzero().flatten().tolist()} differ"


CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


@pytest.mark.parametrize("device", ["cpu", CUDA])  # on a GPU, against the CPU reference
@pytest.mark.parametrize("size", [32, 37])  # 37: rows that do not fill a SIMD vector
def test_batched_jitter_gray_solarize_equal_the_reference(size, device):
    n = 10 * len(PERMUTATIONS)
    images, params = mixed_images(n, size, seed=size), jitter_params(n, seed=size)
    on_device = images.to(device)
    out = photometric_batched(on_device, params, SPEC)  # params stay on the CPU, as loaders pass them
    assert torch.equal(on_device.cpu(), images), "the input is left alone"
    assert_equal_per_sample(out.cpu(), photometric_reference_batch(images, params, SPEC))


@pytest.mark.parametrize("spec, size", [(SPEC, 40), (ViewSpec(size=224), 40)])  # kernels 7 and 23
def test_batched_blur_equals_the_reference(spec, size):
    n = 24
    images = mixed_images(n, size, seed=spec.blur_kernel)
    sigma = torch.linspace(*spec.blur_sigma, n)
    params = jitter_params(n, seed=3)._replace(jitter=torch.zeros(n, dtype=torch.bool),
                                               gray=torch.arange(n) % 4 == 0,
                                               blur=torch.arange(n) % 3 != 0, sigma=sigma,
                                               solarize=torch.arange(n) % 2 == 0)
    out = photometric_batched(images, params, spec)
    assert_equal_per_sample(out, photometric_reference_batch(images, params, spec))
    unblurred = photometric_batched(images, params._replace(blur=torch.zeros(n, dtype=torch.bool)), spec)
    changed = (out != unblurred).flatten(1).any(dim=1)
    assert not changed[~params.blur].any() and changed[params.blur & (sigma > 0.5)].all()


@pytest.mark.parametrize("view", [0, 1])
def test_batched_equals_the_reference_under_the_byol_specs(view):
    spec = byol_view_specs(SIZE)[view]
    n = 48
    params = sample_view_params(5, 0, range(n), view, spec, [SIZE] * n, [SIZE] * n)
    images = mixed_images(n, SIZE, seed=20 + view)
    assert_equal_per_sample(photometric_batched(images, params, spec),
                            photometric_reference_batch(images, params, spec))


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
