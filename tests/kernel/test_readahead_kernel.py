"""readahead.py on a real ext4: it fills the block device's page cache with the blocks ext4
later reads for a directory (so a cold check's getdents finds them cached), and a warm cache
is told and left alone.

The cache is made cold for this device only: unmount, `blockdev --flushbufs`, mount again.
Whether a block is cached is asked with an RWF_NOWAIT read of the device (it fails with
EAGAIN instead of reading the disk).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ovlfsck import readahead

from . import kutil

pytestmark = pytest.mark.kernel


def _cached(device: str, offsets: list[int]) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        buf = bytearray(4096)
        n = 0
        for off in offsets:
            try:
                os.preadv(fd, [buf], off, os.RWF_NOWAIT)
                n += 1
            except BlockingIOError:
                pass
        return n
    finally:
        os.close(fd)


@pytest.mark.skipif(not (shutil.which("debugfs") and shutil.which("blockdev")),
                    reason="debugfs and blockdev are needed")
def test_cold_directory_blocks_are_read_ahead(make_fs):
    fs = make_fs("ext4", mkfs_args=["-b", "4096"])
    dirs = []
    for i in range(60):
        d = fs.path("layer", f"pkg{i:02}", "share")
        d.mkdir(parents=True)
        for j in range(30):
            (d / f"file-{j:02}-{'x' * 40}").write_text("")
        dirs.append(f"/layer/pkg{i:02}/share")
    root = fs.path("layer")
    kutil.umount(fs.mnt)
    fs._mounted = False
    blocks = []
    for d in dirs:
        out = subprocess.run(["debugfs", "-R", f"blocks {d}", fs.device], capture_output=True,
                             text=True, check=True).stdout
        blocks += [int(b) * 4096 for b in out.split()]
    assert len(blocks) >= 60
    subprocess.run(["blockdev", "--flushbufs", fs.device], check=True)
    subprocess.run(["mount", "-t", "ext4", fs.device, str(fs.mnt)], check=True)
    fs._mounted = True
    st = os.lstat(root)
    before = _cached(fs.device, blocks)
    assert before < len(blocks) // 2, f"{before} of {len(blocks)} cached after a flush"
    done = readahead.warm(st.st_dev, [st.st_ino], 1 << 30)
    assert done["warm"] is False and done["tables"] > 0 and done["metadata"] > 0, done
    assert _cached(fs.device, blocks) == len(blocks)
    # now warm: told, nothing read
    assert readahead.warm(st.st_dev, [st.st_ino], 1 << 30) == {"warm": True, "tables": 0,
                                                                "metadata": 0}
    # the check reads the same tree as before (the read-ahead only read)
    assert sorted(os.listdir(root)) == [f"pkg{i:02}" for i in range(60)]


def test_the_child_reads_nothing_on_xfs(make_fs):
    fs = make_fs("xfs")
    (fs.path("d")).mkdir()
    st = os.lstat(fs.path("d"))
    with pytest.raises(ValueError):
        readahead.warm(st.st_dev, [st.st_ino], 1 << 30)
    p = subprocess.run([sys.executable, "-I", "-S", readahead.__file__, str(fs.path("d"))],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == ""
