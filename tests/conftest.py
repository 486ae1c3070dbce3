import os
from pathlib import Path

# Paddle's bundled MKL takes a slow path on AMD CPUs unless this is set before Paddle loads.
os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
