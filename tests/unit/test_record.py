"""`ovlfsck record` on layer sets built from specs (no mount needed)."""
import json
import os
from types import SimpleNamespace

import pytest
import xattr

from ovlfsck import handles
from ovlfsck import record as rec_mod
from ovlfsck.errors import ExitCode, OvlfsckError
from ovlfsck.fixture import build
from ovlfsck.preflight import run_preflight
from ovlfsck.record import FORMAT, load_record, record
from ovlfsck.stack import build_stack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for whiteouts and trusted.* xattrs")

PF = SimpleNamespace(namespace="trusted")

SPEC = """
[lower:0]
dir a
file a/f text=x
file hl1 text=h
hardlink d/hl2 hl1
file gone text=g
dir b/sub
file b/sub/y text=y
[lower:1]
file deep text=d
dir c
[upper]
xattr . origin=@lower:0:.
dir a
xattr a origin=@lower:0:a
file a/f text=changed
xattr a/f origin=@lower:0:a/f
dir b2
xattr b2 redirect=b
xattr b2 origin=@lower:0:b
whiteout b
whiteout gone
file deep text=copied
xattr deep origin=@lower:1:deep
file bad text=z
xattr bad origin=hex:00fb1d00010c3664b7ffbf408182dd84ed33ee52e00c0000003d3553a2
file junk text=j
xattr junk origin=hex:0102
[work]
dir index
"""


def fh_of(path, upper=False):
    return handles.encode_for(path, handles.fs_uuid(path) or handles.NULL_UUID, upper=upper)


class Layers:
    def __init__(self, root, spec=SPEC):
        self.root = str(root)
        self.layers = build(spec, self.root)
        lowers = sorted((k for k in self.layers if k.startswith("lower:")), key=lambda k: int(k[6:]))
        self.stack = build_stack([
            "lowerdir=" + ":".join(self.layers[k] for k in lowers)
            + f",upperdir={self.layers['upper']},workdir={self.layers['work']}"
        ])

    def p(self, layer, rel):
        return os.path.join(self.layers[layer], rel)

    @property
    def index(self):
        return self.p("work", "index")

    def add_index(self, lower_rel, kind, layer="lower:0", upper_rel=None):
        fh = fh_of(self.p(layer, lower_rel))
        name = fh.index_name()
        full = os.path.join(self.index, name)
        if kind == "whiteout":
            os.mknod(full, 0o020000, os.makedev(0, 0))
        elif kind == "dir":
            os.mkdir(full, 0)
            if upper_rel is not None:
                xattr.set(full, "trusted.overlay.upper", fh_of(self.p("upper", upper_rel), upper=True).encode())
        else:  # hardlink index: same inode as an upper alias
            os.link(self.p("upper", upper_rel), full)
            xattr.set(full, "trusted.overlay.origin", fh.encode())
        return fh.encode()


@pytest.fixture
def ls(tmp_path):
    return Layers(tmp_path)


def target(entry):
    return (entry.target.layer, entry.target.path, entry.target.type)


def test_every_kind_recorded_with_its_path(ls):
    # A copied-up indexed hardlink (upper a/hl, alias of index), a whiteout index for the
    # deleted hardlink 'gone' (no other trace), a dir index with its upper handle.
    with open(ls.p("upper", "hlup"), "w") as f:
        f.write("h2\n")
    xattr.set(ls.p("upper", "hlup"), "trusted.overlay.origin", fh_of(ls.p("lower:0", "hl1")).encode())
    hl_name = ls.add_index("hl1", "file", upper_rel="hlup")
    wo_name = ls.add_index("gone", "whiteout")
    dir_name = ls.add_index("a", "dir", upper_rel="a")
    xattr.set(ls.index, "trusted.overlay.upper", fh_of(ls.p("upper", "."), upper=True).encode())
    # a lower entry carrying an origin (lower:0 was once an upper over lower:1)
    xattr.set(ls.p("lower:0", "b/sub/y"), "trusted.overlay.origin", fh_of(ls.p("lower:1", "deep")).encode())

    res = record(ls.stack, PF)
    assert res.path == os.path.join(ls.layers["work"], "ovlfsck", "record.json")
    r = load_record(res.path)

    root = r.lookup(fh_of(ls.p("lower:0", ".")).encode())
    assert target(root) == ("lower:0", ".", "d")
    assert ("origin", "upper", ".") in [(s.kind, s.layer, s.path) for s in root.sources]
    assert target(r.lookup(fh_of(ls.p("lower:0", "a")).encode())) == ("lower:0", "a", "d")
    assert target(r.lookup(fh_of(ls.p("lower:0", "a/f")).encode())) == ("lower:0", "a/f", "f")
    assert target(r.lookup(fh_of(ls.p("lower:0", "b")).encode())) == ("lower:0", "b", "d")
    assert target(r.lookup(fh_of(ls.p("lower:1", "deep")).encode())) == ("lower:1", "deep", "f")
    # index entries
    hl = r.lookup(hl_name)
    assert sorted(hl.kinds) == ["index", "origin"]
    assert hl.target.layer == "lower:0" and hl.target.path in ("hl1", "d/hl2") and hl.target.nlink == 2
    wo = r.lookup(wo_name)
    assert wo.kinds == ["index"] and wo.sources[0].type == "c"
    assert target(wo) == ("lower:0", "gone", "f")
    d = r.lookup(dir_name)
    assert sorted(d.kinds) == ["index", "origin"] and target(d) == ("lower:0", "a", "d")
    # dir index upper, index dir upper
    up = r.lookup(fh_of(ls.p("upper", "a"), upper=True).encode())
    assert up.kinds == ["index-upper"] and target(up) == ("upper", "a", "d")
    rootup = r.lookup(fh_of(ls.p("upper", "."), upper=True).encode())
    assert rootup.kinds == ["indexdir-upper"] and target(rootup) == ("upper", ".", "d")
    # the lower entry's origin
    deep = r.lookup(fh_of(ls.p("lower:1", "deep")).encode())
    assert {(s.layer, s.path) for s in deep.sources} == {("upper", "deep"), ("lower:0", "b/sub/y")}
    assert res.counts["index"] == 3 and res.counts["index-upper"] == 1
    assert res.counts["indexdir-upper"] == 1
    doc = json.load(open(res.path))
    assert doc["format"] == FORMAT and doc["stack"] == ls.stack.describe()
    assert set(doc["uuids"]) == {"upper", "work", "lower:0", "lower:1"}


