"""Origin file handles (passes/origins.py) and the handle syscalls (handles.py).

The handle cases decode and encode real handles with name_to_handle_at/open_by_handle_at.
The pass cases are layer sets written in the fixture language (`xattr a origin=@lower:0:a`
writes the real handle of that object, `hex:` raw bytes), checked in-process through the CLI.
The `kernel` cases copy a layer set made by the real kernel (index=on, nfs_export=on) with
`cp -a` within its filesystem and with `tar` to another one: every handle is then stale, and
the pass must say so without guessing.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
import xattr

from ovlfsck import handles
from ovlfsck.cli import app, invoke
from ovlfsck.fixture import build

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for trusted.* xattrs and open_by_handle_at")
OR = "trusted.overlay.origin"


# =========================================================================== handles


def _fh(path: str) -> handles.OvlFh:
    return handles.encode_for(path, handles.fs_uuid(path) or handles.NULL_UUID)


@root_only
@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo", "chardev"])
def test_open_by_handle_round_trip(tmp_path, kind):
    p = tmp_path / "obj"
    if kind == "file":
        p.write_text("x")
    elif kind == "dir":
        p.mkdir()
    elif kind == "symlink":
        os.symlink("nowhere", p)
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.lstat(p)
    fh = _fh(str(p))
    # The overlay handle survives its own encoding, and decodes back to the same object.
    assert handles.decode(fh.encode()) == fh
    dec = handles.decode_on(str(tmp_path), fh)
    assert dec is not None and dec.key == (st.st_dev, st.st_ino)
    assert stat.S_IFMT(dec.st.st_mode) == stat.S_IFMT(st.st_mode)
    if kind == "dir":
        assert dec.path == str(p)  # directories are always connected
    # The raw syscall returns an fd on the object.
    mfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = handles.open_by_handle_at(mfd, fh.fid_type, fh.fid)
        try:
            assert os.fstat(fd).st_ino == st.st_ino
        finally:
            os.close(fd)
    finally:
        os.close(mfd)


@root_only
def test_a_deleted_object_does_not_decode(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    fh = _fh(str(f))
    f.unlink()
    assert handles.decode_on(str(tmp_path), fh) is None
    # nor does a fid that names nothing
    assert handles.decode_fid(str(tmp_path), fh.fid_type, b"\xff" * len(fh.fid)) is None


@root_only
def test_open_by_handle_at_errors():
    with pytest.raises(OSError):
        handles.open_by_handle_at(-1, 1, b"\0" * 8)
    with pytest.raises(handles.HandleDecodeUnsupported):
        handles.decode_fid("/nonexistent-ovlfsck", 1, b"\0" * 8)


def test_uuid_text_round_trip():
    u = bytes(range(16))
    assert handles.parse_uuid(handles.format_uuid(u)) == u
    assert handles.parse_uuid("0c3664b7ffbf408182dd84ed33ee52e0\n") == bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")
    for bad in ("", "1234", "zz" * 16, "0c3664b7-ffbf"):
        assert handles.parse_uuid(bad) is None


@root_only
def test_fallback_uuid_from_by_uuid_symlinks(tmp_path):
    """Without FS_IOC_GETFSUUID: the /dev/disk/by-uuid link whose device is the layer's."""
    dev = os.stat(tmp_path).st_dev
    by_uuid = tmp_path / "by-uuid"
    by_uuid.mkdir()
    node = tmp_path / "blk"
    os.mknod(node, 0o600 | stat.S_IFBLK, dev)
    other = tmp_path / "other"
    os.mknod(other, 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    os.symlink(other, by_uuid / "11111111-2222-3333-4444-555555555555")
    os.symlink(node, by_uuid / "0c3664b7-ffbf-4081-82dd-84ed33ee52e0")
    got = handles.fallback_uuid(str(tmp_path), by_uuid_dir=str(by_uuid), blkid=None)
    assert got == bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")
    assert handles.fallback_uuid(str(tmp_path), by_uuid_dir=str(tmp_path / "none"), blkid=None) is None


def test_fs_uuid_uses_the_fallback_when_the_ioctl_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(handles, "_ioctl_uuid", lambda path: (None, False))
    monkeypatch.setattr(handles, "fallback_uuid", lambda path: b"F" * 16)
    assert handles.fs_uuid(str(tmp_path)) == b"F" * 16
    monkeypatch.setattr(handles, "_ioctl_uuid", lambda path: (b"I" * 16, True))
    assert handles.fs_uuid(str(tmp_path)) == b"I" * 16


@pytest.mark.kernel
def test_blkid_fallback_matches_the_ioctl(tmp_path):
    from kernel import kutil

    with kutil.LoopFS(tmp_path, "ext4", size_mib=16, name="uuidfs") as fs:
        ioctl = handles.fs_uuid(str(fs.mnt))
        assert ioctl is not None and ioctl != handles.NULL_UUID
        assert handles.fallback_uuid(str(fs.mnt), by_uuid_dir=str(tmp_path / "none")) == ioctl


# =========================================================================== the pass


class Run:
    def __init__(self, tmp_path, capsys, spec, options=""):
        self.root = str(tmp_path)
        self.capsys = capsys
        self.layers = build(spec, self.root)
        lowers = sorted((k for k in self.layers if k.startswith("lower:")), key=lambda k: int(k[6:]))
        opts = "lowerdir=" + ":".join(self.layers[k] for k in lowers)
        if "upper" in self.layers:
            work = self.layers.get("work") or os.path.join(self.root, "work")
            os.makedirs(work, exist_ok=True)
            self.layers["work"] = work
            opts += f",upperdir={self.layers['upper']},workdir={work}"
            for dirpath, _dirs, _files in os.walk(self.layers["upper"]):
                xattr.set(dirpath, "trusted.overlay.impure", b"y", nofollow=True)
        if options:
            opts += "," + options
        self.opts = opts

    def check(self, *args):
        self.capsys.readouterr()
        code = invoke(app, ["check", "--json", *args, "-o", self.opts], "ovlfsck")
        doc = json.loads(self.capsys.readouterr().out)
        assert doc["exit_code"] == code
        return code, doc

    def codes(self, doc, prefix="OVL5"):
        return sorted((p["code"], p["layer"], p["path"]) for p in doc["problems"] if p["code"].startswith(prefix))

    def problem(self, doc, code):
        hits = [p for p in doc["problems"] if p["code"] == code]
        assert len(hits) == 1, doc["problems"]
        return hits[0]

    def path(self, layer, rel=""):
        return os.path.join(self.layers[layer], rel) if rel else self.layers[layer]

    def origin(self, layer, rel=""):
        try:
            return xattr.get(self.path(layer, rel), OR, nofollow=True)
        except OSError:
            return None

    def handle(self, layer, rel="", upper=False):
        p = self.path(layer, rel)
        return handles.encode_for(p, handles.fs_uuid(p) or handles.NULL_UUID, upper=upper).encode()


@pytest.fixture
def run(tmp_path, capsys):
    return lambda spec, options="": Run(tmp_path, capsys, spec, options)


HEALTHY = """
[lower:0]
file f text=f
file old text=old
file x text=lower x
file y text=lower y
dir d
file d/a text=a
dir moved
file moved/m text=m
symlink sl target
fifo pipe
[upper]
file f text=changed
xattr f origin=@lower:0:f
file new_name text=old, renamed after copy-up
xattr new_name origin=@lower:0:old
whiteout old
file x text=y renamed over x
xattr x origin=@lower:0:y
whiteout y
dir d
xattr d origin=@lower:0:d
dir r
xattr r redirect=moved
xattr r origin=@lower:0:moved
whiteout moved
symlink sl target
xattr sl origin=@lower:0:sl
fifo pipe
xattr pipe origin=@lower:0:pipe
file empty text=e
xattr empty origin=hex:
"""


@root_only
def test_kernel_like_origins_are_clean(run):
    """Copy-ups in place, a file renamed after copy-up, a file renamed over another, merged
    and redirected directories, symlinks and fifos, an empty origin: nothing to say."""
    r = run(HEALTHY)
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]
    # ... with the index and nfs_export hints too (the root origin is simply missing).
    r.opts += ",index=on,nfs_export=on"
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


