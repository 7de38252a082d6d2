"""Helpers for tests that drive the real Linux overlayfs (needs root + loop devices).

Everything here is stdlib only and importable from any test module (``from kernel import
kutil`` with pytest's default import mode, or ``from .kutil import ...`` inside this package).

Environment
    ``can_use_kernel()``       -> ``None`` if real overlay mounts are possible, else a skip reason.

Backing filesystems
    ``LoopFS(parent_dir, fstype="ext4"|"xfs"|"tmpfs", size_mib=None, name=None)``
        Context manager (or call ``.setup()`` / ``.close()``).  Creates a sparse image file in
        *parent_dir*, ``mkfs``'s it, attaches it with ``losetup --find --show`` and mounts it
        on ``parent_dir/<name>.mnt``.  ``tmpfs`` mounts a tmpfs instead (no image, no loop).
        Teardown ALWAYS unmounts (retrying, then ``umount -l``) and ``losetup -d``'s the
        device, even when the body raised.  The image file is deleted on a clean exit and kept
        (for post-mortem) when the body raised.  Attributes: ``mnt``, ``image``, ``device``,
        ``fstype``.

Overlay mounts
    ``overlay_options(lowers, upper, work, options="") -> str``  the ``-o`` string.
    ``stack_args(lowers, upper, work, options="") -> list[str]`` ``["-o", ...]`` for ovlfsck.
    ``mount_overlay(lowers, upper, work, mnt, options="")``
        Context manager: ``mount -t overlay overlay -o lowerdir=..,upperdir=..,workdir=..``,
        yields *mnt*, always unmounts.  A failed mount raises ``OverlayMountError`` whose text
        contains the ``overlayfs:`` kernel lines logged during the attempt.  If the unmount
        needed ``umount -l`` (something kept the overlay busy) ``LazyUnmountError`` is raised
        after the lazy unmount, because the layers cannot be trusted to be quiescent.
    ``umount(path)``                   unmount with retries and lazy fallback; True if lazy.

Kernel log
    ``dmesg_mark() -> str``            writes a unique marker line to /dev/kmsg, returns it.
    ``dmesg_overlay_since(marker) -> list[str]``  ``overlayfs:`` lines logged after *marker*
                                       (other sessions may mount overlays concurrently, so the
                                       lines are informative, not proof of causality).

Views and snapshots
    ``merged_view(root) -> dict[str, tuple]``
        lstat-walk (no symlink following) of *root* (normally a mounted overlay).  Maps each
        relative path ("." for the root) to ``(type, mode, uid, gid, size, payload, link_group)``
        where type is one of ``d f l p c b s``, size is 0 for dirs, payload is the sha256 of a
        regular file's content / a symlink's target / ``"c:MAJ:MIN"`` for devices, and
        link_group is ``None`` or the sorted-first path of the group of names sharing one
        (st_dev, st_ino) — comparable between two mounts of the same layers.
    ``diff_views(a, b, limit=40) -> str``   human-readable difference ("" if equal).
    ``layer_snapshot(root) -> dict[str, tuple]``
        Raw view of an (unmounted) layer directory for "nothing was modified" checks: type,
        mode, uid, gid, size, ino, nlink, rdev, mtime_ns, ctime_ns, payload and **all xattrs**
        (trusted.* included; values hex).  Atime is excluded.
    ``xattr_summary(root) -> dict[str, int]``  count of each overlay xattr name under *root*.

ovlfsck invocation
    ``ovlfsck_command() -> list[str]``   ``[sys.executable, "-m", "ovlfsck"]`` (or the
                                         whitespace-split ``$OVLFSCK_CMD`` when set).
    ``run_ovlfsck(*args, check=False, timeout=120) -> CompletedProcess`` (text, captured).
    ``check_json(stack_args) -> (exit_code, report)``  runs ``check -n --json *stack_args``;
        raises ``OvlfsckOutputError`` (an AssertionError) if stdout is not one JSON object;
        the stderr tail is added to the report as ``report["_stderr"]`` for failure messages.
    ``problems_with_severity(report, severity) -> list[dict]``
    ``format_report(report) -> str``      pretty JSON for assertion messages.

Leak safety net
    ``find_leaks(base) -> (mounts, loops)`` and ``sweep_leaks(base) -> list[str]`` (unmounts /
    detaches whatever lies under *base* and describes it).  Used by the session fixture in
    tests/conftest.py.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
OVLFSCK_TIMEOUT = 120

# --------------------------------------------------------------------------- environment


@functools.lru_cache(maxsize=None)
def can_use_kernel() -> str | None:
    """Return why real-kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    try:
        with open("/proc/filesystems") as f:
            fss = {line.split()[-1] for line in f if line.strip()}
    except OSError as e:
        return f"cannot read /proc/filesystems: {e}"
    if "overlay" not in fss:
        # it may be a module that is not loaded yet
        subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
        with open("/proc/filesystems") as f:
            fss = {line.split()[-1] for line in f if line.strip()}
        if "overlay" not in fss:
            return "overlayfs not in /proc/filesystems"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop devices unavailable)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def have_mkfs(fstype: str) -> bool:
    return fstype == "tmpfs" or shutil.which(f"mkfs.{fstype}") is not None


