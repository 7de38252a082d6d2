"""Overlay file handles (`struct ovl_fb`) and the syscalls that produce real ones.

Wire format (overlay-format.md §4.1): version(0) magic(0xfb) len flags type uuid[16] fid,
stored as exactly `len` bytes. Index entry names are the lowercase hex of the same bytes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from ovlfsck.readahead import block_device

OVL_FH_VERSION = 0
OVL_FH_MAGIC = 0xFB
FLAG_BIG_ENDIAN = 0x01
FLAG_ANY_ENDIAN = 0x02
FLAG_PATH_UPPER = 0x04
FLAG_ALL = 0x07
HEADER_LEN = 21
MAX_HANDLE_SZ = 128
CPU_ENDIAN_FLAG = FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
NULL_UUID = bytes(16)


class HandleError(ValueError):
    """The bytes are not a valid overlay file handle (the kernel says EINVAL)."""


class UnknownHandle(ValueError):
    """Valid framing, but a version/flag/endianness the kernel treats as 'unknown' (ENODATA)."""


@dataclass(frozen=True, slots=True)  # (slots: the index keeps one per entry to the end)
class OvlFh:
    flags: int
    fid_type: int
    uuid: bytes
    fid: bytes
    version: int = OVL_FH_VERSION

    def encode(self) -> bytes:
        length = HEADER_LEN + len(self.fid)
        return bytes([self.version, OVL_FH_MAGIC, length, self.flags, self.fid_type]) + self.uuid + self.fid

    def index_name(self) -> str:
        return self.encode().hex()

    def same_object(self, other: "OvlFh") -> bool:
        """Same uuid, type and fid (flags aside), i.e. the kernel's memcmp minus PATH_UPPER."""
        return (self.uuid, self.fid_type, self.fid) == (other.uuid, other.fid_type, other.fid)


def decode(raw: bytes) -> OvlFh:
    """Parse stored bytes exactly as ovl_check_fb_len/ovl_get_fh do.

    Raises HandleError for what the kernel calls invalid (EINVAL) and UnknownHandle for
    what it silently treats as an unknown origin (ENODATA).
    """
    if len(raw) < HEADER_LEN:
        raise HandleError(f"too short ({len(raw)} bytes, need at least {HEADER_LEN})")
    version, magic, length, flags, fid_type = raw[0], raw[1], raw[2], raw[3], raw[4]
    if length < HEADER_LEN or len(raw) < length:
        raise HandleError(f"length field {length} does not match {len(raw)} stored bytes")
    if magic != OVL_FH_MAGIC:
        raise HandleError(f"bad magic 0x{magic:02x}")
    if version > OVL_FH_VERSION or flags & ~FLAG_ALL:
        raise UnknownHandle(f"unknown version {version} or flags 0x{flags:02x}")
    if not flags & FLAG_ANY_ENDIAN and (flags & FLAG_BIG_ENDIAN) != CPU_ENDIAN_FLAG:
        raise UnknownHandle("handle written on a machine of the other endianness")
    uuid = bytes(raw[5:21])
    if len(_UUIDS) < 64:
        uuid = _UUIDS.setdefault(uuid, uuid)
    return OvlFh(flags, fid_type, uuid, bytes(raw[21:length]), version)


# The uuids seen (a layer set has a few): one bytes object each for all the handles kept.
_UUIDS: dict[bytes, bytes] = {}


def decode_index_name(name: str) -> OvlFh:
    """Decode an index entry name (hex of an ovl_fb), as ovl_verify_index does."""
    if len(name) < 2 * HEADER_LEN:
        raise HandleError(f"name shorter than {2 * HEADER_LEN} characters")
    if len(name) % 2:
        raise HandleError("odd number of hex digits")
    try:
        raw = bytes.fromhex(name)
    except ValueError:
        raise HandleError("not hexadecimal") from None
    return decode(raw)


# ----------------------------------------------------------------- real file handles

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


def name_to_handle(path: str) -> tuple[int, bytes]:
    """(fid_type, fid bytes) of the object at `path`, symlinks not followed.

    This is what the kernel encodes for an origin (exportfs_encode_inode_fh without a
    parent), byte for byte (overlay-format.md §4.3).
    """
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    rc = _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id), 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


class HandleDecodeUnsupported(OSError):
    """open_by_handle_at cannot tell (no CAP_DAC_READ_SEARCH, no handle support, ...)."""


@dataclass(frozen=True)
class Decoded:
    """What a file handle decodes to on a filesystem: the object's lstat and, when the
    kernel gives a connected name for it (always for directories), its host path."""

    st: os.stat_result
    path: Optional[str]

    @property
    def key(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)


def open_by_handle_at(mount_fd: int, fid_type: int, fid: bytes, flags: int = os.O_PATH) -> int:
    """open_by_handle_at(2): an fd for the object the fid names on the filesystem of
    `mount_fd` (any fd on it). Needs CAP_DAC_READ_SEARCH. Raises OSError (ESTALE: the object
    is gone or the generation does not match)."""
    if len(fid) > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "fid longer than MAX_HANDLE_SZ")
    fh = _FileHandle()
    fh.handle_bytes = len(fid)
    fh.handle_type = fid_type
    ctypes.memmove(fh.f_handle, fid, len(fid))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


# Errors meaning "this fid names nothing on this filesystem" (the kernel's decode fails the
# same way); anything else means open_by_handle_at cannot tell.
_STALE_ERRNOS = (errno.ESTALE, errno.ENOENT, errno.EINVAL, errno.ELOOP)


