"""`python -m fastbyol.bench augment`: the view engine (crop-resize + photometric, both views) in one
run, three ways on the same decoded images and parameters: our Triton kernels, the batched torch twin
(photometric_batched), and torchvision per sample; each path's crop-resize and photometric timed
apart and together.

    python -m fastbyol.bench augment [--batch-size 256] [--image-size 224] [--steps 20] [--triton]
                                     [--dali] [--device auto] [--json PATH]

On a GPU every path runs on the device. On the CPU it defaults to tiny sizes and leaves the Triton row
out (Triton's interpreter is a test tool, not a speed) unless --triton asks for it.
--dali adds DALI's own colour ops in a fixed order (solo-learn's design) on the same crops, both views,
normalize included (needs DALI: the `dali` extra).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fastbyol import InputError
from fastbyol.bench.record import SEED_PHOTOS, device_name, sync, timed
from fastbyol.kernels.augment import normalize, photometric, photometric_batched, photometric_reference
from fastbyol.kernels.crop_resize import crop_and_flip, crop_resize, pack_images
from fastbyol.views import IMAGENET_MEAN, IMAGENET_STD, byol_view_specs, sample_view_params, view_dtype

HELP = "view engine img/s: Triton kernels vs photometric_batched vs torchvision per sample (both views)"


def _source_images(count: int, max_side: int) -> tuple[list[torch.Tensor], str]:
    """`count` decoded uint8 images: the seed photos (cycled) shrunk to max_side, as an ImageNet-like
    mix of sizes and content; smooth random images where the photos are missing."""
    files = sorted(SEED_PHOTOS.glob("*/*.jpg")) if SEED_PHOTOS.is_dir() else []
    if files:
        from PIL import Image, ImageOps
        decoded = []
        for file in files[:count]:
            image = ImageOps.exif_transpose(Image.open(file)).convert("RGB")
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            decoded.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous())
        return [decoded[i % len(decoded)] for i in range(count)], f"{len(decoded)} seed photos, max side {max_side}"
    gen = torch.Generator().manual_seed(0)
    sizes = [(max_side * 3 // 4 + i % 7, max_side - i % 5) for i in range(count)]
    images = [(torch.rand(3, h // 8, w // 8, generator=gen) * 255).to(torch.uint8) for h, w in sizes]
    images = [torch.nn.functional.interpolate(img[None].float(), size=s, mode="bilinear")[0].to(torch.uint8)
              for img, s in zip(images, sizes)]
    return images, f"synthetic smooth images about {max_side}x{max_side * 3 // 4}"


def _paths(packed, images_on_device, params, specs, size, dtype):
    """For each path, its (crop-resize, photometric) callables over both views; photometric takes the
    crop stage's output."""
    def crops(backend):
        return lambda: [crop_resize(packed, p.crop, p.flip, size, backend=backend) for p in params]

    def colour(backend):
        return lambda views: [photometric(v, p, spec, dtype, backend=backend)
                              for v, p, spec in zip(views, params, specs)]

    def torchvision_crops():
        return [torch.stack([crop_and_flip(img, p.crop[i].tolist(), bool(p.flip[i]), size)
                             for i, img in enumerate(images_on_device)]) for p in params]

    def torchvision_colour(views):
        return [normalize(torch.stack([photometric_reference(img, p.row(i), spec) for i, img in enumerate(v)]),
                          dtype) for v, p, spec in zip(views, params, specs)]

    def batched_colour(views):
        return [normalize(photometric_batched(v, p, spec), dtype) for v, p, spec in zip(views, params, specs)]

    return {"triton": (crops("triton"), colour("triton")),
            "photometric_batched": (crops("torch"), batched_colour),
            "torchvision per sample": (torchvision_crops, torchvision_colour)}


