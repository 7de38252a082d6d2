"""The fast paths of the walk (issue 5 item 2) give exactly what the plain reads give.

* names in byte order without encoding every name (code point order for text without
  surrogate escapes);
* d_type kinds, d_ino, and the readdir stand-in for st_ino/st_dev (`ReaddirStat`), whose
  other fields come from a real lstat;
* /proc/self/mountinfo parsing (escapes, which filesystems keep d_ino == st_ino, mount
  points inside the layers);
* the prefetch child: its records are what a local scandir + listxattr/getxattr read, and
  a whole check gives the same report with it and without it (also on damaged layers);
  it is reaped when the walk ends.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Optional

import pytest
import xattr

from ovlfsck import fsio
from ovlfsck.cli import app, invoke
from ovlfsck.fsio import DevInfo, Entry, Kind, Listing, Prefetcher, ReaddirStat, Xattrs
from ovlfsck.stack import Layer, Role
from ovlfsck.walk import Walker

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mknod, trusted.* xattrs)")
BENCH = Path(__file__).resolve().parents[1] / "bench"


def setx(path, suffix: str, value: bytes, ns: str = "trusted.overlay.") -> None:
    xattr.set(os.fsencode(path), ns + suffix, value, nofollow=True)


def mkwhiteout(path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


# --------------------------------------------------------------------------- names


def test_sort_names_is_byte_order():
    names = ["b", "a", "Z", "é", "ä", "a\udcff", "a\udc80b", "\u20ac", "~", "ab", "a-b", ""]
    names = [n for n in names if n]
    assert fsio.sort_names(names) == sorted(names, key=os.fsencode)
    ascii_only = ["z", "A", "a", "_", "0", "~x"]
    assert fsio.sort_names(ascii_only) == sorted(ascii_only, key=os.fsencode)


def test_scan_sorted_kinds_inodes_and_order(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    os.symlink("nowhere", tmp_path / "l")
    os.mkfifo(tmp_path / "p")
    odd = os.fsdecode(b"n\xffx")
    (tmp_path / odd).write_text("")
    listing = fsio.scan_sorted(str(tmp_path))
    assert isinstance(listing, Listing) and listing.special is None
    assert list(listing) == sorted(listing, key=os.fsencode)
    kinds = {n: e.kind for n, e in listing.items()}
    assert kinds == {"f": Kind.REG, "d": Kind.DIR, "l": Kind.LNK, "p": Kind.FIFO, odd: Kind.REG}
    for name, e in listing.items():
        assert e.ino == (None if e.kind is Kind.DIR else os.lstat(e.path).st_ino)
        assert e.path == os.path.join(str(tmp_path), name)
    # special files are lstat'ed at once (the kind needs it); the others are not
    assert listing["p"]._stat is not None and listing["f"]._stat is None


@needs_root
def test_whiteouts_are_told_from_other_character_devices(tmp_path):
    mkwhiteout(tmp_path / "wo")
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    (tmp_path / "xw").write_text("")
    setx(tmp_path / "xw", "whiteout", b"")
    (tmp_path / "xw-data").write_text("data")
    setx(tmp_path / "xw-data", "whiteout", b"")
    xa = Xattrs("trusted")
    listing = fsio.scan_sorted(str(tmp_path))
    assert {n for n, e in listing.items() if e.is_whiteout(xa)} == {"wo", "xw"}
    assert listing["wo"].is_chr_whiteout() and not listing["null"].is_chr_whiteout()
    assert not listing["xw"].is_chr_whiteout() and listing["xw"].is_xwhiteout(xa)


# --------------------------------------------------------------------------- stat stand-in


def test_readdir_stat_answers_ino_and_dev_and_reads_the_rest(tmp_path):
    (tmp_path / "f").write_text("12345")
    (tmp_path / "d").mkdir()
    dev = os.lstat(tmp_path).st_dev
    listing = fsio.scan_sorted(str(tmp_path), dev)
    f, d = listing["f"], listing["d"]
    st = f.lstat()
    assert isinstance(st, ReaddirStat) and st._real is None
    real = os.lstat(tmp_path / "f")
    assert (st.st_ino, st.st_dev) == (real.st_ino, real.st_dev)
    assert st._real is None  # no syscall so far
    assert st.st_size == 5 and stat.S_ISREG(st.st_mode) and st._real is not None
    assert os.path.samestat(st, real)
    # the real stat is kept: from now on lstat() gives it
    assert isinstance(f.real_lstat(), os.stat_result) and f.lstat() is f.real_lstat()
    g = fsio.scan_sorted(str(tmp_path), dev)["f"]
    assert isinstance(g.lstat(), ReaddirStat) and g._stat is None  # nothing kept, no cycle
    # directories always get a real lstat (a mount point's st_dev is not its parent's)
    assert isinstance(d.lstat(), os.stat_result)
    # without a trusted device: a real lstat
    plain = fsio.scan_sorted(str(tmp_path))
    assert isinstance(plain["f"].lstat(), os.stat_result)


def test_readdir_stat_of_a_vanished_file_raises_on_use(tmp_path):
    (tmp_path / "gone").write_text("x")
    listing = fsio.scan_sorted(str(tmp_path), os.lstat(tmp_path).st_dev)
    os.unlink(tmp_path / "gone")
    st = listing["gone"].lstat()
    assert st.st_ino  # from readdir
    with pytest.raises(FileNotFoundError):
        st.st_size
    assert listing["gone"].get_kind() is Kind.REG  # d_type said so


def test_devinfo_reads_mountinfo(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "30 22 7:0 / /srv/lay\\040ers rw,relatime shared:2 - ext4 /dev/loop0 rw\n"
        "31 30 0:45 / /srv/lay\\040ers/upper/mnt rw shared:3 - btrfs /dev/sdb rw\n"
        "32 30 0:46 / /srv/lay\\040ers/lower/tmp rw shared:4 - tmpfs tmpfs rw\n"
        "33 22 0:47 / /merged rw shared:5 - overlay overlay rw,lowerdir=/a\n"
        "garbage line\n"
    )
    info = DevInfo(["/srv/lay ers/upper", "/srv/lay ers/lower"], mountinfo=str(mi))
    assert os.makedev(7, 0) in info.trusted and os.makedev(254, 0) in info.trusted
    assert os.makedev(0, 46) in info.trusted
    assert os.makedev(0, 45) not in info.trusted and os.makedev(0, 47) not in info.trusted
    assert info.mountpoints == {"/srv/lay ers/upper/mnt", "/srv/lay ers/lower/tmp"}
    none = DevInfo(["/x"], mountinfo=str(tmp_path / "missing"))
    assert not none.trusted and not none.mountpoints


def test_dir_dev_follows_parents_and_mount_points(tmp_path):
    (tmp_path / "sub").mkdir()
    root = fsio.lstat_entry(str(tmp_path))
    info = DevInfo([str(tmp_path)])
    dev = info.dir_dev(root, None)
    real = os.lstat(tmp_path).st_dev
    assert dev in (real, None)  # None when the test filesystem is not a trusted one
    sub = fsio.scan_sorted(str(tmp_path), dev)["sub"]
    assert info.dir_dev(sub, sub.dev) == dev
    info.mountpoints = frozenset({sub.path})
    assert info.dir_dev(sub, sub.dev) == (real if real in info.trusted else None)


# --------------------------------------------------------------------------- prefetch child


def _layer_tree(base: Path) -> tuple[Path, Path]:
    upper, lower = base / "upper", base / "lower"
    for root in (upper, lower):
        (root / "d" / "e").mkdir(parents=True)
        (root / "d" / "f").write_text("f")
        (root / "g").write_text("")
        os.symlink("d", root / "s")
    (lower / "only-lower").mkdir()
    (lower / "only-lower" / os.fsdecode(b"bad\xfename")).write_text("")
    # Byte order differs from code point order: U+E000 is EE 80 80, the escape of FF U+DCFF.
    (lower / "only-lower" / "z\ue000").write_text("")
    (lower / "only-lower" / os.fsdecode(b"z\xff")).mkdir()
    (lower / "only-lower" / os.fsdecode(b"z\xff") / "in").write_text("")
    (lower / "only-lower" / "z\ue000d").mkdir()
    (lower / "d" / "e" / "deep").write_text("")
    mkwhiteout(upper / "d" / "wo")
    os.mknod(upper / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    setx(upper / "d", "impure", b"y")
    setx(upper / "d" / "f", "origin", b"\x00\xfb\x21\x01")
    setx(upper / "d" / "f", "overlay.origin", b"nested: not ours")
    setx(lower / "g", "metacopy", b"")
    setx(lower / "g", "x", b"y", ns="user.")
    setx(lower / "d" / "e", "opaque", b"y")
    return upper, lower


@needs_root
@pytest.mark.parametrize("text_names", [True, False], ids=["child-decodes", "bytes"])
def test_prefetch_records_are_what_a_scan_reads(tmp_path, monkeypatch, text_names):
    upper, lower = _layer_tree(tmp_path)
    layers = [Layer(Role.UPPER, 0, str(upper), 0), Layer(Role.LOWER, 0, str(lower), 1)]
    xa = Xattrs("trusted")
    monkeypatch.setattr(Prefetcher, "TEXT_NAMES", text_names)
    pf = Prefetcher.start(layers, xa)
    assert pf is not None
    proc = pf.proc
    try:
        for layer in layers:
            for dirpath, dirs, _files in os.walk(layer.path):
                rel = os.path.relpath(dirpath, layer.path)
                rel = "" if rel == "." else rel
                got = pf.listing(layer, rel, dirpath, None, None, wait=True)
                assert got is not None, (layer.name, rel)
                want = fsio.scan_sorted(dirpath)
                assert list(got) == list(want)
                for name, e in got.items():
                    w = want[name]
                    assert (e.path, e.kind, e.ino) == (w.path, w.kind, w.ino), name
                    assert dict(e.xattrs(xa)) == w.xattrs(xa), name
                special = [n for n, e in got.items()
                           if e.kind not in (Kind.REG, Kind.DIR, Kind.LNK) or e.xattrs(xa)]
                assert got.special == special
                assert got.dirs == [n for n, e in got.items() if e.kind is Kind.DIR]
        assert pf.listing(layers[0], "no/such", str(upper / "no/such"), None, None, wait=True) is None
    finally:
        pf.close()
    assert proc.returncode is not None  # reaped
    assert pf.listing(layers[0], "", str(upper), None, None) is None  # closed: nothing


# The child with os.listxattr failing for names that start with "gone" (as for an entry
# removed since the listing) and os.getxattr for those that start with "noget".
_FAILING_READS = """
import os
def _failing(real, stem):
    def call(path, *args, **kw):
        if os.fsdecode(path).startswith(stem):
            raise FileNotFoundError(2, "gone")
        return real(path, *args, **kw)
    return call
