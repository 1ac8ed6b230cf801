"""`python -m fastbyol.bench <what>`: our path and a baseline side by side, in one run; a table on the
console and a JSON file with the machine, the versions, the command and every number.

    python -m fastbyol.bench convert [SOURCE ...] [--replicate N] [--max-side 512] [--workers N]
                                     [--reencode-all] [--json PATH]
    python -m fastbyol.bench step [--arch resnet50] [--image-size 224] [--batch-size 256]
                                  [--precision bf16] [--compile default] [--syncbn] [--json PATH]

Each subcommand is one `bench_<what>(args) -> dict` function plus an `add_<what>_args(parser)`,
registered in SUBCOMMANDS. The function returns its numbers with a "rows" list (one dict per
measured path, same keys) and a "name": main() prints the rows as a table and saves the whole dict,
with the machine, the versions and the command, to --json or benchmarks/results/<what>-<name>.json.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fastbyol import InputError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTBYOL_SHARED_DATA", REPO.parent / "shared" / "data"))
SEED_PHOTOS = SHARED_DATA / "oddjpegs" / "dali_extra" / "single" / "jpeg"  # 47 photos, 19 classes
RESULTS = REPO / "benchmarks" / "results"


# ---- What every result records ----------------------------------------------------------------------

def machine_info() -> dict:
    info = dict(platform=platform.platform(), logical_cpus=os.cpu_count(),
                usable_cpus=len(os.sched_getaffinity(0)), load_average_1m=round(os.getloadavg()[0], 2))
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def versions() -> dict:
    found = {"python": platform.python_version()}
    # Distribution versions: ffcv.__version__ says 0.0.3rc1 in FFCV 1.0.2
    for name in ("fastbyol", "torch", "torchvision", "numpy", "pillow", "ffcv", "numba", "opencv-python",
                 "opencv-python-headless", "nvidia-dali-cuda130"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        found["fastbyol_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for r in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


# ---- convert: our converter vs FFCV's DatasetWriter over torchvision's ImageFolder ---------------

def replicate_photos(count: int, destination: Path, seeds: Path = SEED_PHOTOS) -> Path:
    """An ImageFolder `destination/train/<class>/` of `count` files: the seed photos copied round
    robin, each copy a real file (so both converters read and decode every one)."""
    photos = sorted(seeds.glob("*/*.jpg"))
    if not photos:
        raise InputError(f"{seeds}: no seed photos (*/*.jpg); set FASTBYOL_SHARED_DATA")
    for i in range(count):
        photo = photos[i % len(photos)]
        target = destination / "train" / photo.parent.name / f"{photo.stem}-{i // len(photos):05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, target)
    return destination


def _source_folder(args, scratch: Path) -> tuple[Path, str]:
    """The folder to convert and a description of it: --replicate N, a folder, or .tar.gz archives
    extracted into scratch."""
    if args.replicate:
        folder = replicate_photos(args.replicate, scratch / "source")
        return folder, f"{args.replicate} replicated photos from {SEED_PHOTOS}"
    if not args.source:
        raise InputError("give a SOURCE folder or .tar.gz archives, or --replicate N")
    if len(args.source) == 1 and Path(args.source[0]).is_dir():
        return Path(args.source[0]), args.source[0]
    for archive in args.source:
        if not tarfile.is_tarfile(archive):
            raise InputError(f"{archive}: neither a folder nor a tar archive")
        with tarfile.open(archive) as tar:
            tar.extractall(scratch / "source", filter="data")
    return scratch / "source", " + ".join(args.source)


def _ffcv_writer_baseline(source: Path, out: Path, max_side: int, jpeg_quality: int, workers: int) -> dict:
    """FFCV's plain recipe: DatasetWriter over torchvision's ImageFolder, RGBImageField in 'jpg'
    mode (our output's format) with the same max side and quality. Returns the .beton sources."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder
    splits = [s for s in ("train", "val") if (source / s).is_dir()] or ["."]
    out.mkdir(parents=True)
    paths = {}
    for split in splits:
        dataset = ImageFolder(str(source / split))
        name = "train" if split == "." else split
        image = RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=jpeg_quality)
        fields = {"image": image, "label": IntField()}
        DatasetWriter(str(out / f"{name}.beton"), fields, num_workers=workers).from_indexed_dataset(dataset)
        paths[name] = [Path(p).relative_to(source).as_posix() for p, _ in dataset.samples]
    return dict(files=sum(len(p) for p in paths.values()), paths=paths)


