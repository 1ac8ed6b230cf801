import hashlib
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTBYOL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Statistical tests share one family-wise error rate: alpha = 1e-3, Bonferroni-corrected over every
# hypothesis test in the suite. Each statistical module declares HYPOTHESES and is listed here, so the
# level is the same whichever tests a run selects.
ALPHA = 1e-3
STATISTICAL_MODULES = ("test_view_sampling", "test_sampler_joint")


def suite_hypotheses() -> int:
    """M: the number of hypothesis tests the whole suite makes (each module's HYPOTHESES summed)."""
    import importlib
    return sum(per_call * calls for name in STATISTICAL_MODULES
               for per_call, calls in importlib.import_module(name).HYPOTHESES.values())


@pytest.fixture
def significance(request):
    """check(p, what) for a statistical test module (listed in STATISTICAL_MODULES) that declares
    HYPOTHESES = {test function name: (hypothesis tests per call, calls)}: fails when p <= ALPHA / M,
    M the suite's total; at teardown, a call that passed its checks must have run as many tests as
    HYPOTHESES declares, so the level cannot drift from what the modules do."""
    assert request.module.__name__.rsplit(".", 1)[-1] in STATISTICAL_MODULES, \
        "list this statistical module in conftest.STATISTICAL_MODULES"
    hypotheses = request.module.HYPOTHESES
    level = ALPHA / suite_hypotheses()
    tested, rejected = [], []

    def check(p_value: float, what: str) -> None:
        tested.append(what)
        if p_value <= level:
            rejected.append(what)
        assert p_value > level, f"{what}: p = {p_value:.3g} <= {level:.3g}"

    yield check
    if not rejected:
        assert len(tested) == hypotheses[request.node.originalname][0], tested


def free_port() -> int:
    """A TCP port the OS says is free now (bind to port 0), for a test's process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_torchrun_worker(rank: int, world: int, port: int) -> None:
    """Make this (spawned) process look like worker `rank` of a one-node torchrun of `world` on
    `port`, so that fastbyol.dist.init joins the group as it would under torchrun."""
    import torch
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path_factory, request):
    """Every test gets its own FASTBYOL_CACHE (created only if used; inherited by the processes it
    starts): no test reads, writes or races another run's ~/.cache/fastbyol."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    unique = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    cache = tmp_path_factory.getbasetemp() / "caches" / f"{name}-{unique}"
    monkeypatch.setenv("FASTBYOL_CACHE", str(cache))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"shared test data not found at {SHARED_DATA}"
    return SHARED_DATA


def make_image_folder(root: Path, classes: int = 2, train_per_class: int = 32, val_per_class: int = 16,
                      size: int = 32, seed: int = 0) -> Path:
    """A small ImageFolder (train/ and val/) of PNG images whose classes differ in colour and texture."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((size, size, 3), np.float32)
                base[..., c % 3] = 160
                noise = rng.normal(0, 40, (size, size, 3))
                image = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped here, run by benchmarks/gpu.sh's cuda-tests stage."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
