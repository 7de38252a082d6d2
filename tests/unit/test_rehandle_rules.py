"""Rehandling rules (issue 4) on layer sets built from specs, without a mount.

After layers were copied, `check -y` rewrites each stale `origin` (OVL520) to the handle of
the lower object it must now name. Which object that is depends on the file:

* a metacopy file: the lower file its data lookup meets first (its own path, or its
  redirect): with index=on the kernel verifies the origin against exactly that file;
* a plain file that still carries a redirect (renamed while it was a metacopy file, its
  data copied up later): where the redirect leads, not the other file at its own path;
* any other plain file: the lower object of the same type at its own path, else nothing;

and OVL807 (metacopy origin mismatch) is dropped when the rewrite names the very file the
data lookup finds. The kernel tests cover these on real copies; here each rule is pinned on
a small layer set, the stale origins made the two ways a copy makes them:

* `foreign`: the handle carries another filesystem's uuid (a copy to another filesystem);
* `outside`: the handle decodes, on this filesystem, to an object outside the layers (a copy
  within one filesystem, the original kept);

and, with `ovlfsck record` made before a real `cp -a` within one filesystem, handles the
record resolves (the original kept: they decode outside the layers; the original removed:
they are gone). Each test asserts on the --json report, then on the xattr `-y` (or `-p`)
wrote, and ends with a clean `check -n` where the repair is complete.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import xattr

from ovlfsck import handles, rehandle
from ovlfsck.cli import app, invoke

from . import test_origins as origins_run

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for trusted.* xattrs and open_by_handle_at")

OR = "trusted.overlay.origin"
FOREIGN_UUID = bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")
MC_OPTS = "index=on,metacopy=on,redirect_dir=on"
STALE = ["foreign", "outside"]


def _handle_of(path):
    """The overlay handle of the object at a host path, as the kernel stores it."""
    return handles.encode_for(path, handles.fs_uuid(path) or handles.NULL_UUID).encode()


class Run(origins_run.Run):
    """A layer set from a spec (tests/unit/test_origins.py's Run, built under `set/` so that
    it can be copied, plus stale handles)."""

    def __init__(self, tmp_path, capsys, spec, options=""):
        self.tmp = str(tmp_path)
        os.makedirs(os.path.join(self.tmp, "set"), exist_ok=True)
        super().__init__(os.path.join(self.tmp, "set"), capsys, spec, options)

    def problem(self, doc, code, path=None):
        hits = [p for p in doc["problems"] if p["code"] == code and (path is None or p["path"] == path)]
        assert len(hits) == 1, doc["problems"]
        return hits[0]

    def codes(self, doc, prefix="OVL"):
        return super().codes(doc, prefix)

    def set_origin(self, rel, value):
        xattr.set(self.path("upper", rel), OR, value, nofollow=True)

    def handle(self, layer, rel="", upper=False):
        p = self.path(layer, rel)
        return handles.encode_for(p, handles.fs_uuid(p) or handles.NULL_UUID, upper=upper).encode()

    def sparse(self, rel, size):
        """A metacopy upper file as the kernel makes it: sparse, its data's size."""
        os.truncate(self.path("upper", rel), size)

    # ------------------------------------------------------------------ stale handles

    def foreign(self, layer, rel):
        """The handle of `layer:rel` as a copy to another filesystem carries it: another
        filesystem's uuid (no lower layer's)."""
        h = bytearray(self.handle(layer, rel))
        h[5:21] = FOREIGN_UUID
        return bytes(h)

    def outside(self, name, kind="file"):
        """The handle of a new object outside the layers, on their filesystem: what a copy
        within one filesystem carries (the original still exists)."""
        d = os.path.join(self.tmp, "original")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, name)
        if kind == "file":
            with open(p, "w") as fh:
                fh.write("the original\n")
        elif kind == "symlink":
            os.symlink("target", p)
        elif kind == "fifo":
            os.mkfifo(p)
        else:
            raise ValueError(kind)
        return _handle_of(p)

    def original_root(self, names):
        """A directory outside the layers standing for the ORIGINAL top lower layer (holding
        `names`), which the upper root's origin names: a copy within one filesystem."""
        d = os.path.join(self.tmp, "original_lower")
        os.makedirs(d, exist_ok=True)
        for name in names:
            with open(os.path.join(d, name), "w") as fh:
                fh.write("the original\n")
        self.set_origin("", _handle_of(d))
        return d

    def record(self):
        self.capsys.readouterr()
        assert invoke(app, ["record", "--json", "-o", self.opts], "ovlfsck") == 0
        self.capsys.readouterr()

    def copy(self, name="copy", keep=True):
        """`cp -a` of the layer set within its filesystem (`keep`: the original stays)."""
        dst = os.path.join(self.tmp, name)
        subprocess.run(["cp", "-a", self.root, dst], check=True)
        c = Run.__new__(Run)
        c.__dict__.update(self.__dict__)
        c.root = dst
        c.layers = {k: v.replace(self.root, dst, 1) for k, v in self.layers.items()}
        c.opts = self.opts.replace(self.root, dst)
        if not keep:
            shutil.rmtree(self.root)
        return c

    def stale(self, how, rel, layer="lower:0", kind="file"):
        """A stale origin for upper `rel`; `foreign` re-uses the fid of `layer:rel`."""
        value = self.foreign(layer, rel) if how == "foreign" else self.outside(rel.replace("/", "_"), kind)
        self.set_origin(rel, value)
        return value


