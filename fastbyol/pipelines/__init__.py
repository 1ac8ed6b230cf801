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


def choose_loader(name: str, root, embedded: bool) -> str:
    """`--loader auto`: the reference loader until a faster one can take the data."""
    return "torchvision" if name == "auto" else name
