"""The progress bar: on stderr for people, never in data output."""
import io
import os
import subprocess
import sys

import pytest

from ovlfsck import engine
from ovlfsck.engine import Mode, Policy
from ovlfsck.fixture import build
from ovlfsck.stack import build_stack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for trusted.* xattrs")

SPEC = "[lower:0]\n" + "".join(f"dir d{i}\nfile d{i}/f text=x\n" for i in range(30)) + "[upper]\nxattr . impure=y\n"


def _stack(tmp_path):
    layers = build(SPEC, str(tmp_path))
    os.makedirs(tmp_path / "work")
    return build_stack([f"lowerdir={layers['lower:0']},upperdir={layers['upper']},workdir={tmp_path}/work"])


def test_bar_counts_every_directory(tmp_path, monkeypatch):
    # No delay and no refresh throttling, so that a short run shows every step.
    real = engine._progress_bar
    monkeypatch.setattr(engine, "_progress_bar", lambda stream, r: real(stream, r, delay=0, mininterval=0))
    out = io.StringIO()
    result = engine.run(_stack(tmp_path), Policy(Mode.NO), None, progress=out)
    assert result.exit_code == 0
    text = out.getvalue()
    assert "31/31" in text and "dir" in text  # the root and its 30 subdirectories


def test_no_bar_without_a_terminal_or_with_json(tmp_path):
    stack = _stack(tmp_path)
    opts = f"lowerdir={stack.lowers[0].path},upperdir={stack.upper.path},workdir={stack.work.path}"
    for extra in ([], ["--json"], ["-q"]):
        r = subprocess.run([sys.executable, "-m", "ovlfsck", "check", "-n", *extra, "-o", opts],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "dir/s" not in r.stderr and "it/s" not in r.stderr and "\r" not in r.stderr
