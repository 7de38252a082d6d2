"""Top-level pytest configuration shared by every test directory.

* Registers the ``kernel`` marker (pyproject.toml registers it too; doing it here keeps
  ``--strict-markers`` happy when pytest is run with another ini file).
* Skips any test marked ``kernel`` when the machine cannot mount real overlays (not root, no
  overlayfs, no loop devices, no mkfs.ext4); the reason comes from
  ``kernel.kutil.can_use_kernel()``.
* Installs a session-wide safety net: when the session ends, any overlay mount, other mount or
  loop device whose mountpoint / layer directories / backing file lies under pytest's basetemp
  is torn down, and the session is made to fail loudly (a warning *and* a teardown error), so
  that a leaking test or helper cannot go unnoticed.  Only paths under this session's basetemp
  are ever touched, so concurrently running pytest sessions are safe.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent


def _kutil():
    """Import tests/kernel/kutil.py whatever the import mode / package layout is."""
    try:
        from kernel import kutil  # default "prepend" import mode puts tests/ on sys.path
    except ImportError:
        if str(_TESTS_DIR) not in sys.path:
            sys.path.insert(0, str(_TESTS_DIR))
        from kernel import kutil
    return kutil


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "kernel: needs root, overlayfs and loop devices; mounts real overlays",
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("kernel") is not None:
        reason = _kutil().can_use_kernel()
        if reason is not None:
            pytest.skip(f"kernel test skipped: {reason}")


@pytest.fixture(scope="session", autouse=True)
def _ovl_leak_guard(tmp_path_factory):
    """Session-end sweep of mounts / loop devices left under the basetemp (fails loudly)."""
    yield
    basetemp = tmp_path_factory.getbasetemp()
    leaked = _kutil().sweep_leaks(basetemp)
    if leaked:
        msg = (
            "LEAK: tests left mounts/loop devices under %s; they were cleaned up now:\n  %s"
            % (basetemp, "\n  ".join(leaked))
        )
        warnings.warn(msg, pytest.PytestWarning, stacklevel=1)
        print("\n" + msg, file=sys.stderr)
        pytest.fail(msg, pytrace=False)
