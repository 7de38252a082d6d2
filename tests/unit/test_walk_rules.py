"""The lookup rules and checks on layer sets built from specs (no mount needed).

Each case is a small layer set written in the fixture language (ovlfsck/fixture.py) and
checked in-process through the CLI, asserting the JSON report and the state on disk.
The same kinds are also exercised against real kernel-made states in tests/scenarios.
"""
import json
import os

import pytest
import xattr

from ovlfsck.cli import app, invoke
from ovlfsck.fixture import build

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for whiteouts and trusted.* xattrs")


class Run:
    def __init__(self, tmp_path, capsys, spec):
        self.root = str(tmp_path)
        self.capsys = capsys
        self.layers = build(spec, self.root)
        lowers = sorted((k for k in self.layers if k.startswith("lower:")), key=lambda k: int(k[6:]))
        opts = "lowerdir=" + ":".join(self.layers[k] for k in lowers)
        if "upper" in self.layers:
            opts += f",upperdir={self.layers['upper']},workdir={self.layers.get('work') or self._work()}"
        self.opts = opts

    def _work(self):
        w = os.path.join(self.root, "work")
        os.makedirs(w, exist_ok=True)
        self.layers["work"] = w
        return w

    def check(self, *args):
        self.capsys.readouterr()
        code = invoke(app, ["check", "--json", *args, "-o", self.opts], "ovlfsck")
        out = self.capsys.readouterr().out
        doc = json.loads(out)
        assert doc["exit_code"] == code
        return code, doc

    def codes(self, doc, severity=None):
        return sorted((p["code"], p["layer"], p["path"]) for p in doc["problems"]
                      if severity is None or p["severity"] == severity)

    def path(self, layer, rel):
        return os.path.join(self.layers[layer], rel)


@pytest.fixture
def run(tmp_path, capsys):
    return lambda spec: Run(tmp_path, capsys, spec)


HEALTHY = """
[lower:0]
dir a
file a/f text=x
dir b/sub
file b/sub/y text=y
file c text=c
[upper]
xattr . impure=y
dir a
xattr a origin=@lower:0:a
xattr a impure=y
file a/f text=changed
xattr a/f origin=@lower:0:a/f
dir b2
xattr b2 redirect=b
xattr b2 origin=@lower:0:b
whiteout b
whiteout c
dir new
file new/n text=n
"""


def test_healthy_state_is_clean_and_json_follows_the_schema(run):
    r = run(HEALTHY)
    code, doc = r.check("-n")
    assert code == 0, doc
    assert doc["schema"] == "ovlfsck/1" and doc["mode"] == "no"
    assert doc["counts"] == {"found": 0, "fixed": 0, "left": 0}
    assert doc["stack"]["xattr_namespace"] == "trusted" and doc["journal"] is None
    assert doc["problems"] == []


@pytest.mark.parametrize("spec, expect", [
    ("[lower:0]\nfile x text=x\n[upper]\nwhiteout nosuch\n", ("OVL101", "upper", "nosuch")),
    ("[lower:0]\nwhiteout x\n[lower:1]\nfile x text=x\n[upper]\nwhiteout x\n", ("OVL101", "upper", "x")),
    ("[lower:0]\ndir d\nfile d/z text=z\n[upper]\ndir d\nxattr d opaque=y\nwhiteout d/z\n", ("OVL102", "upper", "d/z")),
    ("[lower:0]\nfile f text=f\n[upper]\ndir pure\nwhiteout pure/w\n", ("OVL103", "upper", "pure/w")),
    ("[lower:0]\nfile f text=f\n[lower:1]\nwhiteout w\n", ("OVL101", "lower:1", "w")),
])
def test_whiteout_classes(run, spec, expect):
    r = run(spec)
    code, doc = r.check("-n")
    assert code == 4
    assert r.codes(doc) == [expect]


def test_whiteouts_that_hide_something_and_real_devices_are_fine(run):
    r = run("[lower:0]\nfile x text=x\ndir d\nfile d/y text=y\n[upper]\nxattr . impure=y\nwhiteout x\ndir d\nwhiteout d/y\n")
    os.mknod(r.path("upper", "dev"), 0o644 | 0o020000, os.makedev(5, 0))
    assert r.check("-n")[0] == 0


def test_whiteout_in_pure_dir_with_origin_is_just_orphan(run):
    r = run("[lower:0]\ndir gone_elsewhere\n[upper]\ndir p\nxattr p origin=hex:00fb1500000000000000000000000000000000000000\nwhiteout p/w\nxattr . impure=y\n")
    code, doc = r.check("-n")
    assert ("OVL101", "upper", "p/w") in r.codes(doc)


