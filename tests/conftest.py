"""Shared fixtures: GPU tests skip on machines without CUDA, Triton tests where our kernels
cannot run (no Triton, or one older than ``hybridkit.compat.MIN_TRITON``); every test starts
from a fixed seed; ``one_thread`` for tiny training runs; ``cli_error`` for the command line's
clean errors. (Shared plain helpers live in ``helpers.py``.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import hybridkit.layers  # noqa: F401  (register built-in layer kinds)


def pytest_collection_modifyitems(config, items):
    from hybridkit.compat import TRITON_UNUSABLE

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if TRITON_UNUSABLE:  # e.g. torch 2.5, which pins Triton 3.1
        skips["triton"] = pytest.mark.skip(reason=f"needs our Triton kernels: {TRITON_UNUSABLE}")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is as fast on an idle machine and many times faster on a
    busy one, where OpenMP workers wait for a free core at every op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli_error(capsys) -> Callable[..., str]:
    """``cli_error(*args)`` runs ``hybridkit ARGS`` in-process, checks that it exits with status 2
    and a message without a traceback, and returns that message (stderr)."""
    from hybridkit.cli import main

    def run(*args: str) -> str:
        rc = main(list(args))
        err = capsys.readouterr().err
        assert rc == 2, (args, rc, err)
        assert "Traceback" not in err, (args, err)
        return err

    return run
