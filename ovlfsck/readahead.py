"""Cold-cache read-ahead of an ext4 file system's metadata, the way e2fsck reads it.

A check reads every inode (its xattrs) and every directory of the layers. On a cold page
cache each of those is a small random read: ~24,000 single-block directory reads and the
inode-table blocks for the 200,000-entry bench set. ext4 keeps inode tables, directory
blocks and xattr blocks as buffer heads in the *block device's* page cache, so a buffered
read() of the device fills the very pages the later lstat/listxattr/getdents look for.
This module reads them in large sequential reads instead: the used part of each group's
inode table, then the directory and xattr blocks that those inodes point to.

It runs as a separate process (`start`), beside the walk, only reads, and is only a hint:
whatever it reads or fails to read, the check reads the file system as it would without it
and gives the same result. It does nothing when

- a layer is not on ext2/3/4 on a block device this process can open (xfs, btrfs, tmpfs,
  overlay, ...: other file systems keep their metadata elsewhere);
- the inode tables near the layers are already cached (a warm run: probed with
  RWF_NOWAIT reads, which fail instead of waiting for the disk);
- `OVLFSCK_READAHEAD=0` is set.

It reads the groups nearest to the layers' roots first (ext4 allocates a directory's
entries near it), and at most a quarter of MemAvailable (and at most READ_LIMIT); the walk
stops it when it ends.

This file is also the child's script: `python -I -S readahead.py PATH...`. It imports only
the standard library, so the child starts in a few milliseconds.
"""
from __future__ import annotations

import array
import os
import stat
import struct
import sys
from typing import Optional

# superblock feature bits (fs/ext4/ext4.h)
INCOMPAT_META_BG, INCOMPAT_64BIT, INCOMPAT_FLEX_BG = 0x10, 0x80, 0x200
RO_COMPAT_SPARSE_SUPER, RO_COMPAT_GDT_CSUM, RO_COMPAT_METADATA_CSUM = 0x1, 0x10, 0x400
BG_INODE_UNINIT = 0x1
EXT4_EXTENTS_FL, EXT4_INLINE_DATA_FL = 0x80000, 0x10000000
EXT4_EXT_MAGIC = 0xF30A

CHUNK = 2 << 20  # bytes per read(); a multiple of every inode size (128..1024)
GAP = 256 << 10  # directory blocks this close are read in one go, the gap with them
READ_LIMIT = 2 << 30  # never more than this per file system
BATCH = 8192  # blocks found before they are read (bounds this process's memory)
PROBES = 16  # pages of the nearest inode tables probed for a warm cache

_INODE_HEAD = struct.Struct("<H24xH")  # i_mode (0), i_links_count (26)
_FLAGS = struct.Struct("<I")  # i_flags (32)
_EXT_HEADER = struct.Struct("<4H")  # eh_magic, eh_entries, eh_max, eh_depth (40)
_EXTENT = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
_BLOCKS = struct.Struct("<12I")  # block-mapped: the 12 direct block numbers (40)
_ACL_LO, _ACL_HI = struct.Struct("<I"), struct.Struct("<H")  # i_file_acl (104, 118)


def block_device(dev: int) -> Optional[str]:
    """The device node (/dev/NAME) of the block device with this number, checked to be that
    device; None if there is none (the file system is not on a block device). Also used by
    handles.py: this module may import only the standard library."""
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent") as fh:
            for line in fh:
                if line.startswith("DEVNAME="):
                    node = "/dev/" + line.split("=", 1)[1].strip()
                    st = os.stat(node)
                    if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
                        return node
    except OSError:
        return None
    return None


def _has_super(group: int, sparse: bool) -> bool:
    """Whether a group holds a superblock backup (sparse_super: groups 0, 1 and powers
    of 3, 5 and 7)."""
    if not sparse or group <= 1:
        return True
    for base in (3, 5, 7):
        x = base
        while x < group:
            x *= base
        if x == group:
            return True
    return False


