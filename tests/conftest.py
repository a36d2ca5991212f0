"""Shared pytest configuration."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/vm boots a real guest: mark it so `-m vm` selects it.
    for item in items:
        if "/tests/vm/" in str(item.path):
            item.add_marker(pytest.mark.vm)
