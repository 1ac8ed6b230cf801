"""The sampler's joint law (issue 13, item 3): the flip, jitter, gray, blur and solarize gates are
mutually independent within a view and independent across the two views of a sample. Contingency
tests on the real sampler, fixed seeds, alpha = 1e-3 with Bonferroni over this file (conftest's
`significance`)."""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from fastbyol.views import byol_view_specs, sample_view_params

DRAWS = 50_000
GATES = ("flip", "jitter", "gray", "blur", "solarize")
SPECS = byol_view_specs(224)  # blur 1.0 / 0.1, solarize 0.0 / 0.2


def rate(spec, gate: str) -> float:
    return getattr(spec, {"flip": "flip_p", "jitter": "jitter_p", "gray": "gray_p", "blur": "blur_p",
                          "solarize": "solarize_p"}[gate])


def random_gates(view: int) -> list[str]:
    """The gates of a view that are random (rate strictly between 0 and 1)."""
    return [g for g in GATES if 0 < rate(SPECS[view], g) < 1]


PAIRS_WITHIN = [(view, a, b) for view in (0, 1) for a, b in itertools.combinations(random_gates(view), 2)]
PAIRS_ACROSS = list(itertools.product(random_gates(0), random_gates(1)))

HYPOTHESES = {
    "test_gates_pairwise_independent_within_a_view": (len(PAIRS_WITHIN), 1),
    "test_gates_jointly_follow_the_product_of_their_rates": (2, 1),
    "test_gates_independent_across_the_two_views": (len(PAIRS_ACROSS) + 1, 1),
}


@pytest.fixture(scope="module")
def gates():
    """view -> gate -> bool numpy (DRAWS,), for samples 0..DRAWS-1 of one epoch, both views keyed alike."""
    n = torch.arange(DRAWS)
    sizes = torch.full((DRAWS,), 224)
    out = {}
    for view, spec in enumerate(SPECS):
        params = sample_view_params(11, 4, n, view, spec, sizes, sizes)
        out[view] = {g: getattr(params, g).numpy() for g in GATES}
    return out


def table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([[np.sum(~a & ~b), np.sum(~a & b)], [np.sum(a & ~b), np.sum(a & b)]])


def test_the_gates_tested_are_the_random_ones():
    assert random_gates(0) == ["flip", "jitter", "gray"]  # blur 1.0, solarize 0.0: constant
    assert random_gates(1) == ["flip", "jitter", "gray", "blur", "solarize"]
    assert len(PAIRS_WITHIN) == 3 + 10 and len(PAIRS_ACROSS) == 15


def test_gates_pairwise_independent_within_a_view(gates, significance):
    for view, a, b in PAIRS_WITHIN:
        result = stats.chi2_contingency(table(gates[view][a], gates[view][b]), correction=False)
        significance(result.pvalue, f"view {view}: {a} vs {b}")


def test_gates_jointly_follow_the_product_of_their_rates(gates, significance):
    """Mutual independence (not only pairwise): the 2^k joint cells of a view's random gates against
    the product of the recipe's rates (smallest expected count: 20 in view 2)."""
    for view in (0, 1):
        names = random_gates(view)
        codes = sum(gates[view][g].astype(int) << k for k, g in enumerate(names))
        observed = np.bincount(codes, minlength=2 ** len(names))
        expected = np.array([np.prod([rate(SPECS[view], g) if cell >> k & 1 else 1 - rate(SPECS[view], g)
                                      for k, g in enumerate(names)]) for cell in range(2 ** len(names))])
        assert expected.min() * DRAWS >= 5
        significance(stats.chisquare(observed, expected * DRAWS).pvalue, f"view {view} joint gates")


def test_gates_independent_across_the_two_views(gates, significance):
    for a, b in PAIRS_ACROSS:
        result = stats.chi2_contingency(table(gates[0][a], gates[1][b]), correction=False)
        significance(result.pvalue, f"view 1 {a} vs view 2 {b}")
    # The two views' joint gate states together: 8 x 32 table, cells pooled where sparse.
    first = sum(gates[0][g].astype(int) << k for k, g in enumerate(random_gates(0)))
    second = gates[1]["flip"].astype(int) + 2 * gates[1]["gray"] + 4 * gates[1]["solarize"]
    joint = np.zeros((8, 8), int)
    np.add.at(joint, (first, second), 1)
    significance(stats.chi2_contingency(joint, correction=False).pvalue, "view 1 state vs view 2 state")