class Ext4:
    """The geometry of an ext2/3/4 file system, from its superblock (ValueError if the
    device holds none)."""

    def __init__(self, fd: int) -> None:
        sb = os.pread(fd, 1024, 1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != 0xEF53:
            raise ValueError("not ext2/3/4")
        self.fd = fd
        (self.inodes_count, blocks_lo, _r, _f, _fi, self.first_data_block, log_bs, _lc,
         self.blocks_per_group, _cpg, self.inodes_per_group) = struct.unpack_from("<11I", sb, 0)
        if log_bs > 6 or not self.blocks_per_group or not self.inodes_per_group:
            raise ValueError("implausible ext4 superblock")
        self.block_size = 1024 << log_bs
        rev = struct.unpack_from("<I", sb, 76)[0]
        self.inode_size = struct.unpack_from("<H", sb, 88)[0] if rev else 128
        if self.inode_size < 128 or self.inode_size & (self.inode_size - 1) or self.inode_size > self.block_size:
            raise ValueError("implausible inode size")
        _compat, self.incompat, self.ro_compat = struct.unpack_from("<3I", sb, 92)
        blocks = blocks_lo
        self.desc_size = 32
        if self.incompat & INCOMPAT_64BIT:
            blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
            self.desc_size = max(64, struct.unpack_from("<H", sb, 0xFE)[0])
        self.first_meta_bg = struct.unpack_from("<I", sb, 0x104)[0]
        self.groups_count = -(-(blocks - self.first_data_block) // self.blocks_per_group)
        # bg_itable_unused is kept only with group-descriptor checksums
        self.itable_unused_ok = bool(self.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))

    def _gdt_block(self, i: int) -> int:
        """The block of the i-th block of group descriptors (the primary copy)."""
        if not (self.incompat & INCOMPAT_META_BG) or i < self.first_meta_bg:
            return self.first_data_block + 1 + i
        group = i * (self.block_size // self.desc_size)  # the meta group's first group
        sparse = bool(self.ro_compat & RO_COMPAT_SPARSE_SUPER)
        return self.first_data_block + group * self.blocks_per_group + _has_super(group, sparse)

    def inode_tables(self) -> list[tuple[int, int, int]]:
        """(group, byte offset, bytes in use) of every group's inode table with inodes in
        use (without group checksums: the whole table)."""
        per = self.block_size // self.desc_size
        nblocks = -(-self.groups_count // per)
        if not (self.incompat & INCOMPAT_META_BG):
            raw = os.pread(self.fd, nblocks * self.block_size, self._gdt_block(0) * self.block_size)
        else:
            raw = b"".join(os.pread(self.fd, self.block_size, self._gdt_block(i) * self.block_size)
                           for i in range(nblocks))
        out = []
        big = self.desc_size >= 64
        for g in range(min(self.groups_count, len(raw) // self.desc_size)):
            o = g * self.desc_size
            table = struct.unpack_from("<I", raw, o + 8)[0]
            flags, = struct.unpack_from("<H", raw, o + 18)
            unused, = struct.unpack_from("<H", raw, o + 28)
            if big:
                table |= struct.unpack_from("<I", raw, o + 40)[0] << 32
                unused |= struct.unpack_from("<H", raw, o + 50)[0] << 16
            if not self.itable_unused_ok:
                used = self.inodes_per_group
            elif flags & BG_INODE_UNINIT:
                used = 0
            else:
                used = max(0, self.inodes_per_group - unused)
            if used and table:
                out.append((g, table * self.block_size, used * self.inode_size))
        return out


def metadata_blocks(fs: Ext4, table: bytes, out: array.array) -> None:
    """Append (byte offset, length) of the directory blocks and xattr blocks named by the
    in-use inodes of this piece of an inode table to `out`. Directories with an extent tree
    deeper than the inode (very large ones) and anything implausible are left out: the
    walk reads those itself."""
    isz, bs = fs.inode_size, fs.block_size
    limit = fs.block_size * (fs.blocks_per_group * fs.groups_count + fs.first_data_block)
    head, flags_of, ext_header, extent = _INODE_HEAD.unpack_from, _FLAGS.unpack_from, \
        _EXT_HEADER.unpack_from, _EXTENT.unpack_from
    for o in range(0, len(table) - isz + 1, isz):
        mode, links = head(table, o)
        if not mode or not links:
            continue  # free, or deleted
        acl = _ACL_LO.unpack_from(table, o + 104)[0] | _ACL_HI.unpack_from(table, o + 118)[0] << 32
        if acl and acl * bs < limit:
            out.append(acl * bs)
            out.append(bs)
        if mode & 0xF000 != 0x4000:
            continue
        flags, = flags_of(table, o + 32)
        if flags & EXT4_INLINE_DATA_FL:
            continue  # the entries are in the inode itself
        if flags & EXT4_EXTENTS_FL:
            magic, entries, _max, depth = ext_header(table, o + 40)
            if magic != EXT4_EXT_MAGIC or depth or entries > 4:
                continue
            for e in range(entries):
                _lblk, length, hi, lo = extent(table, o + 52 + 12 * e)
                if length > 32768:
                    length -= 32768  # an unwritten extent
                start = ((hi << 32) | lo) * bs
                if length and start + length * bs <= limit:
                    out.append(start)
                    out.append(length * bs)
        else:
            for block in _BLOCKS.unpack_from(table, o + 40):
                if block and block * bs < limit:
                    out.append(block * bs)
                    out.append(bs)


def coalesce(ranges: list[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """Byte ranges sorted and merged where they overlap or are at most `gap` apart."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if length <= 0:
            continue
        if out and start <= out[-1][0] + out[-1][1] + gap:
            s, n = out[-1]
            out[-1] = (s, max(n, start + length - s))
        else:
            out.append((start, length))
    return out


def nearest_first(tables: list[tuple[int, int, int]], groups: set[int]) -> list[tuple[int, int]]:
    """The inode tables as byte ranges, contiguous ones merged, those of the groups nearest
    to `groups` (the layers' roots) first."""
    merged: list[list[int]] = []  # [offset, length, distance]
    for g, off, length in sorted(tables, key=lambda t: t[1]):
        dist = min((abs(g - r) for r in groups), default=0)
        if merged and off == merged[-1][0] + merged[-1][1]:
            merged[-1][1] += length
            merged[-1][2] = min(merged[-1][2], dist)
        else:
            merged.append([off, length, dist])
    merged.sort(key=lambda m: (m[2], m[0]))
    return [(m[0], m[1]) for m in merged]


def is_warm(fd: int, ranges: list[tuple[int, int]], page: int = 4096) -> bool:
    """Whether pages spread over the first ranges are all in the page cache already
    (RWF_NOWAIT reads fail rather than wait for the disk). Unknown counts as warm: then
    nothing is read."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None or not ranges:
        return True
    span = []
    for start, length in ranges:
        span.append((start, length))
        if sum(n for _, n in span) >= PROBES * CHUNK:
            break
    total = sum(n for _, n in span)
    buf = bytearray(page)
    for k in range(PROBES):
        pos = total * k // PROBES
        for start, length in span:
            if pos < length:
                off = (start + pos) // page * page
                break
            pos -= length
        try:
            os.preadv(fd, [buf], off, nowait)
        except BlockingIOError:
            return False
        except OSError:
            return True
    return True


def read_ranges(fd: int, ranges, left, each=None) -> int:
    """Read the ranges in CHUNK-sized reads while `left()` (the bytes the budget has left)
    is positive; `each(data)` gets every piece read. Returns the bytes read."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    for start, length in ranges:
        off, end = start, start + length
        while off < end:
            room = left()
            if room <= 0:
                return done
            n = os.preadv(fd, [view[:min(CHUNK, end - off, room)]], off)
            if n <= 0:
                break
            if each is not None:
                each(view[:n])
            off += n
            done += n
    return done


def mem_budget() -> int:
    """A quarter of MemAvailable (READ_LIMIT at most): what the read-ahead may fill."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return min(READ_LIMIT, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError):
        pass
    return 0


def warm(dev: int, root_inos: list[int], budget: int, force: bool = False) -> dict:
    """Read the metadata of the ext4 file system on block device `dev` (the groups of
    `root_inos` first) into the page cache. Returns what it did, for tests and -v."""
    node = block_device(dev)
    if node is None:
        raise OSError(f"no block device {os.major(dev)}:{os.minor(dev)}")
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fs = Ext4(fd)
        groups = {(ino - 1) // fs.inodes_per_group for ino in root_inos if 0 < ino <= fs.inodes_count}
        tables = nearest_first(fs.inode_tables(), groups)
        if not force and is_warm(fd, tables):
            return {"warm": True, "tables": 0, "metadata": 0}
        state = {"tables": 0, "metadata": 0, "ranges": 0}
        found = array.array("Q")

        def flush() -> None:
            # The blocks found so far, in disk order, as few large reads.
            pairs = [(found[i], found[i + 1]) for i in range(0, len(found), 2)]
            del found[:]
            meta = coalesce(pairs, GAP)
            state["ranges"] += len(meta)
            state["metadata"] += read_ranges(fd, meta, left)

        def left() -> int:
            return budget - state["tables"] - state["metadata"]

        def each(data) -> None:
            state["tables"] += len(data)
            metadata_blocks(fs, data, found)
            if len(found) >= 2 * BATCH:
                flush()

        read_ranges(fd, tables, left, each)
        flush()
        return {"warm": False, **state}
    finally:
        os.close(fd)


def main(paths: list[str]) -> int:
    """The child: warm the file system of each path's device once (roots grouped by
    device). Any error leaves that device alone."""
    budget = mem_budget()
    devices: dict[int, list[int]] = {}
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        devices.setdefault(st.st_dev, []).append(st.st_ino)
    for dev, inos in devices.items():
        if budget <= 0:
            break
        try:
            done = warm(dev, inos, budget)
        except (OSError, ValueError, struct.error):
            continue
        budget -= done["tables"] + done["metadata"]
    return 0


def start(paths: list[str]):
    """Start the read-ahead child for these layer roots (None when it is turned off or
    cannot start). The caller stops it with `stop` when its walk ends."""
    import subprocess

    if os.environ.get("OVLFSCK_READAHEAD", "") == "0" or not sys.executable:
        return None
    script = os.path.abspath(__file__)
    if not script.endswith(".py") or not os.path.isfile(script):
        return None
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", script, *paths],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True)
    except OSError:
        return None


def stop(proc) -> None:
    """Stop the read-ahead child if it still runs (what it did not read, the walk read)."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:
            pass
    proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