def test_xattr_whiteouts(run):
    spec = """
[lower:0]
dir d
file d/w
xattr d/w whiteout=
dir m
xattr m opaque=x
file m/w
xattr m/w whiteout=
file m/big text=not empty
xattr m/big whiteout=
file uw text=hidden by the upper xattr whiteout
[lower:1]
file d/w text=hidden
file m/w text=hidden
[upper]
xattr . impure=y
file uw
xattr uw whiteout=
"""
    r = run(spec)
    code, doc = r.check("-n")
    found = r.codes(doc)
    assert ("OVL104", "upper", "uw") in found
    assert ("OVL105", "lower:0", "d") in found
    assert not any(p == "m" or p.startswith("m/") for _, _, p in found), found
    code, doc = r.check("-y", "--repair-lowers")
    assert code == 1
    assert os.stat(r.path("upper", "uw")).st_rdev == 0 and os.path.exists(r.path("upper", "uw"))
    assert xattr.get(r.path("lower:0", "d"), "trusted.overlay.opaque") == b"x"
    assert r.check("-n")[0] == 0


def test_opaque_values(run):
    spec = """
[lower:0]
dir y
dir x
dir bad
file f text=f
[lower:1]
dir low
xattr low opaque=y
[upper]
xattr . impure=y
dir bad
xattr bad opaque=yes
dir ux
xattr ux opaque=x
file uf text=f
xattr uf opaque=y
"""
    r = run(spec)
    xattr.set(r.path("lower:0", "x"), "trusted.overlay.opaque", b"x")
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL201", "upper", "bad"), ("OVL202", "upper", "uf"), ("OVL203", "upper", "ux")]
    assert r.check("-y")[0] == 1
    assert b"trusted.overlay.opaque" not in xattr.list(r.path("upper", "bad"))
    assert r.check("-n")[0] == 0


@pytest.mark.parametrize("value, code", [
    ("hex:", "OVL301"), ("a/b", "OVL301"), ("//d", "OVL301"), ("/d/", "OVL301"),
    ("/../etc", "OVL302"), ("..", "OVL302"), ("/a/./b", "OVL302"), ("hex:2f6100", "OVL302"),
    ("/" + "x" * 300, "OVL302"), ("/nonexistent", "OVL303"), ("/file", "OVL304"),
])
def test_bad_redirects_are_reported_and_never_followed(run, tmp_path, value, code):
    r = run(f"[lower:0]\nfile file text=f\ndir d\n[upper]\nxattr . impure=y\ndir r\nxattr r redirect={value}\n")
    before = sorted(os.listdir(tmp_path.parent))
    got_code, doc = r.check("-n")
    assert got_code == 4 and r.codes(doc) == [(code, "upper", "r")]
    assert r.check("-y")[0] == 1
    assert b"trusted.overlay.redirect" not in xattr.list(r.path("upper", "r"))
    assert sorted(os.listdir(tmp_path.parent)) == before  # nothing written next to the layers
    assert r.check("-n")[0] == 0


def test_self_redirect_is_info_only(run):
    r = run("[lower:0]\ndir a\nfile a/x text=x\n[upper]\nxattr . impure=y\ndir a\nxattr a redirect=a\nxattr a origin=@lower:0:a\n")
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == []  # the kernel writes these itself
    code, doc = r.check("-n", "--severity", "redirect-to-self=info")
    assert code == 0 and r.codes(doc, "info") == [("OVL305", "upper", "a")]
    code, doc = r.check("-n", "--severity", "redirect-to-self=error")
    assert code == 4


def test_missing_cover_whiteout_absolute_with_missing_parent(run):
    spec = """
[lower:0]
dir d3/deep
file d3/deep/y text=y
dir d1
[upper]
xattr . impure=y
dir d1
xattr d1 origin=@lower:0:d1
xattr d1 impure=y
dir d1/deepmoved
xattr d1/deepmoved redirect=/d3/deep
xattr d1/deepmoved origin=@lower:0:d3/deep
"""
    r = run(spec)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL306", "upper", "d3/deep")]
    assert r.check("-y")[0] == 1
    assert os.stat(r.path("upper", "d3/deep")).st_rdev == 0
    assert os.path.isdir(r.path("upper", "d3"))
    assert r.check("-n")[0] == 0


def test_no_cover_needed_when_old_parent_is_opaque(run):
    # mv d3/deep d1/deepmoved; rm -rf d3; mkdir d3 -> the old location is hidden by opaque d3.
    spec = """
[lower:0]
dir d3/deep
dir d1
[upper]
xattr . impure=y
dir d1
xattr d1 origin=@lower:0:d1
xattr d1 impure=y
dir d1/deepmoved
xattr d1/deepmoved redirect=/d3/deep
xattr d1/deepmoved origin=@lower:0:d3/deep
dir d3
xattr d3 opaque=y
"""
    assert run(spec).check("-n")[0] == 0


