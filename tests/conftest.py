"""Fixtures and hooks of the test suite.  The helpers that test files import (devices,
backends, tolerances, comparisons) are in support.py; importing it first sets
TRITON_INTERPRET=1 on machines without a GPU, before triton is loaded."""
from __future__ import annotations

import os

import pytest
import torch

from support import BACKEND_DEVICE, backend_id


@pytest.fixture(params=BACKEND_DEVICE, ids=backend_id)
def backend_device(request):
    return request.param


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group (FileStore, 10 s timeout) for the duration of a test."""
    import datetime

    import torch.distributed as dist

    store = dist.FileStore(os.fspath(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=10))
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a learning test that takes tens of seconds (runs by default; "
                                       "deselect with -m 'not slow')")
    config.addinivalue_line("markers", "interpreter_heavy(predicate): cases, chosen by predicate(params), that "
                                       "are too slow for the Triton interpreter; not collected for Triton on "
                                       "CPU tensors, still run on a GPU")


def pytest_collection_modifyitems(config, items):
    """Drops the interpreter_heavy cases of backend_device=("triton", "cpu")."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("interpreter_heavy")
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if marker and params.get("backend_device") == ("triton", "cpu") and marker.args[0](params):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
