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
from fastbyol.schedules import lr_at, scaled_lr, tau_at, warmup_steps_for
from fastbyol.step import BYOLStep
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
        from fastbyol.syncbn import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model.online_parameters(), cfg.weight_decay),
                     momentum=cfg.momentum, weight_decay=cfg.weight_decay, trust_coef=cfg.trust_coef,
                     foreach=cfg.fused)
    net = model
    if dist.enabled:
        # buffers are not broadcast: SyncBN keeps them equal on GPUs; rank 0's are the ones saved
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False, gradient_as_bucket_view=True)
    step_fn = BYOLStep(model, optimizer, net, precision=cfg.precision, compile=cfg.compile,
                       fused=cfg.fused)
    return model, optimizer, step_fn


def train(cfg: Config, given: dict) -> dict:
    cfg, out, device, dist, state = setup(cfg, given)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, out / "config.json")
    small = is_small(cfg)
    local_batch = cfg.batch_size // dist.world_size
    options = options_for(cfg.loader, cfg)
    loader = train_loader(cfg.loader, cfg.data, batch_size=local_batch, image_size=cfg.image_size,
                          small=small, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                          workers=cfg.workers, device=device, dtype=view_dtype(cfg.precision, device),
                          crop_scale=(cfg.crop_scale_min, 1.0), subset=cfg.subset, **options)
    model, optimizer, step_fn = build(cfg, loader.num_classes, device, dist)

    steps_per_epoch = len(loader)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    warmup = warmup_steps_for(cfg.warmup_epochs, steps_per_epoch, total_steps, small)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size)
    stop = min(total_steps, cfg.stop_at_step or total_steps)

    def knn(encoder) -> float:
        return knn_eval(encoder, Path(cfg.data), cfg.image_size, loader.num_classes, device,
                        cfg.knn_samples, cfg.knn_k, cfg.knn_temperature, cfg.workers, dist,
                        loader=cfg.loader, options=options)

    if state is None:
        step, knn_random = 0, knn(model.online["encoder"])
        log.info("k-NN top-1 at random init: %.2f%%", knn_random)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if step_fn.scaler is not None and state.get("grad_scaler"):
            step_fn.scaler.load_state_dict(state["grad_scaler"])
        ckpt_io.set_rng_state(state["rng"])
        step, knn_random = state["step"], state["knn_random_init"]
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
                 cfg.arch, cfg.stem, cfg.image_size, cfg.data, images, loader.num_classes, cfg.batch_size, total_steps, cfg.epochs, peak_lr, cfg.tau_base,
                 cfg.weight_decay, f"{dist.world_size} x {device}, {cfg.precision}, compile "
                 f"{cfg.compile}", cfg.loader)
    metrics_file = open(out / "metrics.jsonl", "a") if dist.is_main else None
    bar = tqdm(total=stop * cfg.batch_size, initial=step * cfg.batch_size, unit="img",
               unit_scale=True, desc="BYOL", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.is_main)
    sums, interval_start, t_last, waited = torch.zeros(4, device=device), step, time.perf_counter(), 0.0

    def log_interval():
        nonlocal sums, interval_start, t_last, waited
        n = step - interval_start
        if n == 0:
            return
        if dist.enabled:  # every rank sees the same values, and so takes the same NaN decision
            torch.distributed.all_reduce(sums)
            sums /= dist.world_size
        loss, byol, probe_loss, probe_acc = (sums / n).tolist()  # note: a host sync, once per interval
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} within steps {interval_start + 1}-{step}; training stopped "
                           f"and the last good checkpoint {out / 'checkpoint.pt'} is kept")
        elapsed = time.perf_counter() - t_last
        record = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss, byol_loss=byol,
                      probe_loss=probe_loss, probe_acc=probe_acc, lr=lr, tau=tau,
                      img_per_s=n * cfg.batch_size / elapsed, data_wait=waited / elapsed,
                      bad_files=len(loader.bad_files))
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.set_postfix(loss=f"{byol:.3f}", probe=f"{probe_acc:.2f}", wait=f"{waited / elapsed:.0%}")
        sums.zero_()
        interval_start, t_last, waited = step, time.perf_counter(), 0.0

    model.train()
    lr = tau = float("nan")
    try:
        while step < stop:
            epoch, start_batch = divmod(step, steps_per_epoch)
            batches = iter(loader.epoch(epoch, start_batch))
            while step < stop:
                t0 = time.perf_counter()
                views = next(batches, None)
                waited += time.perf_counter() - t0
                if views is None:
                    break
                lr = lr_at(step, total_steps, warmup, peak_lr)
                tau = tau_at(step, total_steps, cfg.tau_base)
                sums += step_fn(views.v1, views.v2, views.labels, lr, tau)
                step += 1
                bar.update(cfg.batch_size)
                if step % cfg.log_every == 0:
                    log_interval()
                if step % cfg.ckpt_every == 0:
                    log_interval()  # the NaN check covers every step the checkpoint holds
                    save_checkpoint()
            if cfg.knn_every and step < stop and (epoch + 1) % cfg.knn_every == 0:
                log.info("epoch %d: k-NN top-1 %.2f%%", epoch + 1, knn(model.online["encoder"]))
        log_interval()
        save_checkpoint()
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    if step < total_steps:
        log.info("stopped at step %d of %d (--stop-at-step); continue with --resume", step, total_steps)
        return dict(step=step, total_steps=total_steps)
    knn_online, knn_target = knn(model.online["encoder"]), knn(model.target["encoder"])
    if not dist.is_main:
        return {}
    torch.save(model.backbone_state_dict("online"), out / "backbone.pt")
    summary = dict(arch=cfg.arch, stem=cfg.stem, data=cfg.data, images=len(loader.indices),
                   steps=total_steps, epochs=cfg.epochs, knn_k=cfg.knn_k,
                   knn_samples=cfg.knn_samples, knn_random_init=knn_random,
                   knn_online=knn_online, knn_target=knn_target, world_size=dist.world_size,
                   bad_files=len(loader.bad_files))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    bank = f"{cfg.knn_samples} train / {cfg.knn_samples} val images" if cfg.knn_samples else "all images"
    print(f"\nk-NN top-1 on the validation split (k={cfg.knn_k}, {bank}), {cfg.arch}:\n"
          f"  random init    {knn_random:6.2f}%\n"
          f"  BYOL (online)  {summary['knn_online']:6.2f}%   ({summary['knn_online'] - knn_random:+.2f})\n"
          f"  BYOL (target)  {summary['knn_target']:6.2f}%\n"
          f"backbone weights for {backbone_class(cfg)}: {out / 'backbone.pt'}")
    return summary


def backbone_class(cfg: Config) -> str:
    """What backbone.pt loads into, said in the run's last line."""
    if cfg.arch == "cnn4":
        return "fastbyol.model.CNN4()"
    stem = " after fastbyol.model.small_stem()" if cfg.stem == "small" else ""
    return f"torchvision.models.{cfg.arch}(){stem}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