def _our_converter(source: Path, out: Path, keep_original_jpegs: bool, **settings) -> dict:
    from fastbyol.convert import convert
    report = convert(source, "ffcv", out, keep_original_jpegs=keep_original_jpegs, **settings)
    paths = {s: (out / f"{s}_paths.txt").read_text().splitlines() for s in report["splits"]}
    return dict(files=sum(s["files"] for s in report["splits"].values()), paths=paths,
                counts=report["counts"], stored=report["stored"], phases=report["seconds"])


def _fidelity(source: Path, out: Path, paths: dict[str, list[str]], samples: int) -> float:
    """Mean abs difference (uint8) between .beton images, decoded by FFCV's decoder, and the
    reference decode (Pillow, upright, RGB, INTER_AREA to the stored size), over `samples` images
    spread evenly through each split."""
    import cv2
    from PIL import Image, ImageOps

    from fastbyol.pipelines.ffcv import open_beton, read_image
    diffs = []
    for split, split_paths in paths.items():
        reader = open_beton(out / f"{split}.beton")
        for index in np.linspace(0, len(split_paths) - 1, min(samples, len(split_paths))).astype(int):
            stored = read_image(reader, index)
            with Image.open(source / split_paths[index]) as img:
                reference = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
            if reference.shape != stored.shape:
                reference = cv2.resize(reference, stored.shape[1::-1], interpolation=cv2.INTER_AREA)
            diffs.append(np.abs(reference.astype(np.int16) - stored).mean())
    return float(np.mean(diffs))


def _stored_bytes(out: Path) -> int:
    """Bytes of sample data in the .beton files (their size on disk is rounded up to FFCV's pages)."""
    from fastbyol.pipelines.ffcv import open_beton
    return sum(int(open_beton(p).alloc_table["size"].sum()) for p in out.glob("*.beton"))


def add_convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="*",
                        help="an ImageFolder, or .tar.gz archives of one (extracted first)")
    parser.add_argument("--replicate", type=int, metavar="N",
                        help=f"convert N copies of the 47 photos in {SEED_PHOTOS} instead")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each; the median counts")
    parser.add_argument("--reencode-all", action="store_true",
                        help="also time ours re-encoding every image, as RGBImageField does")
    parser.add_argument("--fidelity-samples", type=int, default=300,
                        help="images per split compared with the reference decode (0: skip)")
    parser.add_argument("--scratch", help="where sources and outputs go (default: a temp folder, removed)")
    parser.add_argument("--json", help="result file (default: benchmarks/results/convert-<name>.json)")
    parser.add_argument("--name", help="result name (default: photos<N>, or the source's name)")


