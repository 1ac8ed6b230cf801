"""Multi-process training on the CPU: 2 gloo workers (DESIGN.md, Processes)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from fastbyol.kernels.lars import LARS, lars_param_groups
from fastbyol.model import BYOL
from fastbyol.step import BYOLStep

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 8


def bn_free_model():
    """The BYOL module with every BatchNorm replaced by identity: per-sample computation, so a
    2-rank step on half batches must equal one process on the whole batch."""
    torch.manual_seed(0)
    model = BYOL("cnn4", small=True, num_classes=3, proj_hidden=32, proj_dim=16)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return model


def global_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 3, 16, 16, generator=gen), torch.randn(BATCH, 3, 16, 16, generator=gen),
             torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(STEPS)]


def train_steps(model, net, rank=0, world=1):
    opt = LARS(lars_param_groups(model.online_parameters(), 1e-3), weight_decay=1e-3)
    step = BYOLStep(model, opt, net)
    share = BATCH // world
    for i, (v1, v2, y) in enumerate(global_batches()):
        part = slice(rank * share, (rank + 1) * share)
        step(v1[part], v2[part], y[part], lr=0.5, tau=0.9 + 0.03 * i)
    return model.state_dict()


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    model = bn_free_model()
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    state = train_steps(model, net, rank, world)
    if rank == 0:
        torch.save(state, out)
    torch_dist.destroy_process_group()


def test_two_gloo_workers_equal_one_process_on_the_concatenated_batch(tmp_path):
    single = train_steps(bn_free_model(), None)
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    changed = 0
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(value, bn_free_model().state_dict()[name])
    assert changed > 0  # the steps really moved the weights


def train_cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, **kwargs)


COMMON = ["--arch", "cnn4", "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "16",
          "--knn-samples", "32", "--knn-k", "5", "--workers", "0", "--log-every", "1"]


def test_nproc_2_trains_one_epoch_and_resumes_on_one_rank(tiny_folder, tmp_path):
    out = tmp_path / "run"
    result = train_cli(["fastbyol.train", "--nproc", "2", "--data", str(tiny_folder), "--epochs", "2",
                        "--stop-at-step", "4", "--out", str(out), *COMMON], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # INFO lines from rank 0 alone (the launcher's process prints none of these)
    assert result.stderr.count("stopped at step 4 of") == 1, result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "lr" in r]  # training intervals (k-NN lines have no lr)
    assert steps == [1, 2, 3, 4]  # rank 0 alone writes; 64 images / 16 = 4 steps
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 4
    resumed = train_cli(["fastbyol.train", "--resume", "--out", str(out), "--data", str(tiny_folder),
                         *COMMON], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a 2-rank run on 1 ranks" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 1


def test_torchrun_forms_and_a_contradicting_nproc(tiny_folder, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = ["-m", "fastbyol.train", "--", "--data", str(tiny_folder), "--epochs", "1",
            "--stop-at-step", "1", *COMMON]
    # torchrun with one worker asked for --nproc 2 re-launches itself as 2 workers
    out = tmp_path / "relaunch"
    result = subprocess.run([*torchrun, "--nproc-per-node", "1", *base, "--nproc", "2", "--out",
                             str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["world_size"] == 2
    # a --nproc that contradicts torchrun's 2 workers is an error naming it
    result = subprocess.run([*torchrun, "--nproc-per-node", "2", *base, "--nproc", "3", "--out",
                             str(tmp_path / "bad")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "--nproc 3 contradicts torchrun" in result.stderr


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time (clock ticks since boot) of every live descendant of `root`: this test's
    own processes only, never another run's."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def _alive(pid: int, start: int) -> bool:
    """The process `pid` that started at `start` still runs (not gone, not a zombie, not reused)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] != "Z" and int(fields[19]) == start


def _worker_pids(launcher_pid):
    """The fastbyol.train workers among the launcher's descendants: local rank -> (pid, start time)."""
    found = {}
    for pid, start in _descendants(launcher_pid).items():
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"fastbyol.train" in cmdline and b"LOCAL_RANK" in env:
            found[int(env[b"LOCAL_RANK"])] = (pid, start)
    return found


def _kill_everything(proc, known: dict[int, int]) -> None:
    """SIGKILL the launcher's process group and the group of each of its descendants still running
    (torchrun starts every worker in a session of its own), so nothing outlives the test."""
    for pid, start in {**known, **_descendants(proc.pid)}.items():
        if _alive(pid, start):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own group (start_new_session)
    except ProcessLookupError:
        pass
    proc.wait()


def test_a_killed_worker_ends_the_job_with_an_error(tiny_folder, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastbyol.train", "--nproc", "2", "--data",
                             str(tiny_folder), "--epochs", "500", "--out", str(out),
                             "--dist-timeout", "30", *COMMON], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    workers = {}
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "training never started"
            time.sleep(0.5)
        workers = _worker_pids(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1][0], signal.SIGKILL)
        killed_at = time.time()
        _, stderr = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert time.time() - killed_at < 60
        assert "worker rank 1 was killed by signal 9; the other workers were stopped" in stderr
        left = [pid for pid, start in workers.values() if _alive(pid, start)]
        assert not left, f"workers left behind: {left}"
    finally:
        _kill_everything(proc, dict(workers.values()))
