"""`python -m fastbyol.bench loader`: img/s of a loader alone (both views, on the device, in the
step's dtype), with baselines in the same run.

    python -m fastbyol.bench loader --data DIR [--loader dali|torchvision|memory|ffcv]
        [--baselines torchvision,dali-colour,ffcv-stock] [--batch-size 256] [--image-size 224]
        [--batches 20] [--warmup 3] [--workers N] [--hw-decoder-load 0.65 ...] [--json PATH]
        [--ffcv-decode cpu gpu] [--crop-on device cpu] [--host-only]

DIR is an ImageFolder (benchmarks/make_bench_folder.py makes the benchmark one); the loaders that read
a converter output (dali, ffcv) get DIR converted first, beside it (DIR-dali, DIR-ffcv; kept for the
next run). img/s counts source images, each yielding two views. Baselines:
  torchvision  the reference loader with a worker per core;
  dali-colour  DALI with its own ops in a fixed order in place of ours (solo-learn's design):
               random_resized_crop, flip, then brightness/contrast, saturation, hue, grayscale, blur,
               solarize, each applied with its probability, always in this order;
  ffcv-stock   FFCV's stock two-view pipeline (fastbyol.bench.ffcv_stock; skipped when absent).
Several --hw-decoder-load values give one dali row each; for --loader ffcv, each --ffcv-decode value
gives a row, the cpu one a row per --crop-on value (the designs: (a) "device", (b) "cpu").
--host-only (ffcv, cpu decode) times the host's side alone: FFCV's threads decoding (and for (b)
resizing) and the copy of each batch into one staging buffer, with the bytes per image that would cross
to the device; the device's work is left out, so the designs compare on what the host pays.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from fastbyol import InputError
from fastbyol.bench.record import device_name, sync
from fastbyol.views import byol_view_specs, view_dtype

HELP = "img/s of a loader alone (two views at 224 px), beside the reference and DALI's own colour ops"
LOADER_NAMES = ("dali", "torchvision", "memory", "ffcv")
BASELINES = ("torchvision", "dali-colour", "ffcv-stock")
KERNEL_PASSES = 5  # --host-only's kernel timings: the median pass (single passes vary by a quarter here)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="an ImageFolder (DIR/train/<class>/*.jpg)")
    parser.add_argument("--loader", default="dali", choices=LOADER_NAMES)
    parser.add_argument("--baselines", default="torchvision,dali-colour",
                        help=f"comma-separated, from {', '.join(BASELINES)}; '' for none")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=3, help="batches before the timing")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: one per core)")
    parser.add_argument("--hw-decoder-load", type=float, nargs="+", default=[0.65],
                        help="--loader dali: one row per value")
    parser.add_argument("--ffcv-decode", nargs="+", default=["cpu"], choices=("cpu", "gpu"),
                        help="--loader ffcv: one row per value")
    parser.add_argument("--crop-on", nargs="+", default=["device"], choices=("device", "cpu"),
                        help="--loader ffcv, cpu decode: one row per value (design (a) device, (b) cpu)")
    parser.add_argument("--host-only", action="store_true",
                        help="--loader ffcv, cpu decode: time the host's side only (no device work)")
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--json", help="where to write the result (default benchmarks/results/)")


def _converted(data: Path, target: str, workers: int) -> Path:
    from fastbyol.convert import convert, default_out
    out = default_out(data, target)
    convert(data, target, out, workers=workers)  # returns at once when out is complete
    return out


def _rate(batches, args, device) -> dict:
    """img/s over args.batches batches of an iterator of batches, after args.warmup."""
    it = iter(batches)
    start = time.perf_counter()
    for _ in range(args.warmup):
        next(it)
    sync(device)
    warm = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    sync(device)
    end = time.perf_counter()
    if hasattr(it, "close"):
        it.close()
    return dict(img_per_s=round(args.batches * args.batch_size / (end - warm), 1),
                startup_s=round(warm - start, 2))


def _epochs(loader):
    """Batches of epochs 0, 1, ... back to back (a short epoch does not end the timing)."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def loader_rate(name: str, args, device, workers: int, **options) -> dict:
    from fastbyol.pipelines import train_loader
    data = Path(args.data)
    root = _converted(data, name, workers) if name in ("dali", "ffcv") else data
    loader = train_loader(name, root, batch_size=args.batch_size, image_size=args.image_size,
                          small=args.image_size <= 64, seed=0, workers=workers, device=device,
                          dtype=view_dtype(args.precision, device), **options)
    return _rate(_epochs(loader), args, device)


