"""Fixtures for the real-kernel problem-code scenarios (tests/scenarios).

* ``bed(nlowers=1, options="") -> Bed``: factory fixture.  Creates a fresh ext4 loop
  filesystem (always unmounted and detached when the test ends, whatever happened), with the
  layer directories ``l0..lN``, ``u`` and ``w`` on it, and an overlay mount point outside it
  (see helpers.Bed).
* Per-test leak check: anything still mounted/attached under the test's tmp_path after the
  test (and its fixtures) fails it.
"""
from __future__ import annotations

from contextlib import ExitStack

import pytest

from .helpers import Bed, kutil


@pytest.fixture
def bed(tmp_path):
    """Factory: bed(nlowers=1, options="") -> Bed on a fresh ext4 loop filesystem."""
    reason = kutil.can_use_kernel()
    if reason is not None:
        pytest.skip(f"kernel test skipped: {reason}")
    count = [0]
    with ExitStack() as stack:
        def factory(nlowers: int = 1, options: str = "") -> Bed:
            count[0] += 1
            fs = kutil.LoopFS(tmp_path, "ext4", size_mib=64, name=f"fs{count[0]}")
            stack.enter_context(fs)
            mnt = tmp_path / f"ovl{count[0]}"
            mnt.mkdir(exist_ok=True)
            return Bed(fs, mnt, nlowers, options)
        yield factory


@pytest.fixture(autouse=True)
def _scenario_leak_check(request):
    """After the test and its fixtures: nothing may stay mounted/attached under tmp_path."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or kutil.can_use_kernel() is not None:
        return
    leaked = kutil.sweep_leaks(tmp)
    if leaked:
        pytest.fail("test leaked mounts/loop devices (now cleaned up):\n  " + "\n  ".join(leaked),
                    pytrace=False)
