"""Test configuration.

* Triton kernels run under the interpreter on machines without CUDA: TRITON_INTERPRET must be set
  before triton is imported, so it is set here, first.
* Tests marked ``slow`` run when ``CI=true`` (as in ``make test`` on CI) or with ``--runslow``.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tiny models: one intra-op thread is faster than two on a 2-core box, and far faster when another
# process competes (OpenMP spinning under oversubscription made tiny calls 100x slower).
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CI") == "true":
        return
    skip_slow = pytest.mark.skip(reason="slow: runs with CI=true or --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def tiny():
    """``tiny(name, **input_kwargs) -> (model, inputs)``: a fresh tiny VLM (eval mode) and a batch."""
    from graphlora import zoo

    def build(name: str, **kwargs):
        model = zoo.build_tiny_model(name)
        model.eval()
        return model, zoo.tiny_example_inputs(name, model, **kwargs)

    return build