def test_undecodable_handles_are_unresolved(ls):
    # stale: a real handle of a file that is then deleted
    with open(ls.p("lower:1", "tmp"), "w") as f:
        f.write("t")
    stale = fh_of(ls.p("lower:1", "tmp")).encode()
    os.unlink(ls.p("lower:1", "tmp"))
    with open(ls.p("upper", "st"), "w") as f:
        f.write("s")
    xattr.set(ls.p("upper", "st"), "trusted.overlay.origin", stale)
    # an index entry whose name is not a handle
    os.mknod(os.path.join(ls.index, "zz"), 0o020000, os.makedev(0, 0))
    res = record(ls.stack, PF)
    r = load_record(res.path)
    why = {e.sources[0].path: e.unresolved for e in r.entries.values() if e.target is None}
    assert "uuid" in why["bad"]  # foreign uuid: matches no lower layer
    assert "invalid handle" in why["junk"]
    assert "stale" in why["st"]
    assert "not a valid handle" in why["index/zz"]
    assert res.counts["unresolved"] == 4 == len(res.unresolved)
    for e in r.entries.values():
        assert (e.target is None) == (e.unresolved is not None)


def test_atomic_write_keeps_old_record(ls, monkeypatch):
    res = record(ls.stack, PF)
    before = open(res.path, "rb").read()
    os.mkdir(ls.p("upper", "newdir"))
    xattr.set(ls.p("upper", "newdir"), "trusted.overlay.origin", fh_of(ls.p("lower:1", "c")).encode())

    def crash(*a, **k):
        raise OSError(5, "simulated crash before rename")

    monkeypatch.setattr(rec_mod.os, "replace", crash)
    with pytest.raises(OSError):
        record(ls.stack, PF)
    monkeypatch.undo()
    assert open(res.path, "rb").read() == before
    assert load_record(res.path).lookup(fh_of(ls.p("lower:1", "c")).encode()) is None
    assert os.listdir(os.path.dirname(res.path)) == ["record.json"]
    record(ls.stack, PF)
    assert load_record(res.path).lookup(fh_of(ls.p("lower:1", "c")).encode()) is not None


def test_non_utf8_names_round_trip(ls):
    bad = os.fsdecode(b"caf\xe9 \xff")
    os.makedirs(os.path.join(ls.p("lower:0", "a"), bad))
    os.makedirs(os.path.join(ls.p("upper", "a"), bad))
    xattr.set(os.path.join(ls.p("upper", "a"), bad), "trusted.overlay.origin",
              fh_of(os.path.join(ls.p("lower:0", "a"), bad)).encode())
    res = record(ls.stack, PF)
    raw = open(res.path, "rb").read()
    raw.decode("ascii")  # the file itself is plain ASCII JSON
    e = load_record(res.path).lookup(fh_of(os.path.join(ls.p("lower:0", "a"), bad)).encode())
    assert e.target.path == os.path.join("a", bad)
    assert os.fsencode(e.target.path) == b"a/caf\xe9 \xff"
    assert e.sources[0].path == os.path.join("a", bad)
    assert os.path.isdir(os.path.join(ls.p("lower:0", "."), e.target.path))


