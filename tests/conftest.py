"""Shared test setup."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # The CPU is shared (2 cores, often a training run beside the tests): OpenMP threads spinning against each
    # other made model tests up to 10x slower than one thread each.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def native_kernels(monkeypatch):
    """The float32 native kernels, chosen as users get them (LMRC_LOCAL_WINDOW unset), or a clean skip without a C
    compiler."""
    import warnings

    from lmrc.ops import _native

    monkeypatch.delenv("LMRC_LOCAL_WINDOW", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if _native.load(torch.float32) is None:
            pytest.skip("no C compiler: PyTorch runs these ops")


SHARED_DAVIS2016 = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016"


@pytest.fixture
def davis2016() -> Path:
    """The real DAVIS 2016 sequences beside the repository (../shared), or a clean skip where they are absent."""
    if not (SHARED_DAVIS2016 / "JPEGImages" / "480p").is_dir() or not (SHARED_DAVIS2016 / "Annotations" / "480p").is_dir():
        pytest.skip(f"real DAVIS 2016 data not found at {SHARED_DAVIS2016}")
    return SHARED_DAVIS2016
