"""Helpers for the real-kernel scenarios: layer-building shortcuts, raw layer snapshots and
the ``Bed`` (one overlay layer set on its own ext4 loop filesystem).

kutil is imported the way tests/conftest.py does it (``from kernel import kutil``).
"""
from __future__ import annotations

import errno
import os
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

_TESTS_DIR = Path(__file__).resolve().parents[1]
try:
    from kernel import kutil  # pytest's default "prepend" import mode puts tests/ on sys.path
except ImportError:  # pragma: no cover - other import modes
    if str(_TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(_TESTS_DIR))
    from kernel import kutil

WHITEOUT_DEV = os.makedev(0, 0)
STATE_DIR = "ovlfsck"  # <work>/ovlfsck: ovlfsck's journal and quarantine


# --------------------------------------------------------------------------- small helpers


def write(path, text: str = "", mode: int = 0o644) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def mkdir(path, mode: int = 0o755) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def mkwhiteout(path) -> None:
    """A classic whiteout, as the kernel makes it: c--------- 0:0."""
    os.mknod(path, stat.S_IFCHR | 0, WHITEOUT_DEV)
    os.chmod(path, 0)


def mkxwhiteout(path, ns: str = "trusted") -> None:
    """An xattr whiteout: zero-size regular file with <ns>.overlay.whiteout."""
    Path(path).write_bytes(b"")
    os.setxattr(path, f"{ns}.overlay.whiteout", b"", follow_symlinks=False)


def setx(path, suffix: str, value: bytes, ns: str = "trusted") -> None:
    os.setxattr(path, f"{ns}.overlay.{suffix}", value, follow_symlinks=False)


def getx(path, suffix: str, ns: str = "trusted") -> Optional[bytes]:
    try:
        return os.getxattr(path, f"{ns}.overlay.{suffix}", follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def rmx(path, suffix: str, ns: str = "trusted") -> None:
    os.removexattr(path, f"{ns}.overlay.{suffix}", follow_symlinks=False)


# --------------------------------------------------------------------------- snapshots


def _xattrs(path: str) -> tuple:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        return (("<listxattr>", errno.errorcode.get(exc.errno, str(exc.errno))),)
    out = []
    for n in sorted(names):
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False).hex()))
        except OSError as exc:
            out.append((n, f"<{errno.errorcode.get(exc.errno, exc.errno)}>"))
    return tuple(out)


def snap_layer(root, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Raw state of one layer directory: for every object its type, mode, owner, size, inode,
    link count (non-dirs), rdev, mtime (non-dirs), content hash / symlink target, and every
    xattr (trusted.* included).  ctimes and directory mtimes/link counts are left out: undo
    cannot restore a ctime, a directory's mtime changes whenever an entry is moved out and
    back, and a directory's link count only mirrors its subdirectories (compared anyway).
    Directories that cannot be listed are recorded with the errno instead of raising.
    Relative paths in `skip` (and everything below them) are left out.
    """
    root = os.fspath(root)
    snap: dict[str, dict] = {}

    def visit(path: str, rel: str) -> None:
        st = os.lstat(path)
        t = kutil._type_char(st.st_mode)
        rec = {
            "type": t, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "ino": st.st_ino, "rdev": st.st_rdev, "xattrs": _xattrs(path),
        }
        if t != "d":
            rec.update(size=st.st_size, nlink=st.st_nlink, mtime=st.st_mtime_ns,
                       payload=kutil._payload(path, st))
        snap[rel] = rec
        if t == "d":
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                rec["unreadable"] = errno.errorcode.get(exc.errno, str(exc.errno))
                return
            for name in names:
                sub = f"{rel}/{name}" if rel != "." else name
                if sub in skip:
                    continue
                visit(os.path.join(path, name), sub)

    visit(root, ".")
    return snap


def diff_snapshots(a: dict, b: dict, limit: int = 30) -> str:
    """Human-readable difference of two {layer: snap_layer()} dicts ("" if equal)."""
    out = []
    for layer in sorted(set(a) | set(b)):
        la, lb = a.get(layer, {}), b.get(layer, {})
        for rel in sorted(set(la) | set(lb)):
            ra, rb = la.get(rel), lb.get(rel)
            if ra == rb:
                continue
            if ra is None or rb is None:
                out.append(f"  {layer}:{rel}: before={ra} after={rb}")
                continue
            fields = {k: (ra.get(k), rb.get(k)) for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)}
            out.append(f"  {layer}:{rel}: " + ", ".join(f"{k}: {x!r} -> {y!r}" for k, (x, y) in sorted(fields.items())))
    if len(out) > limit:
        out = out[:limit] + [f"  ... and {len(out) - limit} more"]
    return "\n".join(out)


# --------------------------------------------------------------------------- the test bed


class Bed:
    """One overlay layer set on its own ext4 loop filesystem."""

    def __init__(self, fs: "kutil.LoopFS", mnt: Path, nlowers: int, options: str) -> None:
        self.fs = fs
        base = Path(fs.mnt)
        # Distinctive names: the pre-flight matches overlays mounted elsewhere with relative
        # layer paths by name, and other test sessions may have such mounts.
        self.lowers = [mkdir(base / f"zqlower{i}") for i in range(nlowers)]
        self.upper = mkdir(base / "zqupper")
        self.work = mkdir(base / "zqwork")
        self.mnt = mnt
        self.options = options

    # paths
    def L(self, i: int, *parts: str) -> Path:
        return self.lowers[i].joinpath(*parts)

    def U(self, *parts: str) -> Path:
        return self.upper.joinpath(*parts)

    def W(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    @property
    def layer_paths(self) -> dict[str, Path]:
        out = {"upper": self.upper, "work": self.work}
        out.update({f"lower:{i}": p for i, p in enumerate(self.lowers)})
        return out

    # mounting
    @contextmanager
    def mounted(self, options: Optional[str] = None) -> Iterator[Path]:
        opts = self.options if options is None else options
        with kutil.mount_overlay(self.lowers, self.upper, self.work, self.mnt, opts):
            yield Path(self.mnt)

    def view(self) -> dict:
        with self.mounted() as m:
            return kutil.merged_view(m)

    # ovlfsck
    def args(self) -> list[str]:
        return kutil.stack_args(self.lowers, self.upper, self.work, self.options)

    # snapshots
    def snapshot(self) -> dict[str, dict]:
        return {name: snap_layer(path, skip=(STATE_DIR,) if name == "work" else ())
                for name, path in self.layer_paths.items()}


