"""Metacopy files, data-only layers and protattr (passes/metacopy.py).

Most cases are layer sets written in the fixture language and checked in-process through
the CLI; the `kernel` cases check layer sets made by the real kernel (metacopy=on mounts:
chmod/chown copy-ups, renames within and across directories, hard links, index=on, data-only
layers, a former upper reused as a lower) and must be completely clean.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xattr

from ovlfsck.cli import app, invoke
from ovlfsck.fixture import build
from ovlfsck.passes.metacopy import check_metacopy_value, check_protattr_value

ROOT = Path(__file__).resolve().parents[2]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for whiteouts and trusted.* xattrs")

MC = "trusted.overlay.metacopy"
RD = "trusted.overlay.redirect"


class Run:
    def __init__(self, tmp_path, capsys, spec, options="metacopy=on", namespace="trusted"):
        self.root = str(tmp_path)
        self.capsys = capsys
        self.layers = build(spec, self.root, namespace=namespace)
        lowers = sorted((k for k in self.layers if k.startswith("lower:")), key=lambda k: int(k[6:]))
        datas = sorted((k for k in self.layers if k.startswith("data:")), key=lambda k: int(k[5:]))
        opts = "lowerdir=" + ":".join(self.layers[k] for k in lowers)
        if datas:
            opts += "::" + "::".join(self.layers[k] for k in datas)
        if "upper" in self.layers:
            work = self.layers.get("work") or os.path.join(self.root, "work")
            os.makedirs(work, exist_ok=True)
            self.layers["work"] = work
            opts += f",upperdir={self.layers['upper']},workdir={work}"
        if options:
            opts += "," + options
        self.opts = opts
        if "upper" in self.layers:
            # Every upper directory impure, as the kernel leaves the parents of copied-up
            # files (the impure pass is not what these tests are about).
            for dirpath, _dirs, _files in os.walk(self.layers["upper"]):
                xattr.set(dirpath, f"{namespace}.overlay.impure", b"y", nofollow=True)

    def check(self, *args):
        self.capsys.readouterr()
        code = invoke(app, ["check", "--json", *args, "-o", self.opts], "ovlfsck")
        doc = json.loads(self.capsys.readouterr().out)
        assert doc["exit_code"] == code
        return code, doc

    def codes(self, doc, severity=None):
        return sorted((p["code"], p["layer"], p["path"]) for p in doc["problems"]
                      if severity is None or p["severity"] == severity)

    def problem(self, doc, code):
        hits = [p for p in doc["problems"] if p["code"] == code]
        assert len(hits) == 1, doc["problems"]
        return hits[0]

    def path(self, layer, rel):
        return os.path.join(self.layers[layer], rel)

    def sparse(self, layer, rel, size):
        """Make a metacopy upper file the way the kernel does: sparse, the lower's size."""
        os.truncate(self.path(layer, rel), size)

    def getx(self, layer, rel, name):
        try:
            return xattr.get(self.path(layer, rel), name, nofollow=True)
        except OSError:
            return None


@pytest.fixture
def run(tmp_path, capsys):
    count = [0]

    def make(spec, **kw):
        count[0] += 1
        return Run(tmp_path / f"s{count[0]}", capsys, spec, **kw)
    return make


# =========================================================================== value formats


@pytest.mark.parametrize("value, expect", [
    (b"", None),
    (b"\x00", "too-small"),
    (b"\x00\x03\x00", "too-small"),
    (b"\x00\x04\x00\x00", None),  # what the kernel writes as empty, spelled out
    (b"\x00\x24\x00\x01" + bytes(32), None),  # SHA-256 digest
    (b"\x00\x44\x00\x02" + bytes(64), None),  # SHA-512 digest
    (b"\x01\x04\x00\x00", "malformed"),  # version 1 (accepted by lookups, H11b)
    (b"\x00\x05\x00\x00\x00", "malformed"),  # digest bytes without an algorithm
    (b"\x00\x24\x00\x02" + bytes(32), "malformed"),  # SHA-512 needs 64 bytes
    (b"\x00\x44\x00\x01" + bytes(64), "malformed"),
    (b"\x00\x04\x00\x07", "malformed"),  # unknown algorithm
    (b"\x00\x04\x00\x01", "malformed"),  # an algorithm without a digest
    (b"\x00\x30\x00\x01" + bytes(32), "malformed"),  # length field is not the size
    (b"\x00\x45\x00\x02" + bytes(65), "malformed"),  # over 68 bytes
])
def test_metacopy_value_formats(value, expect):
    assert check_metacopy_value(value)[0] == expect