# --------------------------------------------------------------------------- subprocess


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(
            f"command failed ({p.returncode}): {' '.join(cmd)}\n"
            f"stdout: {p.stdout.strip()}\nstderr: {p.stderr.strip()}"
        )
    return p


def _is_mountpoint(path: str | os.PathLike) -> bool:
    target = os.path.realpath(path)
    return any(m == target for m, _fs, _src, _opts in _mounts())


def umount(path: str | os.PathLike, *, retries: int = 20, delay: float = 0.1) -> bool:
    """Unmount *path*; retry on EBUSY, finally fall back to ``umount -l``.

    Returns True if the lazy fallback was needed.  Raises if even that failed.
    """
    path = os.fspath(path)
    last = None
    for _ in range(retries):
        p = _run(["umount", path], check=False)
        if p.returncode == 0:
            return False
        last = p
        if not _is_mountpoint(path):
            return False
        time.sleep(delay)
    p = _run(["umount", "-l", path], check=False)
    if p.returncode != 0 and _is_mountpoint(path):
        raise RuntimeError(
            f"could not unmount {path}: {last.stderr.strip() if last else ''} / {p.stderr.strip()}"
        )
    return True


# --------------------------------------------------------------------------- loop filesystems

_DEFAULT_SIZE_MIB = {"ext4": 256, "xfs": 512, "tmpfs": 256}  # mkfs.xfs refuses < 300 MiB


class LoopFS:
    """A scratch filesystem on a sparse loop image (or a tmpfs), mounted under *parent_dir*."""

    def __init__(self, parent_dir, fstype: str = "ext4", size_mib: int | None = None,
                 name: str | None = None, mkfs_args: Sequence[str] = ()):
        if fstype not in ("ext4", "xfs", "tmpfs"):
            raise ValueError(f"unsupported fstype {fstype!r}")
        self.parent = Path(parent_dir)
        self.fstype = fstype
        self.size_mib = size_mib or _DEFAULT_SIZE_MIB[fstype]
        self.name = name or f"{fstype}-{uuid.uuid4().hex[:8]}"
        self.mkfs_args = list(mkfs_args)
        self.image: Path | None = None
        self.device: str | None = None
        self.mnt = self.parent / f"{self.name}.mnt"
        self._mounted = False
        self._keep_image = False

    # -- lifecycle
    def setup(self) -> "LoopFS":
        try:
            self.mnt.mkdir(parents=True, exist_ok=True)
            if self.fstype == "tmpfs":
                _run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m,mode=0755",
                      "tmpfs", str(self.mnt)])
                self._mounted = True
                return self
            self.image = self.parent / f"{self.name}.img"
            with open(self.image, "wb") as f:
                f.truncate(self.size_mib * 1024 * 1024)
            if self.fstype == "ext4":
                _run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", *self.mkfs_args, str(self.image)])
            else:
                _run(["mkfs.xfs", "-q", "-f", "-K", *self.mkfs_args, str(self.image)])
            for attempt in range(5):  # losetup --find can race with concurrent users
                p = _run(["losetup", "--find", "--show", str(self.image)], check=False)
                if p.returncode == 0 and p.stdout.strip():
                    self.device = p.stdout.strip()
                    break
                time.sleep(0.2 * (attempt + 1))
            else:
                raise RuntimeError(f"losetup --find --show failed: {p.stderr.strip()}")
            _run(["mount", "-t", self.fstype, self.device, str(self.mnt)])
            self._mounted = True
            return self
        except BaseException:
            self._keep_image = True
            self.close()
            raise

    def close(self) -> None:
        """Unmount and detach; safe to call more than once; never skips losetup -d."""
        errors = []
        try:
            if self._mounted or _is_mountpoint(self.mnt):
                umount(self.mnt)
            self._mounted = False
        except Exception as e:  # noqa: BLE001 - keep going to detach the loop device
            errors.append(e)
        finally:
            if self.device is not None:
                p = _run(["losetup", "-d", self.device], check=False)
                if p.returncode != 0 and _loop_backing_file(self.device) == str(self.image):
                    errors.append(RuntimeError(f"losetup -d {self.device}: {p.stderr.strip()}"))
                self.device = None
        if self.image is not None and not self._keep_image and not errors:
            try:
                self.image.unlink()
            except FileNotFoundError:
                pass
        if errors:
            raise errors[0]

    def __enter__(self) -> "LoopFS":
        return self.setup()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._keep_image = True
        self.close()

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)

    def __repr__(self) -> str:
        return f"LoopFS({self.fstype}, mnt={self.mnt}, dev={self.device})"