def ffcv_host_rate(args, workers: int, crop_on: str) -> dict:
    """img/s of the FFCV loader's host side alone (cpu decode): its jobs as the prefetcher receives them
    (FFCV's threads decode, and for crop_on="cpu" resize both views), each copied into one staging
    buffer as `to_device` does before its copy (a reused one, as the pinned caching allocator's
    blocks are); plus the kB per image that buffer carries and the main thread's ms per image in
    that copy."""
    from fastbyol.pipelines.ffcv import FfcvLoader
    from fastbyol.pipelines.prefetch import through_one_buffer
    loader = FfcvLoader(_converted(Path(args.data), "ffcv", workers), batch_size=args.batch_size,
                        image_size=args.image_size, small=args.image_size <= 64, seed=0, workers=workers,
                        device="cpu", crop_on=crop_on)
    staged, staging_s, reuse = [], [], torch.empty(0, dtype=torch.uint8)

    def batches():
        nonlocal reuse
        epoch = 0
        while True:
            for job in loader.host_jobs(epoch):
                start = time.perf_counter()
                job = through_one_buffer(job, lambda staging: staged.append(staging.numel()) or staging,
                                         pin=False, reuse=reuse)
                if reuse.numel() < staged[-1]:
                    reuse = torch.empty(2 * staged[-1], dtype=torch.uint8)
                staging_s.append(time.perf_counter() - start)
                yield job
            epoch += 1

    row = _rate(batches(), args, torch.device("cpu"))
    timed = staging_s[args.warmup:args.warmup + args.batches]
    return row | dict(staged_kb_per_img=round(sum(staged) / len(staged) / args.batch_size / 1024, 1),
                      staging_ms_per_img=round(1e3 * sum(timed) / len(timed) / args.batch_size, 3))


def ffcv_kernel_costs(args, workers: int, images: int = 200) -> dict:
    """ms per image of each numba kernel of the FFCV loader, one thread, on the .beton's first
    `images` images with the sampler's epoch-0 boxes: decode (libjpeg-turbo), to_chw (design (a)'s
    repack) and resize_view (design (b), per view); the median of KERNEL_PASSES passes after one that
    compiles."""
    import numpy as np

    from fastbyol.pipelines.ffcv import _kernels, beton_path, open_beton
    from fastbyol.views import sample_view_params
    reader = open_beton(beton_path(_converted(Path(args.data), "ffcv", workers), "train"))
    meta = reader.metadata["f0"][:images]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    raw = np.memmap(reader.file_name, np.uint8, mode="r")
    data = [raw[int(p):int(p) + sizes[int(p)]] for p in meta["data_ptr"]]
    heights, widths = torch.from_numpy(meta["height"].astype(np.int64)), torch.from_numpy(meta["width"].astype(np.int64))
    spec = byol_view_specs(args.image_size, small=args.image_size <= 64)[0]
    boxes = sample_view_params(0, 0, torch.arange(len(meta)), 0, spec, heights, widths)
    kernels = _kernels(True)
    hwc = np.empty(int((heights * widths).max()) * 3, np.uint8)
    chw, view = np.empty_like(hwc), np.empty((3, spec.size, spec.size), np.uint8)
    passes = []  # seconds per kernel over all the images, per pass; the first pass compiles
    for _ in range(1 + KERNEL_PASSES):
        seconds = dict(decode=0.0, to_chw=0.0, resize_view=0.0)
        for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):
            start = time.perf_counter()
            kernels.decode(data[i], int(meta["mode"][i]), h, w, hwc)
            decoded = time.perf_counter()
            kernels.to_chw(hwc, h, w, chw)
            repacked = time.perf_counter()
            kernels.resize_view(hwc, w, *boxes.crop[i].tolist(), int(boxes.flip[i]), view)
            seconds["decode"] += decoded - start
            seconds["to_chw"] += repacked - decoded
            seconds["resize_view"] += time.perf_counter() - repacked
        passes.append(seconds)
    return {f"{name}_ms_per_img": round(1e3 * statistics.median(p[name] for p in passes[1:]) / len(meta), 3)
            for name in passes[0]} | dict(images=len(meta), passes=KERNEL_PASSES,
                                          mean_pixels=int((heights * widths).float().mean()))


