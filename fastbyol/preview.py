"""`python -m fastbyol.preview --data DIR --loader X --out views.png`: what the encoder is shown. For
8 images of the first training batch: the original, then view 1 and view 2 exactly as the loader
yields them (its own output, de-normalised), one row per image."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fastbyol import InputError
from fastbyol import config as config_mod
from fastbyol.fashion_mnist import ensure_fashion_mnist
from fastbyol.pipelines import LOADERS, choose_loader, native_side, options_for, train_loader
from fastbyol.pipelines.torchvision import decode_image, scan_image_folder, split_folder
from fastbyol.views import IMAGENET_MEAN, IMAGENET_STD

CELL_INCHES, DPI = 1.6, 100  # each picture 160 x 160 pixels


def denormalize(views: torch.Tensor) -> np.ndarray:
    """Normalized (N, 3, S, S) views -> float (N, S, S, 3) in [0, 1]: the inverse of `normalize`."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (views.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def first_batch(cfg: config_mod.Config, device: torch.device, count: int):
    """The first `count` samples of epoch 0 as the training loader `cfg.loader` makes them."""
    loader = train_loader(cfg.loader, cfg.data, batch_size=count, image_size=cfg.image_size,
                          small=config_mod.is_small(cfg), seed=cfg.seed, rank=0, world_size=1,
                          workers=0, device=device, dtype=torch.float32,
                          crop_scale=(cfg.crop_scale_min, 1.0), subset=0, **options_for(cfg.loader, cfg))
    return next(iter(loader.epoch(0)))


def render(originals: list[np.ndarray], v1: np.ndarray, v2: np.ndarray, labels: list[str], title: str,
           out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(originals)
    fig, axes = plt.subplots(rows, 3, figsize=(3 * CELL_INCHES, rows * CELL_INCHES + 0.6), dpi=DPI,
                             squeeze=False)
    for row, pictures in enumerate(zip(originals, v1, v2)):
        for col, picture in enumerate(pictures):
            ax = axes[row, col]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(("original", "view 1", "view 2")[col], fontsize=9)
        axes[row, 0].set_ylabel(labels[row], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def preview(data: str | None, loader: str, out: Path, count: int = 8, seed: int = 0,
            originals: str | None = None, device: str = "cpu") -> Path:
    root = Path(data) if data else ensure_fashion_mnist()
    name = choose_loader(loader, root, embedded=data is None)
    dev = torch.device(device)
    cfg = config_mod.resolve(config_mod.Config(data=str(root), loader=name, seed=seed, epochs=1.0),
                             device_type=dev.type, embedded=data is None, native_side=native_side(name, root))
    views = first_batch(cfg, dev, count)
    # The originals, from the ImageFolder every loader numbers its samples by.
    _, samples = scan_image_folder(split_folder(originals or root, "train"))
    index = views.index.tolist()
    pictures = [decode_image(samples[i][0]).permute(1, 2, 0).numpy() for i in index]
    title = f"{root.name}: {name} loader\n{cfg.image_size} px views, seed {seed}, epoch 0"
    return render(pictures, denormalize(views.v1), denormalize(views.v2), [f"sample {i}" for i in index],
                  title, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastbyol.preview", description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="ImageFolder root (default: the embedded Fashion-MNIST)")
    parser.add_argument("--loader", default="auto", choices=("auto", *LOADERS))
    parser.add_argument("--out", type=Path, default=Path("views.png"))
    parser.add_argument("--count", type=int, default=8, help="images (rows)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed (order and views)")
    parser.add_argument("--originals", help="the ImageFolder of the originals, when --data is a "
                        "converted (.beton) folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        print(preview(args.data, args.loader, args.out, args.count, args.seed, args.originals, args.device))
    except InputError as exc:
        print(f"fastbyol.preview: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
