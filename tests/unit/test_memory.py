"""What keeps a wide directory's memory down (issue 5: 1M-entry RSS): xattrs of prefetched
entries kept packed, the visit released before the walker makes the next one, a wide
listing's special items made per pass, and cross-check state without Members."""
from __future__ import annotations

import gc
import os
import weakref
from collections import abc

import pytest
import xattr

from ovlfsck import fsio, walk
from ovlfsck.cli import app, invoke
from ovlfsck.fsio import PackedXattrs

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (trusted.* xattrs)")


def test_packed_xattrs_read_like_the_dict():
    for d in ({}, {"origin": b"o"}, {"origin": b"o", "impure": b"y", "redirect": b"/a"}):
        p = PackedXattrs.of(d)
        assert isinstance(p, abc.Mapping) and len(p) == len(d) and bool(p) == bool(d)
        assert p == d and d == p and not (p != d) and dict(p) == d and {**p} == d
        assert list(p) == list(d) and list(p.keys()) == list(d.keys())
        assert list(p.values()) == list(d.values()) and list(p.items()) == list(d.items())
        assert p.copy() == d and type(p.copy()) is dict and repr(p) == repr(d)
        for k in ("origin", "impure", "redirect", "nope"):
            assert (k in p) == (k in d) and p.get(k) == d.get(k) and p.get(k, 5) == d.get(k, 5)
            if k in d:
                assert p[k] == d[k]
            else:
                with pytest.raises(KeyError):
                    p[k]
    assert PackedXattrs.of({"a": b"1"}) != {"a": b"2"} and PackedXattrs.of({}) != {"a": b""}
    with pytest.raises(TypeError):
        hash(PackedXattrs.of({"a": b"1"}))


def test_prefetched_xattrs_are_kept_packed(tmp_path):
    from tests.unit.test_perf_walk import _record

    for key in (b"origin", "origin"):  # as bytes (the child could not decode) or text
        rec = _record(["a", "b"], "fd", [11, None], {0: {key: b"x"}, 1: {key: b"y"}}, dirs=[1])
        got = fsio._entries(rec, str(tmp_path), 7, None)
        assert type(got["a"]._xattrs) is PackedXattrs and got["a"]._xattrs == {"origin": b"x"}
        assert type(got["b"]._xattrs) is PackedXattrs and got["b"]._xattrs == {"origin": b"y"}


def test_a_wide_listing_gives_its_special_items_without_keeping_them(tmp_path, monkeypatch):
    from tests.unit.test_perf_walk import _record

    rec = _record(["a", "b", "c"], "fff", [1, 2, 3], {0: {"origin": b"x"}, 2: {"impure": b"y"}})
    narrow = fsio._entries(rec, str(tmp_path), 7, None)
    first = fsio.special_items(narrow)
    assert [n for n, _ in first] == ["a", "c"] and fsio.special_items(narrow) is first
    monkeypatch.setattr(fsio, "SPECIAL_ITEMS_KEPT", 1)
    wide = fsio._entries(rec, str(tmp_path), 7, None)
    items = list(fsio.special_items(wide))
    assert [(n, e.name, dict(e._xattrs)) for n, e in items] == [
        ("a", "a", {"origin": b"x"}), ("c", "c", {"impure": b"y"})]
    assert wide.special_items is None  # not kept
    assert [e for _, e in fsio.special_items(wide)] == [e for _, e in items]  # same entries


def _tree(base):
    upper, lower, work = base / "upper", base / "lower", base / "work"
    for d in ("a", "b", "c"):
        (lower / d).mkdir(parents=True)
        (lower / d / "f").write_text("f")
        (upper / d).mkdir(parents=True)
    work.mkdir()
    return upper, lower, work


def test_a_visit_is_released_before_the_walker_makes_the_next(tmp_path, monkeypatch):
    """The engine must not keep the last DirVisit (enumerate() keeps its last result
    tuple): a wide directory's listings and chains would live on beside the next one's."""
    upper, lower, work = _tree(tmp_path)
    orig = walk.Walker._walk
    alive_at_next: list[bool] = []

    def watched(self, pending):
        prev = None
        for visit in orig(self, pending):
            # The walker made this visit: the one before must be gone by now (refcounting
            # alone frees it; the collector is kept out of it).
            if prev is not None:
                alive_at_next.append(prev() is not None)
            prev = weakref.ref(visit)
            yield visit
            del visit

    monkeypatch.setattr(walk.Walker, "_walk", watched)
    gc.disable()
    try:
        rc = invoke(app, ["check", "-n", "-q", "--lower", str(lower), "--upper", str(upper),
                          "--work", str(work)], "ovlfsck")
    finally:
        gc.enable()
    assert rc in (0, 4)  # (the tree lacks an impure xattr: found, not the point here)
    assert len(alive_at_next) == 3 and not any(alive_at_next)  # root, a, b, c


