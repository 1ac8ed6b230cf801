"""`python -m fastbyol.bench e2e`: the real trainer loop (fastbyol.train.Loop, the model and the step
train.build makes) fed by a loader, against the same loop fed by synthetic views, in one run.

    python -m fastbyol.bench e2e --loader memory|dali|ffcv|torchvision|synthetic
                                 [--data DIR | --replicate N] [--arch resnet50] [--image-size 224]
                                 [--batch-size 256] [--steps 30] [--repeats 3] [--json PATH]
    python -m fastbyol.bench e2e --from-run RUN_DIR     (a training run's time to accuracy, as JSON)

"synthetic" is uint8 crops already resident on the device put through the photometric stage every
batch: what is left out is exactly reading, decoding and cropping. The stall ratio is the loader's
img/s over synthetic's (median of --repeats windows each); the baseline is the torchvision reference
loader with as many workers as the machine has cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastbyol import InputError
from fastbyol import config as config_mod
from fastbyol.bench.record import SEED_PHOTOS, device_name, results_line, sync
from fastbyol.dist import Dist
from fastbyol.kernels.augment import photometric
from fastbyol.pipelines import LOADERS, native_side, options_for, train_loader
from fastbyol.train import CALIBRATION, Loop, Meter, build
from fastbyol.views import Views, byol_view_specs, sample_view_params, view_dtype

HELP = "the trainer's loop fed by a loader vs by device-resident synthetic views: img/s, stall ratio"
SYNTHETIC = "synthetic"


class SyntheticLoader:
    """The loader interface over uint8 crops resident on the device (random pixels, one batch per
    view, drawn once): each batch draws its keyed view parameters and runs `photometric` on both
    views, as every loader does after cropping."""

    def __init__(self, *, batch_size: int, image_size: int, small: bool, seed: int, device,
                 dtype: torch.dtype, num_classes: int, batches: int = 1000,
                 crop_scale: tuple[float, float] = (0.08, 1.0)):
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (2, batch_size, 3, image_size, image_size)
        self.crops = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)
        self.labels = torch.randint(0, num_classes, (batch_size,), device=device, generator=gen)
        self.specs = byol_view_specs(image_size, small=small, scale=crop_scale)
        self.batch_size, self.seed, self.dtype, self.batches = batch_size, seed, dtype, batches
        self.sides = torch.full((batch_size,), image_size)
        self.num_classes, self.indices = num_classes, list(range(batches * batch_size))
        self.dataset_size, self.bad_files = len(self.indices), Counter()

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int, start_batch: int = 0):
        for batch in range(start_batch, self.batches):
            index = np.arange(batch * self.batch_size, (batch + 1) * self.batch_size)
            v1, v2 = (photometric(self.crops[view], sample_view_params(self.seed, epoch, index, view, spec,
                                                                       self.sides, self.sides),
                                  spec, self.dtype) for view, spec in enumerate(self.specs))
            yield Views(v1, v2, self.labels, torch.from_numpy(index).to(self.labels.device))


def photo_folder(count: int, destination: Path, max_side: int = 500) -> Path:
    """An ImageFolder `destination/train/<class>/` of `count` JPEGs: the seed photos resized to
    `max_side` (about an ImageNet photo) once, then linked round robin, so every file is its own
    sample to read and decode."""
    photos = sorted(SEED_PHOTOS.glob("*/*.jpg"))
    if not photos:
        raise InputError(f"{SEED_PHOTOS}: no seed photos (*/*.jpg); set FASTBYOL_SHARED_DATA")
    seeds = destination / "seeds"
    for photo in photos:
        target = seeds / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as img:
            img = img.convert("RGB")
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            img.save(target, quality=90)
    for i in range(count):
        seed = seeds / photos[i % len(photos)].parent.name / photos[i % len(photos)].name
        link = destination / "train" / seed.parent.name / f"{seed.stem}-{i // len(photos):05d}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(seed, link)
    return destination


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (/proc/stat): loader workers are
    other processes, so the machine's use is what a loader costs the host."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _measure(name: str, loader, step_fn, args, device) -> dict:
    """Warm-up, then `repeats` windows of `steps` steps of the trainer's loop on `loader`."""
    meter = Meter(device)
    loop = Loop(step_fn, loader, meter)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step = loop.run(0, args.warmup, CALIBRATION)
    meter.sums.tolist()  # note: a host sync: warm-up (and, the first time, compilation) done
    warmup_s = time.perf_counter() - t0
    windows = []
    for _ in range(args.repeats):
        sync(device)
        meter.restart(step)
        busy0, total0 = _busy_jiffies()
        start = time.perf_counter()
        step = loop.run(step, step + args.steps, CALIBRATION)
        meter.sums.tolist()  # note: a host sync: the window's steps have all run
        wall = time.perf_counter() - start
        busy1, total1 = _busy_jiffies()
        windows.append(dict(img_per_s=args.steps * args.batch_size / wall, data_wait=meter.waited / wall,
                            cpu_cores_busy=(busy1 - busy0) / max(1, total1 - total0) * os.cpu_count()))
    loop.close()
    result = dict(loader=name, warmup_s=round(warmup_s, 2), windows=windows,
                  **{key: round(statistics.median(w[key] for w in windows), 4) for key in windows[0]},
                  metrics_finite=bool(torch.isfinite(meter.sums).all()))
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loader", choices=(*LOADERS, SYNTHETIC), default="memory")
    parser.add_argument("--data", help="ImageFolder root (or a converted one for dali/ffcv)")
    parser.add_argument("--replicate", type=int, default=0,
                        help="no --data: this many linked copies of the seed photos (max side 500)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default: bf16 on GPUs, fp32 on the CPU")
    parser.add_argument("--compile", choices=config_mod.COMPILE_MODES, default=None,
                        help="default: default on GPUs, off on the CPU")
    parser.add_argument("--proj-hidden", type=int, default=4096)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per loader (median)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first, per loader")
    parser.add_argument("--workers", type=int, default=None, help="the loader's (default: as train)")
    parser.add_argument("--baseline-workers", type=int, default=os.cpu_count(),
                        help="the torchvision baseline's workers (default: the cores)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the torchvision baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--from-run", type=Path,
                        help="summarise a finished training run (time to accuracy) instead")
    parser.add_argument("--json", help="result file (default: benchmarks/results/e2e-<name>.json)")


