"""Every training setting as one dataclass, with the recipe's defaults and CLI parsing.

Fields left at None are resolved by `resolve`: from the recipe's presets (by --epochs), from the data
(small images) and from the device (the embedded CPU demo). Any flag given overrides them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fastbyol import InputError
from fastbyol.model import ARCHS
from fastbyol.pipelines import LOADERS
from fastbyol.schedules import preset_for_epochs

SMALL_IMAGE_MAX_SIDE = 64
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass
class Config:
    # data
    data: str | None = field(default=None, metadata=dict(help="ImageFolder root (DIR/train/<class>/*, "
                             "DIR/val/<class>/*); default: the embedded Fashion-MNIST"))
    subset: int = field(default=0, metadata=dict(help="train on the first N images of a fixed "
                        "shuffle (0 = all)"))
    image_size: int | None = field(default=None, metadata=dict(help="view side; default 224, or 32 "
                                   "for images <= 64 px"))
    crop_scale_min: float = field(default=0.08, metadata=dict(help="random resized crop area, lower bound"))
    workers: int | None = field(default=None, metadata=dict(help="data-loading processes per rank"))
    loader: str = field(default="auto", metadata=dict(help="auto|torchvision|memory|dali|ffcv: how "
                        "views are made (auto: memory when the data fits on the device, else "
                        "torchvision)"))
    hw_decoder_load: float = field(default=0.65, metadata=dict(help="--loader dali: the share of "
                                   "JPEGs sent to the GPU's hardware decoder (the rest: CUDA nvJPEG)"))
    ffcv_decode: str = field(default="cpu", metadata=dict(help="--loader ffcv: cpu (libjpeg-turbo in "
                             "FFCV's workers) or gpu (nvJPEG)"))
    os_cache: bool = field(default=False, metadata=dict(help="--loader ffcv: read the .beton through "
                           "the OS page cache (off: FFCV's own process cache)"))
    # model
    arch: str | None = field(default=None, metadata=dict(help=f"one of {', '.join(ARCHS)}; default "
                             "resnet50, or for the embedded data resnet18 (GPU) / cnn4 (CPU)"))
    stem: str = field(default="auto", metadata=dict(help="auto|small|imagenet: small = 3x3 conv, "
                      "stride 1, no max-pool (auto: for views <= 64 px)"))
    proj_hidden: int | None = field(default=None, metadata=dict(help="projector/predictor hidden "
                                    "width (4096)"))
    proj_dim: int | None = field(default=None, metadata=dict(help="projection size (256)"))
    # optimisation (None: the official preset nearest to --epochs)
    epochs: float | None = field(default=None, metadata=dict(help="training length (default 300; the "
                                 "embedded data: 3 on the CPU, a 5-minute --time-budget on a GPU)"))
    batch_size: int = field(default=256, metadata=dict(help="GLOBAL batch, split over ranks"))
    lr: float | None = field(default=None, metadata=dict(help="base lr, scaled by batch/256 (default: "
                             "the official preset nearest --epochs)"))
    weight_decay: float | None = field(default=None, metadata=dict(help="LARS weight decay, not on "
                                       "biases and norm parameters (default: the preset)"))
    tau_base: float | None = field(default=None, metadata=dict(help="target EMA decay at step 0, "
                                   "cosine to 1 (default: the preset)"))
    momentum: float = field(default=0.9, metadata=dict(help="LARS momentum"))
    trust_coef: float = field(default=1e-3, metadata=dict(help="LARS trust coefficient eta"))
    warmup_epochs: float = field(default=10.0, metadata=dict(help="linear lr warm-up (small images: "
                                 "at most 10%% of the steps)"))
    # the step
    precision: str | None = field(default=None, metadata=dict(help="bf16|fp16|fp32 (default: bf16 "
                                  "autocast on GPUs, fp32 on the CPU)"))
    compile: str | None = field(default=None, metadata=dict(help="off|default|reduce-overhead|"
                                "max-autotune (default: default on GPUs, off on the CPU; "
                                "reduce-overhead adds CUDA graphs without autotuning)"))
    fused: bool = field(default=True, metadata=dict(help="multi-tensor LARS and EMA (off: the "
                        "per-parameter reference twins)"))
    sync_bn: bool = field(default=True, metadata=dict(help="BatchNorm statistics over the global "
                          "batch under DDP (fastbyol's SyncBatchNorm; NCCL and gloo)"))
    # processes
    nproc: int = field(default=0, metadata=dict(help="local worker processes to launch (0: as "
                       "launched)"))
    dist_timeout: float = field(default=300.0, metadata=dict(help="seconds a collective waits for a "
                                "dead or stuck peer before the job fails"))
    # run
    out: str = field(default="runs/byol", metadata=dict(help="run folder: config, metrics, checkpoints"))
    resume: bool = field(default=False, metadata=dict(help="continue from OUT/checkpoint.pt"))
    seed: int = field(default=0, metadata=dict(help="model init, data order and augmentations"))
    device: str = field(default="auto", metadata=dict(help="auto|cpu|cuda"))
    log_every: int = field(default=20, metadata=dict(help="steps between metric lines (and NaN checks)"))
    ckpt_every: int = field(default=200, metadata=dict(help="steps between checkpoints"))
    stop_at_step: int = field(default=0, metadata=dict(help="stop (with a checkpoint) after this "
                              "global step, keeping the full run's schedule; 0 = run to the end"))
    time_budget: float = field(default=0.0, metadata=dict(help="minutes of wall time for the whole "
                               "run (k-NN evaluations included): the step count, and with it the "
                               "schedules, warm-up and preset, is sized from the step rate measured "
                               "after compilation; 0 = use --epochs (the embedded data on a GPU: 5)"))
    steps: int = field(default=0, metadata=dict(help="total optimizer steps, overriding --epochs; "
                       "--time-budget resolves it and config.json records it (0 = from --epochs)"))
    tensorboard: bool = field(default=False, metadata=dict(help="also write the metrics as "
                              "TensorBoard scalars under OUT/tensorboard"))
    # monitoring
    knn_every: int = field(default=0, metadata=dict(help="epochs between k-NN evaluations (0: at "
                           "the end only)"))
    knn_k: int = field(default=200, metadata=dict(help="k-NN neighbours"))
    knn_temperature: float = field(default=0.1, metadata=dict(help="k-NN vote weight exp(sim / T)"))
    knn_samples: int = field(default=10000, metadata=dict(help="train images in the k-NN bank and "
                             "val images scored (0 = all)"))


def _base_type(tp):
    """The runtime type of a field annotation like `int | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _field_types() -> dict:
    hints = typing.get_type_hints(Config)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(Config)}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, exit 2, as for every InputError
        raise InputError(message)


def build_parser(prog: str, extra: typing.Callable[[argparse.ArgumentParser], None] | None = None):
    # SUPPRESS: only the flags actually given reach the namespace, so resolve() knows what was asked.
    parser = _Parser(prog=prog, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        tp = _field_types()[f.name]
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if f.default is not None and f.default is not dataclasses.MISSING:
            helptext += f" (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, nargs="?", const=True, type=_parse_bool, help=helptext)
        else:
            parser.add_argument(flag, type=tp, help=helptext, metavar=tp.__name__.upper())
    if extra:
        extra(parser)
    return parser


def parse_args(argv: list[str] | None, prog: str = "fastbyol.train", extra=None):
    """Returns (config, the flags given explicitly, the remaining namespace of `extra` flags)."""
    ns = vars(build_parser(prog, extra).parse_args(argv))
    names = {f.name for f in dataclasses.fields(Config)}
    given = {k: v for k, v in ns.items() if k in names}
    rest = {k: v for k, v in ns.items() if k not in names}
    cfg = Config(**given)
    validate(cfg)
    return cfg, given, rest


def validate(cfg: Config) -> None:
    """Reject values that cannot mean anything, naming the flag."""
    def bad(name, why):
        raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: {why}")

    for name in ("batch_size", "log_every", "ckpt_every", "knn_k"):
        if getattr(cfg, name) <= 0:
            bad(name, "must be a positive integer")
    for name in ("subset", "stop_at_step", "knn_samples", "steps"):
        if getattr(cfg, name) < 0:
            bad(name, "must be >= 0")
    for name in ("epochs", "lr", "image_size", "proj_hidden", "proj_dim", "knn_temperature",
                 "trust_coef"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            bad(name, "must be positive")
    for name in ("weight_decay", "momentum", "warmup_epochs", "knn_every"):
        value = getattr(cfg, name)
        if value is not None and not value >= 0:
            bad(name, "must be >= 0")
    if cfg.precision is not None and cfg.precision not in ("bf16", "fp16", "fp32"):
        bad("precision", "choose bf16, fp16 or fp32")
    if cfg.compile is not None and cfg.compile not in COMPILE_MODES:
        bad("compile", f"choose {', '.join(COMPILE_MODES)}")
    if cfg.loader not in ("auto", *LOADERS):
        bad("loader", f"choose auto, {', '.join(LOADERS)}")
    if not 0 <= cfg.hw_decoder_load <= 1:
        bad("hw_decoder_load", "must lie in [0, 1]")
    if cfg.ffcv_decode not in ("cpu", "gpu"):
        bad("ffcv_decode", "choose cpu or gpu")
    if not cfg.time_budget >= 0:
        bad("time_budget", "must be >= 0 (minutes)")
    if cfg.time_budget and (cfg.steps or cfg.epochs):
        bad("time_budget", "sizes the run itself: give it without --steps and --epochs")
    if cfg.nproc < 0:
        bad("nproc", "must be >= 0")
    if not cfg.dist_timeout > 0:
        bad("dist_timeout", "must be positive")
    if cfg.workers is not None and cfg.workers < 0:
        bad("workers", "must be >= 0")
    if cfg.tau_base is not None and not 0 <= cfg.tau_base <= 1:
        bad("tau_base", "must lie in [0, 1]")
    if cfg.momentum >= 1:
        bad("momentum", "must be < 1")
    if not 0 < cfg.crop_scale_min <= 1:
        bad("crop_scale_min", "must lie in (0, 1]")
    if cfg.arch is not None and cfg.arch not in ARCHS:
        bad("arch", f"unknown architecture; choose one of {', '.join(ARCHS)}")
    if cfg.stem not in ("auto", "small", "imagenet"):
        bad("stem", "choose auto, small or imagenet")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        bad("device", "choose auto, cpu or cuda")


# The embedded CPU demo, sized from the measured rate of the 2-core reference machine so that the whole
# run (cache, two k-NN passes, training) ends within 10 minutes (BYOL_RECIPE.md, CPU reference point).
CPU_DEMO = dict(arch="cnn4", epochs=3.0, lr=2.0, tau_base=0.99, weight_decay=1.5e-6,
                proj_hidden=512, proj_dim=128)
# The embedded default on a GPU: resnet18 for as many steps as 5 minutes allow.
GPU_DEMO_BUDGET_MINUTES = 5.0


def resolve(cfg: Config, *, device_type: str, embedded: bool, native_side: int,
            local_ranks: int = 1) -> Config:
    """Fill every None with a concrete value. Order: explicit flags > CPU demo > presets > recipe.
    Values already set are kept, so resolving a saved config changes nothing."""
    cfg = dataclasses.replace(cfg)
    if embedded and device_type == "cpu":
        for key, value in CPU_DEMO.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
    if embedded and device_type == "cuda" and not (cfg.time_budget or cfg.steps or cfg.epochs):
        cfg.time_budget = GPU_DEMO_BUDGET_MINUTES
    if cfg.arch is None:
        cfg.arch = "resnet18" if embedded else "resnet50"
    if not budget_pending(cfg):  # else the length and the preset wait for the measured step rate
        if cfg.epochs is None:  # the embedded data set is small: a demo, not a 300-epoch pretraining
            cfg.epochs = 100.0 if embedded else 300.0
        fill_preset(cfg)
    if cfg.image_size is None:
        cfg.image_size = 32 if native_side <= SMALL_IMAGE_MAX_SIDE else 224
    if cfg.stem == "auto":
        cfg.stem = "small" if cfg.image_size <= SMALL_IMAGE_MAX_SIDE else "imagenet"
    cfg.proj_hidden = cfg.proj_hidden or 4096
    cfg.proj_dim = cfg.proj_dim or 256
    if cfg.workers is None:  # the cores are shared by the ranks on this node
        cfg.workers = max(1, min(8, (os.cpu_count() or 1) // local_ranks))
    if cfg.precision is None:
        cfg.precision = "bf16" if device_type == "cuda" else "fp32"
    if cfg.compile is None:
        cfg.compile = "default" if device_type == "cuda" else "off"
    return cfg


def budget_pending(cfg: Config) -> bool:
    """--time-budget given and its step count not yet measured (a resumed run has it)."""
    return bool(cfg.time_budget) and not cfg.steps


def fill_preset(cfg: Config) -> None:
    """lr, weight decay and tau_base left unset take the official preset nearest to --epochs."""
    preset = preset_for_epochs(cfg.epochs)
    for key in ("lr", "weight_decay", "tau_base"):
        if getattr(cfg, key) is None:
            setattr(cfg, key, preset[key])


def set_length(cfg: Config, steps: int, steps_per_epoch: int) -> None:
    """A length measured by --time-budget: the step count, the epochs it makes, and their preset."""
    cfg.steps, cfg.epochs = steps, steps / steps_per_epoch
    fill_preset(cfg)


def is_small(cfg: Config) -> bool:
    """Small-image mode (BYOL_RECIPE.md): no blur, min(10 epochs, 10%) warm-up."""
    return cfg.image_size <= SMALL_IMAGE_MAX_SIDE


def save(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")


def from_dict(values: dict) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise InputError(f"unknown config keys {sorted(unknown)}")
    return Config(**values)