@pytest.mark.parametrize("value, ok", [
    (b"a", True), (b"i", True), (b"ai", True), (b"ia", True), (b"aa", True), (b"a" * 32, True),
    (b"", False), (b"x", False), (b"ai\n", False), (b"a" * 33, False), (b"A", False),
])
def test_protattr_values_follow_the_kernel(value, ok):
    # 6.18 honours any run of a/i up to 32 bytes (measured: "ia" and "aa" set the flags).
    assert (check_protattr_value(value) is None) == ok


# =========================================================================== clean states

HEALTHY = """
[lower:0]
file d/a text=lower a
file d/b text=lower b
file d/c text=lower c
file keep text=k
[upper]
xattr . impure=y
dir d
xattr d origin=@lower:0:d
xattr d impure=y
file d/a
xattr d/a metacopy=
xattr d/a origin=@lower:0:d/a
file d/b2
xattr d/b2 metacopy=
xattr d/b2 redirect=b
xattr d/b2 origin=@lower:0:d/b
whiteout d/b
dir e
xattr e impure=y
file e/c2
xattr e/c2 metacopy=
xattr e/c2 redirect=/d/c
xattr e/c2 origin=@lower:0:d/c
whiteout d/c
"""


def _healthy(run, **kw):
    r = run(HEALTHY, **kw)
    for rel, lower in (("d/a", "d/a"), ("d/b2", "d/b"), ("e/c2", "d/c")):
        r.sparse("upper", rel, os.path.getsize(r.path("lower:0", lower)))
    return r


@root_only
def test_metacopy_files_with_reachable_data_are_clean(run):
    code, doc = _healthy(run).check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


@root_only
def test_metacopy_without_option_is_a_warning_and_with_off_an_error(run):
    code, doc = _healthy(run, options="").check("-n")
    assert code == 0 and [p["code"] for p in doc["problems"]] == ["OVL809"]
    assert "3 metacopy files" in doc["problems"][0]["message"]
    code, doc = _healthy(run, options="metacopy=off").check("-n")
    assert code == 4 and [p["code"] for p in doc["problems"]] == ["OVL808"]
    # verity turns metacopy on by itself
    code, doc = _healthy(run, options="verity=on").check("-n")
    assert code == 0 and doc["problems"] == []


@root_only
def test_userxattr_cannot_follow_metacopy(run):
    r = run("[lower:0]\nfile a text=a\n[upper]\nfile a\nxattr a metacopy=\n", options="userxattr",
            namespace="user")
    r.sparse("upper", "a", 2)
    code, doc = r.check("-n")
    assert code == 4 and "userxattr" in r.problem(doc, "OVL808")["message"]


@root_only
def test_userxattr_data_only_lookup_is_still_followed(run):
    # Measured: with userxattr a lower metacopy file over a data-only layer is served.
    r = run("[data:0]\nfile blobs/x text=X\n[lower:0]\nfile f\nxattr f metacopy=\n"
            "xattr f redirect=/blobs/x\n[upper]\nfile keep text=k\n", options="userxattr",
            namespace="user")
    r.sparse("lower:0", "f", 2)
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


@root_only
def test_chain_through_lower_metacopy_files(run):
    # upper m -> lower:0 m (metacopy, absolute redirect) -> lower:1 x/y (data)
    r = run("""
[lower:1]
file x/y text=data y
[lower:0]
file m
xattr m metacopy=
xattr m redirect=/x/y
[upper]
file m
xattr m metacopy=
""")
    r.sparse("lower:0", "m", 7)
    r.sparse("upper", "m", 7)
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]
    # The same chain with the data gone: both metacopy files are reported.
    os.unlink(r.path("lower:1", "x/y"))
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL804", "lower:0", "m"), ("OVL804", "upper", "m")]
    upper = [p for p in doc["problems"] if p["layer"] == "upper"][0]
    assert "no layer beneath has /x/y (via lower:0:m)" in upper["message"], upper