def decode_fid(layer_root: str, fid_type: int, fid: bytes) -> Optional[Decoded]:
    """Decode a fid on the filesystem holding `layer_root`, as the kernel's
    exportfs_decode_fh does for an origin: the object it names, or None if it names none
    (ESTALE). Raises HandleDecodeUnsupported when it cannot be told (EPERM, EOPNOTSUPP)."""
    try:
        mfd = os.open(layer_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise HandleDecodeUnsupported(exc.errno, f"cannot open {layer_root}: {exc.strerror}") from None
    try:
        try:
            fd = open_by_handle_at(mfd, fid_type, fid)
        except OSError as exc:
            if exc.errno in _STALE_ERRNOS:
                return None
            raise HandleDecodeUnsupported(exc.errno, f"open_by_handle_at: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            path: Optional[str] = None
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
                if link.startswith("/"):
                    lst = os.lstat(link)
                    if (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino):
                        path = link
            except OSError:
                path = None
            return Decoded(st, path)
        finally:
            os.close(fd)
    finally:
        os.close(mfd)


def decode_on(layer_root: str, fh: "OvlFh") -> Optional[Decoded]:
    """decode_fid for an overlay handle (its uuid is not checked here)."""
    return decode_fid(layer_root, fh.fid_type, fh.fid)


# ----------------------------------------------------------------- filesystem uuids

# FS_IOC_GETFSUUID = _IOR(0x15, 0, struct fsuuid2 { u8 len; u8 uuid[16]; })
FS_IOC_GETFSUUID = 0x80111500
BY_UUID_DIR = "/dev/disk/by-uuid"


def _ioctl_uuid(path: str) -> tuple[Optional[bytes], bool]:
    """(uuid, answered): FS_IOC_GETFSUUID (Linux 6.5+). answered=False when the ioctl is
    unknown or the filesystem exports no uuid (ENOTTY), so a fallback may be tried."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            return None, True
        try:  # not a directory: its parent is on the same filesystem
            fd = os.open(os.path.dirname(os.path.abspath(path)) or "/",
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None, True
    try:
        buf = bytearray(17)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf, True)
        except OSError:
            return None, False
        length = buf[0]
        if not 0 < length <= 16:
            return None, False
        return bytes(buf[1 : 1 + length]).ljust(16, b"\0")[:16], True
    finally:
        os.close(fd)


def parse_uuid(text: str) -> Optional[bytes]:
    """16 bytes from a uuid string ('0c3664b7-ffbf-4081-82dd-84ed33ee52e0'), else None."""
    digits = text.strip().replace("-", "")
    if len(digits) != 32:
        return None
    try:
        return bytes.fromhex(digits)
    except ValueError:
        return None


def format_uuid(uuid: bytes) -> str:
    h = uuid.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" if len(uuid) == 16 else h


def fallback_uuid(path: str, by_uuid_dir: str = BY_UUID_DIR, blkid: Optional[str] = "blkid") -> Optional[bytes]:
    """The filesystem uuid without FS_IOC_GETFSUUID: the /dev/disk/by-uuid symlink whose
    device is the st_dev of `path`, else `blkid -p` on that device. None for filesystems
    without a block device (tmpfs: its random uuid cannot be had this way)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    try:
        names = sorted(os.listdir(by_uuid_dir))
    except OSError:
        names = []
    for name in names:
        try:
            st = os.stat(os.path.join(by_uuid_dir, name))
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
            uuid = parse_uuid(name)
            if uuid is not None:
                return uuid
    if not blkid:
        return None
    node = block_device(dev)
    exe = shutil.which(blkid)
    if node is None or exe is None:
        return None
    try:
        p = subprocess.run([exe, "-p", "-o", "value", "-s", "UUID", node],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    return parse_uuid(p.stdout)


def fs_uuid(path: str) -> Optional[bytes]:
    """The uuid of the filesystem holding `path` (the kernel's s_uuid, which overlay writes
    into every handle), or None if it cannot be had. A filesystem without one (squashfs,
    ext4 made with -U clear) gives the null uuid, as the kernel stores it."""
    uuid, answered = _ioctl_uuid(path)
    if uuid is not None or answered:
        return uuid
    return fallback_uuid(path)


def encode_for(path: str, uuid: bytes, upper: bool = False) -> OvlFh:
    """The overlay handle the kernel would store for the object at `path`."""
    fid_type, fid = name_to_handle(path)
    flags = CPU_ENDIAN_FLAG | (FLAG_PATH_UPPER if upper else 0)
    return OvlFh(flags=flags, fid_type=fid_type, uuid=uuid, fid=fid)


def describe_fid(fh: OvlFh) -> str:
    """A short human description of the fid (inode/generation where the layout is known)."""
    fid = fh.fid
    try:
        if fh.fid_type == 0x01 and len(fid) == 8:  # ext4: ino32, gen32
            ino, gen = struct.unpack("<II" if not fh.flags & FLAG_BIG_ENDIAN else ">II", fid)
            return f"ino {ino} gen {gen:#x}"
        if fh.fid_type == 0x01 and len(fid) == 12:  # shmem: gen, ino_lo, ino_hi
            gen, lo, hi = struct.unpack("<III", fid)
            return f"ino {lo | hi << 32} gen {gen:#x}"
        if fh.fid_type == 0x81 and len(fid) == 12:  # xfs / ino64_gen
            ino, gen = struct.unpack("<QI", fid)
            return f"ino {ino} gen {gen:#x}"
        if fh.fid_type == 0x4D and len(fid) >= 20:  # btrfs
            ino, root, gen = struct.unpack("<QQI", fid[:20])
            return f"ino {ino} subvol {root} gen {gen}"
    except struct.error:
        pass
    return f"type {fh.fid_type:#x} fid {fid.hex()}"
