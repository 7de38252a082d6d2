"""The repair journal, quarantine and undo, on real directories.

Each test builds a small stack in tmp_path (as root: mknod, chown and trusted.* xattrs
work), snapshots every object of every layer, applies operations through a Journal,
undoes the journal and compares the snapshots.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import stat
import subprocess

import pytest
import xattr

from ovlfsck import repair
from ovlfsck.errors import ExitCode, OperationalError
from ovlfsck.repair import (
    Journal,
    Link,
    MakeDir,
    MakeWhiteout,
    Quarantine,
    RemoveXattr,
    Rename,
    SetXattr,
    UnsafePathError,
    split_relpath,
    undo,
)
from ovlfsck.stack import build_stack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown, trusted.*)")

ORIGIN = bytes.fromhex("00fb1d00010c3664b7ffbf408182dd84ed33ee52e00c0000003d3553a2")
BADNAME = os.fsdecode(b"bad\xffname")
T0 = 1_600_000_000_123_456_789


# --------------------------------------------------------------------------- helpers


def snapshot(root: str, skip: tuple[str, ...] = ("work/ovlfsck",)) -> tuple[dict, set]:
    """Every object under root: type, mode, owner, rdev, size, nlink, content hash,
    symlink target, mtime (non-dirs), all xattrs; plus the hard-link groups."""
    entries: dict[str, dict] = {}
    inodes: dict[tuple[int, int], list[str]] = collections.defaultdict(list)

    def visit(path: str, rel: str) -> None:
        st = os.lstat(path)
        entry = {
            "type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid, "gid": st.st_gid, "rdev": st.st_rdev, "nlink": st.st_nlink,
            "xattrs": dict(xattr.get_all(path, nofollow=True)),
        }
        if stat.S_ISDIR(st.st_mode):
            # A dir's nlink only counts its subdirs (compared anyway), and work/'s
            # counts the state directory, which is not part of the layers.
            del entry["nlink"]
        else:
            entry["size"] = st.st_size
            entry["mtime"] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            # O_NOATIME: looking must not change the atimes the tests compare.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
            with os.fdopen(fd, "rb") as fh:
                entry["sha256"] = hashlib.sha256(fh.read()).hexdigest()
        if stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        entries[rel] = entry
        inodes[(st.st_dev, st.st_ino)].append(rel)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME)
            try:
                names = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            for name in names:
                sub = f"{rel}/{name}" if rel else name
                if sub not in skip:
                    visit(os.path.join(path, name), sub)

    visit(root, "")
    return entries, {frozenset(v) for v in inodes.values() if len(v) > 1}


def ino(path: str) -> int:
    return os.lstat(path).st_ino


def mkwhiteout(path: str) -> None:
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
    os.chmod(path, 0)


def records(journal_path: str) -> list[dict]:
    with open(journal_path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def truncate_after(journal_path: str, predicate) -> None:
    """Keep the journal up to and including the last record matching predicate: what a
    power cut right after that record's fsync leaves on disk."""
    with open(journal_path, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    keep = max(i for i, line in enumerate(lines) if predicate(json.loads(line)))
    with open(journal_path, "wb") as fh:
        fh.writelines(lines[: keep + 1])


class Env:
    def __init__(self, root: str) -> None:
        self.root = root
        self.lower = os.path.join(root, "lower")
        self.upper = os.path.join(root, "upper")
        self.work = os.path.join(root, "work")
        self.stack = build_stack(lowers=[self.lower], upper=self.upper, work=self.work)

    def u(self, *parts: str) -> str:
        return os.path.join(self.upper, *parts)

    def snap(self):
        return snapshot(self.root)


@pytest.fixture
def env(tmp_path) -> Env:
    root = tmp_path / "layers"
    for d in ("lower/d", "upper/dir/sub", "work/index", "work/work"):
        (root / d).mkdir(parents=True)
    e = Env(str(root))
    (root / "lower/f").write_text("lower file\n")
    (root / "lower/d/g").write_text("g\n")
    # upper: a bit of everything
    f = e.u("file")
    with open(f, "w") as fh:
        fh.write("hello\n")
    os.chown(f, 1000, 1001)
    os.chmod(f, 0o4755)
    xattr.set(f, "trusted.overlay.origin", ORIGIN, nofollow=True)
    xattr.set(f, "user.comment", b"keep me", nofollow=True)
    os.utime(f, ns=(T0, T0 + 5))
    d = e.u("dir")
    xattr.set(d, "trusted.overlay.opaque", b"y", nofollow=True)
    os.chown(d, 5, 6)
    os.chmod(d, 0o750)
    xattr.set(e.u("dir", "sub"), "trusted.empty", b"", nofollow=True)  # present, empty
    with open(e.u("dir", "sub", "deep"), "wb") as fh:
        fh.write(os.urandom(100_000))
    os.symlink("../file", e.u("dir", "link"))
    xattr.set(e.u("dir", "link"), "trusted.overlay.origin", ORIGIN, nofollow=True)
    os.mkfifo(e.u("dir", "fifo"), 0o640)
    xattr.set(e.u("dir", "fifo"), "trusted.test", b"fifo", nofollow=True)
    with open(e.u("dir", "hl1"), "w") as fh:
        fh.write("linked\n")
    os.link(e.u("dir", "hl1"), e.u("dir", "hl2"))
    # the kernel's shared whiteout inode: upper entries plus the spare in work/index
    mkwhiteout(e.u("wh"))
    os.link(e.u("wh"), e.u("dir", "wh2"))
    os.link(e.u("wh"), os.path.join(e.work, "index", "#54"))
    os.mknod(e.u("bdev"), stat.S_IFBLK | 0o600, os.makedev(7, 0))
    with open(e.u(BADNAME), "w") as fh:
        fh.write("non-utf8 name\n")
    with open(e.u("sparse"), "wb") as fh:
        fh.truncate(1 << 20)
        fh.seek(512 * 1024)
        fh.write(b"data in the middle")
    return e


# --------------------------------------------------------------------------- apply + undo


def _ops(e: Env):
    up = e.stack.upper
    work = e.stack.work
    return {
        "set-new": SetXattr(up, "dir", "trusted.overlay.impure", b"y"),
        "set-overwrite": SetXattr(up, "dir", "trusted.overlay.opaque", b"x"),
        "set-root": SetXattr(up, "", "trusted.overlay.origin", ORIGIN),
        "set-symlink": SetXattr(up, "dir/link", "trusted.overlay.redirect", b"/x"),
        "set-empty": SetXattr(up, "file", "trusted.overlay.origin", b""),
        "remove": RemoveXattr(up, "file", "trusted.overlay.origin"),
        "remove-empty": RemoveXattr(up, "dir/sub", "trusted.empty"),
        "quarantine-file": Quarantine(up, "file"),
        "quarantine-tree": Quarantine(up, "dir"),
        "quarantine-symlink": Quarantine(up, "dir/link"),
        "quarantine-fifo": Quarantine(up, "dir/fifo"),
        "quarantine-hardlink": Quarantine(up, "dir/hl2"),
        "quarantine-whiteout": Quarantine(up, "wh"),
        "quarantine-bdev": Quarantine(up, "bdev"),
        "quarantine-badname": Quarantine(up, BADNAME),
        "quarantine-index": Quarantine(work, "index/#54"),
        "make-whiteout": MakeWhiteout(up, "dir/newwh"),
        "make-dir": MakeDir(up, "newdir", 0o2755, 12, 34),
        "rename-file": Rename(up, "file", "dir/sub/moved"),
        "rename-dir": Rename(up, "dir", "renamed"),
        "rename-index": Rename(work, "index/#54", "index/00fb1d"),
        "link-index": Link(work, "index/00fb1e", up, "file"),
        "link-symlink": Link(work, "index/00fb1f", up, "dir/link"),
        "link-fifo": Link(up, "dir/fifo2", up, "dir/fifo"),
    }


@pytest.mark.parametrize("name", list(_ops(Env("/nonexistent")).keys()))
def test_apply_then_undo_restores_everything(env, name):
    op = _ops(env)[name]
    before = env.snap()
    with Journal.create(env.stack) as journal:
        journal.apply(op)
    assert journal.path and os.path.exists(journal.path)
    after = env.snap()
    assert after != before, "the operation changed nothing"
    lines = undo(journal.path, env.stack)
    assert len(lines) == 1 and "refused" not in lines[0], lines
    assert env.snap() == before


def test_effects_of_each_operation(env):
    up = env.stack.upper
    with Journal.create(env.stack) as j:
        j.apply(SetXattr(up, "dir", "trusted.overlay.opaque", b"x"))
        j.apply(RemoveXattr(up, "file", "user.comment"))
        j.apply(MakeWhiteout(up, "dir/newwh"))
        j.apply(MakeDir(up, "newdir", 0o2755, 12, 34))
        j.apply(Rename(up, "dir/hl1", "newdir/hl1"))
        j.apply(Quarantine(up, "dir/sub"))
    assert xattr.get(env.u("dir"), "trusted.overlay.opaque", nofollow=True) == b"x"
    assert b"user.comment" not in xattr.list(env.u("file"), nofollow=True)
    st = os.lstat(env.u("dir", "newwh"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert (st.st_uid, st.st_gid, st.st_nlink) == (0, 0, 1)
    st = os.lstat(env.u("newdir"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o2755
    assert (st.st_uid, st.st_gid) == (12, 34)
    assert os.lstat(env.u("newdir", "hl1")).st_ino == os.lstat(env.u("dir", "hl2")).st_ino
    assert not os.path.lexists(env.u("dir", "sub"))
    qdir = os.path.join(env.work, "ovlfsck", "quarantine", j.run_id)
    assert os.listdir(os.path.join(qdir, "6")) == ["deep"]


def test_quarantine_of_shared_whiteout_keeps_links_and_undo_restores_the_inode(env):
    original = ino(env.u("wh"))
    spare = os.path.join(env.work, "index", "#54")
    assert os.lstat(spare).st_nlink == 3
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(env.stack.upper, "wh"))
    assert not os.path.lexists(env.u("wh"))
    # Moved, not copied or unlinked: the peers still count three links to one inode.
    assert os.lstat(spare).st_nlink == 3
    assert os.lstat(env.u("dir", "wh2")).st_nlink == 3
    moved = os.path.join(env.work, "ovlfsck", "quarantine", j.run_id, "1")
    assert ino(moved) == original
    undo(j.path)
    assert ino(env.u("wh")) == original
    assert os.lstat(spare).st_nlink == 3
    assert not os.path.lexists(moved)


def test_undo_of_a_quarantined_tree_restores_the_same_inodes(env):
    inos = {p: ino(env.u(p)) for p in ("dir", "dir/sub/deep", "dir/hl1", "dir/link")}
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(env.stack.upper, "dir"))
    undo(j.path)
    assert {p: ino(env.u(p)) for p in inos} == inos


# --------------------------------------------------------------------------- the journal file


def test_journal_is_created_lazily(env):
    j = Journal.create(env.stack)
    j.close()
    assert j.path is None
    assert not os.path.exists(os.path.join(env.work, "ovlfsck"))
    # A refused precondition is not a change either.
    j = Journal.create(env.stack)
    with pytest.raises(OperationalError, match="already exists"):
        j.apply(MakeWhiteout(env.stack.upper, "file"))
    with pytest.raises(OperationalError, match="no xattr"):
        j.apply(RemoveXattr(env.stack.upper, "file", "trusted.overlay.nope"))
    j.close()
    assert j.path is None and not os.path.exists(os.path.join(env.work, "ovlfsck"))


def test_journal_records_everything_needed(env):
    with Journal.create(env.stack) as j:
        j.apply(SetXattr(env.stack.upper, "dir", "trusted.overlay.opaque", b"x"))
        j.apply(SetXattr(env.stack.upper, "dir", "trusted.overlay.impure", b"y"))
        j.apply(Quarantine(env.stack.upper, "file"))
    state = os.path.join(env.work, "ovlfsck")
    assert os.path.dirname(j.path) == state
    assert os.path.basename(j.path) == f"journal-{j.run_id}.jsonl"
    assert "ovlfsck undo" in open(os.path.join(state, "README.txt")).read()
    header, *recs = records(j.path)
    assert header["journal"] == "ovlfsck/1" and header["run"] == j.run_id
    assert header["started"]
    layers = {rec["name"]: rec for rec in header["stack"]["layers"]}
    assert layers["upper"]["path"] == env.upper
    assert (layers["upper"]["dev"], layers["upper"]["ino"]) == \
        (os.stat(env.upper).st_dev, os.stat(env.upper).st_ino)
    assert set(layers) == {"upper", "lower:0", "work"}
    ops = [r for r in recs if r.get("rec") == "op"]
    assert [r["rec"] for r in recs] == ["op", "done"] * 3 + ["end"]
    assert ops[0]["old"] == {"present": True, "value": "eQ=="}  # b"y"
    assert ops[1]["old"] == {"present": False, "value": None}
    obj = ops[2]["object"]
    st = os.lstat(os.path.join(state, ops[2]["quarantine"]))
    assert ops[2]["method"] == "rename"
    assert (obj["type"], obj["mode"], obj["uid"], obj["gid"]) == ("reg", 0o4755, 1000, 1001)
    assert (obj["ino"], obj["nlink"], obj["mtime_ns"], obj["atime_ns"]) == \
        (st.st_ino, 1, T0 + 5, T0)
    assert set(obj["xattrs"]) == {"trusted.overlay.origin", "user.comment"}
    assert ops[2]["quarantine"] == f"quarantine/{j.run_id}/3"


def test_undo_refuses_a_journal_of_another_stack(env, tmp_path):
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(env.stack.upper, "file"))
    other = Env(str(tmp_path / "other"))
    for d in (other.lower, other.upper, other.work):
        os.makedirs(d)
    state = env.snap()
    with pytest.raises(OperationalError, match="another set of layers") as exc:
        undo(j.path, other.stack)
    assert exc.value.exit_code == ExitCode.OPERATIONAL
    assert env.snap() == state
    assert not any(r.get("rec") in ("undo", "undone") for r in records(j.path))
    undo(j.path, env.stack)  # the right stack is accepted
    assert os.path.exists(env.u("file"))


def test_undo_refuses_a_stack_with_a_layer_less(env, tmp_path):
    extra = tmp_path / "lower2"
    extra.mkdir()
    bigger = build_stack(lowers=[env.lower, str(extra)], upper=env.upper, work=env.work)
    with Journal.create(bigger) as j:
        j.apply(Quarantine(env.stack.upper, "file"))
    with pytest.raises(OperationalError, match="another set of layers"):
        undo(j.path, env.stack)
    assert not os.path.exists(env.u("file"))
    undo(j.path, bigger)
    assert os.path.exists(env.u("file"))


def test_undo_refuses_when_a_layer_was_replaced(env, tmp_path):
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(env.stack.upper, "file"))
    # Same path, different directory: the journal's layer identity (dev/ino) differs.
    os.rename(env.upper, str(tmp_path / "old-upper"))
    os.mkdir(env.upper)
    with pytest.raises(OperationalError, match="not the directory this journal"):
        undo(j.path)
    with pytest.raises(OperationalError, match="not the directory this journal"):
        undo(j.path, env.stack)
    assert os.listdir(env.upper) == []


def test_double_undo_is_refused(env):
    with Journal.create(env.stack) as j:
        j.apply(MakeWhiteout(env.stack.upper, "x"))
    undo(j.path)
    assert records(j.path)[-1]["rec"] == "undone"
    with pytest.raises(OperationalError, match="already undone"):
        undo(j.path)
    with pytest.raises(OperationalError, match="already undone"):
        undo(j.path, dry_run=True)


def test_dry_run_changes_nothing(env):
    with Journal.create(env.stack) as j:
        for op in _ops(env).values():
            if not isinstance(op, (Rename, Link)) and op.relpath not in ("dir", "index/#54"):
                j.apply(op)
    after = env.snap()
    journal_bytes = open(j.path, "rb").read()
    state_dir = snapshot(os.path.join(env.work, "ovlfsck"), skip=())
    lines = undo(j.path, env.stack, dry_run=True)
    assert lines and all("would" in line or "nothing" in line for line in lines), lines
    assert env.snap() == after
    assert open(j.path, "rb").read() == journal_bytes
    assert snapshot(os.path.join(env.work, "ovlfsck"), skip=()) == state_dir
    undo(j.path, env.stack)  # not marked undone by the dry run


def test_undo_reverts_newest_first_across_dependent_steps(env):
    before = env.snap()
    up = env.stack.upper
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(up, "wh"))
        j.apply(MakeWhiteout(up, "wh"))
        j.apply(MakeDir(up, "nd", 0o755, 0, 0))
        j.apply(Rename(up, "dir", "nd/dir"))
        j.apply(SetXattr(up, "nd/dir", "trusted.overlay.opaque", b"x"))
        j.apply(Quarantine(up, "nd"))
    dry = undo(j.path, dry_run=True)
    assert len(dry) == 6 and not dry.refused
    lines = undo(j.path)
    assert [line.split()[0] for line in lines] == ["#6", "#5", "#4", "#3", "#2", "#1"]
    assert not lines.refused and lines.reverted == 6
    assert env.snap() == before


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("bad", ["../x", "a/../b", "/etc/passwd", "a\0b", "a//b", "./a", "a/.",
                                 "a/", "x" * 256])
