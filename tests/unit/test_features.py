"""The feature report: what the layers use and the mount options that follow."""
import json
import os

import pytest

from ovlfsck.cli import app, invoke
from ovlfsck.fixture import build

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for trusted.* xattrs")


def features(tmp_path, capsys, spec, *extra_opts):
    layers = build(spec, str(tmp_path))
    lowers = sorted(k for k in layers if k.startswith("lower:"))
    datas = sorted(k for k in layers if k.startswith("data:"))
    low = ":".join(layers[k] for k in lowers) + "".join("::" + layers[k] for k in datas)
    opts = f"lowerdir={low}"
    if "upper" in layers:
        work = layers.get("work") or os.path.join(str(tmp_path), "work")
        os.makedirs(work, exist_ok=True)
        opts += f",upperdir={layers['upper']},workdir={work}"
    for o in extra_opts:
        opts += "," + o
    capsys.readouterr()
    invoke(app, ["check", "-n", "--json", "-o", opts], "ovlfsck")
    return json.loads(capsys.readouterr().out)["features"]


def test_plain_layers_use_nothing(tmp_path, capsys):
    f = features(tmp_path, capsys, "[lower:0]\nfile a text=a\n[upper]\nfile b text=b\n")
    assert f == {"used": {}, "mount_options": "", "notes": []}


def test_redirects_index_and_nfs_export(tmp_path, capsys):
    spec = """
[lower:0]
dir d
file d/x text=x
file f text=f
[upper]
xattr . impure=y
xattr . origin=@lower:0:.
dir e
xattr e redirect=d
xattr e origin=@lower:0:d
whiteout d
[work]
dir index
"""
    f = features(tmp_path, capsys, spec)
    assert set(f["used"]) == {"redirect", "index"}
    assert f["mount_options"] == "redirect_dir=on,index=on"


def test_index_entries_tell_index_and_nfs_export(tmp_path, capsys):
    from ovlfsck import handles
    (tmp_path / "lower0").mkdir()
    (tmp_path / "lower0" / "f").write_text("f")
    uuid = handles.fs_uuid(str(tmp_path)) or handles.NULL_UUID
    name = handles.encode_for(str(tmp_path / "lower0" / "f"), uuid).index_name()
    spec = f"[lower:0]\nfile g text=g\n[upper]\n[work]\ndir index\nwhiteout index/{name}\n"
    f = features(tmp_path, capsys, spec)
    assert {"index", "nfs_export"} <= set(f["used"])
    assert "index=on" in f["mount_options"] and "nfs_export=on" in f["mount_options"]


def test_metacopy_and_conflicts(tmp_path, capsys):
    spec = """
[lower:0]
file m text=data
[upper]
file m
xattr m metacopy=
"""
    f = features(tmp_path, capsys, spec, "nfs_export=on")
    assert "metacopy" in f["used"]
    assert "metacopy=on" in f["mount_options"] and "redirect_dir=on" not in f["mount_options"]


def test_userxattr_with_redirects_is_a_note(tmp_path, capsys):
    spec = """
[lower:0]
dir d
[upper]
dir e
"""
    layers = build(spec, str(tmp_path))
    import xattr
    xattr.set(os.path.join(layers["upper"], "e"), "user.overlay.redirect", b"d")
    xattr.set(layers["upper"], "user.overlay.impure", b"y")
    (tmp_path / "work").mkdir()
    capsys.readouterr()
    invoke(app, ["check", "-n", "--json", "-o",
                 f"lowerdir={layers['lower:0']},upperdir={layers['upper']},workdir={tmp_path}/work"], "ovlfsck")
    f = json.loads(capsys.readouterr().out)["features"]
    assert {"userxattr", "redirect"} <= set(f["used"])
    assert f["mount_options"].startswith("userxattr")
    assert any("nofollow" in n for n in f["notes"])


def test_data_only_layers_and_xwhiteouts(tmp_path, capsys):
    spec = """
[lower:0]
dir x
xattr x opaque=x
[lower:1]
dir x
[data:0]
file blob text=data
"""
    f = features(tmp_path, capsys, spec)
    assert {"data_only", "xwhiteouts"} <= set(f["used"])


def test_given_option_contradicting_the_layers_is_noted(tmp_path, capsys):
    spec = "[lower:0]\ndir d\n[upper]\nxattr . impure=y\ndir e\nxattr e redirect=d\nwhiteout d\n"
    f = features(tmp_path, capsys, spec, "redirect_dir=nofollow")
    assert any("nofollow" in n for n in f["notes"])