@root_only
@pytest.mark.parametrize("value", ["hex:00fa1d0001", "hex:00fb", "hex:00fb30000100000000000000000000000000000000000000", "garbage"])
def test_malformed_origin_on_a_file_is_removed(run, value):
    r = run(f"[lower:0]\nfile f text=f\n[upper]\nfile f text=g\nxattr f origin={value}\n")
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL501", "upper", "f")]
    assert "invalid origin" in r.problem(doc, "OVL501")["message"]
    assert r.check("-p")[0] == 1 and r.origin("upper", "f") is None
    assert r.check("-n")[0] == 0


@root_only
def test_malformed_origin_on_a_merged_dir_is_re_encoded(run):
    r = run("[lower:0]\ndir d\nfile d/a text=a\n[upper]\ndir d\nxattr d origin=hex:00fa1d0001\n")
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL501", "upper", "d")]
    assert r.check("-p")[0] == 1
    assert r.origin("upper", "d") == r.handle("lower:0", "d")
    assert r.check("-n")[0] == 0


@root_only
def test_malformed_origin_on_a_pure_dir_is_removed(run):
    r = run("[lower:0]\nfile keep text=k\n[upper]\ndir p\nxattr p origin=hex:0001\n")
    assert r.codes(r.check("-n")[1]) == [("OVL501", "upper", "p")]
    assert r.check("-y")[0] == 1 and r.origin("upper", "p") is None