os.listxattr = _failing(os.listxattr, "gone")
os.getxattr = _failing(os.getxattr, "noget")
"""


@needs_root
@pytest.mark.parametrize("text_names", [True, False], ids=["child-decodes", "bytes"])
def test_entries_whose_xattrs_the_child_cannot_read_are_left_to_the_walk(
        tmp_path, monkeypatch, text_names):
    """The child reads a directory's xattrs in one go; when a read fails it still sends
    every entry, marks the failed ones unknown (the walk reads those itself) and the
    others' xattrs as read."""
    d = tmp_path / "layer"
    (d / "sub").mkdir(parents=True)
    for name in ("a", "gone1", "m", "noget1", "z"):
        (d / name).write_text("")
        setx(d / name, "origin", name.encode())
    (d / "gone2").mkdir()
    layers = [Layer(Role.LOWER, 0, str(d), 0)]
    xa = Xattrs("trusted")
    monkeypatch.setattr(fsio, "_CHILD", _FAILING_READS + fsio._CHILD)
    monkeypatch.setattr(Prefetcher, "TEXT_NAMES", text_names)
    pf = Prefetcher.start(layers, xa)
    assert pf is not None
    try:
        got = pf.listing(layers[0], "", str(d), None, None, wait=True)
    finally:
        pf.close()
    assert got is not None
    want = fsio.scan_sorted(str(d))
    assert list(got) == list(want) == ["a", "gone1", "gone2", "m", "noget1", "sub", "z"]
    unread = [n for n, e in got.items() if e._xattrs is None]
    assert unread == ["gone1", "gone2", "noget1"]
    for name, e in got.items():
        assert (e.kind, e.ino) == (want[name].kind, want[name].ino), name
        assert dict(e.xattrs(xa)) == want[name].xattrs(xa), name  # the walk's own read
    assert got.special == ["a", "gone1", "gone2", "m", "noget1", "z"]
    assert got.dirs == ["gone2", "sub"]


