"""The workdir: work/work leftovers the kernel cannot clean, temporaries, incompat/volatile.

Only `work/work` and `work/index` are looked at: the kernel never reads anything else in
the workdir root (6.18, measured), and `<work>/ovlfsck/` is ovlfsck's own state directory.

The kernel's cleanup (`ovl_workdir_cleanup`, overlay-format.md §10.2) removes an entry of
`work/work` (level 1) and, if it is a directory, its entries (level 2) with a plain
unlink/rmdir. A level-2 directory that is not empty therefore cannot be removed: the mount
goes read-only (`work/work`) or logs at every mount (`#` entries of `work/index`, cleaned the
same way by `ovl_indexdir_cleanup`). `work/work/incompat` is special: any entry in it whose
name does not start with `.` fails every mount (`overlay with incompat feature`).
"""
from __future__ import annotations

import os
import stat
import time
from typing import Optional

from ovlfsck.engine import CheckContext, Finding
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import Quarantine
from ovlfsck.stack import Layer

WORK = "work"
INDEX = "index"
INCOMPAT = "incompat"
VOLATILE = "volatile"

_COUNT_LIMIT = 100_000  # objects counted in a leftover tree for the message


def finish(ctx: CheckContext) -> None:
    work = ctx.stack.work
    if work is None:
        return
    _check_work(ctx, work)
    _check_index(ctx, work)


# --------------------------------------------------------------------------- helpers


def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _unlistable(ctx: CheckContext, layer: Layer, rel: str, why: str) -> None:
    ctx.fix(Finding(BY_CODE["OVL901"], layer, rel, f"cannot list: {why}"))
    ctx.operational(f"{layer.name}:{rel}: {why}")


def _names(ctx: CheckContext, layer: Layer, rel: str) -> Optional[list[str]]:
    """The entries of a directory in byte order, or None (reported) if it cannot be listed."""
    try:
        return sorted(os.listdir(os.path.join(layer.path, rel)), key=os.fsencode)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _unlistable(ctx, layer, rel, exc.strerror or str(exc))
        return None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return f"regular file, {st.st_size} bytes"
    if stat.S_ISLNK(mode):
        return "symlink"
    if _is_whiteout(st):
        return "whiteout"
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "object of unknown type"


def _blockers(path: str) -> tuple[list[str], Optional[str]]:
    """Entries of the level-1 directory `path` that are non-empty directories (the cleanup's
    plain rmdir fails on them), and the error if something could not be listed."""
    out: list[str] = []
    try:
        names = sorted(os.listdir(path), key=os.fsencode)
    except OSError as exc:
        return out, exc.strerror
    for name in names:
        sub = os.path.join(path, name)
        st = _lstat(sub)
        if st is None or not stat.S_ISDIR(st.st_mode):
            continue
        try:
            with os.scandir(sub) as it:
                if next(it, None) is not None:
                    out.append(name)
        except OSError as exc:
            # Unreadable: the kernel's rmdir decides, not us; say so, count it as blocking.
            out.append(name)
            return out, f"{name}: {exc.strerror}"
    return out, None


def _tree_size(path: str) -> tuple[int, int, bool]:
    """(objects, bytes of regular files, complete) under `path`, never following symlinks."""
    count = size = 0
    stack = [path]
    while stack:
        cur = stack.pop()
        try:
            with os.scandir(cur) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            count += 1
            if count > _COUNT_LIMIT:
                return count - 1, size, False
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
            elif stat.S_ISREG(st.st_mode):
                size += st.st_size
    return count, size, True


def _holds(path: str) -> str:
    count, size, complete = _tree_size(path)
    more = "" if complete else " or more"
    return (f"holds {count}{more} object{'' if count == 1 else 's'}, {size}{more} "
            f"byte{'' if size == 1 else 's'} of file data")


def _shown(names: list[str], limit: int = 3) -> str:
    text = ", ".join(repr(n) for n in names[:limit])
    return text + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- work/work


def _check_work(ctx: CheckContext, work: Layer) -> None:
    top = os.path.join(work.path, WORK)
    st = _lstat(top)
    if st is None:
        return  # created by the next mount
    if not stat.S_ISDIR(st.st_mode):
        ctx.fix(Finding(BY_CODE["OVL703"], work, WORK, f"a {_kind(st)}"))
        return
    names = _names(ctx, work, WORK)
    if names is None:
        return
    for name in names:
        rel = f"{WORK}/{name}"
        path = os.path.join(top, name)
        est = _lstat(path)
        if est is None:
            continue
        if name.startswith("#") and _is_whiteout(est):
            continue  # the kernel's spare whiteout: survives every unmount without index
        if not stat.S_ISDIR(est.st_mode):
            ctx.fix(Finding(BY_CODE["OVL702"], work, rel, f"a {_kind(est)}"))
            continue
        if name == INCOMPAT and _check_incompat(ctx, work, rel, path):
            continue
        _check_tree(ctx, work, rel, path, name, "OVL701", "OVL702",
                    f"cleanup of '{name}/{{blocker}}' failed (-39)")