@root_only
def test_opaque_directory_on_an_absolute_path_does_not_stop_a_metacopy_chain(run):
    # d->stop = !d->metacopy: a metacopy file found under an opaque directory continues the
    # absolute lookup of the upper g; looked up at its own path /o/f, the same file has no
    # data (the opaque directory hides lower:1 o).
    r = run("""
[lower:1]
file o/f text=data
[lower:0]
dir o
xattr o opaque=y
file o/f
xattr o/f metacopy=
[upper]
file g
xattr g metacopy=
xattr g redirect=/o/f
""")
    r.sparse("lower:0", "o/f", 5)
    r.sparse("upper", "g", 5)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL804", "lower:0", "o/f")]


# =========================================================================== malformed values


@root_only
def test_too_small_value_on_a_sparse_file_is_made_empty(run):
    r = run("[lower:0]\nfile d/m text=data\n[upper]\nfile d/m\nxattr d/m metacopy=hex:0000\n")
    r.sparse("upper", "d/m", 5)
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL801", "upper", "d/m")]
    code, doc = r.check("-p")
    assert code == 1 and r.getx("upper", "d/m", MC) == b""
    assert r.check("-n")[0] == 0


@root_only
def test_too_small_value_on_a_file_with_other_data_is_left(run):
    r = run("[lower:0]\nfile d/m text=data\n[upper]\nfile d/m text=else\nxattr d/m metacopy=hex:00\n")
    code, doc = r.check("-y")
    assert code == 4 and r.problem(doc, "OVL801")["fixed"] is False
    assert "differs" in r.problem(doc, "OVL801")["message"]
    assert r.getx("upper", "d/m", MC) == b"\x00"


@root_only
def test_too_small_value_on_a_file_holding_the_lower_data_is_made_empty(run):
    # A crash between a data copy-up and the removal of the xattr leaves such a file.
    r = run("[lower:0]\nfile d/m text=data\n[upper]\nfile d/m text=data\nxattr d/m metacopy=hex:000300\n")
    code, doc = r.check("-p")
    assert code == 1 and r.getx("upper", "d/m", MC) == b""


@root_only
def test_malformed_struct_is_replaced_by_the_empty_value(run):
    r = run("[lower:0]\nfile m text=data\n[upper]\nfile m\nxattr m metacopy=hex:0104000000\n")
    r.sparse("upper", "m", 5)
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL802", "upper", "m")]
    assert "version 1" in r.problem(doc, "OVL802")["message"]
    assert r.check("-p")[0] == 1 and r.getx("upper", "m", MC) == b""
    assert r.check("-n")[0] == 0


@root_only
def test_malformed_struct_under_verity_require_is_not_preened(run):
    r = run("[lower:0]\nfile m text=data\n[upper]\nfile m\nxattr m metacopy=hex:0104000000\n",
            options="metacopy=on,verity=require")
    r.sparse("upper", "m", 5)
    code, doc = r.check("-p")
    assert code == 4 and r.getx("upper", "m", MC) == bytes.fromhex("0104000000")


@root_only
def test_verity_require_wants_digests(run):
    digest = "00240001" + "ab" * 32
    r = run(f"""
[lower:0]
file a text=data
file b text=data
[upper]
file a
xattr a metacopy=
file b
xattr b metacopy=hex:{digest}
""", options="metacopy=on,verity=require")
    r.sparse("upper", "a", 5)
    r.sparse("upper", "b", 5)
    code, doc = r.check("-n")
    assert code == 4 and [p["code"] for p in doc["problems"]] == ["OVL811"]
    assert "1 metacopy file without a digest, first upper:a" in doc["problems"][0]["message"]


