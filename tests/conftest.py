import warnings

import pytest
import torch

from int8fx import fusing

# Tests that turn every warning into an error (to catch int8fx's "runs eagerly" fallback) must not meet the
# warnings torch's own modules give as they are imported: the first compile imports inductor, and on torch
# 2.10 that import warns (torch.utils.mkldnn's `torch.jit.script_method` is deprecated), which failed the
# compile and sent the pass eager where such a test ran first. Import them once, here, with the warnings off.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch._inductor.compile_fx  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The INT8 reference path runs many small ops; with several intra-op threads on a busy 2-core machine each
    small op waits for descheduled threads (measured ~100x slower per op). One thread for the whole suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def eager_passes():
    """For a test module whose subject does not depend on how int8fx's fused passes run (`pytestmark =
    pytest.mark.usefixtures("eager_passes")`): they run eagerly there. Compiling them for each model's shapes
    on a cold cache (10-60 s a model) was most of such a module's time, and compiled or eager they give the
    same bits (tests/test_fused.py)."""
    with fusing.eager_passes():
        yield