def test_load_rejects_other_versions_and_damage(tmp_path, ls):
    res = record(ls.stack, PF)
    doc = json.load(open(res.path))
    for fmt in ("ovlfsck-record/2", None, "something"):
        doc["format"] = fmt
        p = tmp_path / f"r{len(str(fmt))}.json"
        p.write_text(json.dumps(doc))
        with pytest.raises(OvlfsckError, match="unsupported record format") as ei:
            load_record(str(p))
        assert ei.value.exit_code == ExitCode.OPERATIONAL
    doc["format"] = FORMAT
    for bad in ({"x": 1}, ["x"], [{"handle": "00", "kinds": [1]}], [{"handle": "zz"}]):
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(dict(doc, handles=bad)))
        with pytest.raises(OvlfsckError, match="damaged"):
            load_record(str(p))
    p = tmp_path / "trunc.json"
    p.write_bytes(open(res.path, "rb").read()[:100])
    with pytest.raises(OvlfsckError, match="not a valid"):
        load_record(str(p))
    with pytest.raises(OvlfsckError):
        load_record(str(tmp_path / "missing.json"))


def test_with_real_preflight(ls):
    pf = run_preflight(ls.stack, want_write=True)
    res = record(ls.stack, pf)
    assert res.counts["handles"] == len(load_record(res.path))


# --------------------------------------------------------------------------- read on use


def test_head_gives_the_stack_without_the_handles(tmp_path, ls):
    res = record(ls.stack, PF)
    raw = open(res.path, "rb").read()
    doc = json.loads(raw)
    assert rec_mod.load_record_head(res.path) == doc["stack"]
    # Only the part before the handles is read: a record damaged after it still has a head
    # (the whole record is then refused when it is loaded).
    cut = tmp_path / "cut.json"
    cut.write_bytes(raw[: raw.index(b'\n "handles": [') + 40])
    assert rec_mod.load_record_head(str(cut)) == doc["stack"]
    with pytest.raises(OvlfsckError):
        load_record(str(cut))
    # Anything else is not told by the head: None (the caller loads the whole record).
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(doc))
    assert rec_mod.load_record_head(str(flat)) is None
    other = dict(doc, format="ovlfsck-record/2")
    fmt = tmp_path / "fmt.json"
    fmt.write_text(json.dumps(other, indent=1))
    assert rec_mod.load_record_head(str(fmt)) is None
    assert rec_mod.load_record_head(str(tmp_path / "missing.json")) is None


def _rehandler(layers, monkeypatch, loads):
    from ovlfsck import rehandle

    real = rec_mod.load_record  # not rehandle's: a second patch replaces the first

    def counting(path):
        loads.append(path)
        return real(path)

    monkeypatch.setattr(rehandle, "load_record", counting)
    return rehandle.Rehandler(SimpleNamespace(stack=layers.stack), lambda layer: None)


def test_layers_not_moved_never_load_the_record(ls, monkeypatch):
    res = record(ls.stack, PF)
    loads = []
    rh = _rehandler(ls, monkeypatch, loads)
    heads = []
    real_head = rec_mod.load_record_head
    from ovlfsck import rehandle

    monkeypatch.setattr(rehandle, "load_record_head", lambda p: heads.append(p) or real_head(p))
    assert rh.moved is False and rh.moved is False  # asked once per index entry
    assert loads == [] and len(heads) == 1  # the head told it, read once
    fh = handles.decode(next(iter(load_record(res.path).entries)))
    assert rh.recorded(fh) is not None  # a stale handle: now the record is read, once
    assert rh.recorded(fh) is not None
    assert len(loads) == 1


def test_moved_layers_are_told_by_the_head(tmp_path, ls, monkeypatch):
    res = record(ls.stack, PF)
    copy = Layers(tmp_path / "copy")  # the same layers at other paths
    os.makedirs(os.path.dirname(rec_mod.record_path(copy.stack)))
    with open(res.path, "rb") as src, open(rec_mod.record_path(copy.stack), "wb") as dst:
        dst.write(src.read())
    loads = []
    rh = _rehandler(copy, monkeypatch, loads)
    assert rh.moved is True
    assert loads == []
    # A record the head cannot tell about: the whole record decides, as before.
    doc = json.load(open(res.path))
    with open(rec_mod.record_path(copy.stack), "w") as fh:
        json.dump(doc, fh)
    rh = _rehandler(copy, monkeypatch, loads)
    assert rh.moved is True
    assert len(loads) == 1
    # No record, or something else in its place: not moved, nothing loaded.
    os.unlink(rec_mod.record_path(copy.stack))
    rh = _rehandler(copy, monkeypatch, loads)
    assert rh.moved is False and rh.record is None and rh.record_problem is None
    os.mkdir(rec_mod.record_path(copy.stack))
    rh = _rehandler(copy, monkeypatch, loads)
    assert rh.moved is False and "not a regular file" in rh.record_problem
    assert len(loads) == 1