@root_only
def test_metacopy_on_non_regular_files_is_removed(run):
    r = run("[lower:0]\nfile keep text=k\n[upper]\ndir d\nxattr d metacopy=\nsymlink s target\n")
    xattr.set(r.path("upper", "s"), MC, b"", nofollow=True)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL803", "upper", "d"), ("OVL803", "upper", "s")]
    assert r.check("-p")[0] == 1
    assert r.getx("upper", "d", MC) is None and r.getx("upper", "s", MC) is None


# =========================================================================== no data


@root_only
@pytest.mark.parametrize("damage, detail", [
    (lambda r: os.unlink(r.path("lower:0", "d/m")), "no layer beneath has 'm'"),
    (lambda r: (os.unlink(r.path("lower:0", "d/m")), os.mkdir(r.path("lower:0", "d/m"))), "a directory"),
    (lambda r: (os.unlink(r.path("lower:0", "d/m")), os.mknod(r.path("lower:0", "d/m"), 0o020000, 0)),
     "whiteout"),
])
def test_missing_lower_data(run, damage, detail):
    r = run("[lower:0]\nfile d/m text=data\n[upper]\nfile d/m\nxattr d/m metacopy=\nxattr d/m origin=@lower:0:d/m\n")
    r.sparse("upper", "d/m", 5)
    damage(r)
    code, doc = r.check("-y")
    p = r.problem(doc, "OVL804")
    assert code == 4 and p["fixed"] is False and detail in p["message"] and p["action"] is None


@root_only
def test_metacopy_in_an_opaque_or_new_directory_has_no_data(run):
    r = run("[lower:0]\nfile d/m text=data\n[upper]\ndir d\nxattr d opaque=y\nfile d/m\nxattr d/m metacopy=\n")
    r.sparse("upper", "d/m", 5)
    code, doc = r.check("-n")
    assert "no lower directory" in r.problem(doc, "OVL804")["message"]


@root_only
def test_wrong_relative_redirect_proven_by_the_origin_is_removed(run):
    r = run("""
[lower:0]
file d/m text=data
[upper]
file d/m
xattr d/m metacopy=
xattr d/m redirect=gone
xattr d/m origin=@lower:0:d/m
""")
    r.sparse("upper", "d/m", 5)
    code, doc = r.check("-n")
    p = r.problem(doc, "OVL804")
    assert code == 4 and "origin names lower:0:d/m" in p["action"]
    code, doc = r.check("-p")
    assert code == 1 and r.getx("upper", "d/m", RD) is None
    assert r.check("-n")[0] == 0


@root_only
def test_wrong_redirect_on_a_hard_linked_file_is_left(run):
    # The redirect belongs to the inode: removing it for d/m would also change d/m2.
    r = run("""
[lower:0]
file d/m text=data
[upper]
file d/m
xattr d/m metacopy=
xattr d/m redirect=gone
xattr d/m origin=@lower:0:d/m
hardlink d/m2 d/m
""")
    r.sparse("upper", "d/m", 5)
    code, doc = r.check("-y")
    hits = [p for p in doc["problems"] if p["code"] == "OVL804"]
    assert code == 4 and len(hits) == 2 and not any(p["fixed"] for p in hits)
    assert all("2 links" in p["message"] for p in hits)


@root_only
def test_wrong_redirect_without_proof_is_left(run):
    # No origin, or an origin naming another file: the own path is not proven to be the data.
    for origin in ("", "xattr d/m origin=@lower:0:d/other\n"):
        r = run(f"""
[lower:0]
file d/m text=data
file d/other text=other
[upper]
file d/m
xattr d/m metacopy=
xattr d/m redirect=gone
{origin}""")
        r.sparse("upper", "d/m", 5)
        code, doc = r.check("-y")
        assert code == 4 and r.problem(doc, "OVL804")["fixed"] is False
        assert r.getx("upper", "d/m", RD) == b"gone"


