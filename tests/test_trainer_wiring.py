"""The trainer's wiring (issue 13, item 4), through train.build and the real loop, never a hand-made
DDP: 2 gloo workers against one process, the lr scaling, warm-up rule and presets as they reach the
schedule and metrics.jsonl, config.resolve's precedence, and the linear probe under DDP."""
import json
import math
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from conftest import as_torchrun_worker, free_port
from fastbyol import config as config_mod
from fastbyol import train as train_mod
from fastbyol.dist import Dist
from fastbyol.evaluate import linear_probe
from fastbyol.model import BYOL

SMALL = ["--arch", "cnn4", "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "16",
         "--knn-samples", "16", "--knn-k", "5", "--workers", "0", "--log-every", "1",
         "--ckpt-every", "100", "--sync-bn", "false", "--loader", "torchvision"]
# tiny_folder: 64 train images of 32 px, so 4 global steps of 16 per epoch.
IMAGES, GLOBAL_BATCH = 64, 16


# ---- What the recipe says, written out here ------------------------------------------------------

def recipe_lr(k: int, total: int, warmup: int, base: float, global_batch: int) -> float:
    """base x global batch / 256, linear warm-up (step 0 already trains), cosine to 0 at total."""
    peak = base * global_batch / 256
    if k < warmup:
        return peak * (k + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / (total - warmup))))


def recipe_tau(k: int, total: int, tau_base: float) -> float:
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / total) + 1) / 2


