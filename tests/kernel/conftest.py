"""Fixtures for the real-kernel tests in this directory.

* ``make_fs(fstype="ext4", size_mib=None, name=None) -> LoopFS``: factory fixture; creates and
  mounts a scratch filesystem (loop ext4/xfs image, or tmpfs) under the test's ``tmp_path``.
  Every filesystem it made is unmounted and its loop device detached when the test ends,
  whatever happened (images of failed tests are kept in ``tmp_path`` for post-mortem).
* ``ovl_mnt``: a fresh (not yet mounted) directory to mount an overlay on.
* Per-test leak check (autouse): after the test and all its fixtures are torn down, anything
  still mounted / attached under the test's ``tmp_path`` is cleaned up and the test errors.
* Kernel log capture (autouse): when a test fails, the ``overlayfs:`` kernel lines logged since
  it started are attached to its report (section "overlayfs dmesg").

The session-wide safety net and the ``kernel`` marker / skip logic live in tests/conftest.py.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from . import kutil


@pytest.fixture
def make_fs(tmp_path):
    if kutil.can_use_kernel() is not None:
        pytest.skip(f"kernel test skipped: {kutil.can_use_kernel()}")
    with ExitStack() as stack:
        def factory(fstype: str = "ext4", size_mib: int | None = None, name: str | None = None,
                    mkfs_args=()) -> kutil.LoopFS:
            if not kutil.have_mkfs(fstype):
                pytest.skip(f"mkfs.{fstype} not installed")
            fs = kutil.LoopFS(tmp_path, fstype, size_mib=size_mib, name=name,
                              mkfs_args=mkfs_args)
            stack.enter_context(fs)
            return fs
        yield factory


@pytest.fixture
def ovl_mnt(tmp_path):
    p = tmp_path / "ovl"
    p.mkdir(exist_ok=True)
    return p


@pytest.fixture(autouse=True)
def _per_test_leak_check(request, tmp_path_factory):
    yield
    # tmp_path is only created if the test used it; look it up without creating it
    try:
        tmp = request.node.funcargs.get("tmp_path")
    except AttributeError:
        tmp = None
    if tmp is None or kutil.can_use_kernel() is not None:
        return
    leaked = kutil.sweep_leaks(tmp)
    if leaked:
        pytest.fail("test leaked mounts/loop devices (now cleaned up):\n  " + "\n  ".join(leaked),
                    pytrace=False)


@pytest.fixture(autouse=True)
def _kernel_log_capture(request):
    if kutil.can_use_kernel() is None:
        request.node._ovl_dmesg_marker = kutil.dmesg_mark()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    marker = getattr(item, "_ovl_dmesg_marker", None)
    if rep.when == "call" and marker and rep.failed:
        lines = kutil.dmesg_overlay_since(marker)
        rep.sections.append(("overlayfs dmesg (may include other processes' mounts)",
                             "\n".join(lines) or "(none)"))