@root_only
@pytest.mark.parametrize("value, fragment", [
    (b"a/b", "relative value containing '/'"),
    (b"/d/../d/m", "'..'"),
    (b"//d/m", "empty component"),
])
def test_invalid_redirects_on_metacopy_files(run, value, fragment):
    r = run("[lower:0]\nfile d/m text=data\n[upper]\nfile d/m\nxattr d/m metacopy=\nxattr d/m origin=@lower:0:d/m\n")
    r.sparse("upper", "d/m", 5)
    xattr.set(r.path("upper", "d/m"), RD, value, nofollow=True)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL805", "upper", "d/m")]
    assert fragment in r.problem(doc, "OVL805")["message"]
    assert r.check("-p")[0] == 1 and r.getx("upper", "d/m", RD) is None


@root_only
def test_lowermost_metacopy_file_has_nothing_beneath(run):
    r = run("[lower:0]\nfile m\nxattr m metacopy=\nfile keep text=k\n")
    r.sparse("lower:0", "m", 5)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL804", "lower:0", "m")]
    assert "lowermost" in r.problem(doc, "OVL804")["message"]


@root_only
def test_hidden_lower_metacopy_file_is_checked_but_not_counted_for_the_option(run):
    # lower:0 m is covered by a plain upper file: never looked up, still checked.
    r = run("[lower:1]\nfile keep text=k\n[lower:0]\nfile m\nxattr m metacopy=\n[upper]\nfile m text=own\n",
            options="")
    r.sparse("lower:0", "m", 5)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL804", "lower:0", "m")]


# =========================================================================== origin (H29)

H29 = """
[lower:0]
file d/m text=data m
file d/other text=data o
[upper]
file d/m
xattr d/m metacopy=
xattr d/m origin=@lower:0:d/m
"""


@root_only
def test_origin_mismatch_under_index_proven_by_origin_is_fixed(run):
    r = run(H29, options="metacopy=on,index=on")
    r.sparse("upper", "d/m", 7)
    xattr.set(r.path("upper", "d/m"), RD, b"other", nofollow=True)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL807", "upper", "d/m")]
    assert r.check("-p")[0] == 1 and r.getx("upper", "d/m", RD) is None
    assert r.check("-n")[0] == 0


@root_only
def test_origin_mismatch_without_the_index_shows_the_wrong_data(run):
    r = run(H29, options="metacopy=on")
    r.sparse("upper", "d/m", 7)
    xattr.set(r.path("upper", "d/m"), RD, b"other", nofollow=True)
    code, doc = r.check("-n")  # index=off: no ESTALE, the other file's data is shown (H29b)
    assert "shows that file's data" in r.problem(doc, "OVL807")["message"]
    os.makedirs(os.path.join(r.layers["work"], "index"))  # work/index, no hint: index in use
    code, doc = r.check("-n")
    assert "ESTALE" in r.problem(doc, "OVL807")["message"]
    assert r.check("-n", "--severity", "OVL807=error")[0] == 4


@root_only
def test_origin_mismatch_without_redirect_is_left(run):
    r = run(H29.replace("origin=@lower:0:d/m", "origin=@lower:0:d/other"), options="metacopy=on,index=on")
    r.sparse("upper", "d/m", 7)
    code, doc = r.check("-y")
    assert code == 4 and r.problem(doc, "OVL807")["fixed"] is False


@root_only
def test_stale_origin_is_not_verified(run):
    # An origin that no longer decodes means "origin unknown": the kernel does not verify it.
    spec = H29.replace("origin=@lower:0:d/m", "origin=@lower:0:d/tmp")
    r = run(spec.replace("[upper]", "file d/tmp text=t\n[upper]"), options="metacopy=on,index=on")
    r.sparse("upper", "d/m", 7)
    # The spec builds lower:0 before the origin is computed; delete the target afterwards.
    os.unlink(r.path("lower:0", "d/tmp"))
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


# =========================================================================== data-only layers

DATA_ONLY = """
[data:0]
file blobs/x text=DATA-X
[lower:0]
file f
xattr f metacopy=
xattr f redirect=/blobs/x
"""


@root_only
def test_data_only_layer_reached_by_absolute_redirect(run):
    r = run(DATA_ONLY, options="")
    r.sparse("lower:0", "f", 7)
    code, doc = r.check("-n")
    # The lazy data-only lookup needs neither metacopy=on nor redirect_dir (B2).
    assert code == 0 and doc["problems"] == [], doc["problems"]