@needs_root
@pytest.mark.parametrize("text_names", [True, False], ids=["child-decodes", "bytes"])
def test_the_child_sends_directories_in_the_walks_byte_pre_order(tmp_path, monkeypatch, text_names):
    """The walk waits for a directory only while the child has not passed it in byte
    pre-order (Prefetcher._before): the child must go in that order, also for names whose
    code point order is not their byte order."""
    upper, lower = _layer_tree(tmp_path)
    layers = [Layer(Role.UPPER, 0, str(upper), 0), Layer(Role.LOWER, 0, str(lower), 1)]
    monkeypatch.setattr(Prefetcher, "TEXT_NAMES", text_names)
    pf = Prefetcher.start(layers, Xattrs("trusted"))
    try:
        sent = []
        while pf._read(True):
            sent.extend(k for k in pf.buf if k not in sent)
    finally:
        pf.close()
    want = set()
    for li, layer in enumerate(layers):
        for dirpath, _dirs, _files in os.walk(layer.path):
            rel = os.path.relpath(dirpath, layer.path)
            want.add((li, "" if rel == "." else rel))
    assert set(sent) == want
    assert sent == sorted(sent, key=lambda k: (fsio._order_key(k[1]), k[0]))
    names = [k[1] for k in sent if k[1].startswith("only-lower/z")]
    assert names == ["only-lower/z\ue000d", os.fsdecode(b"only-lower/z\xff")]


@needs_root
@pytest.mark.parametrize("text_names", [True, False], ids=["child-decodes", "bytes"])
def test_a_child_given_starts_reads_them_in_their_order_with_the_layers_beneath(
        tmp_path, monkeypatch, text_names):
    """The hidden walk's child (started with `starts`): each start in the order given, in
    pre-order, with its own layer and those beneath (not those above); every head says
    which start it is of, and the records are what a scan reads."""
    upper, lower = _layer_tree(tmp_path)
    layers = [Layer(Role.UPPER, 0, str(upper), 0), Layer(Role.LOWER, 0, str(lower), 1)]
    xa = Xattrs("trusted")
    monkeypatch.setattr(Prefetcher, "TEXT_NAMES", text_names)
    zff = os.fsdecode(b"z\xff")
    pf = Prefetcher.start(layers, xa, [(layers[1], "only-lower"), (layers[0], "d")])
    assert pf is not None and pf.by_start
    try:
        heads = []
        records = {}
        pf.MAX_BUFFERED = 1 << 30
        while pf._read(True):
            for k in pf.buf:
                if k not in records:
                    records[k] = pf.buf[k]
                    heads.append(k)
        assert heads == [
            (1, "only-lower", 0), (1, "only-lower/z\ue000d", 0), (1, "only-lower/" + zff, 0),
            (0, "d", 1), (1, "d", 1), (0, "d/e", 1), (1, "d/e", 1)]
        assert pf.last == (1, "d/e", 1)
        for (li, rel, start_no) in records:
            dirpath = os.path.join(layers[li].path, rel)
            pf.start_no = start_no
            got = pf.listing(layers[li], rel, dirpath, None, None)
            want = fsio.scan_sorted(dirpath)
            assert list(got) == list(want), rel
            for name, e in got.items():
                assert dict(e.xattrs(xa)) == want[name].xattrs(xa), (rel, name)
    finally:
        pf.close()
    assert pf.proc is None


def _hidden_tree(base: Path) -> tuple[Path, Path, Path]:
    """Lower directories the merged view never reaches: under a whiteout, under an opaque
    directory, and one (lower1/w/deep) only its own sub-stack reaches."""
    upper, lower0, lower1 = base / "upper", base / "lower0", base / "lower1"
    for root in (upper, lower0, lower1):
        (root / "keep").mkdir(parents=True)
        (root / "keep" / "f").write_text("x")
    for i in range(6):
        for root in (lower0, lower1):
            (root / f"gone{i}" / "sub" / "deeper").mkdir(parents=True)
            (root / f"gone{i}" / "sub" / f"file{i}").write_text("x")
        mkwhiteout(upper / f"gone{i}")
    (upper / "opq").mkdir()
    setx(upper / "opq", "opaque", b"y")
    (lower0 / "opq" / "under").mkdir(parents=True)
    mkwhiteout(lower0 / "opq" / "under" / "wo")
    (lower1 / "w" / "deep").mkdir(parents=True)
    (lower0 / "w").write_text("a file over lower1's directory")
    return upper, lower0, lower1


def _visits_of(walker, children: Optional[list] = None) -> list:
    """What each visit saw, and which prefetcher (an index into `children`) was there."""
    out = []
    for v in walker.visits():
        pf = walker.prefetcher
        if pf is not None and children is not None and pf not in children:
            children.append(pf)
        out.append((v.path, v.hidden, [m.key for m in v.members],
                    [sorted((n, e.kind, dict(e.xattrs(walker.xa))) for n, e in lst.items())
                     for lst in v.listings],
                    None if pf is None else children.index(pf)))
    return out