def run(args, recorder) -> dict:
    if args.from_run:
        return quality(args.from_run, recorder)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="fastbyol-e2e-") as scratch:
        root = Path(args.data) if args.data else None
        if root is None:
            if not args.replicate:
                raise InputError("give --data DIR or --replicate N")
            root = photo_folder(args.replicate, Path(scratch))
        return _run(args, recorder, root, device)


def _run(args, recorder, root: Path, device: torch.device) -> dict:
    real = args.loader if args.loader != SYNTHETIC else "torchvision"  # the data's size and classes
    cfg = config_mod.resolve(config_mod.Config(
        data=str(root), loader=real, arch=args.arch, image_size=args.image_size,
        batch_size=args.batch_size, precision=args.precision, compile=args.compile, epochs=1.0,
        proj_hidden=args.proj_hidden, proj_dim=args.proj_dim, workers=args.workers,
        device=str(device)), device_type=device.type, embedded=False, native_side=native_side(real, root))
    small, dtype = config_mod.is_small(cfg), view_dtype(cfg.precision, device)

    def make(name: str, workers: int):
        if name == SYNTHETIC:
            return SyntheticLoader(batch_size=cfg.batch_size, image_size=cfg.image_size, small=small,
                                   seed=cfg.seed, device=device, dtype=dtype, num_classes=num_classes)
        return train_loader(name, root, batch_size=cfg.batch_size, image_size=cfg.image_size,
                            small=small, seed=cfg.seed, rank=0, world_size=1, workers=workers,
                            device=device, dtype=dtype, crop_scale=(cfg.crop_scale_min, 1.0),
                            subset=0, **options_for(name, cfg))

    paths = [(args.loader, cfg.workers)]
    if args.loader != SYNTHETIC:
        paths.append((SYNTHETIC, 0))
    if not args.no_baseline and (args.loader, cfg.workers) != ("torchvision", args.baseline_workers):
        paths.append(("torchvision", args.baseline_workers))
    # The data's loader first: its classes size the online probe (synthetic labels: 1000 classes).
    loader = make(*paths[0]) if args.loader != SYNTHETIC else None
    num_classes = loader.num_classes if loader is not None else 1000
    _, _, step_fn = build(cfg, num_classes, device, Dist())  # compiled once, for every path
    measured = []
    for name, workers in paths:
        loader = loader if loader is not None else make(name, workers)
        measured.append(dict(_measure(name, loader, step_fn, args, device), workers=workers))
        loader = None  # its memory (resident images, workers) goes before the next path's
        if device.type == "cuda":
            torch.cuda.empty_cache()
        recorder.save(dict(name=_name(args, device), rows=[], paths=measured))  # kept if a later path fails
    synthetic = next(m for m in measured if m["loader"] == SYNTHETIC)
    for m in measured:
        m["stall_ratio"] = round(m["img_per_s"] / synthetic["img_per_s"], 4)
    main = measured[0]
    baseline = next((m for m in measured[1:] if m["loader"] == "torchvision"), None)
    if baseline is None and not args.no_baseline:
        baseline = main  # --loader torchvision with the cores as workers: it is the baseline
    name = _name(args, device)
    summary = (f"e2e, {cfg.arch} {cfg.image_size} px b{cfg.batch_size} {cfg.precision} compile "
               f"{cfg.compile}, {device_name(device)}: {args.loader} {main['img_per_s']:,.0f} img/s, "
               f"stall ratio {main['stall_ratio']:.3f} (synthetic {synthetic['img_per_s']:,.0f} img/s"
               + (f"; torchvision with {baseline['workers']} workers {baseline['img_per_s']:,.0f} img/s"
                  if baseline else "") + f"), host blocked on the loader {main['data_wait']:.1%}")
    rows = [{"loader": m["loader"], "workers": m["workers"], "img/s": m["img_per_s"],
             "stall ratio": m["stall_ratio"], "data wait": m["data_wait"],
             "CPU cores busy": m["cpu_cores_busy"], "peak GiB": m.get("peak_memory_gib"),
             "warm-up s": m["warmup_s"]} for m in measured]
    result = dict(name=name, rows=rows, device=device_name(device), loader=args.loader,
                  img_per_s=main["img_per_s"], stall_ratio=main["stall_ratio"],
                  data_wait=main["data_wait"], cpu_cores_busy=main["cpu_cores_busy"],
                  peak_memory_gib=main.get("peak_memory_gib"),
                  synthetic=dict(img_per_s=synthetic["img_per_s"]),
                  baseline=None if baseline is None else dict(
                      loader="torchvision", workers=baseline["workers"], img_per_s=baseline["img_per_s"],
                      stall_ratio=baseline["stall_ratio"], data_wait=baseline["data_wait"]),
                  paths=measured, data=str(root) if args.data else f"{args.replicate} linked copies "
                  f"of the {SEED_PHOTOS} photos at max side 500",
                  settings=dict(arch=cfg.arch, image_size=cfg.image_size, batch_size=cfg.batch_size,
                                precision=cfg.precision, compile=cfg.compile, steps=args.steps,
                                repeats=args.repeats, warmup=args.warmup, workers=cfg.workers),
                  timing="img/s = source images per second over a window of `steps` steps of "
                         "fastbyol.train.Loop between two host syncs, median of `repeats` windows, "
                         "after `warmup` steps; data_wait = the window's share of host time blocked "
                         "on the loader; cpu_cores_busy = machine-wide busy cores (/proc/stat)")
    result["results_line"] = results_line(summary, recorder.path(name))
    print(result["results_line"])
    return result


