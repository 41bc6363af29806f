"""Test and demo support, not part of the rewriting core.

* ``graphlora.testing.zoo``: the tiny model zoo (one tiny random-weight VLM per supported family, its
  config and example inputs);
* ``graphlora.testing.synthetic``: a tiny synthetic image + caption set;
* ``graphlora.testing.demo``: the main job on a tiny VLM (``python -m graphlora demo``).

The package imports nothing itself, so importing one of its modules loads only that module. No core
module imports it at module level: the command line's MODEL SPEC resolution (graphlora/model_spec.py)
imports the zoo inside the function that builds a tiny model by family name, and ``graphlora demo``
imports the demo when it runs.
"""
