import math

import pytest

from fastbyol.schedules import lr_at, preset_for_epochs, scaled_lr, tau_at, warmup_steps_for


def test_lr_endpoints_and_shape():
    total, warmup, peak = 1000, 100, 0.8
    lrs = [lr_at(s, total, warmup, peak) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))          # warm-up rises
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))      # cosine falls
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(peak / 2, rel=1e-2)


def test_tau_endpoints_and_monotone():
    taus = [tau_at(s, 500, 0.996) for s in range(501)]
    assert taus[0] == pytest.approx(0.996) and taus[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(taus, taus[1:]))
    assert tau_at(250, 500, 0.99) == pytest.approx(0.995)


def test_linear_scaling():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(0.2, 256) == pytest.approx(0.2)


@pytest.mark.parametrize("epochs,preset", [(1000, 1000), (300, 300), (200, 300), (100, 100),
                                           (10, 40), (1, 40), (60, 40), (70, 100), (600, 1000),
                                           (5000, 1000)])
def test_nearest_preset_on_a_log_scale(epochs, preset):
    table = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
             1000: (0.2, 1.5e-6, 0.996)}
    p = preset_for_epochs(epochs)
    assert (p["lr"], p["weight_decay"], p["tau_base"]) == table[preset]


def test_preset_boundary_is_the_geometric_mean():
    edge = math.sqrt(40 * 100)
    assert preset_for_epochs(edge * 0.999)["tau_base"] == 0.97
    assert preset_for_epochs(edge * 1.001)["tau_base"] == 0.99


def test_warmup_rule():
    assert warmup_steps_for(10, 100, 100_000, small=False) == 1000
    assert warmup_steps_for(10, 100, 3000, small=True) == 300     # 10% of a short small-image run
    assert warmup_steps_for(10, 100, 100_000, small=True) == 1000  # 10 epochs when that is less
