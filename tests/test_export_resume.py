"""Export and resume (issue 13, item 5): backbone.pt is the online encoder, fp16 resume restores the
GradScaler, a run resumed on another world size sees the same samples per global step, a bad
checkpoint is a one-line error, and non-finite parameters at checkpoint time stop the run."""

import pytest
import torch
import torch.multiprocessing as mp

from conftest import as_torchrun_worker, free_port
from fastbyol import train as train_mod
from fastbyol.step import BYOLStep

SMALL = ["--arch", "cnn4", "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "16",
         "--knn-samples", "16", "--knn-k", "5", "--workers", "0", "--log-every", "1",
         "--sync-bn", "false", "--loader", "torchvision"]


def run(argv):
    train_mod.main([str(a) for a in argv])


def test_backbone_pt_is_the_online_encoder(tiny_folder, tmp_path):
    out = tmp_path / "run"
    run(["--data", tiny_folder, "--epochs", 0.5, "--tau-base", 0.5, "--out", out, *SMALL])
    model = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    backbone = torch.load(out / "backbone.pt")
    online = {k[len("online.encoder."):]: v for k, v in model.items() if k.startswith("online.encoder.")}
    target = {k[len("target.encoder."):]: v for k, v in model.items() if k.startswith("target.encoder.")}
    assert backbone.keys() == online.keys() == target.keys()
    weights = [k for k, v in online.items() if v.is_floating_point() and v.ndim > 1]
    assert weights and all(not torch.equal(online[k], target[k]) for k in weights)  # they differ
    for name, value in backbone.items():
        assert torch.equal(value, online[name]), f"{name}: backbone.pt is not the online encoder's"


class RecordFirstScale(BYOLStep):
    """The real step, remembering the loss scale it starts from."""
    scales = []

    def __call__(self, *args, **kwargs):
        if self.scaler is not None and len(RecordFirstScale.scales) == 0:
            state = self.scaler.state_dict()
            RecordFirstScale.scales.append((state["scale"], state["_growth_tracker"]))
        return super().__call__(*args, **kwargs)


def test_fp16_resume_restores_the_grad_scaler(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "fp16"
    common = ["--data", tiny_folder, "--out", out, "--precision", "fp16", *SMALL]
    run([*common, "--epochs", 1, "--stop-at-step", 2])
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    assert state["grad_scaler"] is not None
    # A scale no fresh GradScaler has (65536 at start, halving on overflow, doubling every 2000 steps)
    state["grad_scaler"].update(scale=96.0, _growth_tracker=1)
    torch.save(state, path)
    RecordFirstScale.scales.clear()
    monkeypatch.setattr(train_mod, "BYOLStep", RecordFirstScale)
    run([*common, "--resume"])
    assert RecordFirstScale.scales == [(96.0, 1)]


# ---- Another world size: the same samples per global step ----------------------------------------

REAL_TRAIN_LOADER = train_mod.train_loader


def recording_loader(record: list):
    """train.train_loader, unchanged, whose batches' dataset indices are appended to `record`."""
    real = REAL_TRAIN_LOADER

    def make(*args, **kwargs):
        loader = real(*args, **kwargs)
        epoch = loader.epoch

        def recorded(*a, **k):
            for views in epoch(*a, **k):
                record.append(views.index.tolist())
                yield views
        loader.epoch = recorded
        return loader
    return make


def _ddp_worker(rank, world, port, argv, out):
    as_torchrun_worker(rank, world, port)
    record = []
    train_mod.train_loader = recording_loader(record)
    train_mod.main(argv)
    torch.save(record, out / f"indices{rank}.pt")


def test_resume_on_another_world_size_sees_the_same_samples_per_global_step(tiny_folder, tmp_path,
                                                                            monkeypatch):
    """6 global steps of 16 over 1.5 epochs: uninterrupted on 1 rank, against 2 steps on 2 ranks and
    the rest resumed on 1 rank (across the epoch boundary)."""
    common = ["--data", str(tiny_folder), "--epochs", "1.5", *SMALL]
    whole, first, rest = [], [], []
    monkeypatch.setattr(train_mod, "train_loader", recording_loader(whole))
    run([*common, "--out", tmp_path / "whole"])
    resumed = tmp_path / "resumed"
    mp.spawn(_ddp_worker, args=(2, free_port(), [*common, "--stop-at-step", "2", "--out", str(resumed)],
                                tmp_path), nprocs=2, join=True)
    monkeypatch.setattr(train_mod, "train_loader", recording_loader(rest))
    run([*common, "--resume", "--out", resumed])
    first = [a + b for a, b in zip(torch.load(tmp_path / "indices0.pt"), torch.load(tmp_path / "indices1.pt"),
                                   strict=True)]
    assert len(whole) == 6 and len(first) == 2 and len(rest) == 4
    assert [sorted(batch) for batch in whole] == [sorted(batch) for batch in first + rest]
    assert sorted(sum(whole[:4], [])) == list(range(64))  # one epoch: every image once


# ---- Bad checkpoints and non-finite parameters ---------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    run(["--data", tiny_folder, "--epochs", 1, "--stop-at-step", 1, "--out", out, *SMALL])
    return out


@pytest.mark.parametrize("damage", ["truncated", "text", "foreign torch file"])
def test_a_truncated_or_foreign_checkpoint_is_a_one_line_error(saved_run, tiny_folder, tmp_path, capsys,
                                                               damage):
    out = tmp_path / "bad"
    out.mkdir()
    path = out / "checkpoint.pt"
    good = (saved_run / "checkpoint.pt").read_bytes()
    if damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "text":
        path.write_text("not a checkpoint\n")
    else:  # a loadable torch file that is not ours: a bare state dict
        torch.save({"weight": torch.zeros(3)}, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(["--data", tiny_folder, "--resume", "--out", out, *SMALL])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("fastbyol.train: error:")]
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in err, err[-2000:]


class PoisonTargetAtStep4(BYOLStep):
    """The real step; after the 4th call a target weight becomes inf (that step's loss is finite)."""
    calls = 0

    def __call__(self, *args, **kwargs):
        metrics = super().__call__(*args, **kwargs)
        PoisonTargetAtStep4.calls += 1
        if PoisonTargetAtStep4.calls == 4:
            with torch.no_grad():
                weight = next(self.model.target.parameters())
                weight[(0,) * weight.ndim] = float("inf")
        return metrics


def test_non_finite_parameters_at_checkpoint_time_stop_the_run(tiny_folder, tmp_path, monkeypatch, capsys):
    PoisonTargetAtStep4.calls = 0
    monkeypatch.setattr(train_mod, "BYOLStep", PoisonTargetAtStep4)
    out = tmp_path / "poisoned"
    with pytest.raises(SystemExit) as exit_info:
        run(["--data", tiny_folder, "--epochs", 2, "--ckpt-every", 2, "--out", out, *SMALL])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "diverged: non-finite parameters at step 4" in err
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
