"""The contract every loader yields, and the per-sample parameter samplers of the two BYOL views.

Randomness is explicit: each stage first draws per-sample parameters as tensors, then applies them.
Draws are keyed by (seed, epoch, index, view), so a resumed run, or another loader, sees the same views.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


class Views(NamedTuple):
    """One batch. v1, v2: (N, 3, S, S) normalized, channels_last, bf16 on GPU / fp32 on CPU.
    labels: int64 (monitors only). index: int64 dataset index of each sample."""

    v1: torch.Tensor
    v2: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation recipe (BYOL_RECIPE.md, Table 6)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    @property
    def blur_kernel(self) -> int:
        """23 px at 224: the odd size nearest 10% of the side."""
        k = int(round(0.1 * self.size))
        return k if k % 2 == 1 else k + 1


def byol_view_specs(size: int = 224, small: bool = False,
                    scale: tuple[float, float] = (0.08, 1.0)) -> tuple[ViewSpec, ViewSpec]:
    """The paper's asymmetric pair: blur 1.0 / 0.1, solarize 0.0 / 0.2. Small images (<= 64 px) turn
    blur off in both views (a 23-px kernel on a 32-px image destroys it)."""
    blur1, blur2 = (0.0, 0.0) if small else (1.0, 0.1)
    return (ViewSpec(size=size, scale=scale, blur_p=blur1, solarize_p=0.0),
            ViewSpec(size=size, scale=scale, blur_p=blur2, solarize_p=0.2))


class ViewParams(NamedTuple):
    """Per-sample parameters of one view for n samples (all tensors have leading dim n)."""

    crop: torch.Tensor        # (n, 4) int64: top, left, height, width (torchvision get_params order)
    flip: torch.Tensor        # (n,) bool
    jitter: torch.Tensor      # (n,) bool: colour jitter applied at all
    factors: torch.Tensor     # (n, 4) float32: brightness, contrast, saturation, hue (in JITTER_OPS order)
    order: torch.Tensor       # (n, 4) int64: a permutation of 0..3 indexing JITTER_OPS
    gray: torch.Tensor        # (n,) bool
    blur: torch.Tensor        # (n,) bool
    sigma: torch.Tensor       # (n,) float32, meaningful where blur
    solarize: torch.Tensor    # (n,) bool

    def row(self, i: int) -> ViewParams:
        """Sample i's parameters (each field without its leading dim)."""
        return ViewParams(*(field[i] for field in self))


# Each use of keyed randomness has its own tag, so that no key of one use can collide with a key of
# another.
_KEY_PURPOSES = {"view": 1, "epoch_order": 2, "subset": 3}

# torch's CPU generator is an MT19937 whose manual_seed keeps only the low 32 bits of the seed, so
# seeding it from a hash would make distinct keys collide after ~2^16 of them (an ImageNet epoch has
# 2.5M view keys). Instead numpy's SeedSequence hashes the key into a 128-bit PCG64 seed, and PCG64's
# output fills the generator's whole 624-word state (SeedSequence alone is 4x slower at 624 words).
# The state tensor is (initial_seed u64, left i32, seeded i32, next u64, state[624] u64, ...);
# _mt_template checks that layout against a known seeding, so a torch that changes it fails loudly.
_MT_WORDS = 624
_MT_STATE = slice(24, 24 + 8 * _MT_WORDS)


@functools.cache
def _mt_template() -> torch.Tensor:
    probe = 12345
    state = torch.Generator().manual_seed(probe).get_state()
    words = state[_MT_STATE].numpy().view(np.uint64)
    expected_second = (1812433253 * (probe ^ (probe >> 30)) + 1) & 0xFFFFFFFF  # MT19937 init
    if words[0] != probe or words[1] != expected_second:
        raise RuntimeError("torch's CPU generator state layout changed; update keyed_generator")
    return state