def step_records(out) -> list[dict]:
    """metrics.jsonl lines of training intervals (k-NN lines carry no lr)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "lr" in r]


def assert_schedule_in_metrics(out, total, warmup, base, tau_base, steps):
    records = step_records(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:  # the record of step s holds the lr and tau its last step (index s - 1) used
        k = r["step"] - 1
        assert r["lr"] == pytest.approx(recipe_lr(k, total, warmup, base, GLOBAL_BATCH), rel=1e-12), r
        assert r["tau"] == pytest.approx(recipe_tau(k, total, tau_base), rel=1e-12), r


# ---- 2 gloo workers through the real trainer ------------------------------------------------------

def bn_free_byol(*args, **kwargs) -> BYOL:
    """BYOL with every BatchNorm replaced by the identity: per-sample computation, so that 2 ranks on
    half batches must equal one process on the whole batch (BatchNorm would need SyncBN for that)."""
    model = BYOL(*args, **kwargs)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return model


def recording_build(models: list):
    """train.build, unchanged, that also keeps the model it built."""
    real = train_mod.build

    def build(*args, **kwargs):
        model, optimizer, step_fn = real(*args, **kwargs)
        models.append(model)
        return model, optimizer, step_fn
    return build


def _ddp_worker(rank, world, port, argv, out):
    as_torchrun_worker(rank, world, port)
    models = []
    train_mod.BYOL = bn_free_byol
    train_mod.build = recording_build(models)
    train_mod.main(argv)
    torch.save(models[0].state_dict(), out / f"rank{rank}.pt")


DDP_ARGS = ["--epochs", "2", "--stop-at-step", "3", "--lr", "1.0", "--tau-base", "0.9",
            "--weight-decay", "1e-3", *SMALL]


@pytest.fixture(scope="module")
def ddp_and_single(tiny_folder, tmp_path_factory):
    """The same 3 global steps as 2 gloo workers (train.main under a torchrun-like environment) and as
    one process; returns (ddp run folder, single run folder)."""
    runs = tmp_path_factory.mktemp("wiring")
    ddp, single = runs / "ddp", runs / "single"
    argv = ["--data", str(tiny_folder), *DDP_ARGS]
    mp.spawn(_ddp_worker, args=(2, free_port(), argv + ["--out", str(ddp)], ddp), nprocs=2, join=True)
    models = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_mod, "BYOL", bn_free_byol)
        patch.setattr(train_mod, "build", recording_build(models))
        train_mod.main(argv + ["--out", str(single)])
    torch.save(models[0].state_dict(), single / "rank0.pt")
    return ddp, single


def test_ddp_replicas_stay_identical_and_equal_one_process(ddp_and_single):
    ddp, single = ddp_and_single
    rank0, rank1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    one = torch.load(single / "rank0.pt")
    start = bn_free_byol("cnn4", True, 2, 32, 16).state_dict()  # only for "did it move"
    saved = torch.load(ddp / "checkpoint.pt", weights_only=False)
    assert saved["world_size"] == 2 and saved["step"] == 3
    moved = 0
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"{name}: the DDP replicas differ"
        torch.testing.assert_close(value, one[name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(saved["model"][name], value), name  # rank 0's model is the one saved
        moved += value.shape == start[name].shape and not torch.allclose(value, start[name])
    assert moved > len(rank0) // 2  # the steps really trained
    # the losses logged are the global batch's (averaged over ranks), equal to one process's
    for a, b in zip(step_records(ddp), step_records(single), strict=True):
        assert a["byol_loss"] == pytest.approx(b["byol_loss"], rel=1e-4), (a, b)


def test_peak_lr_is_base_times_global_batch_over_256_on_any_world_size(ddp_and_single):
    # 2 epochs of 4 steps; small images: warm-up min(10 epochs, 10% of 8 steps) -> 1 step
    for out in ddp_and_single:
        assert_schedule_in_metrics(out, total=8, warmup=1, base=1.0, tau_base=0.9, steps=3)
        assert step_records(out)[0]["lr"] == pytest.approx(1.0 * GLOBAL_BATCH / 256)


@pytest.mark.parametrize("image_size, warmup", [(32, 16), (72, 40)])
def test_warmup_rule_and_preset_reach_the_schedule(tiny_folder, tmp_path, image_size, warmup):
    """--epochs 40 and no lr, tau or weight decay: the 40-epoch preset (base lr 0.45, tau 0.97, wd
    1e-6). 160 steps: small images warm up for min(10 epochs = 40, 10% = 16) steps, larger views for
    10 epochs = 40."""
    out = tmp_path / "run"
    train_mod.main(["--data", str(tiny_folder), "--epochs", "40", "--stop-at-step", "3",
                    "--image-size", str(image_size), "--out", str(out), *SMALL])
    assert_schedule_in_metrics(out, total=160, warmup=warmup, base=0.45, tau_base=0.97, steps=3)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    decays = sorted((g["adapt"], g["weight_decay"]) for g in state["optimizer"]["param_groups"])
    assert decays == [(False, 0.0), (True, 1e-6)]
    assert all(g["lr"] == pytest.approx(recipe_lr(2, 160, warmup, 0.45, GLOBAL_BATCH))
               for g in state["optimizer"]["param_groups"])


# ---- config.resolve: a flag beats the CPU demo, which beats the preset ------------------------------

RESOLVE_TABLE = [
    # (flags, embedded, device, native side, expected)
    ([], True, "cpu", 28, dict(arch="cnn4", epochs=3.0, lr=2.0, tau_base=0.99, weight_decay=1.5e-6,
                               proj_hidden=512, proj_dim=128, image_size=32, stem="small",
                               precision="fp32", compile="off")),
    (["--lr", "0.7", "--arch", "resnet18", "--proj-hidden", "64"], True, "cpu", 28,
     dict(arch="resnet18", lr=0.7, epochs=3.0, tau_base=0.99, proj_hidden=64, proj_dim=128)),
    (["--epochs", "1000"], True, "cpu", 28,  # the demo's lr, not the 1000-epoch preset's
     dict(epochs=1000.0, lr=2.0, tau_base=0.99, weight_decay=1.5e-6)),
    (["--epochs", "100"], True, "cuda", 28,
     dict(arch="resnet18", lr=0.45, tau_base=0.99, weight_decay=1e-6, proj_hidden=4096, proj_dim=256,
          precision="bf16", compile="default")),
    ([], False, "cpu", 500, dict(arch="resnet50", epochs=300.0, lr=0.3, tau_base=0.99, weight_decay=1e-6,
                                 image_size=224, stem="imagenet", proj_hidden=4096, proj_dim=256)),
    (["--epochs", "40"], False, "cpu", 500, dict(lr=0.45, tau_base=0.97, weight_decay=1e-6)),
    (["--epochs", "200"], False, "cpu", 500, dict(lr=0.3, tau_base=0.99)),  # nearest on a log scale
    (["--epochs", "1000", "--tau-base", "0.5", "--weight-decay", "0"], False, "cuda", 500,
     dict(lr=0.2, tau_base=0.5, weight_decay=0.0, precision="bf16")),
    (["--epochs", "10", "--precision", "fp32", "--compile", "off", "--image-size", "96"], False,
     "cuda", 32, dict(lr=0.45, tau_base=0.97, precision="fp32", compile="off", image_size=96,
                      stem="imagenet")),
]


@pytest.mark.parametrize("flags, embedded, device, side, expected", RESOLVE_TABLE)
def test_resolve_precedence(flags, embedded, device, side, expected):
    cfg, _, _ = config_mod.parse_args(flags)
    resolved = config_mod.resolve(cfg, device_type=device, embedded=embedded, native_side=side)
    got = {key: getattr(resolved, key) for key in expected}
    assert got == expected


# ---- The linear probe under DDP ---------------------------------------------------------------------

def probe_data():
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 8, generator=gen)
    train_y, val_y = torch.randint(0, 3, (64,), generator=gen), torch.randint(0, 3, (32,), generator=gen)
    train_x = centres[train_y] + 1.5 * torch.randn(64, 8, generator=gen)
    val_x = centres[val_y] + 1.5 * torch.randn(32, 8, generator=gen)
    return train_x, train_y, val_x, val_y


class RecordedLinear(nn.Linear):
    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordedLinear.made.append(self)


def probe_once(dist: Dist, rank: int = 0, world: int = 1):
    """linear_probe on this rank's contiguous shard, full batch (64), so that averaging the ranks'
    gradients equals one process's gradient on all the data. Returns (top-1, the trained head)."""
    train_x, train_y, val_x, val_y = probe_data()
    t = slice(rank * 64 // world, (rank + 1) * 64 // world)
    v = slice(rank * 32 // world, (rank + 1) * 32 // world)
    torch.manual_seed(0)  # the head's initial weights (rank 0's are broadcast)
    RecordedLinear.made.clear()
    real = torch.nn.Linear
    torch.nn.Linear = RecordedLinear
    try:
        top1 = linear_probe(train_x[t], train_y[t], val_x[v], val_y[v], 3, epochs=6, batch_size=64,
                            lr=0.5, dist=dist)
    finally:
        torch.nn.Linear = real
    return top1, {k: v.detach().clone() for k, v in RecordedLinear.made[-1].state_dict().items()}


def _probe_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(probe_once(Dist(rank, world, rank), rank, world), out / f"probe{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def test_ddp_linear_probe_equals_one_process_on_the_whole_data(tmp_path):
    mp.spawn(_probe_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    top1, head = probe_once(Dist())
    initial = nn.Linear(8, 3)
    for rank in (0, 1):
        ddp_top1, ddp_head = torch.load(tmp_path / f"probe{rank}.pt")
        assert ddp_top1 == pytest.approx(top1)
        for name, value in head.items():
            torch.testing.assert_close(ddp_head[name], value, rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.allclose(value, getattr(initial, name)), name