def test_redirect_target_still_merged_resolved_by_origin(run):
    spec = """
[lower:0]
dir b
file b/g text=g
[upper]
xattr . impure=y
dir b
dir b2
xattr b2 redirect=b
xattr b2 origin=@lower:0:b
"""
    r = run(spec)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL308", "upper", "b")]
    assert r.check("-p")[0] == 1
    assert xattr.get(r.path("upper", "b"), "trusted.overlay.opaque") == b"y"
    assert r.check("-n")[0] == 0


def test_duplicate_without_evidence_is_left_by_preen_and_decided_by_yes(run):
    spec = """
[lower:0]
dir b
file b/g text=g
[upper]
xattr . impure=y
whiteout b
dir x2
xattr x2 redirect=b
dir x1
xattr x1 redirect=/b
"""
    r = run(spec)
    code, doc = r.check("-p")
    assert code == 4 and r.codes(doc) == [("OVL307", "upper", "x2")]
    code, doc = r.check("-y")
    assert code == 1
    assert b"trusted.overlay.redirect" in xattr.list(r.path("upper", "x1"))
    assert b"trusted.overlay.redirect" not in xattr.list(r.path("upper", "x2"))
    assert r.check("-n")[0] == 0


def test_duplicate_decided_by_the_claimants_origin(run):
    # Two redirects claim lower:0's b; only x1's origin encodes b: x2's redirect goes, and
    # preen may do it (the claim keeps x1's origin from when the walk read it).
    spec = """
[lower:0]
dir b
file b/g text=g
[upper]
xattr . impure=y
whiteout b
dir x1
xattr x1 redirect=/b
xattr x1 origin=@lower:0:b
dir x2
xattr x2 redirect=b
"""
    r = run(spec)
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL307", "upper", "x2")]
    assert "the origin handle of" in doc["problems"][0]["message"]
    code, doc = r.check("-p")
    assert code == 1
    assert b"trusted.overlay.redirect" in xattr.list(r.path("upper", "x1"))
    assert b"trusted.overlay.redirect" not in xattr.list(r.path("upper", "x2"))
    assert r.check("-n")[0] == 0


def test_redirect_in_lowermost_needs_repair_lowers(run):
    r = run("[lower:0]\nfile f text=f\n[lower:1]\ndir r\nxattr r redirect=/x\n")
    code, doc = r.check("-y")
    assert code == 4 and r.codes(doc) == [("OVL309", "lower:1", "r")]
    assert "repair-lowers" in doc["problems"][0]["note"]
    assert b"trusted.overlay.redirect" in xattr.list(r.path("lower:1", "r"))
    assert r.check("-y", "--repair-lowers")[0] == 1


def test_hidden_lower_subtrees_are_checked_once(run):
    spec = """
[lower:0]
dir x
whiteout x/orphan1
dir b
whiteout b/orphan2
[lower:1]
file keep text=k
[upper]
xattr . impure=y
whiteout x
whiteout b
dir b2
xattr b2 redirect=b
xattr b2 origin=@lower:0:b
"""
    r = run(spec)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL101", "lower:0", "b/orphan2"), ("OVL101", "lower:0", "x/orphan1")]


def test_a_hidden_directory_in_many_layers_is_checked_once_in_each(run):
    """The sub-stack of the topmost hidden `app` takes in those beneath it down to the
    opaque one; the rest are walked from their own layers: every whiteout is judged once,
    against the layers beneath its own."""
    from tests.unit.test_perf_walk import DEEP_HIDDEN

    r = run(DEEP_HIDDEN)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL101", "lower:0", "app/sub/ws0"), ("OVL101", "lower:0", "app/w0"),
                            ("OVL101", "lower:5", "app/w5"), ("OVL102", "lower:2", "app/w2")]


@pytest.mark.parametrize("child", [
    "symlink d/s target\nxattr d/s origin=@lower:0:d/s",  # D6: symlinks count too
    "fifo d/p\nxattr d/p origin=@lower:0:d/p",
    "dir d/m",  # a merged subdirectory
    "dir d/r\nxattr d/r redirect=/d/m",  # a redirected subdirectory
])
def test_missing_impure_reasons(run, child):
    spec = f"""
[lower:0]
dir d/m
symlink d/s target
fifo d/p
[upper]
xattr . impure=y
dir d
xattr d origin=@lower:0:d
{child}
"""
    r = run(spec)
    code, doc = r.check("-n")
    assert ("OVL401", "upper", "d") in r.codes(doc)
    assert r.check("-y")[0] == 1
    assert xattr.get(r.path("upper", "d"), "trusted.overlay.impure") == b"y"


def test_index_bad_names(run):
    r = run("[lower:0]\nfile f text=f\n[upper]\n[work]\ndir index\nwhiteout index/deadbeef\nwhiteout index/#12\n")
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL601", "work", "index/deadbeef")]
    assert r.check("-y")[0] == 1
    assert os.listdir(r.path("work", "index")) == ["#12"]
