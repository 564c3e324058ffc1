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


@pytest.fixture
def built_blocks(monkeypatch) -> dict[str, int]:
    """How many blocks the Cayley-Neumann build (``forward``) and its backward (``backward``)
    processed, over every call (batched or per layer)."""
    from poetx.ops import backend

    counts = {"forward": 0, "backward": 0}
    real_forward, real_backward = backend.rotation_delta, backend.rotation_delta_backward

    def blocks(theta) -> int:  # one tensor, or a batched build's list of sides
        return theta.shape[0] if isinstance(theta, torch.Tensor) else sum(t.shape[0]
                                                                           for t in theta)

    def forward(theta, *args, **kwargs):
        counts["forward"] += blocks(theta)
        return real_forward(theta, *args, **kwargs)

    def backward(theta, *args, **kwargs):
        counts["backward"] += blocks(theta)
        return real_backward(theta, *args, **kwargs)

    monkeypatch.setattr(backend, "rotation_delta", forward)
    monkeypatch.setattr(backend, "rotation_delta_backward", backward)
    return counts