@pytest.fixture
def run(tmp_path, capsys):
    return lambda spec, options="": Run(tmp_path, capsys, spec, options)


def _clean(r):
    """A final `check -n`: exit 0, nothing to say."""
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


def _rewritten(r, doc, rel):
    """The one OVL520 for upper `rel` (and no other OVL520)."""
    assert [p for p in doc["problems"] if p["code"] == "OVL520"] == [r.problem(doc, "OVL520", rel)], doc["problems"]
    return r.problem(doc, "OVL520", rel)


# =========================================================================== rule 1: metacopy files

# x is a metacopy file. "own": its data is lower:0:x. "relative"/"absolute": it was renamed
# over x from y (from e/y) while a metacopy file, so its data is where the redirect leads,
# and the lower x at its own path is another file.
MC_SPECS = {
    "own": ("""
[lower:0]
file x text=lower x data
file y text=another file
[upper]
file x
xattr x metacopy=
""", "x"),
    "relative": ("""
[lower:0]
file x text=the file renamed over
file y text=lower y data, longer
[upper]
file x
xattr x metacopy=
xattr x redirect=y
whiteout y
""", "y"),
    "absolute": ("""
[lower:0]
file x text=the file renamed over
dir e
file e/y text=lower e/y data, longer still
file e/keep text=k
[upper]
file x
xattr x metacopy=
xattr x redirect=/e/y
dir e
whiteout e/y
""", "e/y"),
}


def _metacopy(run, lookup):
    spec, target = MC_SPECS[lookup]
    r = run(spec, options=MC_OPTS)
    r.sparse("x", os.path.getsize(r.path("lower:0", target)))
    return r, target