def keyed_generator(purpose: str, *key: int) -> torch.Generator:
    """A CPU generator whose full state is a hash of (purpose, *key): distinct keys give independent
    streams. Key parts are non-negative integers below 2**64."""
    entropy = np.array([_KEY_PURPOSES[purpose], *key], dtype=np.uint64)  # fixed width: no aliasing
    words = np.random.PCG64(np.random.SeedSequence(entropy.view(np.uint32))).random_raw(
        1 + _MT_WORDS // 2).view(np.uint32)
    state = _mt_template().clone()
    state[0:8] = torch.from_numpy(words[:2].view(np.uint8))  # initial_seed(): informative only
    state[_MT_STATE] = torch.from_numpy(words[2:].astype(np.uint64).view(np.uint8))
    gen = torch.Generator()
    gen.set_state(state)
    return gen


def sample_generator(seed: int, epoch: int, index: int, view: int) -> torch.Generator:
    """A generator keyed by (seed, epoch, index, view); independent streams for distinct keys."""
    return keyed_generator("view", seed, epoch, index, view)


CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback


def sample_crops(gen: torch.Generator, heights: torch.Tensor, widths: torch.Tensor,
                 scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """Vectorised twin of torchvision's RandomResizedCrop.get_params (10 tries, then the central
    fallback), for images of the given (n,) heights and widths. Returns (n, 4) int64.

    Every attempt of every sample is drawn at once, so the number of draws taken from gen does not
    depend on the image sizes. Float64 throughout, like torchvision's Python-float arithmetic."""
    n = heights.shape[0]
    height = heights.to(torch.float64)
    width = widths.to(torch.float64)
    f64 = dict(dtype=torch.float64)

    target_area = (height * width)[:, None] * torch.empty(n, CROP_ATTEMPTS, **f64).uniform_(
        scale[0], scale[1], generator=gen)
    aspect = torch.exp(torch.empty(n, CROP_ATTEMPTS, **f64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=gen))
    tries_w = torch.round(torch.sqrt(target_area * aspect))  # round half to even, as Python's round
    tries_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (tries_w > 0) & (tries_w <= width[:, None]) & (tries_h > 0) & (tries_h <= height[:, None])
    first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)

    # Fallback: clamp the aspect ratio into range, or take the whole image; centred.
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width)
    fallback_h = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)

    w = torch.where(found, tries_w.gather(1, first_fit).squeeze(1), fallback_w)
    h = torch.where(found, tries_h.gather(1, first_fit).squeeze(1), fallback_h)
    # randint(0, H - h + 1) as floor(u * (H - h + 1)); the clamp guards the u -> 1 rounding edge.
    u_top, u_left = torch.rand(2, n, generator=gen, **f64)
    top_range, left_range = height - h + 1, width - w + 1
    top = torch.where(found, torch.minimum(torch.floor(u_top * top_range), top_range - 1),
                      torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.minimum(torch.floor(u_left * left_range), left_range - 1),
                       torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def sample_view_params(gen: torch.Generator, spec: ViewSpec, heights: torch.Tensor,
                       widths: torch.Tensor) -> ViewParams:
    """Draw one view's parameters for n images of the given (n,) sizes, with torchvision's
    distributions: RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale,
    RandomApply(GaussianBlur), RandomSolarize. The number of draws is fixed given n."""
    n = heights.shape[0]

    def bernoulli(p: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) < p

    crop = sample_crops(gen, heights, widths, spec.scale, spec.ratio)
    flip = bernoulli(spec.flip_p)
    jitter = bernoulli(spec.jitter_p)
    # ColorJitter's ranges: [max(0, 1 - x), 1 + x] for brightness, contrast, saturation; [-h, h] for hue.
    low = torch.tensor([max(0.0, 1 - spec.brightness), max(0.0, 1 - spec.contrast),
                        max(0.0, 1 - spec.saturation), -spec.hue])
    high = torch.tensor([1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue])
    factors = low + (high - low) * torch.rand(n, 4, generator=gen)
    # The ranks of 4 i.i.d. uniforms form a uniform random permutation (float64: ties ~ never).
    order = torch.rand(n, 4, generator=gen, dtype=torch.float64).argsort(dim=1)
    gray = bernoulli(spec.gray_p)
    blur = bernoulli(spec.blur_p)
    sigma = torch.empty(n).uniform_(spec.blur_sigma[0], spec.blur_sigma[1], generator=gen)
    solarize = bernoulli(spec.solarize_p)
    return ViewParams(crop, flip, jitter, factors, order, gray, blur, sigma, solarize)


def epoch_batches(num_samples: int, batch_size: int, world_size: int, rank: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """This rank's batches of dataset indices for one epoch.

    A permutation keyed by (seed, epoch) is cut into global batches of G = batch_size * world_size
    (the partial last one dropped); rank r takes slice [r * batch_size, (r + 1) * batch_size) of each.
    Global step k covers the same samples for any world size with the same G, so a run resumed on
    another number of ranks keeps its data order."""
    global_batch = batch_size * world_size
    steps = num_samples // global_batch
    order = torch.randperm(num_samples, generator=keyed_generator("epoch_order", seed, epoch))
    starts = range(rank * batch_size, steps * global_batch, global_batch)
    return [order[start:start + batch_size].tolist() for start in starts]


def fixed_subset(num_samples: int, size: int | None, seed: int) -> list[int]:
    """The first `size` indices of a shuffle keyed by seed, sorted; all indices when size is None or
    not smaller than num_samples."""
    if size is None or size >= num_samples:
        return list(range(num_samples))
    order = torch.randperm(num_samples, generator=keyed_generator("subset", seed))
    return sorted(order[:size].tolist())
