"""The tiny model zoo: one tiny VLM per supported family, random weights, built from a config in milliseconds.

Every model has ~32-wide hidden states, 2 layers per tower, 4 heads (2 KV heads), a 256-token
vocabulary and 16-32 px images, so a forward + backward takes a few milliseconds on CPU. They
exist to exercise tracing and LoRA insertion on the real transformers module structure; the
weights mean nothing.

This package is the zoo's one namespace (``from graphlora.testing import zoo``); the work is done in

* ``configs.py``: the tiny sizes and the config table, one row per family; :func:`build_tiny_config`,
  :func:`deepen_config` (more layers per tower, keeping each family's layer pattern);
* ``models.py``: :func:`build_tiny_model` (seeded random weights, zero-initialised gates revived),
  :func:`tiny_example_inputs` (the family's synthesised batch), the fixture class that mends Llama 4's
  forward in transformers 5.24.

``models`` imports ``configs``; neither imports this package.
"""

from graphlora.testing.zoo.configs import (
    DEFAULT_TINY_MODEL,
    EAGER_ONLY,
    HIDDEN,
    TINY_INIT_STD,
    VOCAB,
    TinyFamily,
    build_tiny_config,
    deepen_config,
    tiny_family,
    tiny_model_names,
)
# The tower field sets and the model class lookup, for tests that build a config variant by hand.
from graphlora.testing.zoo.configs import _text, _vision  # noqa: F401
from graphlora.testing.zoo.models import (  # noqa: F401
    TinyLlama4ForConditionalGeneration,
    _model_class,
    build_tiny_model,
    revive_zero_parameters,
    tiny_example_inputs,
)

__all__ = [
    "DEFAULT_TINY_MODEL",
    "EAGER_ONLY",
    "HIDDEN",
    "TINY_INIT_STD",
    "TinyFamily",
    "TinyLlama4ForConditionalGeneration",
    "VOCAB",
    "build_tiny_config",
    "build_tiny_model",
    "deepen_config",
    "revive_zero_parameters",
    "tiny_example_inputs",
    "tiny_family",
    "tiny_model_names",
]