def test_bad_relpaths_are_rejected_before_anything(env, bad):
    with pytest.raises(ValueError):
        split_relpath(bad)
    for make in (lambda: SetXattr(env.stack.upper, bad, "trusted.x", b"1"),
                 lambda: RemoveXattr(env.stack.upper, bad, "trusted.x"),
                 lambda: Quarantine(env.stack.upper, bad),
                 lambda: MakeWhiteout(env.stack.upper, bad),
                 lambda: MakeDir(env.stack.upper, bad, 0o755, 0, 0),
                 lambda: Rename(env.stack.upper, "file", bad)):
        with pytest.raises(ValueError):
            make()


def test_root_cannot_be_moved_or_created(env):
    for make in (lambda: Quarantine(env.stack.upper, ""),
                 lambda: MakeWhiteout(env.stack.upper, ""),
                 lambda: Rename(env.stack.upper, "", "x")):
        with pytest.raises(ValueError):
            make()
    assert split_relpath("") == ()
    assert split_relpath("a/b c/d") == ("a", "b c", "d")


def test_a_parent_symlink_to_outside_is_refused(env, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("not yours\n")
    os.symlink(str(outside), env.u("escape"))
    os.symlink("../..", env.u("dir", "up"))
    before_out = snapshot(str(outside), skip=())
    before = env.snap()
    up = env.stack.upper
    j = Journal.create(env.stack)
    for op in (SetXattr(up, "escape/f", "trusted.overlay.opaque", b"y"),
               RemoveXattr(up, "escape/f", "trusted.x"),
               Quarantine(up, "escape/f"),
               MakeWhiteout(up, "escape/new"),
               MakeDir(up, "escape/newdir", 0o755, 0, 0),
               Rename(up, "escape/f", "stolen"),
               Rename(up, "file", "escape/planted"),
               SetXattr(up, "dir/up/outside/f", "trusted.x", b"1")):
        with pytest.raises(UnsafePathError, match="symbolic link") as exc:
            j.apply(op)
        assert isinstance(exc.value, OperationalError) and isinstance(exc.value, ValueError)
        assert exc.value.exit_code == ExitCode.OPERATIONAL
    j.close()
    assert j.path is None  # refused before the journal was even created
    assert snapshot(str(outside), skip=()) == before_out
    assert env.snap() == before


def test_xattr_ops_on_a_symlink_never_follow_it(env):
    target_before = dict(xattr.get_all(env.u("file"), nofollow=True))
    with Journal.create(env.stack) as j:
        j.apply(SetXattr(env.stack.upper, "dir/link", "trusted.overlay.opaque", b"y"))
    assert xattr.get(env.u("dir", "link"), "trusted.overlay.opaque", nofollow=True) == b"y"
    assert dict(xattr.get_all(env.u("file"), nofollow=True)) == target_before
    undo(j.path)
    assert b"trusted.overlay.opaque" not in xattr.list(env.u("dir", "link"), nofollow=True)


def test_the_state_directory_is_never_touched(env):
    with Journal.create(env.stack) as j:
        j.apply(SetXattr(env.stack.upper, "dir", "trusted.overlay.impure", b"y"))
        for op in (Quarantine(env.stack.work, "ovlfsck"),
                   Quarantine(env.stack.work, f"ovlfsck/journal-{j.run_id}.jsonl"),
                   Rename(env.stack.work, "ovlfsck", "x"),
                   Rename(env.stack.work, "index", "ovlfsck/index"),
                   SetXattr(env.stack.work, "ovlfsck/README.txt", "trusted.x", b"1")):
            with pytest.raises(UnsafePathError, match="state directory"):
                j.apply(op)
        # xattrs on the work root itself are fine (it only contains the state directory).
        j.apply(SetXattr(env.stack.work, "", "trusted.test", b"1"))
    undo(j.path)


def test_an_operation_on_a_layer_of_another_stack_is_refused(env, tmp_path):
    other = Env(str(tmp_path / "other"))
    os.makedirs(other.upper)
    with Journal.create(env.stack) as j:
        with pytest.raises(ValueError, match="not a layer of this stack"):
            j.apply(MakeWhiteout(other.stack.upper, "x"))
    assert not os.path.exists(os.path.join(other.upper, "x"))


# --------------------------------------------------------------------------- crashes


CRASH_CASES = {
    "set": lambda e: SetXattr(e.stack.upper, "dir", "trusted.overlay.opaque", b"x"),
    "set-new": lambda e: SetXattr(e.stack.upper, "file", "trusted.overlay.impure", b"y"),
    "remove": lambda e: RemoveXattr(e.stack.upper, "file", "trusted.overlay.origin"),
    "quarantine": lambda e: Quarantine(e.stack.upper, "wh"),
    "whiteout": lambda e: MakeWhiteout(e.stack.upper, "dir/new"),
    "mkdir": lambda e: MakeDir(e.stack.upper, "newdir", 0o700, 0, 0),
    "rename": lambda e: Rename(e.stack.upper, "dir", "moved"),
}


@pytest.mark.parametrize("case", list(CRASH_CASES))
def test_crash_after_the_change_before_done(env, case):
    """Write-ahead record, change made, no 'done' record (power cut)."""
    before = env.snap()
    with Journal.create(env.stack) as j:
        j.apply(CRASH_CASES[case](env))
    truncate_after(j.path, lambda r: r.get("rec") == "op")
    assert env.snap() != before
    lines = undo(j.path)
    assert not lines.refused, lines
    assert "interrupted" in lines[0] and "nothing" not in lines[0], lines
    assert env.snap() == before
    assert records(j.path)[-1]["rec"] == "undone"


class Crash(BaseException):
    """A kill -9 in the middle of apply(): nothing after it runs."""


@pytest.mark.parametrize("case", list(CRASH_CASES))
def test_crash_before_the_change(env, case, monkeypatch):
    """Write-ahead record written, then the process died before changing anything."""
    def die(*a, **k):
        raise Crash()
    for fn in ("_xattr_set", "_xattr_remove", "_rename_noreplace"):
        monkeypatch.setattr(repair, fn, die)
    real_mkdir = os.mkdir
    monkeypatch.setattr(repair.os, "mknod", die)
    monkeypatch.setattr(repair.os, "mkdir", lambda name, *a, **k:
                        die() if name == "newdir" else real_mkdir(name, *a, **k))
    before = env.snap()
    j = Journal.create(env.stack)
    with pytest.raises(Crash):
        j.apply(CRASH_CASES[case](env))
    monkeypatch.undo()
    os.close(j._fd)  # the process is gone: no 'end', and the 'failed' record is lost too
    truncate_after(j.path, lambda r: r.get("rec") == "op")
    assert env.snap() == before
    lines = undo(j.path)
    assert not lines.refused, lines
    assert "nothing to do" in lines[0] and "interrupted" in lines[0], lines
    assert env.snap() == before


def test_a_failed_change_is_recorded_and_undo_inspects_it(env, monkeypatch):
    def eio(*a, **k):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(repair, "_xattr_set", eio)
    with Journal.create(env.stack) as j:
        with pytest.raises(OperationalError, match="Input/output error"):
            j.apply(SetXattr(env.stack.upper, "dir", "trusted.overlay.opaque", b"x"))
    monkeypatch.undo()
    assert [r.get("rec") for r in records(j.path)][1:] == ["op", "failed", "end"]
    lines = undo(j.path)
    assert "nothing to do" in lines[0] and "failed" in lines[0]


def test_a_torn_last_line_is_ignored(env):
    before = env.snap()
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(env.stack.upper, "file"))
    with open(j.path, "ab") as fh:
        fh.write(b'{"rec":"op","seq":2,"op":"quaran')
    undo(j.path)
    assert env.snap() == before
    last = open(j.path, "rb").read().splitlines()[-1]
    assert json.loads(last)["rec"] == "undone"  # appended on a fresh line