@root_only
@pytest.mark.parametrize("byte3, byte0", [(0x08, 0), (0x01, 0), (0x00, 1)])
def test_unknown_version_flags_or_byte_order(run, byte3, byte0):
    r = run("[lower:0]\nfile f text=f\n[upper]\nfile f text=g\n")
    good = bytearray(r.handle("lower:0", "f"))
    good[3], good[0] = byte3, byte0
    xattr.set(r.path("upper", "f"), OR, bytes(good), nofollow=True)
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL502", "upper", "f")]
    assert r.check("-p")[0] == 1 and r.origin("upper", "f") is None


@root_only
def test_any_endian_flag_is_a_valid_handle(run):
    r = run("[lower:0]\nfile f text=f\n[upper]\nfile f text=g\n")
    h = bytearray(r.handle("lower:0", "f"))
    h[3] = 0x02
    xattr.set(r.path("upper", "f"), OR, bytes(h), nofollow=True)
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == []


@root_only
def test_wrong_file_type(run):
    r = run("[lower:0]\ndir d\nfile f text=f\n[upper]\nfile f text=g\nxattr f origin=@lower:0:d\n"
            "fifo p\nxattr p origin=@lower:0:f\n")
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL503", "upper", "f"), ("OVL503", "upper", "p")]
    msg = [p["message"] for p in doc["problems"] if p["path"] == "f"][0]
    assert "ftype=8000, origin ftype=4000" in msg
    assert r.check("-p")[0] == 1
    assert r.origin("upper", "f") is None and r.origin("upper", "p") is None
    assert r.check("-n")[0] == 0


@root_only
def test_stale_uuid_is_rewritten_from_the_file_at_the_same_path(run):
    """Another filesystem's uuid: the layers were copied; the lower file at the same path,
    of the same type, is what it must name now (OVL520); -p leaves a path-derived target."""
    r = run("[lower:0]\nfile f text=f\nfile other text=o\n[upper]\nfile f text=g\n")
    h = bytearray(r.handle("lower:0", "other"))
    h[5:21] = bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")
    xattr.set(r.path("upper", "f"), OR, bytes(h), nofollow=True)
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL520", "upper", "f")]
    p = r.problem(doc, "OVL520")
    assert "lower:0:'f'" in p["message"] and "the lower file at the same path" in p["message"]
    assert r.check("-p")[0] == 4 and r.origin("upper", "f") == bytes(h)
    assert r.check("-y")[0] == 1 and r.origin("upper", "f") == r.handle("lower:0", "f")
    assert r.check("-n")[0] == 0


@root_only
def test_stale_uuid_with_another_type_at_the_same_path_is_not_rewritten(run):
    r = run("[lower:0]\ndir f\nfile other text=o\n[upper]\nfile f text=g\n")
    h = bytearray(r.handle("lower:0", "other"))
    h[5:21] = bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")
    xattr.set(r.path("upper", "f"), OR, bytes(h), nofollow=True)
    code, doc = r.check("-n")
    assert code == 0 and r.codes(doc) == [("OVL504", "upper", "f")]
    assert "not rewritten" in r.problem(doc, "OVL504")["message"]


@root_only
def test_stale_uuid_is_a_warning_never_preened(run):
    r = run("[lower:0]\nfile other text=f\n[upper]\nfile f text=g\n")
    h = bytearray(r.handle("lower:0", "other"))
    h[5:21] = bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")
    xattr.set(r.path("upper", "f"), OR, bytes(h), nofollow=True)
    code, doc = r.check("-n")
    assert code == 0 and r.codes(doc) == [("OVL504", "upper", "f")]
    assert "there is no lower file at the same path" in r.problem(doc, "OVL504")["message"]
    p = r.problem(doc, "OVL504")
    assert p["severity"] == "warning" and "0c3664b7-ffbf-4081-82dd-84ed33ee52e0" in p["message"]
    assert r.check("-y")[0] == 0 and r.origin("upper", "f") is not None  # warnings are not acted on
    code, doc = r.check("-p", "--severity", "OVL504=error")
    assert code == 4 and r.origin("upper", "f") is not None  # not preen-safe
    assert r.check("-y", "--severity", "OVL504=error")[0] == 1 and r.origin("upper", "f") is None


@root_only
def test_lower_object_gone(run):
    r = run("[lower:0]\nfile f text=f\nfile tmp text=t\n[upper]\nfile f text=g\nxattr f origin=@lower:0:tmp\n")
    os.unlink(r.path("lower:0", "tmp"))
    code, doc = r.check("-n")
    assert r.codes(doc) == [("OVL504", "upper", "f")]
    assert "does not exist any more" in r.problem(doc, "OVL504")["message"]