def _loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            s = f.read().strip()
    except OSError:
        return None
    return s[: -len(" (deleted)")] if s.endswith(" (deleted)") else s


# --------------------------------------------------------------------------- kernel log


def dmesg_mark() -> str:
    """Write a unique marker line to the kernel log and return it."""
    marker = f"ovlfsck-test-marker-{uuid.uuid4()}"
    try:
        with open("/dev/kmsg", "w") as f:
            f.write(marker + "\n")
    except OSError:
        pass
    return marker


def _kernel_log_lines() -> list[str]:
    """All messages in the kernel ring buffer (text only), oldest first."""
    lines: list[str] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        fd = None
    if fd is not None:
        try:
            while True:
                try:
                    rec = os.read(fd, 8192)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EPIPE:  # overwritten record; keep reading
                        continue
                    raise
                if not rec:
                    break
                text = rec.decode("utf-8", "replace")
                head, _, msg = text.partition(";")
                lines.append(msg.split("\n", 1)[0])
        finally:
            os.close(fd)
        return lines
    p = _run(["dmesg"], check=False)
    for line in p.stdout.splitlines():
        if line.startswith("[") and "] " in line:
            line = line.split("] ", 1)[1]
        lines.append(line)
    return lines


def dmesg_overlay_since(marker: str, prefix: str = "overlayfs:") -> list[str]:
    """Kernel log lines starting with *prefix* logged after the *marker* line."""
    lines = _kernel_log_lines()
    idx = None
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            idx = i
            break
    tail = lines[idx + 1:] if idx is not None else lines[-50:]
    return [line for line in tail if line.startswith(prefix)]


# --------------------------------------------------------------------------- overlay mounts


class OverlayMountError(RuntimeError):
    def __init__(self, options: str, stderr: str, dmesg: list[str]):
        self.options = options
        self.stderr = stderr
        self.dmesg = dmesg
        super().__init__(
            f"overlay mount failed: {stderr.strip()}\n  -o {options}\n  kernel log:\n    "
            + ("\n    ".join(dmesg) if dmesg else "(no overlayfs: lines)")
        )


class LazyUnmountError(RuntimeError):
    pass


def _check_layer_path(p: str) -> str:
    p = os.fspath(p)
    if any(c in p for c in ",:\\\n") or not p:
        raise ValueError(f"layer path unsuitable for a mount option string: {p!r}")
    return p


def overlay_options(lowers: Sequence, upper=None, work=None, options: str = "") -> str:
    if not lowers:
        raise ValueError("at least one lower layer is needed")
    if (upper is None) != (work is None):
        raise ValueError("upper and work go together")
    parts = ["lowerdir=" + ":".join(_check_layer_path(os.fspath(x)) for x in lowers)]
    if upper is not None:
        parts.append("upperdir=" + _check_layer_path(os.fspath(upper)))
        parts.append("workdir=" + _check_layer_path(os.fspath(work)))
    if options:
        parts.append(options.strip(","))
    return ",".join(parts)


def stack_args(lowers: Sequence, upper=None, work=None, options: str = "") -> list[str]:
    """``["-o", "lowerdir=...,upperdir=...,workdir=...[,options]"]`` for ovlfsck."""
    return ["-o", overlay_options(lowers, upper, work, options)]