def _lookup_tree(base: Path) -> tuple[Path, Path, Path]:
    """Three layers whose lookups meet every rule on the way: an opaque directory, an
    absolute and a relative redirect on intermediate directories, a whiteout, a file over
    a directory, and siblings that share their parents (`rm -rf usr/share/doc/*` in a
    later layer)."""
    upper, lower0, lower1 = base / "upper", base / "lower0", base / "lower1"
    for root in (upper, lower0, lower1):
        (root / "usr" / "share" / "doc").mkdir(parents=True)
    for i in range(5):
        for root in (lower0, lower1):
            (root / "usr" / "share" / "doc" / f"p{i}" / "sub").mkdir(parents=True)
        mkwhiteout(upper / "usr" / "share" / "doc" / f"p{i}")
    (lower1 / "old" / "a" / "b").mkdir(parents=True)
    (upper / "new" / "a").mkdir(parents=True)
    setx(upper / "new", "redirect", b"/old")  # new/a/b is lower1's old/a/b
    (lower1 / "old" / "a" / "c").mkdir()
    (upper / "new" / "a" / "c").mkdir()
    # `/X` on X itself counts as a self-redirect only on a path without redirects: not here
    setx(upper / "new" / "a" / "c", "redirect", b"/new/a/c")
    (lower0 / "ren" / "x").mkdir(parents=True)
    (lower1 / "orig" / "x").mkdir(parents=True)
    setx(lower0 / "ren", "redirect", b"orig")  # relative, in lower0
    (upper / "opq" / "in").mkdir(parents=True)
    setx(upper / "opq", "opaque", b"y")
    (lower0 / "opq" / "in" / "deep").mkdir(parents=True)
    (lower0 / "f").write_text("a file over lower1's directory")
    (lower1 / "f" / "d").mkdir(parents=True)
    return upper, lower0, lower1


def _chain_shape(chain) -> tuple:
    return ([(m.key, m.entry.path, m.entry.kind, m.via_redirect) for m in chain.members],
            chain.stop, chain.whiteout.key if chain.whiteout else None,
            [(r.member.key, r.value, r.problem, r.self_redirect) for r in chain.redirects])


@needs_root
def test_merged_lookups_reuse_the_parents_looked_up_before(tmp_path, monkeypatch):
    """lookup_merged keeps the intermediate directories it looked up (the hidden walk's
    starts and the redirects' old locations share their parents) while nothing has been
    written: the chains are those of a lookup from the root, with fewer lookups; after
    close() (the engine calls it before a write) nothing kept is used."""
    from ovlfsck.stack import Stack
    import ovlfsck.walk as walk_mod

    upper, lower0, lower1 = _lookup_tree(tmp_path)
    layers = (Layer(Role.LOWER, 0, str(lower0), 1), Layer(Role.LOWER, 1, str(lower1), 2))
    stack = Stack(lowers=layers, upper=Layer(Role.UPPER, 0, str(upper), 0))
    paths = set()
    for root in (upper, lower0, lower1):
        for dirpath, dirs, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for n in dirs + files + ["missing"]:
                paths.add(n if rel == "." else f"{rel}/{n}")
    paths = sorted(paths)
    tops = [None, *layers]
    calls = []
    real_resolve = walk_mod.Walker.resolve
    monkeypatch.setattr(walk_mod.Walker, "resolve",
                        lambda self, *a, **k: calls.append(1) or real_resolve(self, *a, **k))

    def lookups(walker) -> list:
        calls.clear()
        out = [_chain_shape(walker.lookup_merged(p.split("/"), top))
               for _ in range(2) for top in tops for p in paths]
        return out, len(calls)

    plain = Walker(stack, Xattrs("trusted"), lambda *a: None)
    plain._lookups = None
    want, plain_calls = lookups(plain)
    kept = Walker(stack, Xattrs("trusted"), lambda *a: None)
    got, kept_calls = lookups(kept)
    assert got == want
    assert kept_calls < plain_calls * 0.7, (kept_calls, plain_calls)
    assert kept._lookups  # what it kept
    # Bounded: emptied when full, and the chains are still the same.
    monkeypatch.setattr(Walker, "LOOKUPS_KEPT", 3)
    small = Walker(stack, Xattrs("trusted"), lambda *a: None)
    got, _ = lookups(small)
    assert got == want and len(small._lookups) <= 3
    # After close(), a change on disk is seen (nothing kept is used any more).
    comps = ["usr", "share", "doc", "p0", "sub"]
    before = _chain_shape(kept.lookup_merged(comps, layers[0]))
    assert [k for k, *_ in before[0]] == [("lower:0", "usr/share/doc/p0/sub"),
                                          ("lower:1", "usr/share/doc/p0/sub")]
    kept.close()
    setx(lower0 / "usr" / "share", "opaque", b"y")
    after = _chain_shape(kept.lookup_merged(comps, layers[0]))
    assert [k for k, *_ in after[0]] == [("lower:0", "usr/share/doc/p0/sub")]
    assert kept._lookups is None


DEEP_HIDDEN = """
[lower:0]
dir app
file app/a0 text=x
whiteout app/w0
dir app/sub
whiteout app/sub/ws0
[lower:1]
dir app
dir app/sub
file app/sub/s1 text=y
[lower:2]
dir app
xattr app opaque=y
file app/a2 text=z
whiteout app/w2
[lower:3]
dir app
file app/a3 text=w
[lower:4]
whiteout app
[lower:5]
dir app
whiteout app/w5
file app/a5 text=v
[upper]
whiteout app
"""


