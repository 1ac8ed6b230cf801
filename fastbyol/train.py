"""`python -m fastbyol.train`: BYOL pretraining, one readable loop.

With no --data it trains on the embedded Fashion-MNIST (on a CPU: the small demo encoder for a few
epochs; on a GPU: resnet18). The run folder gets config.json, metrics.jsonl, checkpoint.pt,
backbone.pt (loads into torchvision.models.<arch>()) and summary.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastbyol import InputError
from fastbyol import checkpoint as ckpt_io
from fastbyol import config as config_mod
from fastbyol import dist as dist_mod
from fastbyol.config import Config, is_small
from fastbyol.dist import Dist
from fastbyol.evaluate import knn_eval
from fastbyol.fashion_mnist import ensure_fashion_mnist
from fastbyol.kernels.lars import LARS, lars_param_groups
from fastbyol.model import BYOL
from fastbyol.pipelines import choose_loader, native_side, options_for, train_loader
from fastbyol.schedules import PRESETS, lr_at, scaled_lr, tau_at, warmup_steps_for
from fastbyol.step import BYOLStep
from fastbyol.syncbn import convert_sync_batchnorm
from fastbyol.views import view_dtype

log = logging.getLogger("fastbyol.train")

# Given again on --resume, these change how the run executes, not what it computes.
RUNTIME_FIELDS = {"workers", "device", "log_every", "ckpt_every", "stop_at_step", "knn_every", "resume",
                  "nproc", "dist_timeout", "compile", "precision", "fused", "loader", "hw_decoder_load",
                  "ffcv_decode", "os_cache", "tensorboard"}


class Diverged(RuntimeError):
    """A non-finite loss or parameter: training stops, the last good checkpoint is kept."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def setup(cfg: Config, given: dict) -> tuple[Config, Path, torch.device, Dist, dict | None]:
    """Join the process group; resolve the data root, the device and every 'auto' value; load the
    checkpoint on --resume."""
    dist, device = dist_mod.init(pick_device(cfg.device), cfg.dist_timeout)
    out = Path(cfg.out)
    state = None
    if cfg.resume:
        state = ckpt_io.load(out / "checkpoint.pt")
        saved = state["config"]
        changed = {k: v for k, v in given.items() if k not in RUNTIME_FIELDS and saved.get(k) != v}
        if changed:
            raise InputError(f"--resume continues the run saved in {out}; these flags differ from it: "
                             + ", ".join(f"--{k.replace('_', '-')}" for k in sorted(changed)))
        # How to run is asked afresh (the flags given now, else the defaults); what to compute is saved.
        defaults = dataclasses.asdict(Config())
        cfg = config_mod.from_dict({**saved, **{k: given.get(k, defaults[k]) for k in RUNTIME_FIELDS}})
    elif (out / "checkpoint.pt").exists():
        raise InputError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    if cfg.data is None:  # rank 0 builds the cache once; the others find it complete
        if not dist.is_main:
            dist_mod.barrier(dist)
        root = ensure_fashion_mnist()
        if dist.is_main:
            dist_mod.barrier(dist)
    else:
        root = Path(cfg.data)
    cfg.loader = choose_loader(cfg.loader, root, embedded=cfg.data is None)
    cfg = config_mod.resolve(cfg, device_type=device.type, embedded=cfg.data is None,
                             native_side=native_side(cfg.loader, root),
                             local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cfg.data = str(root)
    if cfg.batch_size % dist.world_size:
        raise InputError(f"--batch-size {cfg.batch_size} (the global batch) does not split evenly "
                         f"over {dist.world_size} ranks")
    if state is not None and state.get("world_size", 1) != dist.world_size:
        log.warning("resuming a %d-rank run on %d ranks: the global batch (%d) and the schedule are "
                    "kept, each global step sees the same images, but their split over ranks, and so "
                    "the per-rank BatchNorm statistics, change", state.get("world_size", 1),
                    dist.world_size, cfg.batch_size)
    return cfg, out, device, dist, state


def build(cfg: Config, num_classes: int, device: torch.device, dist: Dist):
    """The unwrapped model, its optimizer and the step (DDP and compile wrap on top)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = BYOL(cfg.arch, cfg.stem == "small", num_classes, cfg.proj_hidden, cfg.proj_dim)
    if dist.enabled and cfg.sync_bn:  # global-batch statistics, on NCCL and gloo alike
        model = convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    # Under a --time-budget still to be measured, the preset (and its weight decay) is chosen after
    # calibration: meanwhile the value 3 of the 4 presets share, so the compiled update rarely changes.
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else PRESETS[100]["weight_decay"]
    optimizer = LARS(lars_param_groups(model.online_parameters(), weight_decay),
                     momentum=cfg.momentum, weight_decay=weight_decay, trust_coef=cfg.trust_coef,
                     foreach=cfg.fused)
    net = model
    if dist.enabled:
        # With SyncBN the buffers stay equal (NCCL and gloo) and need no broadcast; without it, rank
        # 0's are broadcast each forward, so every rank's k-NN features and the saved ones agree.
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=not cfg.sync_bn, gradient_as_bucket_view=True)
    step_fn = BYOLStep(model, optimizer, net, precision=cfg.precision, compile=cfg.compile,
                       fused=cfg.fused)
    return model, optimizer, step_fn


class Schedule(NamedTuple):
    """lr: linear warm-up, then cosine to 0 at total_steps; tau: cosine from tau_base to 1."""

    total_steps: int
    warmup: int
    peak_lr: float
    tau_base: float

    def at(self, step: int) -> tuple[float, float]:
        return (lr_at(step, self.total_steps, self.warmup, self.peak_lr),
                tau_at(step, self.total_steps, self.tau_base))


# Calibration steps train nothing: lr 0 leaves the online weights, tau 1 the target's, where they are.
CALIBRATION = Schedule(total_steps=1, warmup=1, peak_lr=0.0, tau_base=1.0)


class Meter:
    """One metrics interval: the step metrics summed on the device (read back once, at its end), its
    wall time, and the time the host spent blocked on the loader (`waited`)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, device=device)
        self.restart(0)

    def restart(self, step: int) -> None:
        self.sums.zero_()
        self.first_step, self.waited, self.started = step, 0.0, time.perf_counter()


