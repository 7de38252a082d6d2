"""Seeded, deterministic file-system workloads for real-overlay tests.

The point of these workloads is that the *kernel* produces the on-disk overlay state (copy-ups,
whiteouts, opaque dirs, redirects, origins, index entries, nlink xattrs, metacopy files, ...)
so that ovlfsck can be checked against layers that are correct by construction.

``build_lower(root, rng, n_entries) -> Counter``
    Populate a plain directory (a future lower layer; not through an overlay) with a realistic
    tree: nested dirs (depth up to 6), empty dirs, regular files of assorted sizes and modes and
    owners (some with a ``user.*`` xattr), relative/absolute/dangling symlinks, hardlink groups
    spanning directories, fifos and a character device (1:3, *not* a whiteout).  Names include
    spaces, dots and non-ASCII UTF-8.  Returns counts per kind.

``run_workload(mnt, rng, n_ops, log=None) -> WorkloadStats``
    Perform *n_ops* random operations *through the mounted overlay* at *mnt*: create / append /
    overwrite / truncate files, chmod, chown, setxattr (copy-up of metadata), mkdir, rmdir,
    ``rm -rf`` of subtrees (optionally recreating the same name, as a dir or as a file), unlink
    (optionally recreating the name with another type), rename of files and directories within
    a dir and across dirs (onto existing targets too, sometimes renamed straight back), swapping
    two directories through a temporary name, ``renameat2(RENAME_EXCHANGE)``, hard links
    (``os.link``) of lower and upper files, symlinks, fifos and char devices.

    Every choice comes from *rng* and from sorted directory listings, so a given seed on a given
    configuration performs the same operations.  Operations failing with an errno that is a
    legitimate answer (EXDEV for directory renames without ``redirect_dir=on``, ENOTEMPTY,
    EEXIST, EPERM for ``user.*`` xattrs on symlinks, ...) are skipped and counted in
    ``stats.skipped``; any other errno (EIO, ESTALE, EROFS, ENOSPC, ...) is recorded in
    ``stats.unexpected`` so the test can assert the kernel was happy throughout.

``WorkloadStats``: ``done`` (Counter op -> successes), ``skipped`` (Counter "op:ERRNO" ->
count), ``unexpected`` (list of (op, detail, errno name)), ``summary()``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import shutil
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

WORDS = [
    "a", "b", "file", "data", "conf", "x", "log", "My Documents", "with space", "two  spaces",
    "ünïcødé", "日本語", "naïve café", "Ωmega", "z-last", ".hidden", "dir.d", "v1.2.3", "-dash",
    "trailing.", "UPPER", "emoji-\u2603",
]
UIDS = [0, 0, 0, 1000, 1001, 65534]
FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o444, 0o640, 0o4755, 0o2750, 0o000]
DIR_MODES = [0o755, 0o755, 0o700, 0o775, 0o555, 0o1777, 0o2775]

# errnos that are an acceptable answer to a random operation
_BENIGN = {
    errno.EXDEV, errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EISDIR, errno.ENOTDIR,
    errno.EINVAL, errno.EMLINK, errno.ENAMETOOLONG, errno.EBUSY,
}
_BENIGN_XATTR = _BENIGN | {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA}
_BENIGN_EXCHANGE = _BENIGN | {errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


# --------------------------------------------------------------------------- content helpers


def _content(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.08:
        return b""
    if r < 0.55:
        n = rng.randint(1, 300)
    elif r < 0.92:
        n = rng.randint(301, 16384)
    else:
        n = rng.randint(16385, 200_000)
    if rng.random() < 0.5:  # text-ish
        line = ("line %d of some text\n" % rng.randint(0, 10**6)).encode()
        return (line * (n // len(line) + 1))[:n]
    return rng.randbytes(n)


def _write(path: str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


# --------------------------------------------------------------------------- lower builder


def build_lower(root, rng: random.Random, n_entries: int = 200) -> Counter:
    """Populate directory *root* (created if needed) with about *n_entries* objects."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    counts: Counter = Counter()
    dirs = [""]
    regs: list[str] = []
    seq = 0

    def newname(parent: str) -> str:
        nonlocal seq
        while True:
            seq += 1
            w = rng.choice(WORDS)
            name = w if rng.random() < 0.2 else f"{w}{seq}"
            rel = f"{parent}/{name}" if parent else name
            if not os.path.lexists(os.path.join(root, rel)):
                return rel

    def pick_parent() -> str:
        # favour deeper dirs a bit so the tree gets nested
        cand = [d for d in dirs if d.count("/") < 5]
        return rng.choice(cand)

    def owner(p: str, follow=True) -> None:
        if rng.random() < 0.25:
            os.chown(p, rng.choice(UIDS), rng.choice(UIDS), follow_symlinks=follow)

    # a few guaranteed top-level dirs so that renames/merges have material
    for _ in range(4):
        rel = newname("")
        os.mkdir(os.path.join(root, rel))
        dirs.append(rel)
        counts["dir"] += 1

    kinds = ["dir"] * 18 + ["file"] * 45 + ["symlink"] * 10 + ["hardlink"] * 10 + \
        ["fifo"] * 3 + ["emptydir"] * 5 + ["chardev"] * 1 + ["xattr"] * 4
    while sum(counts.values()) < n_entries:
        kind = rng.choice(kinds)
        parent = pick_parent()
        rel = newname(parent)
        p = os.path.join(root, rel)
        if kind in ("dir", "emptydir"):
            os.mkdir(p)
            if kind == "dir":
                dirs.append(rel)
            owner(p)
        elif kind == "file":
            _write(p, _content(rng))
            os.chmod(p, rng.choice(FILE_MODES))
            owner(p)
            regs.append(rel)
        elif kind == "symlink":
            r = rng.random()
            if r < 0.4 and (regs or len(dirs) > 1):
                target_rel = rng.choice(regs + dirs[1:])
                target = os.path.relpath(target_rel, parent or ".")
            elif r < 0.6:
                target = rng.choice(["/etc/hostname", "/usr/bin", "/", "/proc/self/fd/0"])
            elif r < 0.8:
                target = "/nonexistent/" + rng.choice(WORDS)
            else:
                target = "../" * rng.randint(0, 3) + "missing-" + rng.choice(WORDS)
            os.symlink(target, p)
            owner(p, follow=False)
        elif kind == "hardlink":
            if not regs:
                continue
            src = rng.choice(regs)
            os.link(os.path.join(root, src), p)
        elif kind == "fifo":
            os.mkfifo(p, rng.choice([0o644, 0o600, 0o666]))
        elif kind == "chardev":
            os.mknod(p, stat.S_IFCHR | 0o644, os.makedev(1, 3))
        elif kind == "xattr":
            if not regs:
                continue
            target = os.path.join(root, rng.choice(regs))
            try:
                os.setxattr(target, "user.ovlfsck-test", rng.randbytes(rng.randint(0, 40)))
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    raise
            continue  # not a new entry
        counts[kind] += 1
    # directory modes last (a 0o555 dir would not stop root anyway, but keep it tidy)
    for d in dirs[1:]:
        if rng.random() < 0.3:
            os.chmod(os.path.join(root, d), rng.choice(DIR_MODES))
    return counts


