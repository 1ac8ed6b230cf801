"""The loaders, one module each, picked by `--loader`. Every one yields `fastbyol.views.Views` batches
in `epoch_batches` order with `sample_view_params`' parameters, so they are interchangeable.

What a loader module provides (the trainer, the evaluators and the benchmarks use nothing else):
- a training loader class, constructed as
  `cls(root, "train", batch_size=, image_size=, small=, seed=, rank=, world_size=, workers=, device=,
  dtype=, crop_scale=, subset=, **options)`; `loader.epoch(e, start_batch=0)` yields this rank's
  `Views`; len() is the number of batches per epoch (the same on every rank); attributes
  `num_classes`, `indices` (the dataset indices trained on), `dataset_size` and `bad_files` (a
  Counter of path -> times met);
- an evaluation loader class, `cls(root, split, image_size=, batch_size=, small=, workers=, device=,
  rank=, world_size=, max_samples=, seed=, dtype=, **options)`, iterating deterministic centre crops
  as (images, labels, index) batches, normalized, on the device;
- `native_side(root) -> int`: the largest image side of the data, which decides small-image mode.
`options` are the loader's own flags (LOADERS[name].options), taken from the config.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderEntry:
    module: str
    train: str
    eval: str
    options: tuple[str, ...] = ()


LOADERS = {
    "torchvision": LoaderEntry("fastbyol.pipelines.torchvision", "TorchvisionLoader", "EvalLoader"),
    "memory": LoaderEntry("fastbyol.pipelines.memory", "MemoryLoader", "MemoryEvalLoader"),
    "dali": LoaderEntry("fastbyol.pipelines.dali", "DaliLoader", "DaliEvalLoader", ("hw_decoder_load",)),
    "ffcv": LoaderEntry("fastbyol.pipelines.ffcv", "FfcvLoader", "FfcvEvalLoader",
                        ("ffcv_decode", "os_cache")),
}


def _module(name: str):
    return importlib.import_module(LOADERS[name].module)


def options_for(name: str, cfg) -> dict:
    """The loader's own flags, from a Config (or anything with those attributes)."""
    return {key: getattr(cfg, key) for key in LOADERS[name].options}


def train_loader(name: str, root, **kwargs):
    """The training loader `name` (see the module docstring for its keywords)."""
    return getattr(_module(name), LOADERS[name].train)(root, "train", **kwargs)


def eval_loader(name: str, root, split: str, **kwargs):
    """The evaluation loader `name` over `split` (see the module docstring for its keywords)."""
    return getattr(_module(name), LOADERS[name].eval)(root, split, **kwargs)


def native_side(name: str, root) -> int:
    return _module(name).native_side(root)


# `--loader auto` picks the memory loader for data whose decoded train split is estimated at most this
# size (uint8 RGB, 3 bytes a pixel): CIFAR-10 (50,000 x 32 x 32: 0.14 GiB), Fashion-MNIST (60,000 x 28
# x 28: 0.13 GiB) and Imagenette at 160 px (9,469 images, 160 px on the shorter side: about 0.9 GiB at
# 4:3) qualify; ImageNet does not. 2 GiB leaves room beside a ResNet-50 step on any GPU that trains
# one, and fits the RAM of a CPU machine.
AUTO_MEMORY_MAX_BYTES = 2 * 2**30


def choose_loader(name: str, root, embedded: bool) -> str:
    """The loader `name`, or for `auto`: memory for the embedded Fashion-MNIST and for data whose
    decoded train split is estimated within AUTO_MEMORY_MAX_BYTES (memory.estimated_bytes); else
    torchvision for a folder, ffcv for a converter output folder (.beton files)."""
    if name != "auto":
        return name
    if embedded:
        return "memory"
    from fastbyol.pipelines import memory
    if memory.estimated_bytes(root, stop_above=AUTO_MEMORY_MAX_BYTES) <= AUTO_MEMORY_MAX_BYTES:
        return "memory"
    return "ffcv" if memory.is_beton_root(root) else "torchvision"