@root_only
@pytest.mark.parametrize("lookup", list(MC_SPECS))
@pytest.mark.parametrize("how", STALE)
def test_metacopy_stale_origin_is_rewritten_to_its_data_lookup(run, how, lookup):
    r, target = _metacopy(run, lookup)
    r.set_origin("x", r.handle("lower:0", target))
    _clean(r)  # as the kernel left it: clean
    # A foreign handle re-uses the fid of the lower file at its own path (lower:0:x): the fid
    # alone must not make it that file.
    old = r.stale(how, "x")
    code, doc = r.check("-n")
    assert code == 4, doc["problems"]
    p = _rewritten(r, doc, "x")
    assert f"lower:0:'{target}'" in p["message"], p
    assert rehandle.FROM_DATA in p["message"], p
    assert not any(c == "OVL807" for c, _l, _p in r.codes(doc)), doc["problems"]
    assert r.check("-p")[0] == 4 and r.origin("upper", "x") == old  # derived from paths: not preened
    code, doc = r.check("-y")
    assert code == 1, doc["problems"]
    assert r.origin("upper", "x") == r.handle("lower:0", target)
    if lookup != "own":
        assert r.origin("upper", "x") != r.handle("lower:0", "x")
    _clean(r)


@root_only
@pytest.mark.parametrize("how", STALE)
def test_metacopy_whose_data_lookup_finds_nothing_is_not_rewritten_from_its_own_path(run, how):
    """Its redirect leads nowhere: the lower file at its own path is not its data, and is
    never taken instead (the metacopy pass reports the missing data)."""
    r = run("[lower:0]\nfile x text=the file renamed over\n[upper]\nfile x\nxattr x metacopy=\n"
            "xattr x redirect=y\n", options=MC_OPTS)
    r.sparse("x", 9)
    old = r.stale(how, "x")
    code, doc = r.check("-n")
    assert not any(c == "OVL520" for c, _l, _p in r.codes(doc)), doc["problems"]
    assert ("OVL804", "upper", "x") in r.codes(doc), doc["problems"]
    r.check("-y")
    assert r.origin("upper", "x") == old


# =========================================================================== rule 2: plain files with a redirect

# x was renamed over lower x from y (from e/y) while a metacopy file, then written to: its
# data was copied up and the metacopy xattr removed, the redirect stays. Its origin is y.
PLAIN_REDIRECT = {
    "relative": ("""
[lower:0]
file x text=the file renamed over
file y text=lower y
[upper]
file x text=lower y, then written to
xattr x redirect=y
whiteout y
""", "y"),
    "absolute": ("""
[lower:0]
file x text=the file renamed over
dir e
file e/y text=lower e/y
file e/keep text=k
[upper]
file x text=lower e/y, then written to
xattr x redirect=/e/y
dir e
whiteout e/y
""", "e/y"),
}


@root_only
@pytest.mark.parametrize("redirect", list(PLAIN_REDIRECT))
@pytest.mark.parametrize("how", STALE)
def test_plain_file_with_a_redirect_takes_its_origin_from_the_redirect(run, how, redirect):
    spec, target = PLAIN_REDIRECT[redirect]
    r = run(spec, options=MC_OPTS)
    r.set_origin("x", r.handle("lower:0", target))
    _clean(r)  # as the kernel left it: clean
    old = r.stale(how, "x")  # a foreign handle re-uses the fid of lower:0:x
    code, doc = r.check("-n")
    assert code == 4, doc["problems"]
    p = _rewritten(r, doc, "x")
    assert f"lower:0:'{target}'" in p["message"] and "lower:0:'x'" not in p["message"], p
    assert rehandle.FROM_DATA in p["message"], p
    code, doc = r.check("-y")
    assert code == 1, doc["problems"]
    assert r.origin("upper", "x") == r.handle("lower:0", target) != old
    _clean(r)


@root_only
@pytest.mark.parametrize("how", STALE)
def test_plain_file_whose_redirect_leads_nowhere_is_not_rewritten_from_its_own_path(run, how):
    """The file at its own path is the one it was renamed over, never its origin."""
    r = run("[lower:0]\nfile x text=the file renamed over\n[upper]\nfile x text=y, written to\n"
            "xattr x redirect=y\n", options=MC_OPTS)
    old = r.stale(how, "x")
    code, doc = r.check("-n")
    assert not any(c == "OVL520" for c, _l, _p in r.codes(doc)), doc["problems"]
    code_ = "OVL504" if how == "foreign" else "OVL506"
    p = r.problem(doc, code_, "x")
    assert "not rewritten" in p["message"], p
    assert "its data lookup or redirect finds no lower file" in p["message"], p
    assert p["severity"] == "warning"
    r.check("-y")
    assert r.origin("upper", "x") == old  # a warning: -y leaves it


