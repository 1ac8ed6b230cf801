"""The per-sample view parameters follow torchvision's samplers (statistically, with fixed seeds), and
the keyed draws behind them are numpy's Philox, reproducible per key and independent across keys."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from scipy import stats

from fastbyol.views import (VIEW_DRAWS, ViewSpec, byol_view_specs, philox4x64,
                                      sample_view_params, view_uniforms)

DRAWS = 20_000
CROP_SHAPES = [(224, 224), (375, 500), (10, 40)]  # (10, 40): about 1 in 10 samples falls back
SPEC = ViewSpec()

# The Bonferroni family: every hypothesis test in this file, as (tests per call, calls) for each
# test function. The `significance` fixture fails a call that runs a different number of tests, so
# the level cannot drift from what the file does.
HYPOTHESES = {
    "test_crops_match_torchvision": (4, len(CROP_SHAPES)),
    "test_bernoulli_rates": (8, 1),
    "test_jitter_factors_uniform": (4, 1),
    "test_blur_sigma_uniform": (1, 1),
    "test_jitter_order_uniform": (1, 1),
    "test_keyed_streams_uniform_across_keys": (3, 1),
    "test_draws_within_a_sample_are_uncorrelated": (1, 1),
}
def full(n: int, value: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.int64)


def draw(spec: ViewSpec, seed: int, height: int = 224, width: int = 224, n: int = DRAWS):
    """The real sampler over samples 0..n-1 of one epoch: n independent draws."""
    return sample_view_params(seed, 0, torch.arange(n), 0, spec, full(n, height), full(n, width))


def torchvision_crops(height: int, width: int, n: int) -> torch.Tensor:
    image = torch.empty(1, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return torch.tensor([T.RandomResizedCrop.get_params(image, list(SPEC.scale), list(SPEC.ratio))
                             for _ in range(n)])


def crop_statistics(crops: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, h, w = crops.double().unbind(1)
    return {"area fraction": h * w / (height * width), "log aspect": torch.log(w / h),
            "row centre": (top + h / 2) / height, "column centre": (left + w / 2) / width}


@pytest.mark.parametrize("height, width", CROP_SHAPES)
def test_crops_match_torchvision(height, width, significance):
    ours = draw(SPEC, seed=1, height=height, width=width).crop
    theirs = torchvision_crops(height, width, DRAWS)
    top, left, h, w = ours.unbind(1)
    assert ((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0)).all()
    assert ((top + h <= height) & (left + w <= width)).all()
    ours_stats, theirs_stats = crop_statistics(ours, height, width), crop_statistics(theirs, height, width)
    for name in ours_stats:
        significance(stats.ks_2samp(ours_stats[name], theirs_stats[name]).pvalue,
                     f"{height}x{width} {name}")


@pytest.mark.parametrize("height, width", [(1, 1000), (1000, 1), (2, 1000)])
def test_crop_fallback_is_torchvision_exactly(height, width):
    # No attempt can fit, so torchvision's answer is deterministic: ratio clamped, centred.
    expected = torchvision_crops(height, width, 1)[0]
    ours = draw(SPEC, seed=2, height=height, width=width, n=100).crop
    assert (ours == expected).all(), (ours[0], expected)


def test_crops_of_mixed_sizes_stay_inside_each_image():
    gen = torch.Generator().manual_seed(3)
    heights = torch.randint(1, 600, (DRAWS,), generator=gen)
    widths = torch.randint(1, 600, (DRAWS,), generator=gen)
    top, left, h, w = sample_view_params(3, 0, torch.arange(DRAWS), 0, SPEC, heights, widths).crop.unbind(1)
    assert ((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0)).all()
    assert ((top + h <= heights) & (left + w <= widths)).all()


def test_bernoulli_rates(significance):
    for view, spec in enumerate(byol_view_specs()):
        params = draw(spec, seed=10 + view)
        for name, p in [("flip", spec.flip_p), ("jitter", spec.jitter_p), ("gray", spec.gray_p),
                        ("blur", spec.blur_p), ("solarize", spec.solarize_p)]:
            hits = int(getattr(params, name).sum())
            if p in (0.0, 1.0):  # degenerate: exact
                assert hits == p * DRAWS, (view, name, hits)
            else:
                significance(stats.binomtest(hits, DRAWS, p).pvalue, f"view {view} {name} rate")


def test_small_specs_turn_blur_off_and_keep_solarize():
    first, second = byol_view_specs(32, small=True)
    assert not draw(first, seed=20, n=1000).blur.any() and not draw(second, seed=21, n=1000).blur.any()
    assert draw(second, seed=22, n=1000).solarize.any() and not draw(first, seed=23, n=1000).solarize.any()


def test_jitter_factors_uniform(significance):
    factors = draw(SPEC, seed=30).factors
    ranges = [(1 - SPEC.brightness, 1 + SPEC.brightness), (1 - SPEC.contrast, 1 + SPEC.contrast),
              (1 - SPEC.saturation, 1 + SPEC.saturation), (-SPEC.hue, SPEC.hue)]
    for name, column, (low, high) in zip(("brightness", "contrast", "saturation", "hue"),
                                         factors.unbind(1), ranges):
        assert low <= column.min() and column.max() <= high, name
        significance(stats.kstest(column, "uniform", args=(low, high - low)).pvalue, name)


def test_blur_sigma_uniform(significance):
    sigma = draw(SPEC, seed=40).sigma
    low, high = SPEC.blur_sigma
    significance(stats.kstest(sigma, "uniform", args=(low, high - low)).pvalue, "blur sigma")


def test_jitter_order_uniform(significance):
    order = draw(SPEC, seed=50).order
    assert (order.sort(dim=1).values == torch.arange(4)).all(), "every row is a permutation of 0..3"
    codes = order @ torch.tensor([64, 16, 4, 1])  # base-4 code of each permutation
    _, counts = codes.unique(return_counts=True)
    assert len(counts) == math.factorial(4)
    significance(stats.chisquare(counts).pvalue, "order over 24 permutations")


def test_philox_is_numpys_philox():
    rng = np.random.default_rng(60)
    for _ in range(20):
        key = rng.integers(0, 2**64, 2, dtype=np.uint64)
        counter = rng.integers(0, 2**64, 4, dtype=np.uint64)
        counter[0] |= 1  # numpy steps its counter (+1 on word 0) before each block; no borrow here
        before = counter - np.array([1, 0, 0, 0], dtype=np.uint64)
        expected = np.random.Philox(key=key, counter=before).random_raw(4)
        assert np.array_equal(philox4x64(counter[None], key)[0], expected)


def test_uniforms_are_in_the_unit_interval_on_the_53_bit_grid():
    u = view_uniforms(70, 1, np.arange(1000), 0)
    assert u.shape == (1000, VIEW_DRAWS) and u.dtype == np.float64
    assert (u >= 0).all() and (u < 1).all()
    assert (u * 2.0**53 == np.floor(u * 2.0**53)).all()
    assert len(np.unique(u)) == u.size  # 36000 draws from 2**53 values: no repeats expected


def test_same_key_same_params_and_distinct_keys_differ():
    def params(seed, epoch, index, view):
        return sample_view_params(seed, epoch, [index], view, SPEC, [300], [400])

    reference = params(7, 3, 11, 0)
    assert all(torch.equal(a, b) for a, b in zip(reference, params(7, 3, 11, 0)))
    # Each key part matters, including bits above 32 (torch's own manual_seed drops those).
    for key in [(8, 3, 11, 0), (7, 4, 11, 0), (7, 3, 12, 0), (7, 3, 11, 1), (7 + 2**32, 3, 11, 0),
                (7, 3, 11 + 2**32, 0), (7, 3 + 2**32, 11, 0), (7, 3, 11 + 2**63, 0)]:
        assert not torch.equal(reference.factors, params(*key).factors), key


def test_a_sample_draws_the_same_params_in_any_batch():
    # What makes every loader, worker count and resumed run see the same views.
    heights, widths = torch.tensor([50, 300, 20]), torch.tensor([60, 200, 90])
    batch = sample_view_params(9, 2, [40, 3, 17], 1, SPEC, heights, widths)
    for i, index in enumerate([40, 3, 17]):
        alone = sample_view_params(9, 2, [index], 1, SPEC, heights[i:i + 1], widths[i:i + 1]).row(0)
        assert all(torch.equal(a, b) for a, b in zip(batch.row(i), alone)), index


def test_keyed_streams_uniform_across_keys(significance):
    # Well-mixed keys: a draw over consecutive indices is U(0, 1), and uncorrelated between
    # neighbouring keys; likewise between the two views of one sample.
    first = view_uniforms(0, 0, np.arange(DRAWS), 0)[:, 0]
    significance(stats.kstest(first, "uniform").pvalue, "first draw across keys")
    significance(stats.pearsonr(first[:-1], first[1:]).pvalue, "neighbouring keys correlation")
    other_view = view_uniforms(0, 0, np.arange(DRAWS), 1)[:, 0]
    significance(stats.pearsonr(first, other_view).pvalue, "correlation between views")


def test_draws_within_a_sample_are_uncorrelated(significance):
    # Columns are consecutive words of a block and consecutive blocks: none may echo another.
    u = view_uniforms(1, 0, np.arange(DRAWS), 0)
    correlation = np.corrcoef(u, rowvar=False)[np.triu_indices(VIEW_DRAWS, k=1)]
    # Under independence each coefficient is ~N(0, 1/n); take the largest of the 630.
    z = np.abs(correlation).max() * math.sqrt(DRAWS)
    significance(min(1.0, len(correlation) * 2 * stats.norm.sf(z)), "largest pairwise correlation")