def dali_fixed_order_colour(fn, types, view, spec):
    """DALI's own colour ops on a uint8 HWC view, in solo-learn's fixed order: brightness/contrast,
    saturation, hue, grayscale, blur, solarize, each applied with the recipe's probability through a
    per-sample mux (our engine draws the jitter order per sample instead)."""
    def chance(p):
        return fn.random.coin_flip(probability=p, dtype=types.BOOL)

    def mux(condition, then, otherwise):
        condition = fn.cast(condition, dtype=types.UINT8)
        return fn.cast(condition * then + (1 - condition) * otherwise, dtype=types.UINT8)  # solo-learn's Mux

    jittered = fn.brightness_contrast(
        view, brightness=fn.random.uniform(range=(1 - spec.brightness, 1 + spec.brightness)),
        contrast=fn.random.uniform(range=(1 - spec.contrast, 1 + spec.contrast)))
    jittered = fn.hsv(jittered, saturation=fn.random.uniform(range=(1 - spec.saturation, 1 + spec.saturation)),
                      hue=fn.random.uniform(range=(-360 * spec.hue, 360 * spec.hue)))
    view = mux(chance(spec.jitter_p), jittered, view)
    gray = fn.color_space_conversion(fn.color_space_conversion(view, image_type=types.RGB,
                                                               output_type=types.GRAY),
                                     image_type=types.GRAY, output_type=types.RGB)
    view = mux(chance(spec.gray_p), gray, view)
    if spec.blur_p > 0:
        blurred = fn.gaussian_blur(view, window_size=spec.blur_kernel,
                                   sigma=fn.random.uniform(range=spec.blur_sigma))
        view = mux(chance(spec.blur_p), blurred, view)
    if spec.solarize_p > 0:
        solarized = mux(view >= 128, 255 - view, view)
        view = mux(chance(spec.solarize_p), solarized, view)
    return view


def dali_colour_ops_rate(args, device, workers: int, hw_decoder_load: float = 0.65) -> dict:
    """DALI with its own colour ops in a fixed order (solo-learn's design) instead of ours: file
    reader, one decode, per view random_resized_crop, flip, then brightness/contrast, saturation, hue,
    grayscale, blur and solarize, each applied with the recipe's probability via a per-sample mux,
    always in this order; crop_mirror_normalize to the views' dtype, channels-first."""
    from fastbyol.dali_lists import file_list
    from fastbyol.pipelines.dali import gpu_index, import_dali
    fn, types, pipeline_def = import_dali()
    out = _converted(Path(args.data), "dali", workers)
    files = file_list(out, "train")
    gpu = device.type == "cuda"
    specs = byol_view_specs(args.image_size, small=args.image_size <= 64)
    dtype = {torch.bfloat16: types.FLOAT16, torch.float16: types.FLOAT16}.get(
        view_dtype(args.precision, device), types.FLOAT)  # DALI has no bf16: fp16, the same bytes
    mean, std = [255 * m for m in (0.485, 0.456, 0.406)], [255 * s for s in (0.229, 0.224, 0.225)]

    @pipeline_def(batch_size=args.batch_size, num_threads=max(1, min(workers, 8)),
                  device_id=gpu_index(device) if gpu else None, exec_dynamic=True)
    def fixed_order():
        encoded, _ = fn.readers.file(files=[p for p, _ in files], labels=[label for _, label in files],
                                     random_shuffle=True, name="reader")
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   **({"hw_decoder_load": hw_decoder_load} if gpu else {}))
        views = []
        for spec in specs:
            view = fn.random_resized_crop(images, size=(spec.size, spec.size), random_area=spec.scale,
                                          random_aspect_ratio=spec.ratio, interp_type=types.INTERP_CUBIC)
            view = dali_fixed_order_colour(fn, types, view, spec)
            views.append(fn.crop_mirror_normalize(view, dtype=dtype, output_layout="CHW", mean=mean,
                                                  std=std, mirror=fn.random.coin_flip(probability=spec.flip_p)))
        return tuple(views)

    pipe = fixed_order()
    pipe.build()

    def batches():
        from fastbyol.pipelines.dali import _to_torch
        while True:
            yield [_to_torch(view, device) for view in pipe.run()]

    return _rate(batches(), args, device)


