"""Mount-option parsing and the Stack model (cli.md "Naming the layers")."""
import os

import pytest

from ovlfsck.errors import UsageError
from ovlfsck.stack import Role, build_stack, parse_mount_options, split_lowerdir


def test_lowerdir_split_with_escapes_and_data_layers():
    lowers, datas = split_lowerdir(r"/a\:b:/c\,d::/data1::/data2")
    assert lowers == ["/a:b", "/c,d"]
    assert datas == ["/data1", "/data2"]


@pytest.mark.parametrize("bad", ["", ":/a", "/a:", "::/d", "/a::", "/a::::/d"])
def test_lowerdir_empty_components_are_usage_errors(bad):
    with pytest.raises(UsageError):
        split_lowerdir(bad)


def test_comma_escape_and_later_values_win():
    p = parse_mount_options([r"lowerdir=/x\,y,upperdir=/u1,workdir=/w", "upperdir=/u2,index=on"])
    assert p.lowers == ["/x,y"]
    assert p.upper == "/u2"
    assert p.features == {"index": True}


def test_new_style_lowerdir_plus_and_datadir_plus():
    p = parse_mount_options(["lowerdir+=/l1,lowerdir+=/l2,datadir+=/d1,upperdir=/u,workdir=/w"])
    assert p.lowers == ["/l1", "/l2"] and p.datas == ["/d1"]


def test_mixing_legacy_and_new_lowerdir_is_refused():
    with pytest.raises(UsageError):
        parse_mount_options(["lowerdir=/a,lowerdir+=/b"])
    with pytest.raises(UsageError):
        parse_mount_options(["datadir+=/d,lowerdir+=/b"])


def test_feature_hints_and_unknown_keys():
    p = parse_mount_options(["lowerdir=/l,redirect_dir=follow,uuid=off,xino=auto,userxattr,volatile,"
                             "metacopy=off,nfs_export=on,verity=require,default_permissions,foo=bar"])
    assert p.features == {"redirect_dir": "follow", "uuid": "off", "xino": "auto", "userxattr": True,
                          "volatile": True, "metacopy": False, "nfs_export": True, "verity": "require"}
    assert p.ignored == ["default_permissions", "foo=bar"]


@pytest.mark.parametrize("opt", ["index=maybe", "redirect_dir=yes", "uuid=random", "userxattr=on"])
def test_bad_feature_values_are_usage_errors(opt):
    with pytest.raises(UsageError):
        parse_mount_options([f"lowerdir=/l,{opt}"])


def test_build_stack_orders_and_names_layers(tmp_path):
    for d in ("l1", "l2", "d1", "u", "w"):
        (tmp_path / d).mkdir()
    s = build_stack([f"lowerdir={tmp_path}/l1::{tmp_path}/d1"], lowers=[str(tmp_path / "l2")],
                    upper=str(tmp_path / "u"), work=str(tmp_path / "w"))
    assert [lay.name for lay in s.namespace_layers] == ["upper", "lower:0", "lower:1"]
    assert [lay.depth for lay in s.namespace_layers] == [0, 1, 2]
    assert s.datas[0].name == "data:0" and s.datas[0].role is Role.DATA
    assert s.work.name == "work"


def test_layer_roots_are_resolved_through_symlinks(fs):
    # pyfakefs: layer roots given through a symlink resolve to the real directory.
    fs.create_dir("/real/lower")
    fs.create_symlink("/alias", "/real")
    s = build_stack(["lowerdir=/alias/lower"])
    assert s.lowers[0].path == "/real/lower"


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "l").mkdir()
    monkeypatch.chdir(tmp_path)
    s = build_stack(["lowerdir=l"])
    assert s.lowers[0].path == os.path.realpath(tmp_path / "l")


@pytest.mark.parametrize("kwargs", [
    dict(options=[]),
    dict(options=["lowerdir=/l,upperdir=/u"]),
    dict(options=["lowerdir=/l,workdir=/w"]),
])
def test_incomplete_stacks_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        build_stack(**kwargs)