def _measure(name, crop_fn, colour_fn, steps, warmup, batch, device, budget_s) -> list[dict]:
    """Time crop-resize, photometric and both, after `warmup` untimed batches; a path slower than
    budget_s per measurement gets fewer timed batches (at least 2), so that the per-sample baseline
    fits a GPU stage's time limit."""
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):  # compilation and autotuning happen here, outside the timing
        views = crop_fn()
        colour_fn(views)
        sync(device)
    warmup_s = time.perf_counter() - t0
    steps = max(2, min(steps, int(budget_s * max(1, warmup) / warmup_s)))
    views = crop_fn()
    per = {"crop-resize": timed(crop_fn, steps, device),
           "photometric": timed(lambda: colour_fn(views), steps, device),
           "both": timed(lambda: colour_fn(crop_fn()), steps, device)}
    return [dict(path=name, stage=stage, ms_per_batch=round(1e3 * seconds, 3),
                 img_per_s=round(batch / seconds, 1), steps=steps, warmup_s=round(warmup_s, 2))
            for stage, seconds in per.items()]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=None, help="source images per batch "
                        "(default: 256 on a GPU, 16 on the CPU)")
    parser.add_argument("--image-size", type=int, default=None, help="view side (default: 224 on a "
                        "GPU, 32 on the CPU)")
    parser.add_argument("--source-side", type=int, default=None, help="longer side of the decoded "
                        "images (default: 500 on a GPU, 64 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed batches per measurement "
                        "(default: 20 on a GPU, 2 on the CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (compilation)")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds a path may spend per "
                        "measurement: slower paths time fewer batches (at least 2)")
    parser.add_argument("--triton", action="store_true", help="on the CPU, also time the Triton "
                        "kernels through the interpreter")
    parser.add_argument("--skip-torchvision", action="store_true", help="leave out the per-sample row")
    parser.add_argument("--dali", action="store_true", help="add DALI's own colour ops in a fixed "
                        "order (needs the dali extra)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="the views' dtype, by the view_dtype rule (fp32 on the CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="result file (default: benchmarks/results/augment-<name>.json)")


def run(args, recorder) -> dict:
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    batch = args.batch_size or (256 if gpu else 16)
    size = args.image_size or (224 if gpu else 32)
    steps = args.steps or (20 if gpu else 2)
    dtype = view_dtype(args.precision, device)
    sources, source_note = _source_images(batch, args.source_side or (500 if gpu else 64))
    specs = byol_view_specs(size, small=size <= 64)
    heights = torch.tensor([img.shape[1] for img in sources])
    widths = torch.tensor([img.shape[2] for img in sources])
    # Parameters stay on the CPU, as the sampler gives them to every loader.
    params = [sample_view_params(0, 0, range(batch), view, spec, heights, widths)
              for view, spec in enumerate(specs)]
    packed = pack_images(sources, device)
    on_device = [img.to(device) for img in sources]
    paths = _paths(packed, on_device, params, specs, size, dtype)
    if not gpu and not args.triton:
        del paths["triton"]
    if args.skip_torchvision:
        del paths["torchvision per sample"]
    result = dict(name=f"{size}px-b{batch}-{device_name(device)}", rows=[],
                  settings=dict(batch_size=batch, image_size=size, steps=steps, warmup=args.warmup,
                                dtype=str(dtype), device=str(device), sources=source_note,
                                specs=[repr(spec) for spec in specs]),
                  timing="ms per batch = wall time of a row's `steps` batches between two device "
                         "syncs, both views, after `warmup` untimed batches (slow paths time fewer "
                         "batches, see --budget); img/s = source images per second (each gives two "
                         "views); params drawn on the CPU beforehand, uploaded inside the timing")
    for name, (crop_fn, colour_fn) in paths.items():
        result["rows"] += _measure(name, crop_fn, colour_fn, steps, args.warmup, batch, device, args.budget)
        recorder.save(result)
    if args.dali:
        views = crop_resize(packed, params[0].crop, params[0].flip, size)
        result["rows"].append(_dali_row(views, specs, steps, args.warmup, device, dtype))
    baseline = {row["stage"]: row["ms_per_batch"] for row in result["rows"]
                if row["path"] == "photometric_batched"}
    for row in result["rows"]:
        row["vs photometric_batched"] = (round(baseline[row["stage"]] / row["ms_per_batch"], 2)
                                         if row["stage"] in baseline and row["ms_per_batch"] else None)
    return result


def _dali_row(views: torch.Tensor, specs, steps: int, warmup: int, device, dtype) -> dict:
    """DALI's own colour ops in a fixed order (solo-learn's design: fastbyol.bench.loader's
    dali_fixed_order_colour), both views, on the same uint8 crops the other rows colour, resident
    where DALI runs them; normalize included."""
    row = dict(path="dali colour ops (fixed order)", stage="photometric", ms_per_batch=None,
               img_per_s=None, steps=steps, warmup_s=None)
    try:
        from fastbyol.bench.loader import dali_fixed_order_colour
        from fastbyol.pipelines.dali import _to_torch, gpu_index, import_dali
        fn, types, pipeline_def = import_dali()
    except (ImportError, InputError) as err:
        row["note"] = f"not measured: {err}"
        return row
    gpu = device.type == "cuda"
    hwc = views.permute(0, 2, 3, 1).contiguous()
    batch = [hwc[i] if gpu else hwc[i].numpy() for i in range(len(hwc))]  # CUDA arrays or numpy
    out_dtype = types.FLOAT16 if dtype in (torch.bfloat16, torch.float16) else types.FLOAT
    mean, std = [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]

    @pipeline_def(batch_size=len(batch), num_threads=2, device_id=gpu_index(device) if gpu else None,
                  exec_dynamic=True)
    def colour_only():
        images = fn.external_source(source=lambda: batch, device="gpu" if gpu else "cpu", layout="HWC",
                                    batch=True)
        return tuple(fn.crop_mirror_normalize(dali_fixed_order_colour(fn, types, images, spec),
                                              dtype=out_dtype, output_layout="CHW", mean=mean, std=std)
                     for spec in specs)

    pipe = colour_only()
    pipe.build()

    def one_batch():  # into torch as a loader takes them (DLPack, on torch's stream)
        return [_to_torch(view, device) for view in pipe.run()]

    started = time.perf_counter()
    for _ in range(max(1, warmup)):
        one_batch()
    sync(device)
    warm = time.perf_counter()
    for _ in range(steps):
        one_batch()
    sync(device)
    seconds = (time.perf_counter() - warm) / steps
    row.update(ms_per_batch=round(1e3 * seconds, 3), img_per_s=round(len(batch) / seconds, 1),
               warmup_s=round(warm - started, 2))
    return row