def run(args, recorder) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers or len(os.sched_getaffinity(0))
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise InputError(f"--baselines {','.join(unknown)}: choose from {', '.join(BASELINES)}")
    if not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: no such folder")
    result = dict(name=f"{args.loader}-{device_name(device)}", device=device_name(device),
                  batch_size=args.batch_size, image_size=args.image_size, workers=workers, rows=[])

    def measure(path: str, what, **settings) -> None:
        row = dict(path=path, img_per_s=None, startup_s=None, hw_decoder_load=None, note="")
        row.update(settings)
        try:
            row.update(what())
        except (ImportError, AttributeError, ModuleNotFoundError) as err:
            row["note"] = f"skipped: {type(err).__name__}: {err}"
        print(f"{path}: {row}", flush=True)
        result["rows"].append(row)
        recorder.save(result)

    if args.loader == "dali":
        for load in args.hw_decoder_load:
            measure("ours: dali", lambda: loader_rate("dali", args, device, workers, hw_decoder_load=load),
                    hw_decoder_load=load)
    elif args.loader == "ffcv":
        if args.host_only:
            measure("ffcv numba kernels, 1 thread (ms per image; resize_view per view)",
                    lambda: ffcv_kernel_costs(args, workers))
        for decode in args.ffcv_decode:
            for crop_on in args.crop_on if decode == "cpu" else ["device"]:
                design = "" if decode == "gpu" else {"device": ", (a) crop on the device", "cpu": ", (b) crop in numba"}[crop_on]
                path = f"ours: ffcv, {decode} decode{design}"
                if args.host_only and decode == "cpu":
                    measure(f"{path}, host side only", lambda: ffcv_host_rate(args, workers, crop_on))
                elif args.host_only:
                    measure(path, lambda: dict(note="skipped: --host-only times the cpu decode designs"))
                else:
                    measure(path, lambda: loader_rate("ffcv", args, device, workers, ffcv_decode=decode,
                                                      crop_on=crop_on))
    else:
        measure(f"ours: {args.loader}", lambda: loader_rate(args.loader, args, device, workers))
    if "torchvision" in baselines:
        measure(f"baseline: torchvision, {workers} workers",
                lambda: loader_rate("torchvision", args, device, workers))
    if "dali-colour" in baselines:
        load = args.hw_decoder_load[0]
        measure("baseline: dali-colour (DALI's ops, fixed order)",
                lambda: dali_colour_ops_rate(args, device, workers, load), hw_decoder_load=load)
    if "ffcv-stock" in baselines:
        def stock():
            from fastbyol.bench.ffcv_stock import run_stock
            stock_args = argparse.Namespace(**{**vars(args), "data": str(_converted(Path(args.data), "ffcv", workers)),
                                               "workers": workers, "device": str(device)})
            row = run_stock(stock_args)
            return {k: row[k] for k in ("img_per_s", "startup_s") if k in row} | {"note": row.get("note", "")}
        measure("baseline: ffcv-stock", stock)
    return result
