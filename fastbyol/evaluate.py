"""`python -m fastbyol.evaluate knn|linear --checkpoint PATH --data DIR`: frozen-encoder evaluation.

k-NN: cosine similarity, the k nearest bank features vote with weight exp(sim / T) (k=200, T=0.1).
Linear: a linear classifier on frozen features of centre crops (no augmentation, features computed once:
a quicker stand-in for the paper's 80-epoch augmented protocol), SGD Nesterov, batch 1024, cosine lr.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import torch.distributed as torch_dist

from fastbyol import InputError
from fastbyol import checkpoint as ckpt_io
from fastbyol import dist as dist_mod
from fastbyol.config import SMALL_IMAGE_MAX_SIDE, from_dict
from fastbyol.dist import Dist, all_gather_tensor
from fastbyol.model import BYOL
from fastbyol.pipelines import LOADERS, choose_loader, eval_loader, options_for

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(encoder, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Representations y and labels of every batch, encoder in eval mode, kept on the device (fp16 on
    GPUs, where a bank of 1.28M x 2048 takes 5 GB, sharded over ranks)."""
    was_training = encoder.training
    encoder.eval()
    feat_dtype = torch.float16 if device.type == "cuda" else torch.float32
    feats, labels = [], []
    for images, batch_labels, _ in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(encoder(images).to(feat_dtype))
        labels.append(batch_labels)
    encoder.train(was_training)
    if not feats:  # a rank whose shard is empty
        return torch.zeros(0, 0, device=device, dtype=feat_dtype), torch.zeros(0, dtype=torch.long,
                                                                               device=device)
    return torch.cat(feats), torch.cat(labels)