def _name(args, device) -> str:
    return f"{args.loader}-{args.arch}-{args.image_size}px-b{args.batch_size}-{device_name(device)}"


def minutes_to(records: list[dict], top1: float) -> float | None:
    """Wall minutes (from the start of training) at the first k-NN evaluation reaching top1 (%)."""
    return next((round(r["wall_s"] / 60, 2) for r in records if r["knn_top1"] >= top1), None)


def quality(run_dir: Path, recorder) -> dict:
    """A finished run's time to accuracy: final k-NN, wall time, minutes to 80% and 85%, img/s."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as exc:
        raise InputError(f"{run_dir}: not a finished fastbyol run ({exc})") from exc
    knn = [line for line in lines if "knn_top1" in line]
    trained = [line for line in lines if "img_per_s" in line]
    img_per_s = statistics.median(line["img_per_s"] for line in trained)
    batches = summary["images"] // cfg["batch_size"]
    device = torch.cuda.get_device_name().replace(" ", "-").lower() if torch.cuda.is_available() else "cpu"
    name = f"quality-{cfg['arch']}-{Path(cfg['data']).name}-b{cfg['batch_size']}-{device}"
    result = dict(name=name, device=device, loader=cfg["loader"], img_per_s=round(img_per_s, 1),
                  stall_ratio=None, baseline=None, knn_top1=summary["knn_online"],
                  knn_target=summary["knn_target"], knn_k=summary["knn_k"],
                  knn_samples=summary["knn_samples"], wall_s=summary["wall_s"],
                  **{"minutes_to_0.80": minutes_to(knn, 80.0), "minutes_to_0.85": minutes_to(knn, 85.0)},
                  epoch_s=round(batches * cfg["batch_size"] / img_per_s, 2), steps=summary["steps"],
                  epochs=cfg["epochs"], time_budget_min=cfg["time_budget"],
                  data_wait=round(statistics.median(line["data_wait"] for line in trained), 4),
                  knn_curve=[dict(wall_s=r["wall_s"], epoch=r["epoch"], knn_top1=r["knn_top1"]) for r in knn],
                  run_config=cfg)
    reached = result["minutes_to_0.80"]
    summary_text = (f"quality, {cfg['arch']} on {Path(cfg['data']).name}, b{cfg['batch_size']}, "
                    f"{cfg['loader']} loader, --time-budget {cfg['time_budget']:g} min, {device}: k-NN "
                    f"(k={summary['knn_k']}) {summary['knn_online']:.2f}% after {summary['wall_s'] / 60:.1f} "
                    f"min; 0.80 {'at %.1f min' % reached if reached else 'not reached'}; epoch "
                    f"{result['epoch_s']:.1f} s at {img_per_s:,.0f} img/s")
    result["results_line"] = results_line(summary_text, recorder.path(name))
    result["rows"] = [{"wall min": round(r["wall_s"] / 60, 2), "epoch": r["epoch"], "k-NN top-1": r["knn_top1"]}
                      for r in knn]
    print(result["results_line"])
    return result