@root_only
def test_indexed_hardlink_with_a_stale_origin_and_only_upper_aliases_becomes_plain(run):
    """The -y fallback: nlink says every alias is in the upper layer, so no lower alias shows
    the data: origin and nlink go, the index link goes to the quarantine, the data stays."""
    r = run("[lower:0]\nfile f text=f\nfile tmp text=t\n[upper]\nfile f text=g\n"
            "xattr f origin=@lower:0:tmp\nxattr f nlink=U-1\n", options="index=on")
    index = os.path.join(r.path("work"), "index")
    os.makedirs(index, exist_ok=True)
    entry = os.path.join(index, handles.decode(r.origin("upper", "f")).index_name())
    os.link(r.path("upper", "f"), entry)
    os.unlink(r.path("lower:0", "tmp"))
    code, doc = r.check("-n")
    assert code == 4 and ("OVL505", "upper", "f") in r.codes(doc)
    p = r.problem(doc, "OVL505")
    assert "plain upper file" in p["action"] and "no record" in p["message"]
    assert r.check("-p")[0] == 4  # never under -p
    code, doc = r.check("-y")
    assert code & 1 and r.origin("upper", "f") is None and not os.path.lexists(entry)
    assert open(r.path("upper", "f")).read() == "g\n"
    assert r.check("-n")[0] == 0


@root_only
def test_indexed_hardlink_with_a_stale_origin_has_no_automatic_fix(run):
    r = run("[lower:0]\nfile f text=f\nfile tmp text=t\n[upper]\nfile f text=g\n"
            "xattr f origin=@lower:0:tmp\nxattr f nlink=U+1\n", options="index=on")
    os.unlink(r.path("lower:0", "tmp"))
    code, doc = r.check("-y")
    assert code == 4 and r.codes(doc) == [("OVL505", "upper", "f")]
    assert r.problem(doc, "OVL505")["fixed"] is False and r.origin("upper", "f") is not None
    # Without the index the same file is only a warning.
    r.opts = r.opts.replace(",index=on", ",index=off")
    assert r.codes(r.check("-n")[1]) == [("OVL504", "upper", "f")]


