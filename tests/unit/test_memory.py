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