def bench_convert(args) -> dict:
    from fastbyol.convert import import_ffcv_writer
    import_ffcv_writer()  # imported once, outside every timing (it compiles numba code: seconds)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fastbyol-bench-"))
    settings = dict(max_side=args.max_side, jpeg_quality=args.jpeg_quality, workers=args.workers)
    contestants = {"ours": partial(_our_converter, keep_original_jpegs=True, **settings)}
    if args.reencode_all:
        contestants["ours, re-encode all"] = partial(_our_converter, keep_original_jpegs=False, **settings)
    contestants["ffcv DatasetWriter"] = partial(_ffcv_writer_baseline, **settings)
    results = {label: dict(seconds_each=[]) for label in contestants}
    try:
        source, description = _source_folder(args, scratch)
        for _ in range(args.repeat):  # interleaved, so that a busy moment hits every contestant
            for i, (label, run) in enumerate(contestants.items()):
                out = scratch / f"out-{i}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                outcome = run(source, out)
                results[label]["seconds_each"].append(time.perf_counter() - t0)
                results[label].update(outcome, stored_bytes=_stored_bytes(out))
        # After every conversion: the OpenCV calls here must not precede FFCV writer processes
        # forked from this one (OpenCV's thread pool does not survive a fork)
        for i, (label, result) in enumerate(results.items()):
            paths = result.pop("paths")
            if args.fidelity_samples:
                result["fidelity_mad"] = _fidelity(source, scratch / f"out-{i}", paths, args.fidelity_samples)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    for r in results.values():
        r["seconds"] = float(np.median(r["seconds_each"]))
        r["files_per_s"] = r["files"] / r["seconds"]
    reference = results["ffcv DatasetWriter"]["files_per_s"]
    rows = [{"path": label, "files": r["files"], "seconds": r["seconds"], "files/s": r["files_per_s"],
             "vs FFCV writer": r["files_per_s"] / reference, "JPEG MB": r["stored_bytes"] / 1e6,
             "MAD vs ref": r.get("fidelity_mad")} for label, r in results.items()]
    name = args.name or (f"photos{args.replicate}" if args.replicate
                         else Path(args.source[0]).name.split(".")[0])
    return dict(name=name, source=description, settings=settings, repeat=args.repeat, rows=rows,
                results=results,
                ratio_ours_vs_ffcv_writer=results["ours"]["files_per_s"] / reference, target_ratio=0.8,
                baseline=("ffcv.writer.DatasetWriter over torchvision.datasets.ImageFolder (default PIL "
                          "loader), RGBImageField(write_mode='jpg', max_resolution=max_side, "
                          "jpeg_quality=jpeg_quality), IntField; same workers"),
                seconds_are="median wall-clock seconds over `repeat` interleaved runs, FFCV import excluded",
                fidelity=("MAD vs ref: mean abs difference (uint8) between .beton images decoded by FFCV's "
                          "libjpeg-turbo call and Pillow's decode of the source (OpenCV INTER_AREA to the "
                          "stored size)"))


# ---- step: our compiled step vs the plain eager baseline ----------------------------------------