@needs_root
@pytest.mark.parametrize("prefetch", ["0", "1"], ids=["no-child", "child"])
def test_a_hidden_directory_shared_by_layers_is_walked_once(tmp_path, monkeypatch, prefetch):
    """A hidden directory in n layers: the topmost one's sub-stack takes in those beneath
    it until something cuts the chain (an opaque directory, a whiteout), and those are not
    walked again from their own layers (n walks, not n(n+1)/2). With a child, its plan
    leaves them out too: the walk reads nothing itself."""
    from ovlfsck.fixture import build
    from ovlfsck.stack import Stack

    built = build(DEEP_HIDDEN, str(tmp_path))
    lowers = tuple(Layer(Role.LOWER, i, built[f"lower:{i}"], i + 1) for i in range(6))
    stack = Stack(lowers=lowers, upper=Layer(Role.UPPER, 0, built["upper"], 0))
    monkeypatch.setenv("OVLFSCK_PREFETCH", prefetch)
    read = []
    real_scan = fsio.scan_sorted
    monkeypatch.setattr("ovlfsck.walk.scan_sorted",
                        lambda path, *a: read.append(path) or real_scan(path, *a))
    plans = []
    real_start = Prefetcher.start.__func__
    monkeypatch.setattr(Prefetcher, "start", classmethod(
        lambda cls, layers, xa, starts=None: plans.append(starts) or real_start(cls, layers, xa, starts)))
    walker = Walker(stack, Xattrs("trusted"), lambda *a: None, prefetch=True)
    hidden = [(v.path, [m.key for m in v.members]) for v in walker.visits() if v.hidden]
    assert hidden == [
        ("app", [("lower:0", "app"), ("lower:1", "app"), ("lower:2", "app")]),
        ("app/sub", [("lower:0", "app/sub"), ("lower:1", "app/sub")]),
        ("app", [("lower:3", "app")]),
        ("app", [("lower:5", "app")]),
    ]
    if prefetch == "1":
        assert [[(lay.name, rel) for lay, rel in plan] for plan in plans[1:]] == [
            [("lower:0", "app"), ("lower:3", "app"), ("lower:5", "app")]]
        assert not [p for p in read if "/app" in p]  # every hidden listing from the child


@needs_root
def test_the_hidden_walk_is_read_by_a_child_of_its_own(tmp_path, monkeypatch):
    """The first child's records of hidden lower directories went by long before the walk
    gets to them: the hidden walk starts a child for its starts and waits for it, reading
    nothing itself; it sees what the walk without a child sees."""
    upper, lower0, lower1 = _hidden_tree(tmp_path)
    from ovlfsck.stack import Stack

    stack = Stack(lowers=(Layer(Role.LOWER, 0, str(lower0), 1),
                          Layer(Role.LOWER, 1, str(lower1), 2)),
                  upper=Layer(Role.UPPER, 0, str(upper), 0))
    monkeypatch.setenv("OVLFSCK_PREFETCH", "0")
    plain = _visits_of(Walker(stack, Xattrs("trusted"), lambda *a: None, prefetch=True))
    monkeypatch.setenv("OVLFSCK_PREFETCH", "1")
    read = []
    real_scan = fsio.scan_sorted
    monkeypatch.setattr("ovlfsck.walk.scan_sorted",
                        lambda path, *a: read.append(path) or real_scan(path, *a))
    walker = Walker(stack, Xattrs("trusted"), lambda *a: None, prefetch=True)
    children: list = []
    fetched = _visits_of(walker, children)
    assert [v[:4] for v in fetched] == [v[:4] for v in plain]
    hidden = [v for v in fetched if v[1]]
    assert {v[0] for v in hidden} >= {"gone0", "gone5/sub/deeper", "opq/under", "w", "w/deep"}
    main = {v[4] for v in fetched if not v[1]}
    assert len(main) == 1 and not children[main.pop()].by_start
    of_hidden = {v[4] for v in hidden}
    assert None not in of_hidden and all(children[i].by_start for i in of_hidden)
    # Every hidden listing was served by them: none missed, none read here.
    assert sum(children[i].served for i in of_hidden) == sum(len(v[2]) for v in hidden)
    assert sum(children[i].missed for i in of_hidden) == 0 and read == []


def _run_check(args, monkeypatch, capsys, prefetch: str) -> tuple[int, dict]:
    monkeypatch.setenv("OVLFSCK_PREFETCH", prefetch)
    capsys.readouterr()
    rc = invoke(app, ["check", "-n", "--json", "-v", *map(str, args)], "ovlfsck")
    out, _err = capsys.readouterr()
    return rc, json.loads(out)