@contextmanager
def mount_overlay(lowers: Sequence, upper, work, mnt, options: str = "") -> Iterator[str]:
    """Mount an overlay on *mnt* for the duration of the ``with`` block; always unmounts."""
    opts = overlay_options(lowers, upper, work, options)
    mnt = os.fspath(mnt)
    os.makedirs(mnt, exist_ok=True)
    marker = dmesg_mark()
    p = _run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], check=False)
    if p.returncode != 0:
        if _is_mountpoint(mnt):  # mount(8) failed after the mount happened (should not be)
            umount(mnt)
        raise OverlayMountError(opts, p.stderr or p.stdout, dmesg_overlay_since(marker))
    lazy = False
    try:
        yield mnt
    finally:
        lazy = umount(mnt)
    if lazy:
        raise LazyUnmountError(f"overlay at {mnt} was busy and had to be lazily unmounted")


def mount_info(mnt) -> str | None:
    """The super options the kernel reports for the mount at *mnt* (None if not mounted)."""
    target = os.path.realpath(mnt)
    for m, _fs, _src, opts in _mounts():
        if m == target:
            return opts
    return None


# --------------------------------------------------------------------------- views


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _type_char(mode: int) -> str:
    for test, ch in ((stat.S_ISDIR, "d"), (stat.S_ISREG, "f"), (stat.S_ISLNK, "l"),
                     (stat.S_ISFIFO, "p"), (stat.S_ISCHR, "c"), (stat.S_ISBLK, "b"),
                     (stat.S_ISSOCK, "s")):
        if test(mode):
            return ch
    return "?"


def _walk(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """Yield (relpath, abspath, lstat) for *root* and everything below, sorted, no symlinks."""
    root = os.fspath(root)
    st = os.lstat(root)
    yield ".", root, st
    stack = [("", root)]
    while stack:
        rel, absdir = stack.pop()
        names = sorted(os.listdir(absdir))
        subdirs = []
        for name in names:
            a = os.path.join(absdir, name)
            r = f"{rel}/{name}" if rel else name
            st = os.lstat(a)
            yield r, a, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((r, a))
        stack.extend(reversed(subdirs))


def _payload(abspath: str, st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode):
        return _sha256_file(abspath)
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(abspath)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return f"{_type_char(st.st_mode)}:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return None


def merged_view(root) -> dict[str, tuple]:
    """Comparable description of the tree under *root* (see module docstring)."""
    entries: dict[str, list] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, a, st in _walk(root):
        t = _type_char(st.st_mode)
        size = 0 if t == "d" else st.st_size
        entries[rel] = [t, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
                        _payload(a, st), None]
        if t != "d" and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for paths in groups.values():
        if len(paths) > 1:
            gid = min(paths)
            for p in paths:
                entries[p][6] = gid
    return {k: tuple(v) for k, v in entries.items()}


def diff_views(a: dict, b: dict, limit: int = 40, names=("before", "after")) -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"  {k!r}: {names[0]}={a.get(k)} {names[1]}={b.get(k)}")
    if len(out) > limit:
        out = out[:limit] + [f"  ... and {len(out) - limit} more"]
    return "\n".join(out)


