"""k-NN and linear evaluation: the vote rule, sharding over ranks, and the command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.distributed as torch_dist

from fastbyol.dist import Dist
from fastbyol.evaluate import knn_top1, linear_probe

REPO = Path(__file__).resolve().parents[1]


def test_knn_vote_is_temperature_weighted():
    # query at angle 0; one close neighbour of class 1, two farther ones of class 0
    bank = torch.tensor([[1.0, 0.05], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    # T=0.1: exp(~10) beats 2 exp(6); T=10: the votes are nearly equal weights, 2 beat 1
    assert knn_top1(bank, labels, query, truth, 2, k=3, temperature=0.1) == 100.0
    assert knn_top1(bank, labels, query, truth, 2, k=3, temperature=10.0) == 0.0
    assert knn_top1(bank, labels, query, truth, 2, k=1, temperature=10.0) == 100.0


def features(seed=0, n=300, dim=16, classes=5):
    """Samples of 5 Gaussian classes; the class centres are the same for every seed."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 0.5
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + torch.randn(n, dim, generator=gen), y


def _sharded(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    (bx, by), (qx, qy) = features(0), features(1, n=101)
    dist = Dist(rank, world)
    bank = slice(rank * 300 // world, (rank + 1) * 300 // world)
    queries = slice(rank * 101 // world, (rank + 1) * 101 // world)
    knn = knn_top1(bx[bank], by[bank], qx[queries], qy[queries], 5, k=20, dist=dist)
    linear = linear_probe(bx[bank], by[bank], qx[queries], qy[queries], 5, epochs=20, batch_size=64,
                          dist=dist)
    torch.save(dict(knn=knn, linear=linear), f"{out}.{rank}")
    torch_dist.destroy_process_group()


def test_sharded_knn_equals_one_process(tmp_path):
    (bx, by), (qx, qy) = features(0), features(1, n=101)
    single = knn_top1(bx, by, qx, qy, 5, k=20)
    mp.spawn(_sharded, args=(2, 29900 + os.getpid() % 500, tmp_path / "r"), nprocs=2, join=True)
    results = [torch.load(f"{tmp_path / 'r'}.{rank}") for rank in (0, 1)]
    assert results[0]["knn"] == results[1]["knn"] == single
    assert 50.0 < single < 100.0  # overlapping classes: the vote is informative but not trivial
    assert results[0]["linear"] == results[1]["linear"] > 50.0  # chance is 20%


def test_evaluate_command_line(tiny_folder, tmp_path):
    from fastbyol import train
    out = tmp_path / "run"
    train.main(["--data", str(tiny_folder), "--epochs", "1", "--out", str(out), "--arch", "cnn4",
                "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "16", "--knn-samples", "32",
                "--knn-k", "5", "--workers", "0"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    reports = {}
    for protocol in ("knn", "linear"):
        result = subprocess.run([sys.executable, "-m", "fastbyol.evaluate", protocol, "--checkpoint",
                                 str(out / "checkpoint.pt"), "--data", str(tiny_folder), "--workers", "0",
                                 "--k", "5", "--samples", "32", "--epochs", "3"], capture_output=True,
                                text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        reports[protocol] = json.loads(result.stdout.strip().splitlines()[-1])
        assert reports[protocol]["protocol"] == protocol and 0 <= reports[protocol]["top1"] <= 100
    # the same bank and queries as the run's own final k-NN: the same figure
    summary = json.loads((out / "summary.json").read_text())
    assert reports["knn"]["top1"] == round(summary["knn_online"], 2)
    bad = subprocess.run([sys.executable, "-m", "fastbyol.evaluate", "knn", "--checkpoint",
                          str(tmp_path / "nope.pt"), "--data", str(tiny_folder)], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "no checkpoint at" in bad.stderr
