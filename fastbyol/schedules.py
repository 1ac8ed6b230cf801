"""Learning-rate and target-decay schedules: pure functions of the global optimizer step."""
from __future__ import annotations

import math

# Official presets by training length (deepmind-research/byol configs/byol.py): base lr before the
# batch/256 scaling, weight decay, tau_base.
PRESETS = {
    40: dict(lr=0.45, weight_decay=1e-6, tau_base=0.97),
    100: dict(lr=0.45, weight_decay=1e-6, tau_base=0.99),
    300: dict(lr=0.3, weight_decay=1e-6, tau_base=0.99),
    1000: dict(lr=0.2, weight_decay=1.5e-6, tau_base=0.996),
}


def preset_for_epochs(epochs: float) -> dict:
    """The preset whose epoch count is nearest on a log scale (200 -> 300's, 10 -> 40's)."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    nearest = min(PRESETS, key=lambda e: abs(math.log(epochs) - math.log(e)))
    return dict(PRESETS[nearest])


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = base * batch / 256."""
    return base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up from 0 to peak over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        # (step + 1): step 0 already trains; the official schedule starts at 0 (README, departures)
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2: tau_base at k=0, 1 at k=K."""
    progress = min(1.0, step / max(1, total_steps))
    return 1 - (1 - tau_base) * (math.cos(math.pi * progress) + 1) / 2


def warmup_steps_for(warmup_epochs: float, steps_per_epoch: int, total_steps: int, small: bool) -> int:
    """10 epochs by the paper; for small images min(10 epochs, 10% of the steps), so short runs train."""
    steps = round(warmup_epochs * steps_per_epoch)
    if small:
        steps = min(steps, round(0.1 * total_steps))
    return max(1, min(steps, total_steps))