@root_only
def test_origin_outside_the_layers(run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o").write_text("o")
    r = run("[lower:0]\nfile f text=f\n[upper]\nfile f text=g\n")
    xattr.set(r.path("upper", "f"), OR, _fh(str(outside / "o")).encode(), nofollow=True)
    code, doc = r.check("-n")
    # Outside the layers (a copy within one filesystem): the file at the same path is the copy.
    assert code == 4 and r.codes(doc) == [("OVL520", "upper", "f")]
    assert r.check("-y")[0] == 1 and r.origin("upper", "f") == r.handle("lower:0", "f")
    # With nothing of that name beneath, it is reported, never guessed.
    xattr.set(r.path("upper", "f"), OR, _fh(str(outside / "o")).encode(), nofollow=True)
    os.unlink(r.path("lower:0", "f"))
    code, doc = r.check("-n")
    assert code == 0 and r.codes(doc) == [("OVL506", "upper", "f")]
    assert r.check("-y", "--severity", "OVL506=error")[0] == 1 and r.origin("upper", "f") is None


@root_only
def test_merged_dir_origin_mismatch(run):
    spec = "[lower:0]\ndir d\nfile d/a text=a\ndir e\n[upper]\ndir d\nxattr d origin=@lower:0:e\n"
    r = run(spec)
    code, doc = r.check("-n")
    assert code == 0 and r.codes(doc) == [("OVL508", "upper", "d")]
    assert "nfs_export" in r.problem(doc, "OVL508")["message"]
    r.opts += ",nfs_export=on"
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL507", "upper", "d")]
    msg = r.problem(doc, "OVL507")["message"]
    assert "lower:0:'e'" in msg and "failed to verify origin" in msg
    # The origin names another directory of the layers (a lost redirect?): -p leaves it.
    assert r.check("-p")[0] == 4 and r.origin("upper", "d") == r.handle("lower:0", "e")
    assert r.check("-y")[0] == 1 and r.origin("upper", "d") == r.handle("lower:0", "d")
    assert r.check("-n")[0] == 0


@root_only
def test_merged_dir_origin_of_a_copy_is_preened(run, tmp_path):
    (tmp_path / "orig").mkdir()
    r = run("[lower:0]\ndir d\nfile d/a text=a\n[upper]\ndir d\n", options="nfs_export=on")
    xattr.set(r.path("upper", "d"), OR, _fh(str(tmp_path / "orig")).encode(), nofollow=True)
    code, doc = r.check("-p")
    assert code == 1 and r.codes(doc) == [("OVL507", "upper", "d")]
    assert r.origin("upper", "d") == r.handle("lower:0", "d")


@root_only
def test_nfs_export_is_inferred_from_directory_index_entries(run):
    r = run("[lower:0]\ndir d\ndir e\n[upper]\ndir d\nxattr d origin=@lower:0:e\n[work]\ndir index/00fb1d00\n")
    assert r.codes(r.check("-n")[1]) == [("OVL507", "upper", "d")]


@root_only
def test_redirected_dir_is_checked_against_its_target(run):
    spec = ("[lower:0]\ndir a\nfile a/x text=x\ndir b\n[upper]\nwhiteout a\ndir r\n"
            "xattr r redirect=a\nxattr r origin=@lower:0:{}\n")
    assert run(spec.format("a")).check("-n", "-o", "nfs_export=on")[0] == 0


@root_only
def test_redirected_dir_with_the_wrong_origin(run):
    r = run("[lower:0]\ndir a\nfile a/x text=x\ndir b\n[upper]\nwhiteout a\ndir r\n"
            "xattr r redirect=a\nxattr r origin=@lower:0:b\n", options="nfs_export=on")
    code, doc = r.check("-y")
    assert code == 1 and r.codes(doc) == [("OVL507", "upper", "r")]
    assert r.origin("upper", "r") == r.handle("lower:0", "a")


@root_only
def test_upper_root_origin(run):
    spec = "[lower:0]\ndir d\nfile f text=f\n[upper]\nfile f text=g\nxattr f origin=@lower:0:f\nxattr . origin=@lower:0:{}\n[work]\ndir index\n"
    assert run(spec.format("")).check("-n")[0] == 0


@root_only
def test_upper_root_origin_mismatch(run):
    r = run("[lower:0]\ndir d\nfile f text=f\n[upper]\nfile f text=g\nxattr f origin=@lower:0:f\n"
            "xattr . origin=@lower:0:d\n[work]\ndir index\n")
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL509", "upper", "")]
    msg = r.problem(doc, "OVL509")["message"]
    assert "failed to verify upper root origin" in msg and "lower:0:'d'" in msg
    # It names a directory of the layers: -p does not decide.
    assert r.check("-p")[0] == 4
    assert r.check("-y")[0] == 1 and r.origin("upper") == r.handle("lower:0")
    assert r.check("-n")[0] == 0


@root_only
def test_upper_root_origin_is_ignored_without_the_index(run):
    r = run("[lower:0]\ndir d\n[upper]\nxattr . origin=@lower:0:d\n")
    assert r.check("-n")[0] == 0
    r.opts += ",index=on"
    assert r.codes(r.check("-n")[1]) == [("OVL509", "upper", "")]


@root_only
def test_upper_root_origin_of_a_copy_is_preened_when_isolated(run, tmp_path):
    (tmp_path / "oldlower").mkdir()
    r = run("[lower:0]\nfile f text=f\n[upper]\nfile f text=g\nxattr f origin=@lower:0:f\n", options="index=on")
    xattr.set(r.path("upper"), OR, _fh(str(tmp_path / "oldlower")).encode(), nofollow=True)
    code, doc = r.check("-p")
    assert code == 1 and r.codes(doc) == [("OVL509", "upper", "")]
    assert r.origin("upper") == r.handle("lower:0")


@root_only
def test_malformed_upper_root_origin_with_the_index(run):
    r = run("[lower:0]\nfile f text=f\n[upper]\nxattr . origin=hex:00fa1d0001\n", options="index=on")
    code, doc = r.check("-p")
    assert code == 1 and r.codes(doc) == [("OVL501", "upper", "")]
    assert r.origin("upper") == r.handle("lower:0")


@root_only
def test_index_dir_upper(run):
    r = run("[lower:0]\nfile f text=f\n[upper]\ndir d\n[work]\ndir index\n")
    up = "trusted.overlay.upper"
    idx = os.path.join(r.path("work"), "index")
    xattr.set(idx, up, r.handle("upper", "", upper=True))
    assert r.check("-n")[0] == 0
    xattr.set(idx, up, r.handle("upper", "d", upper=True))
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL511", "work", "index")]
    assert "failed to verify index dir 'upper' xattr" in r.problem(doc, "OVL511")["message"]
    assert r.check("-y")[0] == 1 and xattr.get(idx, up) == r.handle("upper", "", upper=True)
    xattr.set(idx, up, b"\x00\xfb")
    assert r.codes(r.check("-n")[1]) == [("OVL511", "work", "index")]
    assert r.check("-p")[0] == 1 and r.check("-n")[0] == 0


@root_only
@pytest.mark.parametrize("size", [0, 2, 15, 17])
def test_uuid_xattr_size(run, size):
    r = run("[lower:0]\nfile f text=f\n[upper]\n")
    xattr.set(r.path("upper"), "trusted.overlay.uuid", b"u" * size)
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL512", "upper", "")]
    assert "failed to get uuid" in r.problem(doc, "OVL512")["message"]
    assert r.check("-p")[0] == 1
    assert r.check("-n")[0] == 0


@root_only
def test_uuid_xattr_of_16_bytes_is_fine(run):
    r = run("[lower:0]\nfile f text=f\n[upper]\n")
    xattr.set(r.path("upper"), "trusted.overlay.uuid", os.urandom(16))
    assert r.check("-n") == (0, r.check("-n")[1]) and r.check("-n")[1]["problems"] == []


@root_only
def test_null_uuid_handles_mean_uuid_off(run, monkeypatch):
    """Handles with a null uuid on a filesystem that has one: made with uuid=off."""
    r = run("[lower:0]\ndir d\nfile f text=f\n[upper]\nfile f text=g\ndir d\n")
    null = handles.NULL_UUID
    xattr.set(r.path("upper", "f"), OR, handles.encode_for(r.path("lower:0", "f"), null).encode())
    xattr.set(r.path("upper", "d"), OR, handles.encode_for(r.path("lower:0", "d"), null).encode())
    monkeypatch.setattr(handles, "fs_uuid", lambda path: b"R" * 16)
    code, doc = r.check("-n")
    assert code == 0 and r.codes(doc) == [("OVL513", "upper", "")], doc["problems"]
    assert "uuid=off" in r.problem(doc, "OVL513")["message"]
    r.opts += ",uuid=off"
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == []
    r.opts = r.opts.replace("uuid=off", "uuid=on")
    # uuid=on: a null uuid is no lower filesystem's, as after a copy: rewritten from the paths.
    assert r.codes(r.check("-n")[1]) == [("OVL520", "upper", "d"), ("OVL520", "upper", "f")]


@root_only
def test_two_files_sharing_one_origin(run):
    r = run("[lower:0]\nfile a text=a\n[upper]\nfile a text=a2\nxattr a origin=@lower:0:a\n"
            "file b text=cp -a of a\nxattr b origin=@lower:0:a\n")
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL514", "upper", "b")]
    assert r.check("-p")[0] == 1
    assert r.origin("upper", "b") is None and r.origin("upper", "a") is not None
    assert r.check("-n")[0] == 0


@root_only
def test_hardlinks_sharing_one_origin_are_fine(run):
    r = run("[lower:0]\nfile a text=a\nhardlink a2 a\n[upper]\nfile a text=a\nxattr a origin=@lower:0:a\n"
            "xattr a nlink=U+0\nhardlink b a\n", options="index=on")
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


@root_only
def test_shared_origin_without_evidence_is_not_preened(run):
    r = run("[lower:0]\nfile o text=o\n[upper]\nwhiteout o\nfile a text=a\nxattr a origin=@lower:0:o\n"
            "file b text=b\nxattr b origin=@lower:0:o\n")
    code, doc = r.check("-p")
    assert code == 4 and r.codes(doc) == [("OVL514", "upper", "b")]
    assert r.check("-y")[0] == 1 and r.origin("upper", "a") is not None and r.origin("upper", "b") is None


@root_only
def test_origin_naming_a_file_still_shown(run):
    r = run("[lower:0]\nfile a text=a\nfile shown text=s\n[upper]\nfile a text=a2\nxattr a origin=@lower:0:shown\n")
    code, doc = r.check("-n")
    assert code == 4 and r.codes(doc) == [("OVL514", "upper", "a")]
    assert "still shows" in r.problem(doc, "OVL514")["message"]
    assert r.check("-p")[0] == 1 and r.origin("upper", "a") is None


FORMER_UPPER = """
[lower:1]
file f text=f
file old text=old
dir d
file d/x text=x
[lower:0]
xattr . impure=y
file f text=f changed in the former upper
xattr f origin=@lower:1:f
file renamed text=old
xattr renamed origin=@lower:1:old
whiteout old
dir d
xattr d origin=@lower:1:d
xattr d impure=y
[upper]
"""


@root_only
def test_former_upper_as_lower_is_clean(run):
    r = run(FORMER_UPPER)
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc["problems"]


@root_only
def test_stale_origins_in_a_former_upper(run):
    r = run(FORMER_UPPER + "[lower:0]\nfile bad text=b\nxattr bad origin=hex:00fa1d\ndir e\nxattr e origin=@lower:1:d\ndir e/sub\n"
            "[lower:1]\ndir e\n")
    code, doc = r.check("-n")
    assert code == 0 and r.codes(doc) == [("OVL510", "lower:0", "bad"), ("OVL510", "lower:0", "e")]
    assert all(p["severity"] == "warning" for p in doc["problems"])
    sev = ("--severity", "OVL510=error")
    assert r.check("-y", *sev)[0] == 4  # lower layers: only with --repair-lowers
    code, doc = r.check("-p", "--repair-lowers", *sev)
    assert code == 5 and r.origin("lower:0", "bad") is None  # the invalid value: preen-safe
    assert r.check("-y", "--repair-lowers", *sev)[0] == 1
    assert r.origin("lower:0", "e") == r.handle("lower:1", "e")
    assert r.check("-n", *sev)[0] == 0


@root_only
def test_lowermost_and_unimpure_lower_dirs_are_not_read(run):
    r = run("[lower:0]\nfile f text=f\nxattr f origin=hex:00fa\n[upper]\n")
    assert r.check("-n")[1]["problems"] == []
    r = run("[lower:1]\nfile g text=g\n[lower:0]\nfile f text=f\nxattr f origin=hex:00fa\n[upper]\n")
    assert r.check("-n")[1]["problems"] == []  # lower:0's root is not impure: its files are not read


@root_only
def test_metacopy_files_are_left_to_the_metacopy_pass(run):
    r = run("[lower:0]\nfile m text=data\nfile tmp text=t\n[upper]\nfile m\nxattr m metacopy=\n"
            "xattr m origin=@lower:0:tmp\n", options="metacopy=on")
    os.truncate(r.path("upper", "m"), 5)
    os.unlink(r.path("lower:0", "tmp"))
    assert r.codes(r.check("-n")[1]) == []


# =========================================================================== layer copies (kernel)


@pytest.mark.kernel
def test_copied_layer_sets_are_reported_stale(tmp_path):
    """A kernel-made index=on,nfs_export=on layer set, copied with cp -a within its
    filesystem (the originals kept) and with tar to a second filesystem: the original checks
    clean; the copies report the upper root origin (error), the merged directories (error:
    nfs_export would hide their lower content) and the copied-up files (indexed: error, else
    warning); nothing is re-encoded from a guess."""
    from kernel import kutil

    opts = "index=on,nfs_export=on"
    with kutil.LoopFS(tmp_path, "ext4", size_mib=64, name="a") as fa, \
            kutil.LoopFS(tmp_path, "ext4", size_mib=64, name="b") as fb:
        src = fa.path("set")
        for d in ("lower/d/sub", "upper", "work"):
            (src / d).mkdir(parents=True)
        (src / "lower/d/a").write_text("a\n")
        (src / "lower/f").write_text("f\n")
        (src / "lower/single").write_text("s\n")
        (src / "lower/ren").write_text("r\n")
        os.link(src / "lower/f", src / "lower/hl")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        with kutil.mount_overlay([src / "lower"], src / "upper", src / "work", mnt, opts) as m:
            with open(os.path.join(m, "d", "a"), "a") as fh:
                fh.write("more\n")
            with open(os.path.join(m, "f"), "a") as fh:
                fh.write("more\n")
            os.chmod(os.path.join(m, "single"), 0o600)
            with open(os.path.join(m, "ren"), "a") as fh:  # copied up, then renamed
                fh.write("more\n")
            os.rename(os.path.join(m, "ren"), os.path.join(m, "moved"))
        rc, doc = kutil.check_json(kutil.stack_args([src / "lower"], src / "upper", src / "work", opts))
        assert rc == 0 and doc["problems"] == [], kutil.format_report(doc)

        copy = fa.path("copy")
        subprocess.run(["cp", "-a", str(src), str(copy)], check=True)
        dst = fb.path("set")
        tar = subprocess.Popen(["tar", "--xattrs", "--xattrs-include=*", "-C", str(src), "-cf", "-", "."],
                               stdout=subprocess.PIPE)
        dst.mkdir()
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", str(dst), "-xf", "-"],
                       stdin=tar.stdout, check=True)
        tar.stdout.close()
        assert tar.wait() == 0
        for where, base in (("cp -a", copy), ("tar", dst)):
            args = kutil.stack_args([base / "lower"], base / "upper", base / "work", opts)
            rc, doc = kutil.check_json(args)
            got = {(p["code"], p["path"]) for p in doc["problems"] if p["code"].startswith("OVL5")}
            report = f"{where}:\n" + kutil.format_report(doc)
            assert rc == 4, report
            assert ("OVL509", "") in got, report
            assert ("OVL507", "d") in got, report
            # Every copied-up file has its lower file at the same path: rewritten from it.
            assert {("OVL520", "d/a"), ("OVL520", "f"), ("OVL520", "single")} <= got, report
            # Renamed after its copy-up: nothing at its own path. Within one filesystem the
            # original it names tells its path; on another one only a record could.
            if where == "cp -a":
                moved = [p for p in doc["problems"] if (p["code"], p["path"]) == ("OVL520", "moved")]
                assert moved and "lower:0:'ren'" in moved[0]["message"] and "original" in moved[0]["message"], report
            else:
                assert ("OVL505", "moved") in got, report
            root = [p for p in doc["problems"] if p["code"] == "OVL509"][0]
            assert ("copied" in root["message"]), report
            # Nothing is preened away: the root's re-encode waits for a decision.
            p = kutil.run_ovlfsck("check", "-p", "--json", *args)
            doc = json.loads(p.stdout)
            assert not any(p["fixed"] for p in doc["problems"] if p["code"] in ("OVL509", "OVL520")), \
                kutil.format_report(doc)
            # -y rewrites every handle from the paths; the copy is then clean.
            p = kutil.run_ovlfsck("check", "-y", "--json", *args)
            assert p.returncode == 1, p.stdout[-3000:]
            rc, doc = kutil.check_json(args)
            assert rc == 0 and doc["problems"] == [], kutil.format_report(doc)