def test_a_corrupt_journal_is_refused(env, tmp_path):
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(env.stack.upper, "file"))
    lines = open(j.path).read().splitlines()
    lines[1] = lines[1][:20]
    with open(j.path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.raises(OperationalError, match="line 2"):
        undo(j.path)
    other = tmp_path / "notes.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(OperationalError, match="not an ovlfsck journal"):
        undo(str(other))
    with pytest.raises(OperationalError, match="cannot open"):
        undo(str(tmp_path / "missing.jsonl"))


def test_undo_of_a_journal_still_being_written_is_refused(env):
    j = Journal.create(env.stack)
    j.apply(MakeWhiteout(env.stack.upper, "x"))
    with pytest.raises(OperationalError, match="in use"):
        undo(j.path)
    j.close()
    undo(j.path)
    assert not os.path.lexists(env.u("x"))


# --------------------------------------------------------------------------- refused steps


def test_a_step_that_cannot_be_reverted_is_refused_and_the_rest_continues(env):
    up = env.stack.upper
    with Journal.create(env.stack) as j:
        j.apply(Quarantine(up, "file"))
        j.apply(SetXattr(up, "dir", "trusted.overlay.opaque", b"x"))
        j.apply(MakeWhiteout(up, "newwh"))
    # Someone recreates 'file' and replaces the whiteout we made with data.
    with open(env.u("file"), "w") as fh:
        fh.write("new data\n")
    os.unlink(env.u("newwh"))
    with open(env.u("newwh"), "w") as fh:
        fh.write("also new\n")
    lines = undo(j.path)
    assert len(lines.refused) == 2
    assert any("#1" in line and "exists again" in line for line in lines.refused)
    assert any("#3" in line and "not the whiteout ovlfsck created" in line
               for line in lines.refused)
    assert xattr.get(env.u("dir"), "trusted.overlay.opaque", nofollow=True) == b"y"
    assert open(env.u("file")).read() == "new data\n"  # nothing overwritten
    assert records(j.path)[-1]["rec"] != "undone"
    # Fixed by hand: undo again finishes the remaining steps only.
    os.unlink(env.u("file"))
    os.unlink(env.u("newwh"))
    again = undo(j.path)
    assert not again.refused, again
    assert "already reverted" in again[1]
    assert open(env.u("file")).read() == "hello\n"
    assert records(j.path)[-1]["rec"] == "undone"


def test_undo_leaves_an_xattr_changed_since(env):
    with Journal.create(env.stack) as j:
        j.apply(SetXattr(env.stack.upper, "dir", "trusted.overlay.opaque", b"x"))
    xattr.set(env.u("dir"), "trusted.overlay.opaque", b"z", nofollow=True)
    lines = undo(j.path)
    assert lines.refused and "changed since" in lines[0]
    assert xattr.get(env.u("dir"), "trusted.overlay.opaque", nofollow=True) == b"z"


def test_undo_leaves_a_created_dir_that_was_filled(env):
    with Journal.create(env.stack) as j:
        j.apply(MakeDir(env.stack.upper, "nd", 0o755, 0, 0))
    open(env.u("nd", "precious"), "w").close()
    lines = undo(j.path)
    assert lines.refused and "not empty" in lines[0]
    assert os.path.exists(env.u("nd", "precious"))


# --------------------------------------------------------------------------- other filesystems


@pytest.fixture
def tmpfs_lower(tmp_path):
    """A lower layer on its own tmpfs: rename() into the workdir's quarantine gives EXDEV."""
    mnt = tmp_path / "lowerfs"
    mnt.mkdir()
    # noatime: the tests' own reads (snapshots list dirs, read links) must not move the
    # atimes they compare; utime() still sets them.
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,noatime", "ovlfsck-test",
                          str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_lower(lower: str) -> None:
    tree = os.path.join(lower, "tree")
    os.makedirs(os.path.join(tree, "sub", "deeper"))
    with open(os.path.join(tree, "a"), "wb") as fh:
        fh.write(os.urandom(300_000))
    os.chown(os.path.join(tree, "a"), 7, 8)
    os.chmod(os.path.join(tree, "a"), 0o6711)
    xattr.set(os.path.join(tree, "a"), "trusted.overlay.metacopy", b"", nofollow=True)
    xattr.set(os.path.join(tree, "a"), "user.note", b"n", nofollow=True)
    os.link(os.path.join(tree, "a"), os.path.join(tree, "sub", "a-link"))
    with open(os.path.join(tree, "sparse"), "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(4 << 20)
        fh.write(b"x")
    os.symlink("/absolute/target", os.path.join(tree, "sub", "abs"))
    os.lchown(os.path.join(tree, "sub", "abs"), 3, 4)
    xattr.set(os.path.join(tree, "sub", "abs"), "trusted.overlay.origin", ORIGIN, nofollow=True)
    os.mkfifo(os.path.join(tree, "sub", "fifo"), 0o600)
    os.mknod(os.path.join(tree, "sub", "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    xattr.set(os.path.join(tree, "sub"), "trusted.overlay.opaque", b"x", nofollow=True)
    os.chmod(os.path.join(tree, "sub", "deeper"), 0o1777)
    mkwhiteout(os.path.join(lower, "wh"))
    xattr.set(os.path.join(lower, "wh"), "trusted.test", b"w", nofollow=True)
    os.mkdir(os.path.join(lower, "empty"), 0o711)
    os.chown(os.path.join(lower, "empty"), 9, 9)
    xattr.set(os.path.join(lower, "empty"), "trusted.overlay.opaque", b"y", nofollow=True)
    with open(os.path.join(lower, "single"), "w") as fh:
        fh.write("single\n")
    for dirpath, dirnames, filenames in os.walk(lower):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(T0 + 1, T0 + 2), follow_symlinks=False)
    os.utime(tree, ns=(T0 + 3, T0 + 4))


def _times(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns


@pytest.mark.parametrize("target, method", [("tree", "copy"), ("single", "copy"),
                                            ("wh", "record"), ("empty", "record")])
def test_lower_on_another_filesystem(env, tmpfs_lower, target, method):
    _fill_lower(tmpfs_lower)
    stack = build_stack(lowers=[tmpfs_lower, env.lower], upper=env.upper, work=env.work)
    layer = stack.lowers[0]
    before = snapshot(tmpfs_lower, skip=())
    times = {p: _times(os.path.join(tmpfs_lower, p)) for p in before[0] if p}
    assert times["single"] == (T0 + 1, T0 + 2)  # the snapshot did not touch atimes
    with Journal.create(stack) as j:
        j.apply(Quarantine(layer, target))
    assert not os.path.lexists(os.path.join(tmpfs_lower, target))
    op = [r for r in records(j.path) if r.get("rec") == "op"][0]
    assert op["method"] == method
    recs = [r.get("rec") for r in records(j.path)]
    assert recs[1:] == ["op"] + (["copied"] if method == "copy" else []) + ["done", "end"]
    if method == "copy":
        # The quarantine holds a full copy (content, metadata) on the workdir's filesystem.
        copy = os.path.join(env.work, "ovlfsck", op["quarantine"])
        assert os.stat(copy).st_dev == os.stat(env.work).st_dev
        sub = {k[len(target) + 1:]: v for k, v in before[0].items()
               if k == target or k.startswith(target + "/")}
        got = snapshot(copy, skip=())[0]
        assert got == sub
    else:
        assert op["quarantine"] is None and op["object"]["xattrs"]
    lines = undo(j.path, stack)
    assert not lines.refused, lines
    assert snapshot(tmpfs_lower, skip=()) == before
    # atime and mtime of everything restored (the layer root's are not: not required).
    after_times = {p: _times(os.path.join(tmpfs_lower, p)) for p in times}
    assert {p: (times[p], after_times[p]) for p in times if times[p] != after_times[p]} == {}
    if method == "copy":
        assert not os.path.lexists(os.path.join(env.work, "ovlfsck", op["quarantine"]))


def test_lower_copy_keeps_internal_hardlinks(env, tmpfs_lower):
    _fill_lower(tmpfs_lower)
    stack = build_stack(lowers=[tmpfs_lower], upper=env.upper, work=env.work)
    with Journal.create(stack) as j:
        j.apply(Quarantine(stack.lowers[0], "tree"))
    copy = os.path.join(env.work, "ovlfsck", "quarantine", j.run_id, "1")
    assert ino(os.path.join(copy, "a")) == ino(os.path.join(copy, "sub", "a-link"))
    # Holes are kept: 8 MiB apparent, almost nothing allocated.
    assert os.stat(os.path.join(copy, "sparse")).st_blocks * 512 < 1 << 20
    undo(j.path)
    tree = os.path.join(tmpfs_lower, "tree")
    assert ino(os.path.join(tree, "a")) == ino(os.path.join(tree, "sub", "a-link"))
    assert os.stat(os.path.join(tree, "sparse")).st_blocks * 512 < 1 << 20


def test_copy_interrupted_while_removing_the_original(env, tmpfs_lower, monkeypatch):
    """Crash after the copy was complete ('copied' record) with the original half removed:
    undo merges the copy back into what is left."""
    _fill_lower(tmpfs_lower)
    stack = build_stack(lowers=[tmpfs_lower], upper=env.upper, work=env.work)
    before = snapshot(tmpfs_lower, skip=())
    real_unlink = os.unlink
    calls = []

    def unlink_then_die(name, *a, **k):
        calls.append(name)
        real_unlink(name, *a, **k)
        if len(calls) == 2:
            raise Crash()
    monkeypatch.setattr(repair.os, "unlink", unlink_then_die)
    j = Journal.create(stack)
    with pytest.raises(Crash):
        j.apply(Quarantine(stack.lowers[0], "tree"))
    monkeypatch.undo()
    os.close(j._fd)
    truncate_after(j.path, lambda r: r.get("rec") == "copied")
    assert snapshot(tmpfs_lower, skip=()) != before  # partly removed
    lines = undo(j.path)
    assert not lines.refused and "merged" in lines[0], lines
    assert snapshot(tmpfs_lower, skip=()) == before


def test_copy_interrupted_before_it_was_complete(env, tmpfs_lower, monkeypatch):
    _fill_lower(tmpfs_lower)
    stack = build_stack(lowers=[tmpfs_lower], upper=env.upper, work=env.work)
    before = snapshot(tmpfs_lower, skip=())
    real = repair._copy_data
    calls = []

    def copy_then_die(*a):
        calls.append(1)
        if len(calls) == 2:
            raise Crash()
        return real(*a)
    monkeypatch.setattr(repair, "_copy_data", copy_then_die)
    j = Journal.create(stack)
    with pytest.raises(Crash):
        j.apply(Quarantine(stack.lowers[0], "tree"))
    monkeypatch.undo()
    os.close(j._fd)
    truncate_after(j.path, lambda r: r.get("rec") == "op")
    lines = undo(j.path)
    assert not lines.refused and "never removed" in lines[0], lines
    assert snapshot(tmpfs_lower, skip=()) == before


def test_no_workdir_uses_the_state_dir(tmp_path, monkeypatch):
    lower = tmp_path / "lower"
    lower.mkdir()
    mkwhiteout(str(lower / "wh"))
    state = tmp_path / "state"
    monkeypatch.setenv("OVLFSCK_STATE_DIR", str(state))
    stack = build_stack(lowers=[str(lower)])
    original = ino(str(lower / "wh"))
    with Journal.create(stack) as j:
        j.apply(Quarantine(stack.lowers[0], "wh"))
    assert os.path.dirname(j.path) == str(state)
    assert os.path.exists(state / "README.txt")
    assert ino(str(state / "quarantine" / j.run_id / "1")) == original  # same fs: renamed
    monkeypatch.delenv("OVLFSCK_STATE_DIR")
    undo(j.path)
    assert ino(str(lower / "wh")) == original


def test_copy_is_not_merged_into_a_new_object_at_the_same_name(env, tmpfs_lower):
    _fill_lower(tmpfs_lower)
    stack = build_stack(lowers=[tmpfs_lower], upper=env.upper, work=env.work)
    with Journal.create(stack) as j:
        j.apply(Quarantine(stack.lowers[0], "tree"))
    os.mkdir(os.path.join(tmpfs_lower, "tree"))
    with open(os.path.join(tmpfs_lower, "tree", "theirs"), "w") as fh:
        fh.write("someone else's\n")
    lines = undo(j.path)
    assert lines.refused and "exists again" in lines[0], lines
    assert os.listdir(os.path.join(tmpfs_lower, "tree")) == ["theirs"]
    assert os.path.isdir(os.path.join(env.work, "ovlfsck", "quarantine", j.run_id, "1"))


def test_undo_interrupted_after_copying_back_finishes_on_the_next_run(env, tmpfs_lower,
                                                                      monkeypatch):
    _fill_lower(tmpfs_lower)
    stack = build_stack(lowers=[tmpfs_lower], upper=env.upper, work=env.work)
    before = snapshot(tmpfs_lower, skip=())
    with Journal.create(stack) as j:
        j.apply(Quarantine(stack.lowers[0], "tree"))
    copy = os.path.join(env.work, "ovlfsck", "quarantine", j.run_id, "1")

    def die(*a):
        raise Crash()
    monkeypatch.setattr(repair, "_remove_tree", die)
    with pytest.raises(Crash):
        undo(j.path)
    monkeypatch.undo()
    assert records(j.path)[-1]["rec"] == "restored" and os.path.isdir(copy)
    assert snapshot(tmpfs_lower, skip=()) == before
    lines = undo(j.path)
    assert not lines.refused and "finish" in lines[0], lines
    assert not os.path.lexists(copy)
    assert snapshot(tmpfs_lower, skip=()) == before
    assert records(j.path)[-1]["rec"] == "undone"


@pytest.mark.parametrize("syscall", [True, False], ids=["renameat2", "fallback"])
def test_rename_never_replaces_an_existing_target(tmp_path, monkeypatch, syscall):
    """Planning checks that the target is free; the rename itself must not trust that."""
    if not syscall:
        monkeypatch.setattr(repair, "_renameat2", None)
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            repair._rename_noreplace(fd, "a", fd, "b")
        assert (tmp_path / "a").read_text() == "a" and (tmp_path / "b").read_text() == "b"
        repair._rename_noreplace(fd, "a", fd, "c")
        assert (tmp_path / "c").read_text() == "a" and not (tmp_path / "a").exists()
    finally:
        os.close(fd)


def test_link_ties_an_index_entry_to_its_upper_file_and_refuses_the_rest(env):
    up, work = env.stack.upper, env.stack.work
    with Journal.create(env.stack) as j:
        j.apply(Link(work, "index/00fb1e", up, "file"))
        assert os.path.samestat(os.lstat(env.u("file")), os.lstat(os.path.join(env.work, "index/00fb1e")))
        j.apply(Link(work, "index/00fb1f", up, "dir/link"))  # the symlink itself, never its target
        assert os.path.samestat(os.lstat(env.u("dir/link")), os.lstat(os.path.join(env.work, "index/00fb1f")))
        with pytest.raises(OperationalError, match="already exists"):
            j.apply(Link(work, "index/00fb1e", up, "dir/fifo"))
        with pytest.raises(OperationalError, match="directory"):
            j.apply(Link(work, "index/00fb20", up, "dir/sub"))
        with pytest.raises(OperationalError, match="no such"):
            j.apply(Link(work, "index/00fb21", up, "nothing"))
        with pytest.raises(UnsafePathError):
            Link(work, "index/x", up, "../outside")
    # undo refuses to remove what became the only link
    os.unlink(env.u("file"))
    lines = undo(j.path, env.stack)
    assert any("only link" in line and "refused" in line for line in lines), lines
    assert os.path.exists(os.path.join(env.work, "index/00fb1e"))
    assert not os.path.lexists(os.path.join(env.work, "index/00fb1f"))
