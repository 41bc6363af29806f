"""Test configuration.

* Triton kernels run under the interpreter on machines without CUDA: TRITON_INTERPRET must be set
  before triton is imported, so it is set here, first.
* Tests marked ``slow`` run when ``CI=true`` (as in ``make test`` on CI) or with ``--runslow``.
* The family matrix: a test parametrised over zoo families (a ``family`` or ``name`` parameter whose
  value is a zoo family) runs for :data:`CORE_FAMILIES` by default and for every family when slow
  tests run. The core families cover the structures the others combine: a plain projector (LLaVA),
  packed vision tokens with a grid prologue (Qwen2-VL), cross-attention layers (Mllama), Gemma 3's
  mixed attention, Idefics3's pixel shuffle and tiles, and mixture-of-experts blocks (Llama 4).
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


CORE_FAMILIES = frozenset({"llava", "qwen2_vl", "mllama", "gemma3", "idefics3", "llama4"})
#: Parameter names that carry a zoo family in the parametrised tests.
_FAMILY_PARAMS = ("family", "name")


def _outside_core(item, families: frozenset[str]) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(params.get(key), str) and params[key] in families and params[key] not in CORE_FAMILIES
               for key in _FAMILY_PARAMS)


def pytest_collection_modifyitems(config, items):
    from graphlora.testing import zoo

    families = frozenset(zoo.tiny_model_names())
    for item in items:
        if _outside_core(item, families):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--runslow") or os.environ.get("CI") == "true":
        return
    skip_slow = pytest.mark.skip(reason="slow: runs with CI=true or --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def tiny():
    """``tiny(name, **input_kwargs) -> (model, inputs)``: a fresh tiny VLM (eval mode) and a batch."""
    from graphlora.testing import zoo

    def build(name: str, **kwargs):
        model = zoo.build_tiny_model(name)
        model.eval()
        return model, zoo.tiny_example_inputs(name, model, **kwargs)

    return build