@root_only
def test_data_only_lookup_with_a_regular_layer_beneath_needs_metacopy(run):
    r = run(DATA_ONLY + "[lower:1]\nfile keep text=k\n", options="metacopy=off")
    r.sparse("lower:0", "f", 7)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL808", None, "")]


@root_only
@pytest.mark.parametrize("setup, fragment", [
    (lambda r: os.unlink(r.path("data:0", "blobs/x")), "no blobs/x"),
    (lambda r: (os.rename(r.path("data:0", "blobs"), r.path("data:0", "real")),
                os.symlink("real", r.path("data:0", "blobs"))), "symlink"),
    (lambda r: (os.unlink(r.path("data:0", "blobs/x")), os.mkdir(r.path("data:0", "blobs/x"))),
     "not a regular file"),
])
def test_data_only_target_missing(run, setup, fragment):
    r = run(DATA_ONLY)
    r.sparse("lower:0", "f", 7)
    setup(r)
    code, doc = r.check("-y")
    p = r.problem(doc, "OVL806")
    assert code == 4 and fragment in p["message"] and p["layer"] == "lower:0"


@root_only
def test_data_only_lookup_disarmed_by_a_lower_directory(run):
    # Measured on 6.18: a directory on the absolute path in a lower layer beneath resets
    # d->absolute_redirect, and the lookup fails with EIO instead of using the data layer.
    r = run(DATA_ONLY + "[lower:1]\ndir blobs\n")
    r.sparse("lower:0", "f", 7)
    code, doc = r.check("-n")
    assert "not armed" in r.problem(doc, "OVL804")["message"]


@root_only
def test_upper_metacopy_cannot_use_a_data_only_layer_directly(run):
    r = run(DATA_ONLY + "[upper]\nfile u\nxattr u metacopy=\nxattr u redirect=/blobs/x\n")
    r.sparse("lower:0", "f", 7)
    r.sparse("upper", "u", 7)
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL804", "upper", "u")]
    assert "cannot use directly" in r.problem(doc, "OVL804")["message"]


@root_only
def test_copied_up_data_only_file_is_clean(run):
    # What chmod through the mount makes of lower:0 f (B2 + copy-up): an upper metacopy
    # file over the lower metacopy file, whose redirect leads into the data layer.
    r = run(DATA_ONLY + "[upper]\nfile f\nxattr f metacopy=\nxattr f origin=@lower:0:f\n")
    r.sparse("lower:0", "f", 7)
    r.sparse("upper", "f", 7)
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


@root_only
def test_size_mismatch_is_a_warning(run):
    r = run("[lower:0]\nfile m text=0123456789\n[upper]\nfile m\nxattr m metacopy=\n")
    r.sparse("upper", "m", 3)
    code, doc = r.check("-n")
    assert code == 0 and r.codes(doc, "warning") == [("OVL810", "upper", "m")]


# =========================================================================== protattr


@root_only
def test_protattr(run):
    r = run("""
[lower:0]
file keep text=k
file lower_bad text=x
xattr lower_bad protattr=zz
[upper]
file a text=a
xattr a protattr=ai
file b text=b
xattr b protattr=ia
file c text=c
xattr c protattr=x
dir d
xattr d protattr=hex:
file e text=e
xattr e protattr=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
""")
    code, doc = r.check("-n")
    # lower layers: never read by the kernel, not checked.
    assert r.codes(doc) == [("OVL851", "upper", "c"), ("OVL851", "upper", "d"), ("OVL851", "upper", "e")]
    assert r.check("-p")[0] == 1
    assert r.getx("upper", "c", "trusted.overlay.protattr") is None
    assert r.getx("upper", "a", "trusted.overlay.protattr") == b"ai"
    assert r.check("-n")[0] == 0


# =========================================================================== kernel-made


def _kutil():
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from kernel import kutil
    return kutil


def _write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _check_clean(kutil, opts):
    p = kutil.run_ovlfsck("check", "-n", "--json", "-o", opts)
    doc = json.loads(p.stdout)
    assert p.returncode == 0 and doc["problems"] == [], kutil.format_report(doc)
    return doc