class Loop:
    """The training loop over any loader and step function. `run(step, stop, schedule)` trains global
    steps [step, stop), epoch after epoch, and adds to `meter.waited` every second the host spends
    getting a batch (next() on the loader, and closing an epoch's loader). A call that continues where
    the last one stopped keeps the epoch's iterator, so a run can be driven in pieces (calibration,
    benchmark windows) without restarting the loader's workers."""

    def __init__(self, step_fn, loader, meter: Meter):
        self.step_fn, self.loader, self.meter = step_fn, loader, meter
        self.steps_per_epoch = len(loader)
        self._batches, self._at = None, -1

    def run(self, step: int, stop: int, schedule: Schedule, after_step=None, after_epoch=None) -> int:
        """after_step(step, lr, tau) runs after each step, after_epoch(step) after each epoch's last;
        `step` counts the steps done. Returns the step reached."""
        while step < stop:
            t0 = time.perf_counter()
            if self._at != step:
                self.close()
                epoch, start_batch = divmod(step, self.steps_per_epoch)
                self._batches, self._at = iter(self.loader.epoch(epoch, start_batch)), step
            views = next(self._batches, None)
            self.meter.waited += time.perf_counter() - t0
            if views is None:
                raise RuntimeError(f"the loader ended epoch {step // self.steps_per_epoch} after "
                                   f"{step % self.steps_per_epoch} of its {len(self.loader)} batches")
            lr, tau = schedule.at(step)
            self.meter.sums += self.step_fn(views.v1, views.v2, views.labels, lr, tau)
            step = self._at = step + 1
            epoch_done = step % self.steps_per_epoch == 0
            if epoch_done:  # the epoch's iterator is spent: let its workers go now
                t0 = time.perf_counter()
                self.close()
                self.meter.waited += time.perf_counter() - t0
            if after_step:
                after_step(step, lr, tau)
            if epoch_done and after_epoch:
                after_epoch(step)
        return step

    def close(self) -> None:
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()
        self._batches, self._at = None, -1


