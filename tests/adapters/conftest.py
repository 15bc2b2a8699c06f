"""The adapter tests' fixtures; the shared toys live in adapter_toys.py."""

from __future__ import annotations

import pytest

import trainlab.adapters as adapters


@pytest.fixture(params=adapters.adapter_names())
def method(request: pytest.FixtureRequest) -> str:
    return request.param
