import pytest
import torch

# The suite's tensors are small: one thread avoids OpenMP spin-waiting that makes a 2-core
# machine crawl whenever anything else runs beside the tests.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