@root_only
def test_pure_dir_origin_named_by_a_dir_index_entry_is_not_removed(run):
    """Removing it would fail the mount (the index entry's upper has no origin, H4)."""
    r = run("[lower:0]\ndir gone\nfile keep text=k\n[upper]\ndir p\nxattr p origin=@lower:0:gone\n", options="nfs_export=on")
    fh = handles.decode(r.origin("upper", "p"))
    os.rmdir(r.path("lower:0", "gone"))
    os.makedirs(os.path.join(r.path("work"), "index", fh.index_name()))
    code, doc = r.check("-y", "--severity", "OVL504=error")
    hits = [p for p in doc["problems"] if p["code"] == "OVL504"]
    assert hits and hits[0]["fixed"] is False and "fails the mount" in hits[0]["message"], doc["problems"]
    assert r.origin("upper", "p") is not None


# ------------------------------------------------------------------ elimination (issue 4)

ELIM = """
[lower:0]
file a text=data
hardlink b a
file tmp text=t
file c text=data
hardlink d c
{lower}
[upper]
file moved text={text}
xattr moved origin=@lower:0:tmp
xattr moved nlink={nlink}
whiteout a
{upper}
"""


def _renamed_indexed(run, text="data", nlink="U+0", lower="", upper=""):
    """An indexed hardlink copied up through lower 'a', renamed to 'moved' (a whiteout at
    'a'), its lower alias 'b' still shown; its origin names an object that is gone (as after
    a copy without a record). Lower pair c/d (the same data, both names shown) is a decoy."""
    r = run(ELIM.format(text=text, nlink=nlink, lower=lower, upper=upper), options="index=on")
    index = os.path.join(r.path("work"), "index")
    os.makedirs(index, exist_ok=True)
    entry = os.path.join(index, handles.decode(r.origin("upper", "moved")).index_name())
    os.link(r.path("upper", "moved"), entry)
    os.unlink(r.path("lower:0", "tmp"))
    return r, entry


