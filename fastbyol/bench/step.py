"""`python -m fastbyol.bench step`: our step against the plain steps, on the same device-resident
synthetic views, in one run.

    python -m fastbyol.bench step [--arch resnet50] [--image-size 224] [--batch-size 256]
                                  [--precision bf16] [--compile reduce-overhead] [--syncbn] [--json PATH]

Rows (one change at a time, so no gain is credited to the wrong change):
  ours_compiled  multi-tensor LARS + EMA, compiled, in --precision (bf16 on GPUs)
  ours_eager     the same, eager
  plain          per-parameter LARS and EMA loops, eager, in --precision
  plain_fp32     the same in fp32: the textbook step
The checks (--syncbn: our SyncBatchNorm against nn.BatchNorm on a 1-rank group) run first, and the
JSON is written after each measurement, so a later failure keeps what was measured. On the CPU the
defaults are small (cnn4, 32 px) and the compiled row runs only when --variants asks for it.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from fastbyol import InputError
from fastbyol.bench.record import device_name, timed

HELP = "our compiled bf16 step (multi-tensor LARS + EMA) vs the plain eager bf16 and fp32 steps"
VARIANTS = ("ours_compiled", "ours_eager", "plain", "plain_fp32")


def _settings(name: str, args) -> dict:
    return dict(ours_compiled=dict(fused=True, precision=args.precision, compile=args.compile),
                ours_eager=dict(fused=True, precision=args.precision, compile="off"),
                plain=dict(fused=False, precision=args.precision, compile="off"),
                plain_fp32=dict(fused=False, precision="fp32", compile="off"))[name]


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def _build_step(args, device, settings):
    from fastbyol.kernels.lars import LARS, lars_param_groups
    from fastbyol.model import BYOL
    from fastbyol.step import BYOLStep
    torch.manual_seed(0)
    model = BYOL(args.arch, args.image_size <= 64, 1000, args.proj_hidden, args.proj_dim)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model.online_parameters(), 1.5e-6), foreach=settings["fused"])
    return BYOLStep(model, optimizer, **settings)


def _step_variant(name: str, args, device, views) -> dict:
    """One variant: compile/warm-up time, img/s, the update's (LARS + EMA) share of the step, peak
    memory; for a compiled one, the CUDA graphs the update had to skip (reduce-overhead)."""
    settings = _settings(name, args)
    step = _build_step(args, device, settings)
    v1, v2, labels = views
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = dict(variant=name, **settings)
    t0 = time.perf_counter()
    if settings["compile"] != "off":
        # The update compiled on its own first (gradients from one eager backward), so that its
        # CUDA-graph skips are counted apart from the forward's.
        with torch.autocast(device.type, dtype=step.dtype, enabled=step.dtype != torch.float32):
            loss = step.model(v1, v2, labels)[0]
        loss.backward()
        skips = _cudagraph_skips()
        step.update(step.lr, step.tau)
        result["update_cudagraph_skips"] = _cudagraph_skips() - skips
    skips = _cudagraph_skips()
    for _ in range(args.warmup):  # compilation happens here, outside the timing
        metrics = step(v1, v2, labels, 0.1, 0.99)
    metrics.tolist()
    result["warmup_s"] = round(time.perf_counter() - t0, 2)
    if settings["compile"] != "off":
        result["forward_cudagraph_skips"] = _cudagraph_skips() - skips

    def update():
        if step.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        step.update(step.lr, step.tau)

    per_step = timed(lambda: step(v1, v2, labels, 0.1, 0.99), args.steps, device)
    per_update = timed(update, args.steps, device)  # on the last step's gradients
    result.update(img_per_s=round(args.batch_size / per_step, 1), step_ms=round(1e3 * per_step, 3),
                  update_ms=round(1e3 * per_update, 3), update_share=round(per_update / per_step, 4),
                  loss_finite=bool(torch.isfinite(metrics).all()))
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def _kernel_microbench(args, device, compile_mode: str) -> dict:
    """The EMA alone, compiled in the step's mode (or eager when the step was not compiled), against
    a plain copy of the same bytes; EMA and LARS against their per-parameter twins."""
    from fastbyol.kernels.ema import ema_foreach, ema_reference
    from fastbyol.kernels.lars import lars_foreach, lars_param_groups, lars_reference
    from fastbyol.model import BYOL
    torch.manual_seed(0)
    model = BYOL(args.arch, args.image_size <= 64, 1000, args.proj_hidden, args.proj_dim).to(device)
    params = list(model.online.parameters())
    numel = sum(p.numel() for p in params)
    tau = torch.tensor(0.99, device=device)
    out = dict(params=numel, ema_compile=compile_mode)
    reps = max(5, args.steps)
    ema = ema_foreach
    if compile_mode != "off":
        for tensor in [tau, *model.parameters(), *model.buffers()]:  # static for a CUDA graph
            torch._dynamo.mark_static_address(tensor)
        ema = torch.compile(ema_foreach, mode=None if compile_mode == "default" else compile_mode)
        skips = _cudagraph_skips()
        for _ in range(3):  # compilation (and CUDA-graph recording) outside the timing
            ema(model.target, model.online, tau)
        out["ema_cudagraph_skips"] = _cudagraph_skips() - skips
    ema(model.target, model.online, tau)  # eager too: one untimed call first
    out["ema_fused_ms"] = 1e3 * timed(lambda: ema(model.target, model.online, tau), reps, device)
    out["ema_twin_ms"] = 1e3 * timed(lambda: ema_reference(model.target, model.online, 0.99), reps,
                                      device)
    # xi <- tau * xi + (1 - tau) * theta reads xi and theta and writes xi: 3 x 4 bytes per element
    out["ema_gbps"] = 12 * numel / (out["ema_fused_ms"] / 1e3) / 1e9
    src = torch.zeros(numel, device=device)  # written once, so no timing meets a first touch
    dst = torch.zeros_like(src)
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
    """Our SyncBatchNorm over a 1-rank group (NCCL on a GPU, gloo on the CPU) against nn.BatchNorm:
    forward, weight gradients and running statistics. One rank is the most one device can show."""
    import torch.distributed as torch_dist
    from fastbyol.syncbn import convert_sync_batchnorm
    created = not torch_dist.is_initialized()
    if created:
        if device.type == "cuda":  # device_id needs an index: cuda, not cuda:N, is rejected
            device = torch.device("cuda", device.index if device.index is not None
                                  else torch.cuda.current_device())
        store = torch_dist.TCPStore("127.0.0.1", 0, 1, is_master=True)  # a free port from the OS
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0,
                                      world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 10, 4),
                                    torch.nn.BatchNorm1d(4)).to(device)
        synced = convert_sync_batchnorm(copy.deepcopy(plain))
        x = torch.randn(16, 3, 12, 12, device=device).contiguous(memory_format=torch.channels_last)
        outs = []
        for net in (plain, synced):
            y = net(x)
            y.square().sum().backward()
            outs.append((y.detach(), net[0].weight.grad, net[1].running_var, net[5].running_mean))
    finally:
        if created:
            torch_dist.destroy_process_group()
    diffs = [float((a - b).abs().max()) for a, b in zip(*outs)]
    return dict(backend="nccl" if device.type == "cuda" else "gloo", max_abs_diff_output=diffs[0],
                max_abs_diff_grad=diffs[1], max_abs_diff_running_var=diffs[2],
                max_abs_diff_running_mean=diffs[3], matches=max(diffs) < 1e-4,
                sync_bn_class=type(synced[1]).__module__ + "." + type(synced[1]).__name__)


def _tf32_flags() -> dict:
    """Whether fp32 matmuls and convolutions may run as TF32 (it changes what 'fp32' measures)."""
    flags = dict(matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                 cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                 float32_matmul_precision=torch.get_float32_matmul_precision())
    for name, owner in (("matmul_fp32_precision", torch.backends.cuda.matmul),
                        ("cudnn_conv_fp32_precision", getattr(torch.backends.cudnn, "conv", None))):
        if owner is not None and hasattr(owner, "fp32_precision"):
            flags[name] = owner.fp32_precision
    return flags


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=None, help="default: resnet50 on GPUs, cnn4 on the CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on GPUs, 32 on the CPU")
    parser.add_argument("--batch-size", type=int, default=256, help="per device")
    parser.add_argument("--proj-hidden", type=int, default=4096)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="ours and plain (default: bf16 on GPUs, fp32 on the CPU); plain_fp32 is fp32")
    parser.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"),
                        default="default", help="the mode of ours_compiled and of the EMA bandwidth row")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all on GPUs; on the "
                             "CPU all but ours_compiled, and no plain_fp32 when --precision is fp32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--syncbn", action="store_true",
                        help="first check our SyncBatchNorm against nn.BatchNorm on a 1-rank group")
    parser.add_argument("--json", help="result file (default: benchmarks/results/step-<name>.json)")


def run(args, recorder) -> dict:
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.arch = args.arch or ("resnet50" if gpu else "cnn4")
    args.image_size = args.image_size or (224 if gpu else 32)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    if args.variants:
        names = args.variants.split(",")
    else:
        names = [n for n in VARIANTS if (gpu or n != "ours_compiled")
                 and not (n == "plain_fp32" and args.precision == "fp32")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise InputError(f"--variants {','.join(unknown)}: choose from {', '.join(VARIANTS)}")
    result = dict(name=f"{args.arch}-{args.image_size}px-b{args.batch_size}-{device_name(device)}",
                  rows=[], settings=dict(arch=args.arch, image_size=args.image_size,
                                         batch_size=args.batch_size, precision=args.precision,
                                         compile=args.compile, steps=args.steps, warmup=args.warmup,
                                         device=str(device)),
                  tf32=_tf32_flags(), variants=[],
                  plain="BYOLStep(fused=False, compile=off): per-parameter EMA and LARS loops, eager",
                  views="synthetic normal views resident on the device, channels_last; labels over 1000 "
                        "classes",
                  timing="seconds per step = wall time of `steps` steps between two device syncs, after "
                         "`warmup` untimed steps; the update alone is timed the same way on the last grads")
    if args.syncbn:  # checks first: a failing check costs no measurement
        result["syncbn"] = _syncbn_check(device)
        recorder.save(result)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    views = (torch.randn(shape, generator=gen, device=device).contiguous(memory_format=torch.channels_last),
             torch.randn(shape, generator=gen, device=device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 1000, (args.batch_size,), generator=gen, device=device))
    for name in names:
        result["variants"].append(_step_variant(name, args, device, views))
        result["rows"] = _rows(result["variants"])
        recorder.save(result)
        if gpu:  # the variant's model is gone: give its memory back before the next
            torch.cuda.empty_cache()
    compiled = "ours_compiled" in names
    result["kernels"] = _kernel_microbench(args, device, args.compile if compiled else "off")
    result["rows"] = _rows(result["variants"], result["kernels"])
    return result


def _rows(variants: list[dict], kernels: dict | None = None) -> list[dict]:
    plain = next((v for v in variants if v["variant"] == "plain"), None)
    rows = [{"variant": v["variant"], "precision": v["precision"], "compile": v["compile"],
             "img/s": v["img_per_s"], "vs plain": v["img_per_s"] / plain["img_per_s"] if plain else None,
             "LARS+EMA share": v["update_share"], "warm-up s": v["warmup_s"],
             "peak GiB": v.get("peak_memory_gib")} for v in variants]
    if kernels:  # "vs plain" here: the multi-tensor kernel's speed over its per-parameter twin
        rows += [{"variant": f"{what} fused vs twin", "precision": "fp32",
                  "compile": kernels["ema_compile"] if what == "ema" else "off", "img/s": None,
                  "vs plain": kernels[f"{what}_twin_ms"] / kernels[f"{what}_fused_ms"],
                  "LARS+EMA share": None, "warm-up s": None, "peak GiB": None}
                 for what in ("ema", "lars")]
    return rows