@needs_root
def test_check_reports_the_same_with_and_without_the_prefetch_child(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import generate
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "set"
    generate.Gen(str(out), 5).build(3000)
    # some damage, in every layer, so that there is something to report
    upper, lower0, lower1 = out / "upper", out / "lower0", out / "lower1"
    pkgs = sorted(p for p in os.listdir(lower1) if p.startswith("pkg"))
    mkwhiteout(upper / "orphan-whiteout")
    mkwhiteout(lower1 / pkgs[0] / "orphan-in-lowermost")
    setx(lower0 / pkgs[1], "opaque", b"bogus") if (lower0 / pkgs[1]).is_dir() else None
    for root in (upper, lower0, lower1):
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        setx(files[len(files) // 2], "opaque", b"y")
        setx(files[len(files) // 3], "redirect", b"/x/y")
    (lower0 / "zz-xw").write_text("")
    setx(lower0 / "zz-xw", "whiteout", b"")
    args = ["--lower", lower0, "--lower", lower1, "--upper", upper, "--work", out / "work"]
    rc0, doc0 = _run_check(args, monkeypatch, capsys, "0")
    rc1, doc1 = _run_check(args, monkeypatch, capsys, "1")
    assert rc0 == rc1 == 4
    for key in ("problems", "features", "counts", "notes", "error"):
        assert doc0.get(key) == doc1.get(key), key
    codes = {p["code"] for p in doc0["problems"]}
    assert {"OVL101", "OVL202"} <= codes, codes


@needs_root
def test_the_walk_stops_the_child_and_reaps_it(tmp_path, monkeypatch):
    upper, lower = _layer_tree(tmp_path)
    monkeypatch.setenv("OVLFSCK_PREFETCH", "1")
    # A child that is surely still running when the walk stops (the real one may be done
    # with this small tree already, on a loaded machine); it sends nothing, so the walk
    # reads for itself.
    monkeypatch.setattr(fsio, "_CHILD", "import os, time; os.close(1); time.sleep(60)")
    from ovlfsck.stack import build_stack

    (tmp_path / "work").mkdir()
    stack = build_stack([], [str(lower)], str(upper), str(tmp_path / "work"))
    walker = Walker(stack, Xattrs("trusted"), lambda *a: None, prefetch=True)
    visits = walker.visits()
    next(visits)
    pf = walker.prefetcher
    assert pf is not None and pf.proc.poll() is None
    proc = pf.proc
    visits.close()  # the consumer stops early: the child is stopped too
    assert walker.prefetcher is None and proc.returncode is not None


def test_no_child_without_prefetch_or_when_turned_off(tmp_path, monkeypatch):
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "f").write_text("")
    from ovlfsck.stack import build_stack

    stack = build_stack([], [str(tmp_path / "l")], None, None)
    for prefetch, env in ((False, "1"), (True, "0")):
        monkeypatch.setenv("OVLFSCK_PREFETCH", env)
        walker = Walker(stack, Xattrs("trusted"), lambda *a: None, prefetch=prefetch)
        assert [v.path for v in walker.visits()] == [""]
        assert walker.prefetcher is None
    # small layer sets never start it by default
    monkeypatch.delenv("OVLFSCK_PREFETCH")
    started = []
    monkeypatch.setattr(Prefetcher, "start", classmethod(lambda cls, *a: started.append(a)))
    walker = Walker(stack, Xattrs("trusted"), lambda *a: None, prefetch=True)
    list(walker.visits())
    assert not started


def test_entry_keeps_the_old_constructor():
    e = Entry("n", "/x/n", Kind.REG)
    assert (e.name, e.path, e.kind, e.ino, e.dev) == ("n", "/x/n", Kind.REG, None, None)
    st = os.lstat("/")
    e2 = Entry("root", "/", Kind.DIR, st)
    assert e2.lstat() is st and e2.is_dir


# ------------------------------------------------------------------ the child's robustness


def _all_records(pf) -> dict:
    """Every record the child sends: {(layer index, relpath): decoded record}."""
    import marshal

    pf.MAX_BUFFERED = 1 << 30
    while pf._read(True) or not pf.eof:
        pass
    return {k: marshal.loads(v) for k, v in pf.buf.items()}


@needs_root
def test_the_child_never_lists_through_a_symlink(tmp_path):
    """A symlink in one layer where another layer has a directory of that name: the child
    lists the directory only in the layer where it is one (never the symlink's target)."""
    outside = tmp_path / "outside"
    (outside / "secret-dir").mkdir(parents=True)
    setx(outside / "secret-dir", "opaque", b"y")
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    (lower / "a").mkdir(parents=True)
    os.symlink(outside, upper / "a")
    layers = [Layer(Role.UPPER, 0, str(upper), 0), Layer(Role.LOWER, 0, str(lower), 1)]
    pf = Prefetcher.start(layers, Xattrs("trusted"))
    try:
        recs = _all_records(pf)
    finally:
        pf.close()
    assert sorted(recs) == [(0, ""), (1, ""), (1, "a")], sorted(recs)


@needs_root
def test_an_xattr_name_that_is_not_utf8_is_read_the_same_both_ways(tmp_path):
    upper, lower = _layer_tree(tmp_path)
    f = upper / "d" / "f"
    os.setxattr(f, os.fsdecode(b"trusted.overlay.\xffodd"), b"v", follow_symlinks=False)
    xa = Xattrs("trusted")
    direct = dict(xa.read_all(str(f)))  # raised UnicodeEncodeError in pyxattr before
    assert direct[os.fsdecode(b"\xffodd")] == b"v"
    layers = [Layer(Role.UPPER, 0, str(upper), 0), Layer(Role.LOWER, 0, str(lower), 1)]
    pf = Prefetcher.start(layers, xa)
    try:
        got = pf.listing(layers[0], "d", str(upper / "d"), None, None, wait=True)
    finally:
        pf.close()
    assert dict(got["f"].xattrs(xa)) == direct


class _FakeProc:
    """A child that wrote `data` to its stdout and exited."""

    def __init__(self, data: bytes):
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        self.stdout = os.fdopen(r, "rb", buffering=0)
        self.killed = False

    def kill(self):
        self.killed = True

    def wait(self):
        return 0


def _frame(head) -> bytes:
    import marshal
    import struct

    h, b = marshal.dumps(head), marshal.dumps(([], "", b"", {}, [], []))
    return struct.pack("<II", len(h), len(b)) + h + b


@pytest.mark.parametrize("by_start", [False, True], ids=["all", "starts"])
@pytest.mark.parametrize("garbage", [
    b"\x05\x00\x00\x00\x03\x00\x00\x00" + b"\xff" * 8,  # lengths fine, contents not marshal
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",  # lengths out of range
    # marshal, but not a head: (layer, relpath[, start]) with int layer and start
    _frame(5), _frame(("x", "")), _frame((0, "", "1")), _frame((0, "", 1, 2)), _frame((0,)),
], ids=["not-marshal", "lengths", "int-head", "str-layer", "str-start", "long-head",
        "short-head"])
def test_a_broken_stream_stops_the_child_and_the_walk_reads_itself(tmp_path, garbage, by_start):
    """A stream out of step (a short write once lost bytes) must not crash the check or
    hold unbounded data: the prefetcher stops the child and gives no records."""
    layer = Layer(Role.LOWER, 0, str(tmp_path), 0)
    proc = _FakeProc(garbage)
    pf = Prefetcher(proc, [layer], by_start)
    assert pf.listing(layer, "", str(tmp_path), None, None, wait=True) is None
    assert pf.corrupt and proc.killed and pf.proc is None
    assert pf.listing(layer, "", str(tmp_path), None, None) is None


@pytest.mark.parametrize("by_start", [False, True], ids=["all", "starts"])
def test_a_head_of_the_other_mode_is_a_broken_stream(tmp_path, by_start):
    """A child given starts heads every record with its start's number, the other child
    never: a head of the other form means the stream is out of step."""
    layer = Layer(Role.LOWER, 0, str(tmp_path), 0)
    proc = _FakeProc(_frame((0, "") if by_start else (0, "", 0)))
    pf = Prefetcher(proc, [layer], by_start)
    assert pf.listing(layer, "", str(tmp_path), None, None, wait=True) is None
    assert pf.corrupt and proc.killed


def test_a_stop_and_continue_of_the_child_loses_nothing(tmp_path):
    """Ctrl-Z and fg stop and continue the whole process group: the child's os.write on the
    full pipe returns short. Before, the rest of the batch was lost and the parent read
    the stream out of step (a crash in marshal); every record must still come through."""
    import signal
    import time

    base = tmp_path / "l"
    for d in range(300):
        (base / f"d{d:04d}").mkdir(parents=True)
        for f in range(100):
            (base / f"d{d:04d}" / f"{'n' * 60}{f:03d}").touch()
    layer = Layer(Role.LOWER, 0, str(base), 0)
    pf = Prefetcher.start([layer], Xattrs("trusted"))
    try:
        pid = pf.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until it blocks on the full pipe
            time.sleep(0.2)
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "S":
                    break
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)
        os.kill(pid, signal.SIGCONT)
        got = [pf.listing(layer, rel, str(base / rel), None, None, wait=True)
               for rel in [""] + [f"d{d:04d}" for d in range(300)]]
        assert not pf.corrupt and all(g is not None for g in got)
        assert sum(len(g) for g in got) == 300 + 300 * 100
    finally:
        pf.close()


@needs_root
def test_names_decode_as_the_parent_decodes_them_under_any_locale(tmp_path):
    """The child (python -I) ignores PYTHONUTF8 and the locale coercion of the parent: it
    sends names as bytes, decoded by the parent as its own os.scandir would."""
    import subprocess

    base = tmp_path / "set"
    for d in ("upper", "lower", "work"):
        (base / d).mkdir(parents=True)
    name = os.fsdecode("é".encode())
    (base / "lower" / name).mkdir()
    (base / "lower" / name / "f").write_text("x")
    mkwhiteout(base / "upper" / name)
    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    docs = []
    for pf in ("0", "1"):
        env["OVLFSCK_PREFETCH"] = pf
        p = subprocess.run([sys.executable, "-m", "ovlfsck", "check", "-n", "--json",
                            "--lower", str(base / "lower"), "--upper", str(base / "upper"),
                            "--work", str(base / "work")], env=env, capture_output=True)
        assert p.returncode == 0, (pf, p.stderr.decode(errors="replace")[-2000:])
        docs.append(json.loads(p.stdout))
    assert docs[0]["problems"] == docs[1]["problems"] and docs[0]["counts"] == docs[1]["counts"]


# --------------------------------------------------------------------------- lazy entries


def _record(names, kinds, inos, xmap=None, unknown=(), dirs=()):
    """A record as the prefetch child sends it (d_ino packed, 0 for None)."""
    import array

    return (names, kinds, array.array("Q", [i or 0 for i in inos]).tobytes(), xmap or {},
            list(unknown), list(dirs))


@needs_root
def test_lazy_listing_reads_like_the_eager_one(tmp_path):
    rec = _record(["a", "b", "c", "d"], "fdlf", [11, None, 13, 14], {3: {b"origin": b"x"}},
                  dirs=[1])
    lazy = fsio._entries(rec, str(tmp_path), 7, None)
    assert type(lazy) is fsio.LazyListing
    # Only the entry with xattrs was made; the others hold their index until asked for.
    assert [type(v) for v in dict.values(lazy)] == [int, int, int, Entry]
    eager = fsio._entries(rec, str(tmp_path), 7, frozenset({"/nowhere"}))
    assert type(eager) is Listing
    # xattr names as Xattrs.read_all gives them, whether the child sent bytes or text
    text = fsio._entries(_record(["a", "b", "c", "d"], "fdlf", [11, None, 13, 14],
                                 {3: {"origin": b"x"}}, dirs=[1]), str(tmp_path), 7, None)
    assert lazy["d"]._xattrs == eager["d"]._xattrs == text["d"]._xattrs == {"origin": b"x"}

    def shape(e):
        return (e.name, e.path, e.kind, e.ino, e.dev, dict(e.xattrs(Xattrs("trusted"))))

    a = lazy["a"]
    assert shape(a) == shape(eager["a"]) and lazy["a"] is a  # made once, then kept
    assert shape(lazy.get("c")) == shape(eager["c"]) and lazy.get("zz", 5) == 5
    assert list(lazy) == ["a", "b", "c", "d"] and len(lazy) == 4 and "b" in lazy
    assert (lazy.special, lazy.dirs, list(lazy.inos)) == (["d"], ["b"], [11, 0, 13, 14])
    assert lazy["b"].ino is None and eager["b"].ino is None  # a directory's: not known
    other = fsio._entries(rec, str(tmp_path), 7, None)
    assert [shape(e) for e in other.copy().values()] == [shape(e) for e in eager.values()]
    assert type(other.pop("b")) is Entry and other.pop("b", None) is None
    assert type(other.setdefault("c")) is Entry and type(other.popitem()[1]) is Entry
    # Two listings of the same names elsewhere are not equal (their unmade indices are).
    plain = _record(["a", "b"], "ff", [11, 12])
    here, there = fsio._entries(plain, str(tmp_path), 7, None), fsio._entries(plain, "/x", 7, None)
    assert not (here == there) and here != there
    copied = dict(lazy)  # not dict's fast copy of the raw values
    assert all(isinstance(v, Entry) for v in copied.values())
    assert [shape(e) for e in lazy.values()] == [shape(e) for e in eager.values()]
    assert all(isinstance(v, Entry) for v in dict.values(lazy))


def _check_lazy_chains(chains) -> None:
    from ovlfsck.walk import Chains

    assert isinstance(chains, Chains)
    # The walk did not need the union's order: not made.
    assert chains._ordered is None
    assert sorted(c.name for c in chains.built()) == ["gone", "sub"]  # none for f0..f19 yet
    assert len(chains) == 22 and chains._ordered is not None
    assert list(chains) == sorted(["gone", "sub"] + [f"f{i}" for i in range(20)])
    c = chains["f3"]
    assert [m.key for m in c.members] == [("upper", "d/f3")] and chains["f3"] is c
    assert chains["gone"].whiteout is not None and chains["sub"].is_dir
    assert "nope" not in chains and chains.get("nope") is None
    assert chains == dict(chains.items()) and chains != {}


@needs_root
def test_the_walk_makes_chains_only_for_names_that_need_a_lookup(tmp_path):
    """Plain files and symlinks of a prefetched listing get their chain (and Entry) on use;
    what the passes see is the same (test_check_reports_the_same_... covers the report)."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for root in (lower, upper):
        (root / "d").mkdir(parents=True)
        for i in range(20):
            (root / "d" / f"f{i}").write_text("x")
    (lower / "d" / "sub").mkdir()
    (lower / "only").mkdir()
    for i in range(5):
        (lower / "only" / f"g{i}").write_text("x")
    os.symlink("g0", lower / "only" / "ln")
    mkwhiteout(upper / "d" / "gone")
    (lower / "d" / "gone").write_text("")
    from ovlfsck.stack import Stack

    stack = Stack(lowers=(Layer(Role.LOWER, 0, str(lower), 1),),
                  upper=Layer(Role.UPPER, 0, str(upper), 0))
    walker = Walker(stack, Xattrs("trusted"), lambda *a: None)
    walker.prefetcher = Prefetcher.start(walker.layers, walker.xa)
    checked = []
    try:
        # A visit is looked at while it is the current one (when the walk resumes, its
        # subdirectories' chains go to the walk's stack).
        for v in walker.visits():
            if v.path == "d":
                _check_lazy_chains(v.chains)
                checked.append("d")
            elif v.path == "only":
                one = v.chains  # one layer directory
                assert list(one.built()) == [] and len(one) == 6
                assert [m.key for m in one["ln"].members] == [("lower:0", "only/ln")]
                checked.append("only")
    finally:
        walker.close()
    assert checked == ["d", "only"]
    # The union in byte order (the walk's order), not code point order: U+E000 is
    # b"\xee\x80\x80", the escaped byte b"\xf0" sorts after it.
    for root in (lower, upper):
        (root / "d" / "\ue000").write_text("x")
    hi = os.fsdecode(b"\xf0")
    (lower / "d" / hi).write_text("x")
    walker = Walker(stack, Xattrs("trusted"), lambda *a: None)
    walker.prefetcher = Prefetcher.start(walker.layers, walker.xa)
    try:
        names = list({v.path: v for v in walker.visits()}["d"].chains)
    finally:
        walker.close()
    assert names.index("\ue000") < names.index(hi) and names == fsio.sort_names(names)


# --------------------------------------------------------------------------- quiet visits


@needs_root
def test_quiet_visits_go_only_to_the_passes_that_may_have_work(tmp_path, monkeypatch):
    """A directory of lower layers only, with nothing special in it and no xattrs of its
    own (known from the read-ahead child's records), is quiet; the engine gives it only to
    the passes without QUIET_SKIP (index: a plain lower file can be a hardlink alias)."""
    from ovlfsck import engine
    from ovlfsck.engine import Mode, Policy
    from ovlfsck.passes import PASSES
    from ovlfsck.stack import build_stack

    lower0, lower1, upper, work = (tmp_path / n for n in ("l0", "l1", "u", "w"))
    for d in ("plain", "merged", "xdir", "withx", "up", "plain2"):
        (lower1 / d).mkdir(parents=True)
        (lower1 / d / "f").write_text("x")
    (lower0 / "merged").mkdir(parents=True)
    (lower0 / "merged" / "g").write_text("y")
    (lower0 / "withx").mkdir()
    (lower0 / "withx" / "h").write_text("z")
    xattr.set(str(lower0 / "withx" / "h"), "trusted.overlay.metacopy", b"", nofollow=True)
    (lower0 / "xdir").mkdir()
    xattr.set(str(lower0 / "xdir"), "trusted.overlay.opaque", b"y", nofollow=True)
    (upper / "up").mkdir(parents=True)
    (work / "work").mkdir(parents=True)
    stack = build_stack(lowers=[str(lower0), str(lower1)], upper=str(upper), work=str(work))

    seen: dict[str, list[str]] = {}
    for p in PASSES:
        if hasattr(p, "check"):
            def spy(ctx, visit, _real=p.check, _name=p.__name__.rsplit(".", 1)[-1]):
                seen.setdefault((visit.path, visit.hidden), []).append(_name)
                return _real(ctx, visit)
            monkeypatch.setattr(p, "check", spy)
    monkeypatch.setenv("OVLFSCK_PREFETCH", "1")
    quiet: dict[str, bool] = {}
    real_visits = Walker.visits

    def visits(self):
        for v in real_visits(self):
            quiet[(v.path, v.hidden)] = v.quiet
            yield v

    monkeypatch.setattr(Walker, "visits", visits)
    engine.run(stack, Policy(Mode.NO), None)
    # xdir: opaque in l0 (its own xattrs), and l1's below it is walked as a hidden root
    assert quiet == {("", False): False, ("merged", False): True, ("plain", False): True,
                     ("plain2", False): True, ("up", False): False, ("withx", False): False,
                     ("xdir", False): False, ("xdir", True): False}
    every = [p.__name__.rsplit(".", 1)[-1] for p in PASSES if hasattr(p, "check")]
    kept = [n for n in every if not getattr(sys.modules[f"ovlfsck.passes.{n}"], "QUIET_SKIP", False)]
    assert kept == ["index"]
    for path, q in quiet.items():
        assert seen[path] == (kept if q else every), path
