"""data_wait in metrics.jsonl is the share of wall time the host spent waiting for the loader: checked
against a loader and a step that each sleep a known time, through the real trainer."""
import json
import time
from collections import Counter

import pytest
import torch

from fastbyol import train as train_mod
from fastbyol.views import Views

BATCH, STEPS_PER_EPOCH = 4, 5


class SleepyLoader:
    """Yields tiny CPU views after sleeping `seconds` per batch, and records how long each took."""
    seconds = 0.0
    spent: list = []

    def __init__(self, root, split, **kwargs):
        self.num_classes, self.indices, self.dataset_size = 2, list(range(BATCH * STEPS_PER_EPOCH)), BATCH * STEPS_PER_EPOCH
        self.bad_files = Counter()

    def __len__(self):
        return STEPS_PER_EPOCH

    def epoch(self, epoch, start_batch=0):
        for _ in range(start_batch, STEPS_PER_EPOCH):
            t0 = time.perf_counter()
            time.sleep(self.seconds)
            view = torch.zeros(BATCH, 3, 8, 8)
            SleepyLoader.spent.append(time.perf_counter() - t0)
            yield Views(view, view, torch.zeros(BATCH, dtype=torch.long), torch.arange(BATCH))


class SleepyStep:
    """Stands in for BYOLStep: sleeps `seconds` per step and returns zero metrics."""
    seconds = 0.0
    spent: list = []

    def __init__(self, model, optimizer, net=None, **kwargs):
        self.scaler = None

    def __call__(self, v1, v2, labels, lr, tau):
        t0 = time.perf_counter()
        time.sleep(self.seconds)
        SleepyStep.spent.append(time.perf_counter() - t0)
        return torch.zeros(4)


@pytest.mark.parametrize("load_s,step_s", [(0.01, 0.04), (0.04, 0.01)])
def test_data_wait_is_the_share_of_time_spent_waiting_for_the_loader(tiny_folder, tmp_path, monkeypatch,
                                                                     load_s, step_s):
    monkeypatch.setattr(train_mod, "train_loader", lambda name, root, **kw: SleepyLoader(root, "train", **kw))
    monkeypatch.setattr(train_mod, "BYOLStep", SleepyStep)
    monkeypatch.setattr(SleepyLoader, "seconds", load_s)
    monkeypatch.setattr(SleepyLoader, "spent", [])
    monkeypatch.setattr(SleepyStep, "seconds", step_s)
    monkeypatch.setattr(SleepyStep, "spent", [])
    out = tmp_path / "run"
    train_mod.main([str(a) for a in [
        "--data", tiny_folder, "--out", out, "--arch", "cnn4", "--proj-hidden", "16", "--proj-dim", "8",
        "--batch-size", BATCH, "--epochs", 6, "--log-every", 10, "--ckpt-every", 1000, "--workers", 0,
        "--knn-samples", 8, "--knn-k", 3, "--knn-every", 2]])
    # The truth, from the sleeps as they happened (a sleep may overrun): loading / (loading + step).
    loading, stepping = sum(SleepyLoader.spent), sum(SleepyStep.spent)
    truth = loading / (loading + stepping)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    waits = [line["data_wait"] for line in lines if "data_wait" in line]
    assert len(waits) >= 3  # k-NN every 2 epochs cut intervals: its time must count in none of them
    for wait in waits:
        assert abs(wait - truth) <= 0.1 * truth, (waits, truth)
