"""`python -m fastbyol.bench step`: our compiled step, our eager step and the plain eager baseline on
the same device-resident synthetic views, in one run.

    python -m fastbyol.bench step [--arch resnet50] [--image-size 224] [--batch-size 256]
                                  [--precision bf16] [--compile default] [--syncbn] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from fastbyol.bench.record import device_name, sync, timed

HELP = "our compiled bf16 step (multi-tensor LARS + EMA) vs the plain eager baselines"

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
    per_step = timed(lambda: step(v1, v2, labels, 0.1, 0.99), args.steps, device)
    # The update alone (gradients of the last step are still in place).
    per_update = timed(lambda: step.update(step.lr, step.tau), args.steps, device)
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
    out["ema_fused_ms"] = 1e3 * timed(lambda: ema_foreach(model.target, model.online, tau), reps, device)
    out["ema_twin_ms"] = 1e3 * timed(lambda: ema_reference(model.target, model.online, 0.99), reps,
                                      device)
    # lerp reads target and online and writes target: 3 x 4 bytes per fp32 element
    out["ema_gbps"] = 3 * 4 * numel / (out["ema_fused_ms"] / 1e3) / 1e9
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = 1e3 * timed(lambda: dst.copy_(src), reps, device)
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
        out["lars_fused_ms"] = 1e3 * timed(lars(lars_foreach, torch.tensor(1e-6, device=device)), reps,
                                            device)
        out["lars_twin_ms"] = 1e3 * timed(lars(lars_reference, 1e-6), reps, device)
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


def add_args(parser: argparse.ArgumentParser) -> None:
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


def run(args, recorder) -> dict:
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
    gpu = device_name(device)
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