def _timed(fn, steps: int, device) -> float:
    """Seconds per call of fn over `steps` calls, synchronising only around the loop."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_variant(name: str, args, device, views) -> dict:
    """One variant of the step on GPU-resident synthetic views: compile/warm-up time, img/s, the
    update's (LARS + EMA) share of the step, and peak memory."""
    from fastbyol.kernels.lars import LARS, lars_param_groups
    from fastbyol.model import BYOL
    from fastbyol.step import BYOLStep
    settings = dict(ours_compiled=dict(fused=True, precision=args.precision, compile=args.compile),
                    ours_eager=dict(fused=True, precision=args.precision, compile="off"),
                    baseline=dict(fused=False, precision="fp32", compile="off"))[name]
    torch.manual_seed(0)
    model = BYOL(args.arch, args.image_size <= 64, 1000, args.proj_hidden, args.proj_dim)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model.online_parameters(), 1.5e-6), foreach=settings["fused"])
    step = BYOLStep(model, optimizer, **settings)
    v1, v2, labels = views
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compilation happens here, outside the timing
        metrics = step(v1, v2, labels, 0.1, 0.99)
    metrics.tolist()
    warmup_s = time.perf_counter() - t0
    per_step = _timed(lambda: step(v1, v2, labels, 0.1, 0.99), args.steps, device)
    # The update alone (gradients of the last step are still in place).
    per_update = _timed(lambda: step.update(step.lr, step.tau), args.steps, device)
    result = dict(variant=name, **settings, warmup_s=round(warmup_s, 2),
                  img_per_s=round(args.batch_size / per_step, 1), step_ms=round(1e3 * per_step, 3),
                  update_ms=round(1e3 * per_update, 3),
                  update_share=round(per_update / per_step, 4),
                  loss_finite=bool(torch.isfinite(metrics).all()))
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def _kernel_microbench(args, device) -> dict:
    """EMA and LARS against their per-parameter twins on the real parameter list, plus the EMA's
    achieved bandwidth against a plain copy of the same bytes."""
    from fastbyol.kernels.ema import ema_foreach, ema_reference
    from fastbyol.kernels.lars import lars_foreach, lars_param_groups, lars_reference
    from fastbyol.model import BYOL
    torch.manual_seed(0)
    model = BYOL(args.arch, args.image_size <= 64, 1000, args.proj_hidden, args.proj_dim).to(device)
    params = list(model.online.parameters())
    numel = sum(p.numel() for p in params)
    tau = torch.tensor(0.99, device=device)
    out = dict(params=numel)
    reps = max(5, args.steps)
    out["ema_fused_ms"] = 1e3 * _timed(lambda: ema_foreach(model.target, model.online, tau), reps, device)
    out["ema_twin_ms"] = 1e3 * _timed(lambda: ema_reference(model.target, model.online, 0.99), reps,
                                      device)
    # lerp reads target and online and writes target: 3 x 4 bytes per fp32 element
    out["ema_gbps"] = 3 * 4 * numel / (out["ema_fused_ms"] / 1e3) / 1e9
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = 1e3 * _timed(lambda: dst.copy_(src), reps, device)
    out["copy_gbps"] = 2 * 4 * numel / (copy_ms / 1e3) / 1e9
    out["ema_fraction_of_copy_bw"] = out["ema_gbps"] / out["copy_gbps"]
    groups = lars_param_groups(model.online_parameters(), 1.5e-6)
    grads = {id(p): torch.randn_like(p) for g in groups for p in g["params"]}
    bufs = {id(p): torch.zeros_like(p) for g in groups for p in g["params"]}

    def lars(fn, lr):
        def run():
            for g in groups:
                ps = g["params"]
                fn(ps, [grads[id(p)] for p in ps], [bufs[id(p)] for p in ps], lr=lr,
                   weight_decay=g["weight_decay"], momentum=0.9, trust_coef=1e-3, adapt=g["adapt"])
        return run
    with torch.no_grad():
        out["lars_fused_ms"] = 1e3 * _timed(lars(lars_foreach, torch.tensor(1e-6, device=device)), reps,
                                            device)
        out["lars_twin_ms"] = 1e3 * _timed(lars(lars_reference, 1e-6), reps, device)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _syncbn_check(device) -> dict:
    """SyncBatchNorm over a 1-rank NCCL group runs and equals plain BatchNorm (forward and grads)."""
    import torch.distributed as torch_dist
    if device.type != "cuda":
        return dict(skipped="SyncBatchNorm is CUDA-only in torch")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    created = not torch_dist.is_initialized()
    if created:
        torch_dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.LazyLinear(4)).to(device)
    x = torch.randn(16, 3, 12, 12, device=device)
    plain(x)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    outs = []
    for net in (plain, synced):
        net.zero_grad()
        y = net(x)
        y.square().sum().backward()
        outs.append((y.detach(), net[0].weight.grad.clone(), net[1].running_mean.clone()))
    if created:
        torch_dist.destroy_process_group()
    diffs = [float((a - b).abs().max()) for a, b in zip(*outs)]
    return dict(max_abs_diff_output=diffs[0], max_abs_diff_grad=diffs[1],
                max_abs_diff_running_mean=diffs[2], matches=max(diffs) < 1e-4,
                sync_bn_class=type(synced[1]).__name__)


