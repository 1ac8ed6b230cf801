"""FFCV's stock pipeline, as FFCV-SSL and most users run it for two-view SSL: the baseline row of
`python -m fastbyol.bench loader --baselines ffcv-stock`.

Two image pipelines over the one image field, each `RandomResizedCropRGBImageDecoder` (decode and
crop fused: two full decodes per image, INTER_AREA resizing), then ToTensor, ToDevice, ToTorchImage,
and torchvision's v2 colour ops on the device over the whole batch, with ONE draw of their random
parameters per batch (the recipe's ops, each view with its own blur / solarize probabilities).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _colour(spec, small: bool):
    """torchvision v2 colour ops for one view: applied to a batch tensor, one draw for all of it."""
    import torchvision.transforms.v2 as T
    ops = [T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                         p=spec.jitter_p),
           T.RandomGrayscale(p=spec.gray_p)]
    if not small and spec.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(spec.blur_kernel, spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=spec.solarize_p))
    return T.Compose(ops)


def run_stock(args) -> dict:
    """Time FFCV's stock two-view pipeline on args.data (the converter's output folder, or a .beton).
    Reads args: data, batch_size, image_size, workers, device, batches, warmup, os_cache, precision
    (absent ones take defaults). Returns one row: img/s (source images, two views each)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    from fastbyol.kernels.augment import normalize
    from fastbyol.pipelines.ffcv import beton_path, open_beton
    from fastbyol.views import byol_view_specs, view_dtype

    size = getattr(args, "image_size", 224)
    batch_size = getattr(args, "batch_size", 256)
    workers = getattr(args, "workers", None) or os.cpu_count()
    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches, warmup = getattr(args, "batches", 20), getattr(args, "warmup", 3)
    dtype = view_dtype(getattr(args, "precision", "bf16"), device)
    small = size <= 64
    path = beton_path(args.data, "train")
    open_beton(path)
    specs = byol_view_specs(size, small=small)

    def view_pipeline():
        return [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip(), ToTensor(),
                ToDevice(device, non_blocking=True), ToTorchImage()]

    start = time.perf_counter()
    loader = Loader(str(path), batch_size=batch_size, num_workers=workers,
                    os_cache=getattr(args, "os_cache", False), order=OrderOption.RANDOM, seed=0,
                    drop_last=True, pipelines={
                        "image": view_pipeline(),
                        "image2": PipelineSpec("image", transforms=view_pipeline()),
                        "label": [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]})
    colours = [_colour(spec, small) for spec in specs]
    wanted = warmup + batches
    seen, timed_from, images = 0, None, 0
    while seen < wanted:
        for v1, labels, v2 in loader:  # fields in file order, then the extra output "image2"
            if seen == warmup:  # compile, first decodes and allocations stay out of the timing
                if device.type == "cuda":
                    torch.cuda.synchronize()  # note: a host sync, once, to start the clock
                timed_from = time.perf_counter()
            views = [normalize(colour(view), dtype) for colour, view in zip(colours, (v1, v2))]
            seen += 1
            if seen > warmup:
                images += len(labels)
            if seen == wanted:
                break
        if seen == 0:
            raise ValueError(f"{path}: fewer images than one batch of {batch_size}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - timed_from if timed_from else float("nan")
    del views
    return dict(name="ffcv-stock", loader="ffcv-stock", decode="cpu (two decodes per image)",
                data=str(Path(args.data)), batch_size=batch_size, image_size=size, workers=workers,
                device=str(device), batches=batches, images=images, seconds=round(seconds, 3),
                img_per_s=round(images / seconds, 1) if seconds == seconds and seconds > 0 else None,
                startup_s=round(timed_from - start, 1) if timed_from else None)