def _mount(kutil, opts, mnt):
    mnt = Path(mnt)
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    return mnt


@pytest.mark.kernel
@pytest.mark.parametrize("fstype, options", [
    ("ext4", "metacopy=on"), ("ext4", "metacopy=on,index=on"),
    ("xfs", "metacopy=on,index=on"), ("tmpfs", "metacopy=on,index=on"),
])
def test_kernel_made_metacopy_states_are_clean(tmp_path, fstype, options):
    kutil = _kutil()
    if fstype == "xfs" and not kutil.have_mkfs("xfs"):
        pytest.skip("no mkfs.xfs")
    with kutil.LoopFS(tmp_path, fstype, size_mib=None if fstype == "xfs" else 64) as fs:
        b = Path(fs.mnt)
        low, up, wk = b / "zml", b / "zmu", b / "zmw"
        for d in (low, up, wk):
            d.mkdir()
        for n in "a b c e h m s big".split():
            _write(low / "d1" / n, f"lower {n}\n" * (5000 if n == "big" else 1))
        _write(low / "d2" / "x", "x\n")
        os.link(low / "d1" / "h", low / "d1" / "h2")
        opts = f"lowerdir={low},upperdir={up},workdir={wk},{options}"
        marker = kutil.dmesg_mark()
        with kutil.mount_overlay([low], up, wk, tmp_path / "m", options) as m:
            m = Path(m)
            os.chmod(m / "d1" / "a", 0o600)                       # metadata-only copy-up
            os.chown(m / "d1" / "big", 1000, 1000)
            os.chmod(m / "d1" / "b", 0o600)
            os.rename(m / "d1" / "b", m / "d1" / "b2")            # relative redirect
            os.rename(m / "d1" / "c", m / "d2" / "c")             # absolute redirect
            os.rename(m / "d1" / "e", m / "d1" / "e2")            # rename alone copies up meta
            os.chmod(m / "d1" / "h", 0o600)                       # lower hard link
            os.link(m / "d2" / "x", m / "d2" / "xl")              # link(): absolute redirect
            os.chmod(m / "d1" / "m", 0o600)
            with open(m / "d1" / "m", "a") as fh:                  # data copy-up drops metacopy
                fh.write("more\n")
            os.chmod(m / "d1" / "s", 0o600)
            os.rename(m / "d1" / "s", m / "d2" / "s")
            os.rename(m / "d2" / "s", m / "d1" / "s")             # and back
        assert os.getxattr(up / "d1" / "a", MC) == b""
        assert os.getxattr(up / "d1" / "b2", RD) == b"b"
        assert os.getxattr(up / "d2" / "c", RD) == b"/d1/c"
        _check_clean(kutil, opts)
        with kutil.mount_overlay([low], up, wk, tmp_path / "m", options) as m:
            os.chmod(Path(m) / "d2" / "c", 0o640)
            os.rename(Path(m) / "d2" / "xl", Path(m) / "d1" / "xl")
        _check_clean(kutil, opts)
        lines = [ln for ln in kutil.dmesg_overlay_since(marker) if "zm" in ln]
        assert not lines, lines


@pytest.mark.kernel
def test_kernel_made_former_upper_as_middle_layer_is_clean(tmp_path):
    kutil = _kutil()
    with kutil.LoopFS(tmp_path, "ext4", size_mib=64) as fs:
        b = Path(fs.mnt)
        low, mid, wk1, up, wk2 = (b / n for n in ("zml", "zmm", "zmw1", "zmu", "zmw2"))
        for d in (low, mid, wk1, up, wk2):
            d.mkdir()
        for n in "a b c".split():
            _write(low / "d" / n, f"lower {n}\n")
        with kutil.mount_overlay([low], mid, wk1, tmp_path / "m", "metacopy=on") as m:
            os.chmod(Path(m) / "d" / "a", 0o600)
            os.chmod(Path(m) / "d" / "b", 0o600)
            os.rename(Path(m) / "d" / "b", Path(m) / "b")
        # mid is now a lower holding metacopy files whose data is in low.
        with kutil.mount_overlay([mid, low], up, wk2, tmp_path / "m", "metacopy=on") as m:
            os.chown(Path(m) / "d" / "a", 1000, 1000)
            os.chmod(Path(m) / "b", 0o640)
            os.rename(Path(m) / "d" / "c", Path(m) / "c")
            assert (Path(m) / "d" / "a").read_text() == "lower a\n"
        _check_clean(kutil, f"lowerdir={mid}:{low},upperdir={up},workdir={wk2},metacopy=on")