def add_step_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="per GPU")
    parser.add_argument("--proj-hidden", type=int, default=4096)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="ours (default: bf16 on GPUs, fp32 on the CPU); the baseline is always fp32")
    parser.add_argument("--compile", choices=("default", "max-autotune"), default="default")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--variants", default="ours_compiled,ours_eager,baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--syncbn", action="store_true", help="also check 1-rank NCCL SyncBatchNorm")
    parser.add_argument("--json", help="result file (default: benchmarks/results/step-<name>.json)")


def bench_step(args) -> dict:
    """Our compiled step, our eager step and the plain eager baseline (per-parameter EMA loop,
    reference LARS, fp32, no compile) on the same device-resident synthetic views, in one run."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    views = (torch.randn(shape, generator=gen, device=device).contiguous(memory_format=torch.channels_last),
             torch.randn(shape, generator=gen, device=device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 1000, (args.batch_size,), generator=gen, device=device))
    variants = []
    for name in args.variants.split(","):
        variants.append(_step_variant(name, args, device, views))
        if device.type == "cuda":  # the variant's model is gone: give its memory back before the next
            torch.cuda.empty_cache()
    baseline = next((v for v in variants if v["variant"] == "baseline"), None)
    rows = [{"variant": v["variant"], "precision": v["precision"], "compile": v["compile"],
             "img/s": v["img_per_s"], "vs baseline": v["img_per_s"] / baseline["img_per_s"] if baseline
             else None, "LARS+EMA share": v["update_share"], "warm-up s": v["warmup_s"],
             "peak GiB": v.get("peak_memory_gib")} for v in variants]
    kernels = _kernel_microbench(args, device)
    rows += [{"variant": f"{what} fused vs twin", "precision": "fp32", "compile": "off",
              "img/s": None, "vs baseline": kernels[f"{what}_twin_ms"] / kernels[f"{what}_fused_ms"],
              "LARS+EMA share": None, "warm-up s": None, "peak GiB": None} for what in ("ema", "lars")]
    gpu = torch.cuda.get_device_name(device).replace(" ", "-").lower() if device.type == "cuda" else "cpu"
    return dict(name=f"{args.arch}-{args.image_size}px-b{args.batch_size}-{gpu}", rows=rows,
                settings=dict(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                              precision=args.precision, compile=args.compile, steps=args.steps,
                              warmup=args.warmup, device=str(device)),
                variants=variants, kernels=kernels, syncbn=_syncbn_check(device) if args.syncbn else None,
                baseline="BYOLStep(fused=False, precision=fp32, compile=off): per-parameter EMA loop, "
                         "reference LARS loop, fp32, eager",
                views="synthetic normal views resident on the device, channels_last; labels over 1000 classes",
                timing="seconds per step = wall time of `steps` steps between two device syncs, after "
                       "`warmup` untimed steps; the update alone is timed the same way on the last grads")


SUBCOMMANDS = {
    "convert": (add_convert_args, bench_convert,
                "our converter (validates every file) vs FFCV's DatasetWriter over ImageFolder"),
    "step": (add_step_args, bench_step,
             "our compiled bf16 step (multi-tensor LARS + EMA) vs the plain eager fp32 baseline"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastbyol.bench",
                                     description="Our path and a baseline side by side: a table and a JSON file.")
    subparsers = parser.add_subparsers(dest="what", required=True)
    for name, (add_args, run, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        add_args(sub)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    machine = machine_info()
    try:
        result = args.run(args)
    except InputError as exc:
        print(f"fastbyol.bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    command = " ".join(["python -m fastbyol.bench", *(sys.argv[1:] if argv is None else argv)])
    result = dict(benchmark=args.what, command=command,
                  date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine, versions=versions(), **result)
    result["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    print()
    print_table(result["rows"])
    name = result.get("name", time.strftime("%Y%m%d-%H%M%S"))
    path = Path(args.json) if getattr(args, "json", None) else RESULTS / f"{args.what}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
