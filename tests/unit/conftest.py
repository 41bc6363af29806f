"""Fixtures of the unit layer: a freshly exported toy VLM per test (tests/unit/toy.py)."""

import pytest

from toy import Toy, ToyConfig, export_toy


@pytest.fixture
def toy() -> Toy:
    """The default toy, exported (cached) and copied: this test's own graph."""
    return export_toy(ToyConfig())


@pytest.fixture
def make_toy():
    """``make_toy(**config_fields) -> Toy``: a toy variant (see ToyConfig)."""
    def make(**fields) -> Toy:
        return export_toy(ToyConfig(**fields))

    return make