@pytest.mark.kernel
@pytest.mark.parametrize("style", ["legacy", "append"])
def test_kernel_served_data_only_layers_are_clean(tmp_path, style):
    """B2/B3: a metadata layer made by a tool (sparse metacopy files with absolute
    redirects) over a data-only layer; the kernel serves the data, also after chmod copy-ups
    through an upper. ovlfsck must call both states clean."""
    kutil = _kutil()
    with kutil.LoopFS(tmp_path, "ext4", size_mib=64) as fs:
        b = Path(fs.mnt)
        meta, data, up, wk = (b / n for n in ("zmmeta", "zmdata", "zmu", "zmw"))
        for d in (meta, data, up, wk):
            d.mkdir()
        _write(data / "blobs" / "ab" / "cdef", "DATA-CONTENT\n")
        _write(data / "blobs" / "12" / "3456", "OTHER\n")
        for name, blob in (("f", "/blobs/ab/cdef"), ("sub/g", "/blobs/12/3456")):
            p = meta / name
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as fh:
                fh.truncate(os.path.getsize(data / blob.lstrip("/")))
            os.setxattr(p, MC, b"")
            os.setxattr(p, RD, blob.encode())
        lower = (f"lowerdir={meta}::{data}" if style == "legacy"
                 else f"lowerdir+={meta},datadir+={data}")
        mnt = tmp_path / "m"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", lower, str(mnt)], check=True)
        try:
            assert (mnt / "f").read_text() == "DATA-CONTENT\n"
            assert (mnt / "sub" / "g").read_text() == "OTHER\n"
        finally:
            kutil.umount(mnt)
        _check_clean(kutil, lower)
        rw = f"{lower},upperdir={up},workdir={wk},metacopy=on"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", rw, str(mnt)], check=True)
        try:
            os.chmod(mnt / "f", 0o600)
            os.rename(mnt / "sub" / "g", mnt / "g2")
            assert (mnt / "g2").read_text() == "OTHER\n"
        finally:
            kutil.umount(mnt)
        assert os.getxattr(up / "f", MC) == b""
        _check_clean(kutil, rw)


@pytest.mark.kernel
def test_kernel_made_data_copy_up_after_rename_is_clean(tmp_path):
    """A data copy-up removes the metacopy xattr of a renamed or linked file but keeps its
    redirect (6.18): the file is complete and the redirect ignored, not a problem."""
    kutil = _kutil()
    with kutil.LoopFS(tmp_path, "ext4", size_mib=64) as fs:
        b = Path(fs.mnt)
        low, up, wk = b / "zml", b / "zmu", b / "zmw"
        for d in (low, up, wk):
            d.mkdir()
        for n in "a b c".split():
            _write(low / "d" / n, f"lower {n}\n")
        with kutil.mount_overlay([low], up, wk, tmp_path / "m", "metacopy=on") as m:
            m = Path(m)
            os.rename(m / "d" / "a", m / "d" / "a2")
            os.rename(m / "d" / "b", m / "b2")
            os.link(m / "d" / "c", m / "d" / "c2")
            for n in ("d/a2", "b2", "d/c2"):
                with open(m / n, "a") as fh:
                    fh.write("more\n")
        # The data copy-up removed metacopy but kept the redirects (6.18).
        assert os.getxattr(up / "d" / "a2", RD) == b"a"
        assert os.getxattr(up / "b2", RD) == b"/d/b"
        assert MC not in os.listxattr(up / "d" / "a2")
        _check_clean(kutil, f"lowerdir={low},upperdir={up},workdir={wk},metacopy=on")