def _xattrs(abspath: str) -> dict[str, str]:
    try:
        names = os.listxattr(abspath, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for n in sorted(names):
        try:
            out[n] = os.getxattr(abspath, n, follow_symlinks=False).hex()
        except OSError as e:
            out[n] = f"<{errno.errorcode.get(e.errno, e.errno)}>"
    return out


def layer_snapshot(root) -> dict[str, tuple]:
    """Raw state of a layer directory, xattrs included (for "unchanged" assertions)."""
    snap = {}
    for rel, a, st in _walk(root):
        snap[rel] = (_type_char(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                     st.st_size if not stat.S_ISDIR(st.st_mode) else 0, st.st_ino, st.st_nlink,
                     st.st_rdev, st.st_mtime_ns, st.st_ctime_ns, _payload(a, st),
                     tuple(_xattrs(a).items()))
    return snap


def xattr_summary(root) -> dict[str, int]:
    """How many objects under *root* carry each ``*.overlay.*`` xattr name."""
    counts: dict[str, int] = {}
    for _rel, a, _st in _walk(root):
        for n in _xattrs(a):
            if ".overlay." in n:
                counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- ovlfsck


class OvlfsckOutputError(AssertionError):
    pass


def ovlfsck_command() -> list[str]:
    cmd = os.environ.get("OVLFSCK_CMD")
    if cmd:
        return cmd.split()
    return [sys.executable, "-m", "ovlfsck"]


def run_ovlfsck(*args: str, check: bool = False, timeout: float = OVLFSCK_TIMEOUT,
                env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ovlfsck from this checkout (repo root first on PYTHONPATH) and capture output."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.setdefault("LC_ALL", "C.UTF-8")
    return subprocess.run([*ovlfsck_command(), *map(os.fspath, args)], capture_output=True,
                          text=True, timeout=timeout, check=check, env=e,
                          stdin=subprocess.DEVNULL)


def check_json(stack: Sequence[str], *extra: str) -> tuple[int, dict]:
    """``ovlfsck check -n --json <stack> <extra>`` -> (exit code, parsed report)."""
    p = run_ovlfsck("check", "-n", "--json", *stack, *extra)
    try:
        report = json.loads(p.stdout)
        if not isinstance(report, dict):
            raise ValueError("top level is not an object")
    except ValueError as e:
        raise OvlfsckOutputError(
            f"ovlfsck check --json did not print one JSON object ({e}); exit code "
            f"{p.returncode}\n--- stdout (head) ---\n{p.stdout[:3000]}\n"
            f"--- stderr (tail) ---\n{p.stderr[-5000:]}") from None
    report.setdefault("_stderr", p.stderr[-5000:])
    return p.returncode, report


def problems_with_severity(report: dict, severity: str) -> list[dict]:
    return [p for p in report.get("problems") or [] if p.get("severity") == severity]


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------- leak safety net


def _unescape_mount_field(s: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mountpoint, fstype, source, super options) from /proc/self/mountinfo, in mount order."""
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            fields = pre.split()
            post_f = post.split(" ", 2)
            if len(fields) < 5 or len(post_f) < 3:
                continue
            res.append((_unescape_mount_field(fields[4]), post_f[0],
                        _unescape_mount_field(post_f[1]), _unescape_mount_field(post_f[2])))
    return res


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _opts_mention(opts: str, base: str) -> bool:
    b = base.rstrip("/")
    i = opts.find(b)
    while i != -1:
        end = i + len(b)
        if end == len(opts) or opts[end] in "/,:":
            return True
        i = opts.find(b, i + 1)
    return False


def find_leaks(base) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Mounts ``(mountpoint, fstype)`` and loop devices ``(device, backing file)`` under *base*."""
    base = os.path.realpath(base)
    mounts = []
    for mnt, fs, _src, opts in _mounts():
        if _under(mnt, base) or (fs == "overlay" and _opts_mention(opts, base)):
            mounts.append((mnt, fs))
    loops = []
    try:
        devs = sorted(os.listdir("/sys/block"))
    except OSError:
        devs = []
    for d in devs:
        if not d.startswith("loop"):
            continue
        bf = _loop_backing_file(d)
        if bf and _under(bf, base):
            loops.append((f"/dev/{d}", bf))
    return mounts, loops


def sweep_leaks(base) -> list[str]:
    """Tear down everything :func:`find_leaks` reports; return descriptions of what was found."""
    if os.geteuid() != 0:
        return []
    described = []
    mounts, _ = find_leaks(base)
    for mnt, fs in reversed(mounts):  # newest (overlays on top of loop fs) first
        described.append(f"mount {fs} on {mnt}")
        try:
            umount(mnt, retries=5)
        except Exception as e:  # noqa: BLE001
            described.append(f"  !! could not unmount {mnt}: {e}")
    _, loops = find_leaks(base)
    for dev, bf in loops:
        described.append(f"loop device {dev} -> {bf}")
        p = _run(["losetup", "-d", dev], check=False)
        if p.returncode != 0:
            described.append(f"  !! losetup -d {dev}: {p.stderr.strip()}")
    return described


def our_leftovers(base) -> str:
    """`grep overlay /proc/self/mounts` + `losetup -a` lines that mention *base* (for asserts)."""
    base = os.path.realpath(base)
    out = []
    with open("/proc/self/mounts") as f:
        out += [line.strip() for line in f if base in _unescape_mount_field(line)]
    p = _run(["losetup", "-a"], check=False)
    out += [line for line in p.stdout.splitlines() if base in line]
    return "\n".join(out)