def _sync(meter: Meter) -> None:
    meter.sums.tolist()  # note: a host sync: every step queued so far has run


def calibrate(loop: Loop, model, optimizer, step_fn, min_seconds: float, dist: Dist,
              warmup: int = 5, max_steps: int = 1000) -> float:
    """Seconds per step of `loop` (loader included), timed after `warmup` steps (compilation) for at
    least min_seconds, on steps that train nothing (CALIBRATION), with the model, the momentum buffers
    and the loss scale put back afterwards (BatchNorm statistics do move). The slowest rank's rate."""
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    momenta = [optimizer.state[p]["momentum_buffer"] for g in optimizer.param_groups for p in g["params"]]
    saved_momenta = [buf.clone() for buf in momenta]
    scaler = step_fn.scaler.state_dict() if step_fn.scaler else None
    step = loop.run(0, warmup, CALIBRATION)
    _sync(loop.meter)
    start, chunk = time.perf_counter(), 2
    while True:
        step = loop.run(step, step + chunk, CALIBRATION)
        _sync(loop.meter)
        # the slowest rank's time: every rank takes the same decision, and so runs the same steps
        elapsed = _slowest(time.perf_counter() - start, dist)
        if elapsed >= min_seconds or step - warmup >= max_steps:
            break
        chunk = step - warmup  # doubling: few syncs, which a real run does only at log intervals
    loop.close()
    model.load_state_dict(saved)  # copies in place: the compiled step keeps its tensors
    with torch.no_grad():
        for buf, value in zip(momenta, saved_momenta):
            buf.copy_(value)
    if scaler:
        step_fn.scaler.load_state_dict(scaler)
    loop.meter.restart(0)
    return elapsed / (step - warmup)


