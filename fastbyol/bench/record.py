"""What every benchmark result records, in one place: the machine, the versions, the command, the
table on the console, the JSON file under benchmarks/results/ and its line in benchmarks/RESULTS.md.
Also the timing helpers every subcommand uses."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("FASTBYOL_SHARED_DATA", REPO.parent / "shared" / "data"))
SEED_PHOTOS = SHARED_DATA / "oddjpegs" / "dali_extra" / "single" / "jpeg"  # 47 photos, 19 classes
RESULTS = REPO / "benchmarks" / "results"
RESULTS_INDEX = REPO / "benchmarks" / "RESULTS.md"

def machine_info() -> dict:
    info = dict(platform=platform.platform(), logical_cpus=os.cpu_count(),
                usable_cpus=len(os.sched_getaffinity(0)), load_average_1m=round(os.getloadavg()[0], 2))
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def versions() -> dict:
    found = {"python": platform.python_version()}
    # Distribution versions: ffcv.__version__ says 0.0.3rc1 in FFCV 1.0.2
    for name in ("fastbyol", "torch", "torchvision", "numpy", "pillow", "ffcv", "numba", "opencv-python",
                 "opencv-python-headless", "nvidia-dali-cuda130"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        found["fastbyol_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for r in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)



def timed(fn, steps: int, device) -> float:
    """Seconds per call of fn over `steps` calls, synchronising only around the loop."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    """'cpu', or the GPU's name in lower case with dashes (for result names)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device).replace(" ", "-").lower() if device.type == "cuda" else "cpu"


def save(result: dict, path: Path) -> Path:
    """Write one result as JSON now (a later failure in the same run keeps it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def results_line(summary: str, path: Path) -> str:
    """The line a result gets in benchmarks/RESULTS.md: what was measured, then the JSON it cites."""
    try:
        cited = Path(path).resolve().relative_to(RESULTS.parent)
    except ValueError:
        cited = Path(path)
    return f"- {summary} [{cited}]({cited})"


class Recorder:
    """The record of one benchmark run: its header (benchmark, command, date, machine, versions) and
    where its JSON goes. A subcommand calls save() with what it has measured so far as often as it
    likes, so a later failure keeps every finished measurement."""

    def __init__(self, what: str, command: str, json_path: str | None = None):
        self.what, self.json_path = what, json_path
        self.header = dict(benchmark=what, command=command, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           machine=machine_info(), versions=versions())
        self.default_name = time.strftime("%Y%m%d-%H%M%S")

    def path(self, name: str | None) -> Path:
        if self.json_path:
            return Path(self.json_path)
        return RESULTS / f"{self.what}-{name or self.default_name}.json"

    def save(self, result: dict) -> Path:
        full = {**self.header, **result}
        full["machine"] = dict(self.header["machine"], load_average_1m_after=round(os.getloadavg()[0], 2))
        return save(full, self.path(result.get("name")))
