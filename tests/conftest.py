"""Fixtures shared by the test folders: the backends this machine runs."""

from __future__ import annotations

import pytest

from supsup_fast import ops, testing

#: CPU backends available here (``reference`` always; ``cpu_ext`` with the compiled extension)
CPU_BACKENDS = [name for name, device in testing.available_backends() if device == "cpu"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Every test using it runs once per CPU backend, with that backend forced for every op."""
    with ops.force_backend(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """One torch thread for the test (``testing.torch_threads``); modules of tiny-tensor tests opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with testing.torch_threads(1):
        yield