def _slowest(seconds: float, dist: Dist) -> float:
    """The largest value over the ranks, so that every rank sizes the same run."""
    if not dist.enabled:
        return seconds
    on_gpu = torch.distributed.get_backend() == "nccl"
    value = torch.tensor(seconds, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item()


def steps_for_budget(seconds: float, step_s: float, knn_s: float, ckpt_s: float, steps_per_epoch: int,
                     knn_every: int, ckpt_every: int) -> int:
    """The most steps whose training, k-NN evaluations (one every knn_every epochs but the last, two
    at the end) and checkpoints (every ckpt_every steps, and one at the end) fit in `seconds`."""
    def cost(steps: int) -> float:
        knns = 2 + ((steps - 1) // (steps_per_epoch * knn_every) if knn_every else 0)
        return steps * step_s + knns * knn_s + (1 + steps // ckpt_every) * ckpt_s

    low, high = 0, int(seconds / step_s) + 1  # cost is increasing: bisect for the last step that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= seconds else (low, mid - 1)
    return low


def budget_margin(budget_s: float) -> float:
    """Seconds kept back for what is not modelled: the final export, log lines, rate jitter."""
    return max(3.0, 0.05 * budget_s)


class MetricsLog:
    """metrics.jsonl (one JSON object a line) and, with --tensorboard, the same numbers as scalars."""

    def __init__(self, out: Path, tensorboard: bool):
        self.file = open(out / "metrics.jsonl", "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise InputError("--tensorboard needs the tensorboard package: pip install "
                                 "'fastbyol[viz]'") from exc
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()


def train(cfg: Config, given: dict) -> dict:
    started = time.perf_counter()  # --time-budget counts from here: setup and evaluations included
    cfg, out, device, dist, state = setup(cfg, given)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    small = is_small(cfg)
    local_batch = cfg.batch_size // dist.world_size
    options = options_for(cfg.loader, cfg)
    loader = train_loader(cfg.loader, cfg.data, batch_size=local_batch, image_size=cfg.image_size,
                          small=small, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                          workers=cfg.workers, device=device, dtype=view_dtype(cfg.precision, device),
                          crop_scale=(cfg.crop_scale_min, 1.0), subset=cfg.subset, **options)
    model, optimizer, step_fn = build(cfg, loader.num_classes, device, dist)
    steps_per_epoch = len(loader)
    meter = Meter(device)
    loop = Loop(step_fn, loader, meter)
    metrics = MetricsLog(out, cfg.tensorboard) if dist.is_main else None

    def wall_s() -> float:
        return round(time.perf_counter() - started, 3)

    def knn(encoder) -> float:
        return knn_eval(encoder, Path(cfg.data), cfg.image_size, loader.num_classes, device,
                        cfg.knn_samples, cfg.knn_k, cfg.knn_temperature, cfg.workers, dist,
                        loader=cfg.loader, options=options)

    if state is None:
        t0 = time.perf_counter()
        step, knn_random = 0, knn(model.online["encoder"])
        knn_s = _slowest(time.perf_counter() - t0, dist)
        log.info("k-NN top-1 at random init: %.2f%% (%.1f s)", knn_random, knn_s)
        if metrics:
            metrics.write(dict(step=0, epoch=0.0, knn_top1=knn_random, knn_s=round(knn_s, 3),
                               wall_s=wall_s()))
        if config_mod.budget_pending(cfg):
            # The first evaluation may include one-time work (a loader decoding its split once): the
            # cost of the later ones is a second, warm, evaluation's.
            t0 = time.perf_counter()
            knn(model.online["encoder"])
            knn_s = min(knn_s, _slowest(time.perf_counter() - t0, dist))
            size_to_budget(cfg, loop, model, optimizer, step_fn, dist, out, started, knn_s)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if step_fn.scaler is not None and state.get("grad_scaler"):
            step_fn.scaler.load_state_dict(state["grad_scaler"])
        ckpt_io.set_rng_state(state["rng"])
        step, knn_random = state["step"], state["knn_random_init"]
    if dist.is_main:
        config_mod.save(cfg, out / "config.json")

    total_steps = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))
    # A budgeted run is short by construction: its warm-up is at most 10% of it, as for small images.
    warmup = warmup_steps_for(cfg.warmup_epochs, steps_per_epoch, total_steps,
                              small or bool(cfg.time_budget))
    schedule = Schedule(total_steps, warmup, scaled_lr(cfg.lr, cfg.batch_size), cfg.tau_base)
    stop = min(total_steps, cfg.stop_at_step or total_steps)
    if state is not None:
        log.info("resumed %s at step %d of %d", out, step, total_steps)

    def save_checkpoint():
        # note: a host sync, once per checkpoint; a non-finite parameter never reaches the file.
        # Every rank checks and takes the same decision, so none is left waiting in a collective.
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all().float()
        if dist.enabled:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            raise Diverged(f"non-finite parameters at step {step}; kept {out / 'checkpoint.pt'}")
        if not dist.is_main:
            return
        ckpt_io.save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                 rng=ckpt_io.rng_state(), config=dataclasses.asdict(cfg),
                                 num_classes=loader.num_classes, knn_random_init=knn_random,
                                 world_size=dist.world_size,
                                 grad_scaler=step_fn.scaler.state_dict() if step_fn.scaler else None,
                                 sampler=dict(epoch=step // steps_per_epoch,
                                              batch=step % steps_per_epoch)), out / "checkpoint.pt")

    if dist.is_main:
        images = (f"{len(loader.indices)} images (a fixed subset of {loader.dataset_size})"
                  if len(loader.indices) < loader.dataset_size else f"{loader.dataset_size} images")
        log.info("training %s (%s stem, %d px views) on %s: %s, %d classes, global batch %d, "
                 "%d steps (%.3g epochs), peak lr %.3g, tau_base %.4g, wd %.3g, %s, loader %s",
                 cfg.arch, cfg.stem, cfg.image_size, cfg.data, images, loader.num_classes,
                 cfg.batch_size, total_steps, cfg.epochs, schedule.peak_lr, cfg.tau_base,
                 cfg.weight_decay, f"{dist.world_size} x {device}, {cfg.precision}, compile "
                 f"{cfg.compile}", cfg.loader)
    bar = tqdm(total=stop * cfg.batch_size, initial=step * cfg.batch_size, unit="img",
               unit_scale=True, desc="BYOL", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.is_main)
    last = dict(lr=float("nan"), tau=float("nan"))

    def log_interval():
        n = step - meter.first_step
        if n == 0:
            return
        sums = meter.sums
        if dist.enabled:  # every rank sees the same values, and so takes the same NaN decision
            torch.distributed.all_reduce(sums)
            sums /= dist.world_size
        loss, byol, probe_loss, probe_acc = (sums / n).tolist()  # note: a host sync, once per interval
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} within steps {meter.first_step + 1}-{step}; training "
                           f"stopped and the last good checkpoint {out / 'checkpoint.pt'} is kept")
        elapsed = time.perf_counter() - meter.started
        record = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss, byol_loss=byol,
                      probe_loss=probe_loss, probe_acc=probe_acc, lr=last["lr"], tau=last["tau"],
                      img_per_s=n * cfg.batch_size / elapsed, data_wait=meter.waited / elapsed,
                      bad_files=len(loader.bad_files), wall_s=wall_s())
        if metrics:
            metrics.write(record)
        bar.set_postfix(loss=f"{byol:.3f}", probe=f"{probe_acc:.2f}", wait=f"{record['data_wait']:.0%}")
        meter.restart(step)

    def after_step(step_done, lr, tau):
        nonlocal step
        step, last["lr"], last["tau"] = step_done, lr, tau
        bar.update(cfg.batch_size)
        if step % cfg.log_every == 0:
            log_interval()
        if step % cfg.ckpt_every == 0:
            log_interval()  # the NaN check covers every step the checkpoint holds
            save_checkpoint()

    def after_epoch(step_done):
        epoch = step_done // steps_per_epoch
        if cfg.knn_every and step_done < stop and epoch % cfg.knn_every == 0:
            log_interval()  # the interval ends here: k-NN time counts in neither img/s nor data_wait
            t0 = time.perf_counter()
            top1 = knn(model.online["encoder"])
            log.info("epoch %d: k-NN top-1 %.2f%%", epoch, top1)
            if metrics:
                metrics.write(dict(step=step_done, epoch=float(epoch), knn_top1=top1,
                                   knn_s=round(time.perf_counter() - t0, 3), wall_s=wall_s()))
            meter.restart(step_done)

    model.train()
    meter.restart(step)
    try:
        loop.run(step, stop, schedule, after_step, after_epoch)
        log_interval()
        save_checkpoint()
    finally:
        loop.close()
        bar.close()
        if metrics and step < total_steps:
            metrics.close()

    if step < total_steps:
        log.info("stopped at step %d of %d (--stop-at-step); continue with --resume", step, total_steps)
        return dict(step=step, total_steps=total_steps)
    knn_online, knn_target = knn(model.online["encoder"]), knn(model.target["encoder"])
    if not dist.is_main:
        return {}
    metrics.write(dict(step=step, epoch=round(step / steps_per_epoch, 4), knn_top1=knn_online,
                       knn_target=knn_target, wall_s=wall_s()))
    metrics.close()
    torch.save(model.backbone_state_dict("online"), out / "backbone.pt")
    summary = dict(arch=cfg.arch, stem=cfg.stem, data=cfg.data, images=len(loader.indices),
                   steps=total_steps, epochs=cfg.epochs, knn_k=cfg.knn_k,
                   knn_samples=cfg.knn_samples, knn_random_init=knn_random,
                   knn_online=knn_online, knn_target=knn_target, world_size=dist.world_size,
                   bad_files=len(loader.bad_files), time_budget_min=cfg.time_budget, wall_s=wall_s())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    bank = f"{cfg.knn_samples} train / {cfg.knn_samples} val images" if cfg.knn_samples else "all images"
    print(f"\nk-NN top-1 on the validation split (k={cfg.knn_k}, {bank}), {cfg.arch}:\n"
          f"  random init    {knn_random:6.2f}%\n"
          f"  BYOL (online)  {summary['knn_online']:6.2f}%   ({summary['knn_online'] - knn_random:+.2f})\n"
          f"  BYOL (target)  {summary['knn_target']:6.2f}%\n"
          f"backbone weights for {backbone_class(cfg)}: {out / 'backbone.pt'}")
    return summary


