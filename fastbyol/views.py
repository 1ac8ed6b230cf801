"""The contract every loader yields, and the per-sample parameter sampler of the two BYOL views.

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
    """One batch. v1, v2: (N, 3, S, S) normalized, channels_last, in `view_dtype` (the step's compute
    dtype). labels: int64 (monitors only). index: int64 dataset index of each sample."""

    v1: torch.Tensor
    v2: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


# The step's compute dtype for each --precision.
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def view_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype every loader gives its views: the step's compute dtype on GPUs (bf16 views into
    fp32 weights would fail the fp32 step), fp32 on the CPU, where the convolutions autocast
    themselves and a bf16 input gains nothing. The one place this is decided."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision] if torch.device(device).type == "cuda" else torch.float32


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
# seeding it from a hash would make distinct keys collide after ~2^16 of them. Instead numpy's
# SeedSequence hashes the key into a 128-bit PCG64 seed, and PCG64's output fills the generator's
# whole 624-word state (SeedSequence alone is 4x slower at 624 words).
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


# ---- Per-view draws ------------------------------------------------------------------------------
#
# A loader draws two views for each of hundreds of samples per batch, so a draw must cost a few µs
# per sample: a keyed torch generator per sample and view plus its n=1 sampling ops cost ~1 ms here.
# Instead each (sample, view) takes a fixed number of uniforms from Philox4x64-10, the counter-based
# generator numpy ships as numpy.random.Philox: block b of (index, view) is the cipher of the counter
# (b, view, index, 0) under a 128-bit key hashed from (seed, epoch). Distinct counters give
# independent blocks, and a whole batch is one vectorised computation; one vectorised function then
# turns the uniforms into parameters.

_PHILOX_MULTIPLIERS = (np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157))
_PHILOX_KEY_STEPS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B))
_PHILOX_ROUNDS = 10
_LOW32, _HALF = np.uint64(0xFFFFFFFF), np.uint64(32)


def _mulhilo(a: np.ndarray, m: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 64-bit words of the 128-bit products a * m (numpy has no 128-bit type)."""
    a_lo, a_hi = a & _LOW32, a >> _HALF
    m_lo, m_hi = m & _LOW32, m >> _HALF
    lo_hi, hi_lo = a_lo * m_hi, a_hi * m_lo
    carry = ((a_lo * m_lo) >> _HALF) + (lo_hi & _LOW32) + (hi_lo & _LOW32)  # < 3 * 2**32: no overflow
    return a_hi * m_hi + (lo_hi >> _HALF) + (hi_lo >> _HALF) + (carry >> _HALF), a * m


