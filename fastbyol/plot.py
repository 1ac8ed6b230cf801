"""`python -m fastbyol.plot RUN_DIR [--out PNG]`: a run's training curves from its metrics.jsonl, as one
PNG (default RUN_DIR/curves.png): loss, lr, tau, probe and k-NN accuracy, img/s and data wait."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastbyol import InputError

SIZE_INCHES, DPI = (15, 8), 100  # 1500 x 800 pixels


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The training interval lines and the k-NN evaluation lines of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: no readable metrics ({exc})") from exc
    trained = [line for line in lines if "img_per_s" in line]
    if not trained:
        raise InputError(f"{path}: no training lines yet (one comes every --log-every steps)")
    return trained, [line for line in lines if "knn_top1" in line]


def plot_run(run_dir: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained, knn = read_metrics(run_dir)
    step = [line["step"] for line in trained]
    fig, axes = plt.subplots(2, 3, figsize=SIZE_INCHES, dpi=DPI)
    (loss, lr, tau), (acc, speed, wait) = axes
    loss.plot(step, [line["byol_loss"] for line in trained], label="BYOL loss")
    loss.plot(step, [line["probe_loss"] for line in trained], label="online probe loss", alpha=0.7)
    loss.set_title("loss")
    loss.legend()
    lr.plot(step, [line["lr"] for line in trained])
    lr.set_title("learning rate")
    tau.plot(step, [line["tau"] for line in trained])
    tau.set_title("target decay tau")
    acc.plot(step, [100 * line["probe_acc"] for line in trained], label="online probe (train views)")
    if knn:
        acc.plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], "o-", label="k-NN top-1 (val)")
    acc.set_title("accuracy (%)")
    acc.legend()
    speed.plot(step, [line["img_per_s"] for line in trained])
    speed.set_title("source images / s")
    speed.set_ylim(bottom=0)
    wait.plot(step, [100 * line["data_wait"] for line in trained])
    wait.set_title("data wait: host blocked on the loader (% of wall time)")
    wait.set_ylim(0, 100)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    minutes = max(line.get("wall_s", 0) for line in trained + knn) / 60
    fig.suptitle(f"{Path(run_dir).resolve().name}: {step[-1]} steps, {minutes:.1f} min")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastbyol.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a fastbyol.train --out folder")
    parser.add_argument("--out", type=Path, help="the PNG (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out or args.run_dir / "curves.png"))
    except InputError as exc:
        print(f"fastbyol.plot: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