def _check_incompat(ctx: CheckContext, work: Layer, rel: str, path: str) -> bool:
    """work/work/incompat: True if reported (entries naming incompatible features)."""
    try:
        names = sorted(os.listdir(path), key=os.fsencode)
    except OSError as exc:
        _unlistable(ctx, work, rel, exc.strerror or str(exc))
        return True
    # The kernel skips names starting with '.' (only '.' and '..' are meant) before its
    # incompat test; those are cleaned like any other level-2 entry.
    features = [n for n in names if not n.startswith(".")]
    if not features:
        return False
    quoted = ", ".join(f"'{n}'" for n in features[:3]) + (" ..." if len(features) > 3 else "")
    if VOLATILE in features:
        detail = (f"left by a 'volatile' mount, which never syncs the upper layer: if the system "
                  "crashed or lost power while it was mounted, the upper layer may be "
                  "inconsistent and the kernel documentation says to discard upper and work "
                  f"(overlay with incompat feature '{VOLATILE}' cannot be mounted)"
                  f"{_volatile_age(os.path.join(path, VOLATILE))}")
        others = [n for n in features if n != VOLATILE]
        if others:
            detail += f"; also names unknown feature(s) {', '.join(map(repr, others[:3]))}"
    else:
        detail = (f"unknown incompatible feature(s) {quoted}, written by another kernel; the "
                  "layers may depend on it (overlay with incompat feature "
                  f"'{features[0]}' cannot be mounted)")
    ctx.fix(Finding(
        BY_CODE["OVL704"], work, rel, detail,
        ops=(Quarantine(work, rel),),
        action="move work/work/incompat to the quarantine (undo puts it back); unless certain "
               "the system did not crash since that mount, check the upper layer before using it",
    ))
    return True


def _boot_time() -> Optional[float]:
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _volatile_age(path: str) -> str:
    """When the volatile marker was made, against this system's boot time (a hint only)."""
    st = _lstat(os.path.join(path, "dirty")) or _lstat(path)
    btime = _boot_time()
    if st is None or btime is None:
        return ""
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    if st.st_mtime < btime:
        return (f"; the marker dates from {made}, before this system last booted: check that "
                "the shutdown in between was clean")
    return (f"; the marker dates from {made}, during the current boot (no crash since, if the "
            "layers were not moved from another machine): run sync before answering yes")


# --------------------------------------------------------------------------- work/index


def _check_index(ctx: CheckContext, work: Layer) -> None:
    top = os.path.join(work.path, INDEX)
    st = _lstat(top)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        ctx.fix(Finding(
            BY_CODE["OVL705"], work, INDEX,
            f"a {_kind(st)}; a mount with index=on fails: Not a directory",
            ops=(Quarantine(work, INDEX),),
            action="move it to the quarantine (the next mount with index=on creates an empty "
                   "index directory)",
        ))
        return
    names = _names(ctx, work, INDEX)
    if names is None:
        return
    for name in names:
        if not name.startswith("#"):
            continue  # index entries: the index pass
        rel = f"{INDEX}/{name}"
        path = os.path.join(top, name)
        est = _lstat(path)
        if est is None or _is_whiteout(est):
            continue  # the spare shared whiteout: survives every unmount, normal
        if not stat.S_ISDIR(est.st_mode):
            ctx.fix(Finding(BY_CODE["OVL706"], work, rel, f"a {_kind(est)}"))
            continue
        _check_tree(ctx, work, rel, path, name, "OVL707", "OVL706",
                    f"every mount with index=on logs cleanup of '{name}/{{blocker}}' failed (-39)")


def _check_tree(ctx: CheckContext, work, rel: str, path: str, name: str,
                blocked_code: str, cleanable_code: str, kernel_says: str) -> None:
    """A directory the kernel's two-level cleanup meets: blocked (non-empty directories two
    levels down: quarantine it, keeping any data) or cleanable (info: the kernel removes it)."""
    blockers, err = _blockers(path)
    if err and not blockers:
        _unlistable(ctx, work, rel, err)
        return
    if not blockers:
        ctx.fix(Finding(BY_CODE[cleanable_code], work, rel, f"a directory that {_holds(path)}"))
        return
    detail = (f"{_shown(blockers)} {'is a' if len(blockers) == 1 else 'are'} non-empty "
              f"director{'y' if len(blockers) == 1 else 'ies'} two levels down "
              f"({kernel_says.replace('{blocker}', blockers[0])}); it {_holds(path)}")
    if err:
        detail += f"; cannot read {err}"
    ctx.fix(Finding(
        BY_CODE[blocked_code], work, rel, detail,
        ops=(Quarantine(work, rel),),
        action="move it to the quarantine and keep it there: a copy-up cut short by a "
               "crash may hold the only copy of recently written data",
    ))
