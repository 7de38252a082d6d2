"""readahead.py: the ext4 metadata it finds, checked against debugfs on images that
mkfs.ext4 builds from a directory (no root, no mount), and its life beside the walk.

Kernel side (it fills the block device's page cache that ext4 reads): tests/kernel/
test_readahead_kernel.py.
"""

from __future__ import annotations

import array
import os
import re
import shutil
import subprocess
import sys

import pytest

from ovlfsck import readahead
from ovlfsck.fsio import Xattrs
from ovlfsck.walk import Walker

needs_e2fsprogs = pytest.mark.skipif(
    not (shutil.which("mkfs.ext4") and shutil.which("debugfs")),
    reason="mkfs.ext4 and debugfs (e2fsprogs) are needed")


def _tree(root):
    """Directories of one block and of many blocks (long names), files with data."""
    os.makedirs(root / "a" / "b" / "c")
    for i in range(40):
        (root / "a" / f"d{i:02}").mkdir()
        (root / "a" / f"d{i:02}" / "f").write_bytes(b"x" * 100)
    big = root / "wide"
    big.mkdir()
    for i in range(300):  # ~300 * 80 bytes of entries: several directory blocks
        (big / (f"{i:04}-" + "n" * 70)).write_text("")
    (root / "data").write_bytes(os.urandom(256 << 10))  # 64 data blocks: not metadata


def _debugfs(image, request: str) -> str:
    p = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _blocks(image, path: str) -> list[int]:
    return [int(b) for b in _debugfs(image, f"blocks {path}").split()]


def _found(image) -> tuple[readahead.Ext4, list[tuple[int, int]]]:
    fd = os.open(image, os.O_RDONLY)
    try:
        fs = readahead.Ext4(fd)
        found = array.array("Q")
        for _g, off, length in fs.inode_tables():
            readahead.metadata_blocks(fs, os.pread(fd, length, off), found)
        return fs, readahead.coalesce([(found[i], found[i + 1]) for i in range(0, len(found), 2)])
    finally:
        os.close(fd)


def _covered(ranges, offset: int) -> bool:
    return any(s <= offset < s + n for s, n in ranges)


@needs_e2fsprogs
@pytest.mark.parametrize("features", [
    "^metadata_csum,^uninit_bg",  # no group checksums: every inode table read whole
    "metadata_csum,64bit",  # 64-byte group descriptors, bg_itable_unused used
    "^extent,^64bit",  # block-mapped directories (ext3 style)
])
def test_every_directory_block_is_found_and_no_file_data(tmp_path, features):
    src = tmp_path / "src"
    _tree(src)
    image = tmp_path / "fs.img"
    p = subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", features,
                        "-d", str(src), str(image), "64M"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"mkfs.ext4 -O {features}: {p.stderr.strip()}")
    fs, ranges = _found(image)
    assert fs.block_size == 4096 and fs.inode_size == 256
    dirs = ["/", "/a", "/a/b", "/a/b/c", "/wide"] + [f"/a/d{i:02}" for i in range(40)]
    wide = _blocks(image, "/wide")
    assert len(wide) > 1, "the wide directory should span several blocks"
    for d in dirs:
        blocks = _blocks(image, d)
        assert blocks, d
        for b in blocks:
            assert _covered(ranges, b * 4096), f"{d}: block {b} not found ({features})"
    # file data is not metadata: none of the big file's blocks is read
    data = _blocks(image, "/data")
    assert len(data) >= 64
    assert not any(_covered(ranges, b * 4096) for b in data), features