# =========================================================================== rule 3: plain files

@root_only
@pytest.mark.parametrize("kind", ["file", "symlink", "fifo"])
@pytest.mark.parametrize("how", STALE)
def test_plain_entry_is_rewritten_from_the_same_type_at_its_own_path(run, how, kind):
    """No redirect: the lower object of the same type at its own path (not the one the stale
    handle's fid named in the copy)."""
    make = {"file": "file {} text={}", "symlink": "symlink {} {}", "fifo": "fifo {}"}[kind]
    r = run(f"[lower:0]\n{make.format('x', 'lower')}\n{make.format('other', 'o')}\n"
            f"[upper]\n{make.format('x', 'upper')}\n", options="index=on")
    old = r.foreign("lower:0", "other") if how == "foreign" else r.outside("x", kind)
    r.set_origin("x", old)
    code, doc = r.check("-n")
    assert code == 4, doc["problems"]
    p = _rewritten(r, doc, "x")
    assert "lower:0:'x'" in p["message"] and rehandle.FROM_PATH in p["message"], p
    code, doc = r.check("-y")
    assert code == 1, doc["problems"]
    assert r.origin("upper", "x") == r.handle("lower:0", "x") != r.handle("lower:0", "other")
    _clean(r)


@root_only
@pytest.mark.parametrize("lower", ["dir x", "fifo x", "symlink x target"])
@pytest.mark.parametrize("how", STALE)
def test_plain_file_with_another_type_at_its_own_path_is_not_rewritten(run, how, lower):
    r = run(f"[lower:0]\n{lower}\nfile other text=o\n[upper]\nfile x text=upper\n", options="index=on")
    old = r.foreign("lower:0", "other") if how == "foreign" else r.outside("x")
    r.set_origin("x", old)
    code, doc = r.check("-n")
    assert not any(c == "OVL520" for c, _l, _p in r.codes(doc)), doc["problems"]
    p = r.problem(doc, "OVL504" if how == "foreign" else "OVL506", "x")
    what = {"dir": "a directory", "fifo": "a fifo", "symlink": "a symlink"}[lower.split()[0]]
    assert "not rewritten" in p["message"] and f"at the same path is {what}, this is a regular file" in p["message"], p
    assert p["severity"] == "warning"
    r.check("-y")
    assert r.origin("upper", "x") == old


# =========================================================================== rule 4: OVL807 after the rewrite

@root_only
@pytest.mark.parametrize("lookup", ["own", "relative"])
@pytest.mark.parametrize("via", ["data-lookup", "original-path"])
def test_ovl807_is_dropped_when_the_rewrite_names_the_data_file(run, via, lookup):
    """Copied within one filesystem: the origin still decodes (to the original, outside the
    layers), so the metacopy pass sees an origin that is not the file the lookup finds
    (OVL807). The origins pass rewrites it to that very file: no OVL807 is left to report."""
    r, target = _metacopy(run, lookup)
    if via == "data-lookup":
        r.stale("outside", "x")
        source = rehandle.FROM_DATA
    else:
        orig = r.original_root([target])
        r.set_origin("x", _handle_of(os.path.join(orig, target)))
        source = rehandle.FROM_ORIGINAL
    code, doc = r.check("-n")
    assert code == 4, doc["problems"]
    p = _rewritten(r, doc, "x")
    assert f"lower:0:'{target}'" in p["message"] and source in p["message"], p
    assert [c for c in r.codes(doc) if c[0] == "OVL807"] == [], doc["problems"]
    code, doc = r.check("-y")
    assert code == 1, doc["problems"]
    assert r.origin("upper", "x") == r.handle("lower:0", target)
    _clean(r)