def philox4x64(counters: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x64-10 of uint64 counters (..., 4) under a uint64 key (2,): uint64 (..., 4), word for
    word what numpy.random.Philox(key=key) emits after its counter reaches these values."""
    c0, c1, c2, c3 = (counters[..., i] for i in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    with np.errstate(over="ignore"):  # the key schedule wraps modulo 2**64 by design
        for round_ in range(_PHILOX_ROUNDS):
            if round_:
                k0, k1 = k0 + _PHILOX_KEY_STEPS[0], k1 + _PHILOX_KEY_STEPS[1]
            hi0, lo0 = _mulhilo(c0, _PHILOX_MULTIPLIERS[0])
            hi1, lo1 = _mulhilo(c2, _PHILOX_MULTIPLIERS[1])
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=-1)


CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback

# Columns of the (n, VIEW_DRAWS) uniform matrix, one stretch per parameter. Every sample draws all
# of them, whatever its image size or gates, so the draws never depend on the data.
_AREA = slice(0, CROP_ATTEMPTS)
_LOG_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_TOP, _LEFT, _FLIP, _JITTER = range(2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 4)
_FACTORS = slice(_JITTER + 1, _JITTER + 5)
_ORDER = slice(_FACTORS.stop, _FACTORS.stop + 4)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = range(_ORDER.stop, _ORDER.stop + 4)
VIEW_DRAWS = _SOLARIZE + 1  # 36: nine Philox blocks of four 64-bit words


def view_uniforms(seed: int, epoch: int, index, view: int) -> np.ndarray:
    """The keyed uniforms in [0, 1) of one view of samples `index` (n,): float64 (n, VIEW_DRAWS),
    row i a function of (seed, epoch, index[i], view) only. Key parts are integers in [0, 2**64)."""
    entropy = np.array([_KEY_PURPOSES["view"], seed, epoch], dtype=np.uint64)  # fixed width
    key = np.random.SeedSequence(entropy.view(np.uint32)).generate_state(2, np.uint64)
    index = np.asarray(index, dtype=np.uint64)
    blocks = VIEW_DRAWS // 4
    counters = np.zeros((len(index), blocks, 4), dtype=np.uint64)
    counters[..., 0] = np.arange(blocks, dtype=np.uint64)
    counters[..., 1] = view
    counters[..., 2] = index[:, None]
    bits = philox4x64(counters, key).reshape(len(index), VIEW_DRAWS)
    return (bits >> np.uint64(11)) * 2.0**-53  # the top 53 bits: every double in [0, 1) on a 2**-53 grid


def _crops(u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
           scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """Vectorised twin of torchvision's RandomResizedCrop.get_params (10 tries, then the central
    fallback) from each sample's uniforms. Returns (n, 4) int64. Float64 throughout, like
    torchvision's Python-float arithmetic."""
    height, width = heights.to(torch.float64), widths.to(torch.float64)
    target_area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u[:, _LOG_RATIO])
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
    # randint(0, H - h + 1) as floor(u * (H - h + 1)), which stays below H - h + 1 for any double u < 1.
    top = torch.where(found, torch.floor(u[:, _TOP] * (height - h + 1)),
                      torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, _LEFT] * (width - w + 1)),
                       torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def view_params(uniforms, spec: ViewSpec, heights, widths) -> ViewParams:
    """One view's parameters for n images of the given (n,) sizes from their (n, VIEW_DRAWS)
    uniforms, with torchvision's distributions: RandomResizedCrop, RandomHorizontalFlip,
    RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur), RandomSolarize."""
    u = torch.as_tensor(uniforms, dtype=torch.float64)
    crop = _crops(u, torch.as_tensor(heights), torch.as_tensor(widths), spec.scale, spec.ratio)
    # ColorJitter's ranges: [max(0, 1 - x), 1 + x] for brightness, contrast, saturation; [-h, h] for hue.
    low = torch.tensor([max(0.0, 1 - spec.brightness), max(0.0, 1 - spec.contrast),
                        max(0.0, 1 - spec.saturation), -spec.hue], dtype=torch.float64)
    high = torch.tensor([1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue],
                        dtype=torch.float64)
    factors = (low + (high - low) * u[:, _FACTORS]).to(torch.float32)
    # The ranks of 4 i.i.d. uniforms form a uniform random permutation (53-bit draws: ties ~ never).
    order = u[:, _ORDER].argsort(dim=1)
    low_sigma, high_sigma = spec.blur_sigma
    sigma = (low_sigma + (high_sigma - low_sigma) * u[:, _SIGMA]).to(torch.float32)
    return ViewParams(crop, flip=u[:, _FLIP] < spec.flip_p, jitter=u[:, _JITTER] < spec.jitter_p,
                      factors=factors, order=order, gray=u[:, _GRAY] < spec.gray_p,
                      blur=u[:, _BLUR] < spec.blur_p, sigma=sigma,
                      solarize=u[:, _SOLARIZE] < spec.solarize_p)


def sample_view_params(seed: int, epoch: int, index, view: int, spec: ViewSpec, heights,
                       widths) -> ViewParams:
    """The parameters of view `view` of samples `index` (n,) whose images have the given (n,) sizes,
    keyed by (seed, epoch, index, view): the one sampler every loader uses, so a resumed run, or
    another loader, sees the same views."""
    return view_params(view_uniforms(seed, epoch, index, view), spec, heights, widths)


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


def training_indices(num_samples: int, subset: int, seed: int, batch_size: int, world_size: int,
                     where: str) -> list[int]:
    """The dataset indices a training loader trains on: all of them, or with subset > 0 a fixed
    subset keyed by seed. Raises InputError naming `where` (the data) when they do not fill one
    global batch of batch_size x world_size."""
    indices = fixed_subset(num_samples, subset or None, seed)
    if len(indices) < batch_size * world_size:
        from fastbyol import InputError
        raise InputError(f"{where}: {len(indices)} training images are fewer than one global batch "
                         f"({batch_size} x {world_size} ranks)")
    return indices


def eval_indices(num_samples: int, max_samples: int | None, seed: int, rank: int,
                 world_size: int) -> list[int]:
    """This rank's share of an evaluation split: a fixed subset of max_samples keyed by seed (all
    when None), cut into world_size disjoint contiguous slices without padding."""
    chosen = fixed_subset(num_samples, max_samples, seed)
    return chosen[rank * len(chosen) // world_size:(rank + 1) * len(chosen) // world_size]