@needs_e2fsprogs
def test_an_external_xattr_block_is_found(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_text("")
    try:  # too big to fit in the inode: ext4 puts it in a block of its own
        os.setxattr(f, "user.big", b"v" * 1500)
    except OSError as exc:
        pytest.skip(f"user xattrs on {src}: {exc.strerror}")
    image = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-d", str(src),
                    str(image), "32M"], check=True, capture_output=True)
    m = re.search(r"File ACL: (\d+)", _debugfs(image, "stat /f"))
    if not m or int(m.group(1)) == 0:
        pytest.skip("mkfs.ext4 -d did not copy the xattr to a block")
    _fs, ranges = _found(image)
    assert _covered(ranges, int(m.group(1)) * 4096)


def test_not_ext4_is_refused(tmp_path):
    img = tmp_path / "zero.img"
    img.write_bytes(bytes(8192))
    fd = os.open(img, os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            readahead.Ext4(fd)
    finally:
        os.close(fd)


def test_coalesce_and_nearest_first():
    assert readahead.coalesce([(100, 10), (0, 10), (10, 5), (200, 0)]) == [(0, 15), (100, 10)]
    assert readahead.coalesce([(0, 10), (30, 10)], gap=20) == [(0, 40)]
    assert readahead.coalesce([(0, 10), (31, 10)], gap=20) == [(0, 10), (31, 10)]
    # tables of groups 0-1 contiguous, group 5 apart: the layers' group 5 first
    tables = [(0, 1000, 100), (1, 1100, 100), (5, 9000, 50)]
    assert readahead.nearest_first(tables, {5}) == [(9000, 50), (1000, 200)]
    assert readahead.nearest_first(tables, {0}) == [(1000, 200), (9000, 50)]


def test_read_ranges_keeps_to_the_budget(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(os.urandom(3 * readahead.CHUNK + 100))
    fd = os.open(f, os.O_RDONLY)
    try:
        seen = []
        got = readahead.read_ranges(fd, [(0, 3 * readahead.CHUNK + 100)],
                                    lambda: readahead.CHUNK + 7 - sum(seen),
                                    lambda data: seen.append(len(data)))
        assert got == sum(seen) == readahead.CHUNK + 7
    finally:
        os.close(fd)


def test_the_child_leaves_what_it_cannot_read_alone(tmp_path):
    # not on a block device (or not ext4, or no such path): it exits 0 at once, reading nothing
    p = subprocess.run([sys.executable, "-I", "-S", readahead.__file__, str(tmp_path),
                        str(tmp_path / "missing"), "/proc"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stderr == ""


def _small_stack(tmp_path):
    from ovlfsck.stack import build_stack

    for d in ("l", "u", "w"):
        (tmp_path / d).mkdir()
    (tmp_path / "l" / "f").write_text("")
    return build_stack([], [str(tmp_path / "l")], str(tmp_path / "u"), str(tmp_path / "w"))


def test_the_walk_starts_and_reaps_the_child(tmp_path, monkeypatch):
    stack = _small_stack(tmp_path)
    monkeypatch.setenv("OVLFSCK_PREFETCH", "1")  # started with the prefetch child, at once
    started = []
    real = readahead.start

    def start(paths):
        assert sorted(paths) == sorted(lay.path for lay in stack.namespace_layers)
        # a child surely still running when the walk ends
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started.append(proc)
        return proc

    monkeypatch.setattr(readahead, "start", start)
    walker = Walker(stack, Xattrs("trusted"), lambda *a: None, prefetch=True)
    assert [v.path for v in walker.visits()] == [""]
    assert len(started) == 1 and started[0].returncode is not None
    assert walker.readahead is None
    # turned off: no child
    monkeypatch.setattr(readahead, "start", real)
    monkeypatch.setenv("OVLFSCK_READAHEAD", "0")
    assert readahead.start([str(tmp_path)]) is None


def test_block_device_is_none_off_block_devices():
    # /proc has an anonymous device number: no /sys/dev/block entry, no node
    assert readahead.block_device(os.stat("/proc").st_dev) is None
    root = os.stat("/").st_dev
    node = readahead.block_device(root)
    if node is not None:  # the root fs is on a block device here: its node, checked
        assert os.stat(node).st_rdev == root