@root_only
def test_renamed_indexed_hardlink_is_placed_by_elimination(run):
    r, entry = _renamed_indexed(run)
    code, doc = r.check("-n")
    assert code == 4 and ("OVL520", "upper", "moved") in r.codes(doc), doc["problems"]
    p = r.problem(doc, "OVL520")
    assert "elimination" in p["message"] and "lower:0:'a'" in p["message"]
    assert r.check("-p")[0] == 4  # a deduction, never preened
    code, doc = r.check("-y")
    assert code == 1, doc["problems"]
    assert r.origin("upper", "moved") == r.handle("lower:0", "a")
    new_entry = os.path.join(os.path.dirname(entry),
                             handles.decode(r.handle("lower:0", "a")).index_name())
    assert not os.path.lexists(entry) and os.path.samefile(new_entry, r.path("upper", "moved"))
    assert r.check("-n")[0] == 0


@root_only
@pytest.mark.parametrize("why, kw", [
    ("changed since the copy-up", {"text": "data, changed"}),
    ("nlink leaves two lower aliases", {"nlink": "U+1"}),
    ("a second lower pair fits too", {"lower": "file e text=data\nhardlink f e",
                                      "upper": "whiteout e"}),
    ("the only fitting pair is another file's origin",
     {"upper": "file other text=data\nxattr other origin=@lower:0:b"}),
])
def test_elimination_places_nothing_uncertain(run, why, kw):
    r, entry = _renamed_indexed(run, **kw)
    code, doc = r.check("-y")
    assert ("OVL505", "upper", "moved") in r.codes(doc), (why, doc["problems"])
    assert not any(p["code"] == "OVL520" and p["path"] == "moved" for p in doc["problems"]), why
    assert "elimination among the lower hardlinks" in r.problem(doc, "OVL505")["message"]
    assert handles.decode(r.origin("upper", "moved")).index_name() == os.path.basename(entry)
    assert os.path.lexists(entry)