def size_to_budget(cfg: Config, loop: Loop, model, optimizer, step_fn, dist: Dist, out: Path,
                   started: float, knn_s: float) -> None:
    """--time-budget: measure the step rate after compilation and one checkpoint's cost, then size
    the run (steps, epochs, preset) so that it ends, k-NN evaluations included, inside the budget."""
    budget_s = 60 * cfg.time_budget
    margin = budget_margin(budget_s)
    step_s = calibrate(loop, model, optimizer, step_fn, min_seconds=max(1.0, 0.01 * budget_s),
                       dist=dist, warmup=2 if cfg.compile == "off" else 5)
    t0 = time.perf_counter()
    if dist.is_main:  # what a checkpoint costs: the same write, to a scratch name
        scratch = out / "calibration.pt"
        ckpt_io.save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict()), scratch)
        scratch.unlink()
    ckpt_s = _slowest(time.perf_counter() - t0, dist)
    left = budget_s - _slowest(time.perf_counter() - started, dist) - margin  # alike on every rank
    steps = steps_for_budget(left, step_s, knn_s, ckpt_s, len(loop.loader), cfg.knn_every,
                             cfg.ckpt_every)
    if steps < 1:
        raise InputError(f"--time-budget {cfg.time_budget:g}: {max(0.0, left):.0f} s are left after "
                         f"setup, compilation and the k-NN at random init ({knn_s:.0f} s, and as much "
                         f"per evaluation), too few for one {step_s:.2f} s step: give more minutes")
    config_mod.set_length(cfg, steps, len(loop.loader))
    for group in optimizer.param_groups:  # the preset's weight decay, where decay applies
        if group["adapt"]:
            group["weight_decay"] = cfg.weight_decay
    log.info("--time-budget %g min: %.4f s/step after compilation, k-NN %.1f s, checkpoint %.2f s, "
             "%.0f s kept back: %d steps (%.3g epochs) and the preset nearest that", cfg.time_budget,
             step_s, knn_s, ckpt_s, margin, steps, cfg.epochs)


def backbone_class(cfg: Config) -> str:
    """What backbone.pt loads into, said in the run's last line."""
    if cfg.arch == "cnn4":
        return "fastbyol.model.CNN4()"
    stem = " after fastbyol.model.small_stem()" if cfg.stem == "small" else ""
    return f"torchvision.models.{cfg.arch}(){stem}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    dist_mod.configure_logging()
    try:
        cfg, given, _ = config_mod.parse_args(argv)
        if dist_mod.needs_launch(cfg.nproc):
            sys.exit(dist_mod.launch(cfg.nproc, "fastbyol.train", argv))
        train(cfg, given)
    except InputError as exc:
        print(f"fastbyol.train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Diverged as exc:
        print(f"fastbyol.train: diverged: {exc}", file=sys.stderr)
        sys.exit(3)
    finally:
        dist_mod.shutdown()


if __name__ == "__main__":
    main()
