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

from fastbyol import InputError

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(encoder, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Representations y (float32, on the CPU) and labels of every batch, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, batch_labels, _ in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(encoder(images.to(device)).float().cpu())
        labels.append(batch_labels.cpu())
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
             query_labels: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.1,
             chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of a temperature-weighted cosine k-NN vote."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), chunk):
        sim, idx = (queries[start:start + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / len(queries)


def linear_probe(train_x, train_y, val_x, val_y, num_classes: int, epochs: int = 80,
                 batch_size: int = 1024, lr: float = 0.1, seed: int = 0) -> float:
    """Val top-1 (%) of a linear classifier on standardized frozen features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=gen).split(batch_size):
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * (head(val_x).argmax(1) == val_y).float().mean().item()


def split_features(encoder, root: Path, split: str, image_size: int, samples: int, workers: int,
                   device: torch.device, batch_size: int = 512):
    from fastbyol.pipelines.torchvision import eval_loader
    batches = eval_loader(root, split, image_size=image_size, batch_size=batch_size, workers=workers,
                          device=device, max_samples=samples or None)
    return extract_features(encoder, batches, device)


def knn_eval(encoder, root: Path, image_size: int, num_classes: int, device: torch.device,
             samples: int = 10000, k: int = 200, temperature: float = 0.1, workers: int = 2) -> float:
    """k-NN top-1 with a bank of `samples` train images, scored on `samples` val images."""
    bank, bank_labels = split_features(encoder, root, "train", image_size, samples, workers, device)
    queries, query_labels = split_features(encoder, root, "val", image_size, samples, workers, device)
    return knn_top1(bank, bank_labels, queries, query_labels, num_classes, k, temperature)


def load_encoder(checkpoint: Path, which: str, device: torch.device):
    """The online (default) or target encoder of a training checkpoint, and the run's config."""
    from fastbyol import checkpoint as ckpt_io
    from fastbyol.config import from_dict, is_small
    from fastbyol.model import BYOL
    state = ckpt_io.load(checkpoint)
    cfg = from_dict(state["config"])
    model = BYOL(cfg.arch, cfg.stem == "small", state["num_classes"], cfg.proj_hidden, cfg.proj_dim)
    model.load_state_dict(state["model"])
    return getattr(model, which)["encoder"].to(device), cfg, state["num_classes"]


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="fastbyol.evaluate")
    parser.add_argument("protocol", choices=("knn", "linear"))
    parser.add_argument("--checkpoint", type=Path, required=True, help="a fastbyol training checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--which", choices=("online", "target"), default="online")
    parser.add_argument("--samples", type=int, default=0, help="images per split (0 = all)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=80, help="linear probe epochs")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        encoder, cfg, num_classes = load_encoder(args.checkpoint, args.which, device)
        if args.protocol == "knn":
            top1 = knn_eval(encoder, args.data, cfg.image_size, num_classes, device, args.samples,
                            args.k, args.temperature, args.workers)
        else:
            feats = [split_features(encoder, args.data, split, cfg.image_size, args.samples,
                                    args.workers, device) for split in ("train", "val")]
            top1 = linear_probe(*feats[0], *feats[1], num_classes, epochs=args.epochs)
    except InputError as exc:
        sys.exit(f"fastbyol.evaluate: error: {exc}")
    print(json.dumps(dict(protocol=args.protocol, which=args.which, top1=round(top1, 2),
                          checkpoint=str(args.checkpoint), data=str(args.data))))


if __name__ == "__main__":
    main()