def _all_reduce_sum(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch_dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
             query_labels: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.1,
             dist: Dist = Dist(), chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of a temperature-weighted cosine k-NN vote. Under DDP each rank holds a
    shard of the bank and of the queries: every rank scores every query chunk against its own shard,
    and the per-shard top-k candidates are gathered and merged, so the bank never sits on one device."""
    bank = F.normalize(bank.float(), dim=1).to(bank.dtype) if len(bank) else bank
    queries = torch.cat(all_gather_tensor(F.normalize(queries.float(), dim=1), dist))
    query_labels = torch.cat(all_gather_tensor(query_labels, dist))
    correct = torch.zeros((), device=queries.device)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        sim = torch.full((len(q), k), -float("inf"), device=q.device)  # padding: weight exp(-inf) = 0
        lab = torch.zeros((len(q), k), dtype=torch.long, device=q.device)
        if len(bank):
            top_sim, top_idx = (q.to(bank.dtype) @ bank.T).float().topk(min(k, len(bank)), dim=1)
            sim[:, :top_sim.shape[1]], lab[:, :top_sim.shape[1]] = top_sim, bank_labels[top_idx]
        if dist.enabled:
            sims, labs = [torch.empty_like(sim) for _ in range(dist.world_size)], \
                [torch.empty_like(lab) for _ in range(dist.world_size)]
            torch_dist.all_gather(sims, sim)
            torch_dist.all_gather(labs, lab)
            sim, pick = torch.cat(sims, 1).topk(k, dim=1)
            lab = torch.cat(labs, 1).gather(1, pick)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, lab, (sim / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start:start + chunk]).sum()
    return 100.0 * correct.item() / max(1, len(queries))


def linear_probe(train_x, train_y, val_x, val_y, num_classes: int, epochs: int = 80,
                 batch_size: int = 1024, lr: float = 0.1, seed: int = 0, dist: Dist = Dist()) -> float:
    """Val top-1 (%) of a linear classifier on standardized frozen features. Under DDP each rank trains
    on its shard and the gradients are averaged (the global batch is batch_size)."""
    train_x, val_x = train_x.float(), val_x.float()
    count = _all_reduce_sum(torch.tensor(float(len(train_x)), device=train_x.device), dist)
    total = _all_reduce_sum(train_x.sum(0), dist)
    mean = total / count
    var = _all_reduce_sum(((train_x - mean) ** 2).sum(0), dist) / (count - 1)
    std = var.sqrt().clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator().manual_seed(seed + dist.rank)
    head = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    if dist.enabled:
        for p in head.parameters():
            torch_dist.broadcast(p.data, 0)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    per_rank = max(1, batch_size // dist.world_size)
    steps_per_epoch = math.ceil(count.item() / batch_size)  # the same on every rank
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen).to(train_x.device)
        for i in range(steps_per_epoch):
            idx = order[(i * per_rank) % len(order):][:per_rank]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dist.enabled:
                for p in head.parameters():
                    torch_dist.all_reduce(p.grad)
                    p.grad /= dist.world_size
            opt.step()
            sched.step()
    with torch.no_grad():
        correct = _all_reduce_sum((head(val_x).argmax(1) == val_y).sum().float(), dist)
        seen = _all_reduce_sum(torch.tensor(float(len(val_y)), device=val_x.device), dist)
    return 100.0 * correct.item() / seen.item()


def split_features(encoder, root: Path, split: str, image_size: int, samples: int, workers: int,
                   device: torch.device, dist: Dist = Dist(), batch_size: int = 256,
                   loader: str = "torchvision", options: dict | None = None):
    """This rank's shard of a split's features (a fixed random subset of `samples`; 0 = all), from
    the evaluation loader of `loader` (fastbyol.pipelines) with its `options`."""
    batches = eval_loader(loader, root, split, image_size=image_size, batch_size=batch_size,
                          small=image_size <= SMALL_IMAGE_MAX_SIDE, workers=workers, device=device,
                          rank=dist.rank, world_size=dist.world_size, max_samples=samples or None,
                          seed=0, dtype=None, **(options or {}))
    return extract_features(encoder, batches, device)


def knn_eval(encoder, root: Path, image_size: int, num_classes: int, device: torch.device,
             samples: int = 10000, k: int = 200, temperature: float = 0.1, workers: int = 2,
             dist: Dist = Dist(), loader: str = "torchvision", options: dict | None = None) -> float:
    """k-NN top-1 with a bank of `samples` train images, scored on `samples` val images."""
    bank, bank_labels, queries, query_labels = (
        tensor for split in ("train", "val")
        for tensor in split_features(encoder, root, split, image_size, samples, workers, device, dist,
                                     loader=loader, options=options))
    return knn_top1(bank, bank_labels, queries, query_labels, num_classes, k, temperature, dist)


def load_encoder(checkpoint: Path, which: str, device: torch.device):
    """The online (default) or target encoder of a training checkpoint, and the run's config."""
    state = ckpt_io.load(checkpoint)
    cfg = from_dict(state["config"])
    model = BYOL(cfg.arch, cfg.stem == "small", state["num_classes"], cfg.proj_hidden, cfg.proj_dim)
    model.load_state_dict(state["model"])
    return getattr(model, which)["encoder"].to(device), cfg, state["num_classes"]


def main(argv=None) -> None:
    """Under torchrun every rank extracts and scores its shard; rank 0 prints the result."""
    dist_mod.configure_logging()
    parser = argparse.ArgumentParser(prog="fastbyol.evaluate")
    parser.add_argument("protocol", choices=("knn", "linear"))
    parser.add_argument("--checkpoint", type=Path, required=True, help="a fastbyol training checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--which", choices=("online", "target"), default="online")
    parser.add_argument("--loader", choices=sorted(LOADERS),
                        help="evaluation loader (default: the one the run trained with)")
    parser.add_argument("--samples", type=int, default=0, help="images per split (0 = all)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=80, help="linear probe epochs")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dist-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    try:
        dist, device = dist_mod.init(torch.device(args.device), args.dist_timeout)
        encoder, cfg, num_classes = load_encoder(args.checkpoint, args.which, device)
        loader = args.loader or choose_loader(cfg.loader, args.data, embedded=False)
        source = dict(loader=loader, options=options_for(loader, cfg))
        if args.protocol == "knn":
            top1 = knn_eval(encoder, args.data, cfg.image_size, num_classes, device, args.samples,
                            args.k, args.temperature, args.workers, dist, **source)
        else:
            feats = [split_features(encoder, args.data, split, cfg.image_size, args.samples,
                                    args.workers, device, dist, **source) for split in ("train", "val")]
            top1 = linear_probe(*feats[0], *feats[1], num_classes, epochs=args.epochs, dist=dist)
    except InputError as exc:
        print(f"fastbyol.evaluate: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        dist_mod.shutdown()
    if dist.is_main:
        print(json.dumps(dict(protocol=args.protocol, which=args.which, top1=round(top1, 2),
                              checkpoint=str(args.checkpoint), data=str(args.data),
                              world_size=dist.world_size)))


if __name__ == "__main__":
    main()