@needs_root
def test_hidden_roots_and_claims_keep_no_entries(tmp_path):
    """Kept to the end of the walk, so compact: (layer, relpath) for a hidden lower
    directory, a Claim (no Member, no Entry) for a redirect's target."""
    from ovlfsck.stack import Layer, Role

    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (lower / "gone" / "sub").mkdir(parents=True)
    (lower / "moved").mkdir()
    upper.mkdir()
    os.mknod(upper / "gone", 0o20600, os.makedev(0, 0))
    (upper / "new").mkdir()
    xattr.set(str(upper / "new"), "trusted.overlay.redirect", b"moved")
    xattr.set(str(upper / "new"), "trusted.overlay.origin", b"\x00\xfb\x06\x01\x00")
    os.mknod(upper / "moved", 0o20600, os.makedev(0, 0))
    layers = [Layer(Role.UPPER, 0, str(upper), 0), Layer(Role.LOWER, 0, str(lower), 1)]

    class _Stack:
        namespace_layers = layers

    w = walk.Walker(_Stack(), fsio.Xattrs("trusted"), lambda *a: None)
    seen = []
    gen = w._walk([("", w.root_members(), True, False)])
    for v in gen:
        seen.append(v.path)
    assert seen[:2] == ["", "new"]
    assert w.hidden_roots == [(layers[1], "gone")]
    (claim,) = w.claimants(("lower:0", "moved"))
    assert (claim.layer, claim.relpath, claim.merged, claim.origin) == (
        layers[0], "new", "new", b"\x00\xfb\x06\x01\x00")
    assert w.claimants(("lower:0", "gone")) == []


