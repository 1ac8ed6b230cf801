"""The device prefetcher: the view engine for batch k+1 runs on a side CUDA stream while the training
step runs batch k on its own stream. On the CPU it is a plain pass-through that yields the same Views.

API (for the loaders whose views are made on the device: memory and FFCV; DALI runs its own
pipeline ahead and applies photometric on the consumer's stream):

    for views in prefetch(jobs, engine, device): ...

- `jobs`: an iterable of batch jobs, each a tuple / NamedTuple / list tree whose leaves are tensors
  (or anything else, passed through). Host tensors in a job are this batch's small per-sample data
  (ViewParams, crop offsets, labels, indices); tensors already on the device (decoded images) stay
  where they are. Build jobs lazily (a generator): the host draws batch k+1's parameters while the
  device runs batch k.
- `engine(job) -> Views`: turns a job whose tensors are all on `device` into Views. It runs on the
  side stream, so it must not synchronise the host. `crop_views` below is the usual engine
  (crop_resize, then photometric, for both views); a loader whose crops come out of its decoder would
  pass its own.
- `to_device(job, device)`: the copy used for each job, also usable alone (the memory loader's
  evaluation batches): every host tensor of the job is packed into ONE pinned buffer and crosses in
  ONE non-blocking copy; the job's tensors become views into the device buffer. Never row by row.

Stream order: at the start the side stream waits for everything already queued on the consumer's
stream (e.g. the resident images written there at start-up). Batch k's work is followed by an event
on the side stream; the consumer's current stream waits for that event (not for the whole side
stream, which already runs batch k+1) when batch k is handed over, and every tensor handed over is
marked with `record_stream`, so the caching allocator does not reuse its memory until the consumer
stream is done with it. Pinned staging buffers come from torch's caching host allocator, which keeps
a buffer until the copy that reads it has finished.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch

from fastbyol.kernels.augment import photometric
from fastbyol.kernels.crop_resize import PackedImages, crop_resize
from fastbyol.views import ViewParams, ViewSpec, Views

ALIGN = 16  # bytes: every field of the staging buffer starts aligned for any dtype's view


class ViewJob(NamedTuple):
    """One batch for `crop_views`: the decoded images (data on the device; offsets, heights and widths
    of this batch's images, host or device), both views' parameters, labels and dataset indices."""

    images: PackedImages
    params: tuple[ViewParams, ViewParams]
    labels: torch.Tensor
    index: torch.Tensor
    # Each view's largest crop height, read while the params are still on the host, so that
    # crop_resize need not read it back from the device (a host sync on the side stream).
    max_heights: tuple[int, int] | None = None


def make_view_job(images: PackedImages, params: tuple[ViewParams, ViewParams], labels: torch.Tensor,
             index: torch.Tensor) -> ViewJob:
    """A ViewJob from host params, with each view's largest crop height read on the host now."""
    heights = tuple(int(p.crop[:, 2].max()) if len(p.crop) else 1 for p in params)
    return ViewJob(images, params, labels, index, heights)


def crop_views(job: ViewJob, specs: tuple[ViewSpec, ViewSpec], dtype: torch.dtype) -> Views:
    """The view engine: crop_resize, then photometric (normalized to dtype), for both views."""
    heights = job.max_heights or (None, None)
    v1, v2 = (photometric(crop_resize(job.images, params.crop, params.flip, spec.size, max_height=height),
                          params, spec, dtype)
              for params, spec, height in zip(job.params, specs, heights))
    return Views(v1, v2, job.labels, job.index)


def _flatten(tree: Any, leaves: list) -> Callable[[Iterator], Any]:
    """Append tree's leaves to `leaves`; return a function rebuilding the tree from new leaves."""
    if isinstance(tree, (tuple, list)):
        parts = [_flatten(child, leaves) for child in tree]
        if isinstance(tree, list):
            return lambda it: [part(it) for part in parts]
        if hasattr(tree, "_fields"):  # a NamedTuple
            return lambda it: type(tree)(*(part(it) for part in parts))
        return lambda it: tuple(part(it) for part in parts)
    leaves.append(tree)
    return lambda it: next(it)


def to_device(job: Any, device: torch.device | str) -> Any:
    """job with every host tensor moved to `device` through one pinned buffer and one non-blocking
    copy (on the current stream); device tensors and non-tensors are kept. On the CPU: job itself."""
    device = torch.device(device)
    if device.type == "cpu":
        return job
    return through_one_buffer(job, lambda staging: staging.to(device, non_blocking=True), pin=True)


def through_one_buffer(job: Any, copy: Callable[[torch.Tensor], torch.Tensor], pin: bool,
                       reuse: torch.Tensor | None = None) -> Any:
    """job rebuilt from copy(staging), where staging is one uint8 buffer (pinned if `pin`) holding the
    bytes of all the job's host tensors, each at an ALIGN-byte boundary; the rebuilt tensors are
    views into the copy. to_device's packing, apart from the copy (the CPU tests call it). `reuse`: a
    uint8 buffer to stage in where it is large enough (the host benchmark's stand-in for the pinned
    caching allocator, which hands back the same blocks: a fresh buffer each batch would time page
    faults)."""
    leaves: list = []
    rebuild = _flatten(job, leaves)
    host = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu"]
    starts, end = [], 0
    for i in host:
        starts.append(end)
        end += -(-leaves[i].numel() * leaves[i].element_size() // ALIGN) * ALIGN
    staging = (reuse[:end] if reuse is not None and reuse.numel() >= end
               else torch.empty(end, dtype=torch.uint8, pin_memory=pin))
    for i, start in zip(host, starts):
        leaf = leaves[i].contiguous().reshape(-1)
        staging[start:start + leaf.numel() * leaf.element_size()].copy_(leaf.view(torch.uint8))
    copied = copy(staging)
    for i, start in zip(host, starts):
        leaf = leaves[i]
        nbytes = leaf.numel() * leaf.element_size()
        leaves[i] = copied[start:start + nbytes].view(leaf.dtype).view(leaf.shape)
    return rebuild(iter(leaves))


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves: list = []
    _flatten(tree, leaves)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def prefetch(jobs: Iterable, engine: Callable[[Any], Any], device: torch.device | str) -> Iterator:
    """engine(to_device(job)) for each job, computed one batch ahead on a side CUDA stream; on the CPU,
    in order, on demand (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        for job in jobs:
            yield engine(job)
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    pending = None
    for job in jobs:
        with torch.cuda.stream(side):  # never across a yield: the consumer's step stays on its stream
            out = engine(to_device(job, device))
            done = side.record_event()
        if pending is not None:
            yield _hand_over(*pending, device)
        pending = out, done
    if pending is not None:
        yield _hand_over(*pending, device)


def _hand_over(out: Any, done: torch.cuda.Event, device: torch.device) -> Any:
    consumer = torch.cuda.current_stream(device)
    consumer.wait_event(done)
    for tensor in _tensors(out):
        if tensor.device.type == "cuda":
            tensor.record_stream(consumer)
    return out