# --------------------------------------------------------------------------- workload

_libc = None


def _renameat2_exchange(a: str, b: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not in libc")
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    r = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), a)


@dataclass
class WorkloadStats:
    done: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    unexpected: list = field(default_factory=list)

    def summary(self) -> str:
        d = ", ".join(f"{k}={v}" for k, v in sorted(self.done.items()))
        s = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        u = "; ".join(f"{o} {d} {e}" for o, d, e in self.unexpected[:10])
        return f"done: {d}\nskipped: {s}\nunexpected: {u or 'none'}"


class _Skip(Exception):
    """Nothing suitable to operate on."""


class Workload:
    def __init__(self, mnt, rng: random.Random, log: Callable[[str], None] | None = None):
        self.mnt = os.fspath(mnt)
        self.rng = rng
        self.log = log
        self.stats = WorkloadStats()
        self.seq = 0
        self.ops: list[tuple[str, Callable[[], str]]] = []
        weights = {
            "create": 10, "append": 8, "overwrite": 4, "truncate": 4, "chmod": 6, "chown": 5,
            "setxattr": 3, "mkdir": 6, "rmdir": 3, "rmtree": 3, "unlink": 6,
            "rename_file": 8, "rename_dir": 9, "swap_dirs": 2, "exchange": 2, "link": 7,
            "symlink": 4, "mkfifo": 2, "mknod": 1,
        }
        self.table = [name for name, w in weights.items() for _ in range(w)]

    # -- state
    def a(self, rel: str) -> str:
        return os.path.join(self.mnt, rel) if rel else self.mnt

    def scan(self) -> None:
        dirs, regs, others = [""], [], []
        stack = [""]
        while stack:
            d = stack.pop()
            with os.scandir(self.a(d)) as it:
                ents = sorted(it, key=lambda e: e.name)
            sub = []
            for e in ents:
                rel = f"{d}/{e.name}" if d else e.name
                if e.is_dir(follow_symlinks=False):
                    sub.append(rel)
                elif e.is_file(follow_symlinks=False):
                    regs.append(rel)
                else:
                    others.append(rel)
            dirs.extend(sub)
            stack.extend(reversed(sub))
        self.dirs, self.regs, self.others = sorted(dirs), sorted(regs), sorted(others)

    def newname(self, parent: str) -> str:
        while True:
            self.seq += 1
            w = self.rng.choice(WORDS)
            name = w if self.rng.random() < 0.15 else f"{w}~{self.seq}"
            rel = f"{parent}/{name}" if parent else name
            if not os.path.lexists(self.a(rel)):
                return rel

    def pick(self, seq: list):
        if not seq:
            raise _Skip
        return self.rng.choice(seq)

    def subdirs(self) -> list[str]:
        return [d for d in self.dirs if d]

    @staticmethod
    def parent(rel: str) -> str:
        return rel.rpartition("/")[0]

    @staticmethod
    def inside(rel: str, ancestor: str) -> bool:
        return ancestor == "" or rel == ancestor or rel.startswith(ancestor + "/")

    # -- operations (each returns a short description)
    def op_create(self):
        rel = self.newname(self.pick(self.dirs))
        _write(self.a(rel), _content(self.rng))
        return rel

    def op_append(self):
        rel = self.pick(self.regs)
        _write(self.a(rel), self.rng.randbytes(self.rng.randint(1, 4096)), "ab")
        return rel

    def op_overwrite(self):
        rel = self.pick(self.regs)
        _write(self.a(rel), _content(self.rng))
        return rel

    def op_truncate(self):
        rel = self.pick(self.regs)
        size = os.lstat(self.a(rel)).st_size
        os.truncate(self.a(rel), self.rng.choice([0, size // 2, size + self.rng.randint(1, 70000)]))
        return rel

    def op_chmod(self):
        if self.rng.random() < 0.3:
            rel = self.pick(self.subdirs())
            mode = self.rng.choice(DIR_MODES)
        else:
            rel = self.pick(self.regs + [o for o in self.others if not os.path.islink(self.a(o))])
            mode = self.rng.choice(FILE_MODES)
        os.chmod(self.a(rel), mode)
        return f"{rel} {mode:o}"

    def op_chown(self):
        rel = self.pick(self.dirs + self.regs + self.others)
        os.chown(self.a(rel), self.rng.choice(UIDS), self.rng.choice(UIDS), follow_symlinks=False)
        return rel

    def op_setxattr(self):
        rel = self.pick(self.dirs + self.regs + self.others)
        name = self.rng.choice(["user.ovlfsck-test", "user.other", "user.Ünï"])
        if self.rng.random() < 0.2:
            os.removexattr(self.a(rel), name, follow_symlinks=False)
        else:
            os.setxattr(self.a(rel), name, self.rng.randbytes(self.rng.randint(0, 64)),
                        follow_symlinks=False)
        return f"{rel} {name}"

    def op_mkdir(self):
        rel = self.newname(self.pick(self.dirs))
        os.mkdir(self.a(rel), self.rng.choice(DIR_MODES))
        if self.rng.random() < 0.5:
            _write(self.a(self.newname(rel)), _content(self.rng))
        return rel

    def op_rmdir(self):
        # prefer dirs that look empty, but try others too (ENOTEMPTY is fine)
        cands = self.subdirs()
        empty = [d for d in cands if not any(self.inside(x, d) and x != d
                                             for x in self.regs + self.others)]
        rel = self.pick(empty if empty and self.rng.random() < 0.7 else cands)
        os.rmdir(self.a(rel))
        return rel

    def op_rmtree(self):
        # mostly small subtrees, so that the tree is not emptied after a few hundred ops
        everything = self.regs + self.others + self.dirs
        subs = self.subdirs()
        small = [d for d in subs if sum(1 for x in everything if self.inside(x, d)) <= 12]
        rel = self.pick(small if small and self.rng.random() < 0.9 else subs)
        shutil.rmtree(self.a(rel))
        r = self.rng.random()
        if r < 0.45:  # recreate as a dir -> opaque dir over the lower one
            os.mkdir(self.a(rel))
            if self.rng.random() < 0.6:
                _write(self.a(self.newname(rel)), _content(self.rng))
            return f"{rel} -> dir"
        if r < 0.6:  # recreate as a file
            _write(self.a(rel), _content(self.rng))
            return f"{rel} -> file"
        return rel

    def op_unlink(self):
        rel = self.pick(self.regs + self.others)
        os.unlink(self.a(rel))
        r = self.rng.random()
        if r < 0.2:
            _write(self.a(rel), _content(self.rng))
            return f"{rel} -> file"
        if r < 0.3:
            os.mkdir(self.a(rel))
            return f"{rel} -> dir"
        return rel

    def _rename_target(self, src: str, is_dir: bool) -> str:
        r = self.rng.random()
        if r < 0.45:  # same dir
            parent = self.parent(src)
        else:
            cands = [d for d in self.dirs if not (is_dir and self.inside(d, src))]
            parent = self.pick(cands)
        if r > 0.85:  # onto an existing object of the same kind in that dir
            pool = self.subdirs() if is_dir else self.regs
            existing = [x for x in pool if self.parent(x) == parent and x != src
                        and not (is_dir and self.inside(src, x))]
            if existing:
                return self.rng.choice(existing)
        if self.parent(src) != parent and self.rng.random() < 0.5:
            rel = f"{parent}/{os.path.basename(src)}" if parent else os.path.basename(src)
            if not os.path.lexists(self.a(rel)):
                return rel
        return self.newname(parent)

    def op_rename_file(self):
        src = self.pick(self.regs + self.others)
        dst = self._rename_target(src, False)
        os.rename(self.a(src), self.a(dst))
        if self.rng.random() < 0.15:
            os.rename(self.a(dst), self.a(src))
            return f"{src} -> {dst} -> back"
        return f"{src} -> {dst}"

    def op_rename_dir(self):
        src = self.pick(self.subdirs())
        dst = self._rename_target(src, True)
        os.rename(self.a(src), self.a(dst))
        if self.rng.random() < 0.25:
            os.rename(self.a(dst), self.a(src))
            return f"{src} -> {dst} -> back"
        return f"{src} -> {dst}"

    def _two_unrelated_dirs(self):
        subs = self.subdirs()
        a = self.pick(subs)
        cands = [d for d in subs if not self.inside(d, a) and not self.inside(a, d)]
        return a, self.pick(cands)

    def op_swap_dirs(self):
        a, b = self._two_unrelated_dirs()
        tmp = self.newname(self.parent(a))
        os.rename(self.a(a), self.a(tmp))
        try:
            os.rename(self.a(b), self.a(a))
        except OSError:
            os.rename(self.a(tmp), self.a(a))  # roll back; the original error is reported
            raise
        os.rename(self.a(tmp), self.a(b))
        return f"{a} <-> {b} via {tmp}"

    def op_exchange(self):
        if self.rng.random() < 0.5:
            a, b = self._two_unrelated_dirs()
        else:
            a = self.pick(self.regs + self.others)
            b = self.pick([x for x in self.regs + self.others + self.subdirs()
                           if x != a and not self.inside(a, x)])
        _renameat2_exchange(self.a(a), self.a(b))
        return f"{a} <=> {b}"

    def op_link(self):
        src = self.pick(self.regs + self.others)
        dst = self.newname(self.pick(self.dirs))
        os.link(self.a(src), self.a(dst), follow_symlinks=False)
        return f"{src} => {dst}"

    def op_symlink(self):
        parent = self.pick(self.dirs)
        r = self.rng.random()
        if r < 0.5:
            target = os.path.relpath(self.pick(self.dirs + self.regs + self.others) or ".",
                                     parent or ".")
        elif r < 0.75:
            # absolute, as seen from inside a container whose root is the overlay (not the
            # host path of the mount: the tree must not depend on where it is mounted)
            target = "/" + self.pick(self.regs + self.dirs)
        else:
            target = "dangling-" + self.rng.choice(WORDS)
        rel = self.newname(parent)
        os.symlink(target, self.a(rel))
        return f"{rel} -> {target}"

    def op_mkfifo(self):
        rel = self.newname(self.pick(self.dirs))
        os.mkfifo(self.a(rel), 0o640)
        return rel

    def op_mknod(self):
        rel = self.newname(self.pick(self.dirs))
        os.mknod(self.a(rel), stat.S_IFCHR | 0o600, os.makedev(1, self.rng.choice([3, 5, 7])))
        return rel

    # -- driver
    def step(self) -> None:
        name = self.rng.choice(self.table)
        self.scan()
        benign = _BENIGN_XATTR if name == "setxattr" else \
            _BENIGN_EXCHANGE if name == "exchange" else _BENIGN
        try:
            desc = getattr(self, "op_" + name)()
        except _Skip:
            self.stats.skipped[f"{name}:nothing"] += 1
            return
        except OSError as e:
            en = errno.errorcode.get(e.errno, str(e.errno))
            if e.errno in benign:
                self.stats.skipped[f"{name}:{en}"] += 1
            else:
                self.stats.unexpected.append((name, f"{e.filename!r} {e.strerror}", en))
            if self.log:
                self.log(f"{name}: {en} {e.filename!r}")
            return
        self.stats.done[name] += 1
        if self.log:
            self.log(f"{name}: {desc}")


def run_workload(mnt, rng: random.Random, n_ops: int,
                 log: Callable[[str], None] | None = None,
                 stats: WorkloadStats | None = None) -> WorkloadStats:
    """Run *n_ops* random operations through the overlay mounted at *mnt* (see module doc).

    Pass the *stats* of an earlier call to accumulate counts across a remount.
    """
    w = Workload(mnt, rng, log)
    if stats is not None:
        w.stats = stats
    for _ in range(n_ops):
        w.step()
    return w.stats