@root_only
@pytest.mark.parametrize("lookup", ["own", "relative"])
def test_ovl807_stays_when_the_rewrite_names_another_file(run, lookup):
    """The control: the original's origin named another file than its data lookup found (it
    was already mismatched); its copy is rewritten to that other file, and the mismatch is
    still reported."""
    r, target = _metacopy(run, lookup)
    other = "y" if lookup == "own" else "x"
    orig = r.original_root([other])
    r.set_origin("x", _handle_of(os.path.join(orig, other)))
    code, doc = r.check("-n")
    p = _rewritten(r, doc, "x")
    assert f"lower:0:'{other}'" in p["message"], p
    p = r.problem(doc, "OVL807", "x")
    assert f"finds lower:0:{target}" in p["message"], p


@root_only
@pytest.mark.parametrize("name", ["y", "y2"])
def test_record_naming_another_link_of_the_data_file_drops_ovl807(run, name):
    """With a record: it keeps ONE path of a multiply-linked lower inode, maybe not the name
    the data lookup meets; the rewrite still names the very file found (compared by handle),
    so OVL807 is not reported."""
    r = run(f"""
[lower:0]
file x text=the file renamed over
file y text=lower y data
hardlink y2 y
[upper]
file x
xattr x metacopy=
xattr x redirect={name}
xattr x origin=@lower:0:{name}
whiteout {name}
""", options=MC_OPTS)
    r.sparse("x", os.path.getsize(r.path("lower:0", "y")))
    _clean(r)  # the original, as the kernel left it
    r.record()
    c = r.copy()
    code, doc = c.check("-n")
    assert code == 4, doc["problems"]
    p = _rewritten(c, doc, "x")
    assert rehandle.FROM_RECORD in p["message"] and "lower:0:'x'" not in p["message"], p
    assert [k for k in c.codes(doc) if k[0] == "OVL807"] == [], doc["problems"]
    code, doc = c.check("-p")  # from the record: preen-safe
    assert code == 1, doc["problems"]
    assert c.origin("upper", "x") == c.handle("lower:0", name) == c.handle("lower:0", "y")
    _clean(c)


# =========================================================================== origins that are gone

_MOVED = """
[lower:0]
file x text=lower x data
file y text=another file
[upper]
file x{text}
{metacopy}
xattr x origin=@lower:0:x
"""


def _moved_with_record(run, metacopy):
    """Copied within one filesystem with the record, then the original removed: every
    stored handle is gone (same uuid, no such object any more)."""
    r = run(_MOVED.format(text="" if metacopy else " text=upper x data",
                          metacopy="xattr x metacopy=" if metacopy else ""), options=MC_OPTS)
    if metacopy:
        r.sparse("x", os.path.getsize(r.path("lower:0", "x")))
    _clean(r)  # the original, as the kernel left it
    r.record()
    return r.copy(keep=False)


@root_only
def test_plain_file_whose_origin_is_gone_is_rewritten_from_the_record(run):
    c = _moved_with_record(run, metacopy=False)
    code, doc = c.check("-n")
    p = _rewritten(c, doc, "x")
    assert "does not exist any more" in p["message"] and rehandle.FROM_RECORD in p["message"], p
    assert c.check("-p")[0] == 1 and c.origin("upper", "x") == c.handle("lower:0", "x")
    _clean(c)


@root_only
def test_metacopy_file_whose_origin_is_gone_is_rewritten_from_the_record(run):
    c = _moved_with_record(run, metacopy=True)
    code, doc = c.check("-n")
    p = _rewritten(c, doc, "x")
    assert rehandle.FROM_RECORD in p["message"] and "lower:0:'x'" in p["message"], p
    assert c.check("-p")[0] == 1 and c.origin("upper", "x") == c.handle("lower:0", "x")
    _clean(c)
