import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTBYOL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Statistical tests share one family-wise error rate: alpha = 1e-3, Bonferroni-corrected over the
# number of hypothesis tests in the suite (each statistical test module registers its count).
ALPHA = 1e-3


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"shared test data not found at {SHARED_DATA}"
    return SHARED_DATA