_RSS_SCRIPT = r"""
import sys
from ovlfsck import memtune

if sys.argv[1] == "tune":
    assert memtune.tune()

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

big = bytearray(8 << 20)  # mmapped; freeing it raises glibc's threshold to 8 MiB (untuned)
del big
base = rss_kib()
blocks = [bytearray(1 << 20) for _ in range(8)]  # a wide directory's tables, say
del blocks
print(rss_kib() - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_large_blocks_go_back_to_the_system_when_freed():
    import subprocess
    import sys

    from ovlfsck import memtune

    if not memtune.tune():
        pytest.skip("not glibc: no mmap threshold to set")
    env = {**os.environ, "OVLFSCK_MALLOC_TUNE": "1"}
    kept = {}
    for how in ("tune", "plain"):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, how], capture_output=True,
                             text=True, env=env, check=True)
        kept[how] = int(out.stdout)
    # Untuned, the 8 MiB freed stay in the heap; tuned, they were unmapped.
    assert kept["plain"] > 6 * 1024, kept
    assert kept["tune"] < 2 * 1024, kept


def test_the_commands_tune_malloc_and_the_switch_turns_it_off(monkeypatch):
    from ovlfsck import cli, fsck_compat, memtune

    calls = []
    monkeypatch.setattr(memtune, "tune", lambda: calls.append(1) or True)
    for main in (cli.main, fsck_compat.main):
        with pytest.raises(SystemExit):
            main(["--version"] if main is cli.main else ["-V"])
    assert len(calls) == 2
    monkeypatch.undo()
    monkeypatch.setenv("OVLFSCK_MALLOC_TUNE", "0")
    assert memtune.tune() is False


def _visit_shapes(layers, monkeypatch, width: int) -> list:
    from ovlfsck.fsio import Prefetcher, Xattrs

    monkeypatch.setattr(walk, "PACK_WIDTH", width)

    class _Stack:
        namespace_layers = layers

    w = walk.Walker(_Stack(), Xattrs("trusted"), lambda *a: None)
    w.prefetcher = Prefetcher.start(w.layers, w.xa)
    out = []
    try:
        for v in w.visits():
            out.append((v.path, v.straight, v.hidden, [
                (m.key, m.via_redirect, type(m.entry).__name__, m.entry.name, m.entry.path,
                 m.entry.kind, None if m.entry._xattrs is None else dict(m.entry._xattrs),
                 m.entry.ino, m.entry.dev, m.entry._stat is None) for m in v.members]))
    finally:
        w.close()
    return out


@needs_root
def test_packed_subdirectories_are_visited_as_unpacked_ones(tmp_path, monkeypatch):
    """A wide directory's waiting subdirectories are packed (walk._Frame): packed or not,
    the walk gives the same visits, members and entries."""
    from ovlfsck.stack import Layer, Role

    upper, lower0, lower1 = tmp_path / "upper", tmp_path / "lower0", tmp_path / "lower1"
    for root in (upper, lower0, lower1):
        (root / "top" / "a").mkdir(parents=True)
    for d in ("b", "c", "e"):
        (lower1 / "top" / d / "in").mkdir(parents=True)
    (lower0 / "top" / "b").mkdir()
    (upper / "top" / "c").mkdir()
    xattr.set(str(upper / "top" / "c"), "trusted.overlay.origin", b"\x00\xfb\x06\x01\x00")
    (upper / "top" / "moved").mkdir()  # a redirect: not packed
    xattr.set(str(upper / "top" / "moved"), "trusted.overlay.redirect", b"e")
    os.mknod(upper / "top" / "e", 0o20600, os.makedev(0, 0))
    (lower1 / "top" / "gone").mkdir()  # hidden by an opaque upper dir
    (upper / "top" / "gone").mkdir()
    xattr.set(str(upper / "top" / "gone"), "trusted.overlay.opaque", b"y")
    layers = [Layer(Role.UPPER, 0, str(upper), 0), Layer(Role.LOWER, 0, str(lower0), 1),
              Layer(Role.LOWER, 1, str(lower1), 2)]
    packed = _visit_shapes(layers, monkeypatch, 0)
    plain = _visit_shapes(layers, monkeypatch, 10 ** 9)
    assert packed == plain
    paths = [p for p, *_ in plain]
    assert {"top/a", "top/b", "top/c", "top/moved", "top/moved/in", "top/gone"} <= set(paths)


def test_pack_refuses_what_unpack_would_not_make_again():
    from ovlfsck.fsio import NO_XATTRS, DirPrefix, Entry, Kind
    from ovlfsck.stack import Layer, Role

    up, lo = Layer(Role.UPPER, 0, "/u", 0), Layer(Role.LOWER, 0, "/l", 1)
    parents = [walk.Member(up, "p", Entry("p", "/u/p", Kind.DIR)),
               walk.Member(lo, "p", Entry("p", "/l/p", Kind.DIR))]
    pu, pl = DirPrefix("/u/p/"), DirPrefix("/l/p/")

    def members(**over):
        x = over.pop("x", PackedXattrs.of({"origin": b"o"}))
        eu = Entry("n", None, Kind.DIR, None, x, None, 5, pu)
        el = Entry("n", None, Kind.DIR, None, NO_XATTRS, None, 6, pl)
        for k, v in over.items():
            setattr(el, k, v)
        return [walk.Member(up, "p/n", eu), walk.Member(lo, "p/n", el)]

    frame = walk._Frame("p", parents, False)
    cm = members()
    got = frame.pack("n", cm, True)
    assert type(got) is walk._Packed
    path, out, straight, hidden = got.unpack()
    def shape(m):
        e = m.entry
        return (m.layer, m.relpath, m.via_redirect, type(e), e.name, e._path, e.kind, e._stat,
                e._xattrs, e.ino, e.dev)

    assert (path, straight, hidden) == ("p/n", True, False)
    assert [shape(m) for m in out] == [shape(m) for m in cm]
    assert [m.entry._xattrs for m in out] == [cm[0].entry._xattrs, NO_XATTRS]
    for over in ({"_stat": os.lstat("/")}, {"ino": 7}, {"kind": Kind.REG}, {"name": "m"},
                 {"dev": 9}, {"_path": DirPrefix("/l/q/")}):
        assert frame.pack("n", members(**over), True) is None, over
    redirected = members()
    redirected[1].via_redirect = True
    assert frame.pack("n", redirected, True) is None
    assert frame.pack("n", members()[::-1], True) is None  # not in the parents' order
