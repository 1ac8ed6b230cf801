"""Process group, ranks and launching.

- `python -m fastbyol.train --nproc N` re-launches itself as N local workers through torch's own
  launcher (torch.distributed.run, as torchrun does).
- Under torchrun, a worker joins the group it finds (`torchrun --nproc-per-node N -m fastbyol.train`).
- `torchrun -m fastbyol.train -- --nproc N` (one torchrun worker asked for N) re-launches itself
  exactly like the `python -m` form. The `--` is needed where torchrun's argparse (Python 3.11 here)
  reports our `--nproc` as an ambiguous prefix of its own `--nproc-per-node`.
- A --nproc that contradicts a torchrun of several workers is an error. Multi-node is torchrun's.
A worker that dies ends the job: the launcher's agent stops the others, and a collective that waits on
a dead peer fails after --dist-timeout seconds instead of hanging.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from fastbyol import InputError

# What torchrun sets for its workers; cleared before a nested launch so the inner one starts afresh.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "GROUP_WORLD_SIZE",
               "ROLE_NAME", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_launch(nproc: int) -> bool:
    """True when this process should start `nproc` workers rather than train itself."""
    world = launched_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world > 1:
        if nproc not in (0, local):
            raise InputError(f"--nproc {nproc} contradicts torchrun, which started {local} workers "
                             f"per node ({world} in all): drop --nproc or match it")
        return False
    return nproc > 1


def launch(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as nproc local workers (a single-node torchrun); returns the exit
    status: non-zero as soon as any worker fails (the others are stopped)."""
    from torch.distributed import run as torchrun
    for key in _LAUNCH_ENV:
        os.environ.pop(key, None)
    # "--": torchrun's argparse rejects our --nproc anywhere on its line, as an ambiguous prefix of its
    # --nproc-per-node; after "--" everything is the module's (the "--" itself is dropped).
    args = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--monitor-interval", "0.5", "-m", module, "--", *argv]
    try:
        torchrun.main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # ChildFailedError: torchrun has printed the worker's traceback above
        what = "a worker failed"
        if hasattr(exc, "get_first_failure"):
            rank, failure = exc.get_first_failure()
            code = failure.exitcode
            what = f"worker rank {rank} " + (f"was killed by signal {-code}" if code < 0
                                             else f"exited with status {code}")
        print(f"{module}: {what}; the other workers were stopped", file=sys.stderr)
        return 1
    return 0


def configure_logging() -> None:
    """The log format of the entry points. Under torchrun (RANK set), INFO lines come from rank 0
    alone, which would otherwise be repeated by every rank; warnings and errors come from every rank,
    those of the others prefixed with their rank (a bad file or a failing rank is that rank's news)."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"{prefix}%(levelname)s %(name)s: %(message)s")


def init(device: torch.device, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any). NCCL on GPUs, gloo on the CPU."""
    world = launched_world_size()
    if world == 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                  timeout=datetime.timedelta(seconds=timeout_s),
                                  device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank), device


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_gather_tensor(tensor: torch.Tensor, dist: Dist) -> list[torch.Tensor]:
    """Every rank's tensor (first dimensions may differ across ranks)."""
    if not dist.enabled:
        return [tensor]
    sizes = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(dist.world_size)]
    torch_dist.all_gather(sizes, torch.tensor(len(tensor), device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in range(dist.world_size)]
    torch_dist.all_gather(gathered, padded)
    return [g[:int(s.item())] for g, s in zip(gathered, sizes)]


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()
