"""Shared fixtures: GPU tests skip on machines without CUDA; every test starts from a fixed seed."""

from __future__ import annotations

import pytest
import torch

import hybridkit.layers  # noqa: F401  (register built-in layer kinds)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
