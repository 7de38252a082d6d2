"""Pre-flight checks (ovlfsck/preflight.py) on real temp directories.

Mount tables are synthetic mountinfo files; the layers they name are real directories, so
matching by device and inode is exercised for real. Real mounts are in
tests/kernel/test_preflight_kernel.py.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xattr

from ovlfsck import preflight
from ovlfsck.errors import ExitCode, OperationalError
from ovlfsck.preflight import (
    detect_namespace,
    find_overlay_uses,
    has_cap_sys_admin,
    overlay_layer_options,
    overlay_mounts_using,
    parse_mountinfo,
    parse_mountinfo_text,
    run_preflight,
    unoctal,
)
from ovlfsck.stack import Features, Layer, Role, Stack, build_stack

REPO = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0


# --------------------------------------------------------------------------- helpers


def kernel_show(path: str) -> str:
    """A layer path as 6.18 shows it in mountinfo (measured): the overlay escapes
    `\\`, `,` and `:` with a backslash; mountinfo then octal-escapes space, tab, newline,
    backslash and comma."""
    ovl = path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\," else c for c in ovl)


def mi_escape(path: str) -> str:
    """Mountpoint escaping in mountinfo (fs/proc_namespace.c: mangle " \\t\\n\\\\")."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def overlay_line(mountpoint, super_opts: str, mount_id: int = 900) -> str:
    return (
        f"{mount_id} 1 0:{mount_id} / {mi_escape(os.fspath(mountpoint))} rw,relatime "
        f"shared:{mount_id} - overlay overlay rw,{super_opts}"
    )


def write_mountinfo(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def mkdirs(base: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        p = base / name
        p.mkdir(parents=True, exist_ok=True)
        out.append(p)
    return out


@pytest.fixture(autouse=True)
def _trusted_readable(monkeypatch):
    """Unprivileged runs: pretend CAP_SYS_ADMIN so that tests about other things reach
    their point (the privilege tests patch it to False, or drop it for real)."""
    if not has_cap_sys_admin():
        monkeypatch.setattr(preflight, "has_cap_sys_admin", lambda *a, **k: True)


@pytest.fixture
def empty_mountinfo(tmp_path):
    return write_mountinfo(tmp_path)


@pytest.fixture
def layers(tmp_path):
    """A plain upper/work/two-lower stack on the temp filesystem."""
    base = tmp_path / "s"
    up, wk, l0, l1 = mkdirs(base, "upper", "work", "l0", "l1")
    stack = build_stack(lowers=[str(l0), str(l1)], upper=str(up), work=str(wk))
    return stack


def raises_op(excinfo) -> str:
    assert excinfo.value.exit_code == ExitCode.OPERATIONAL == 8
    assert isinstance(excinfo.value, OperationalError)
    return str(excinfo.value)


# --------------------------------------------------------------------------- parsing


def test_parse_mountinfo_fields_and_escapes():
    text = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
        "46 27 0:39 /sub /mnt/a\\040b ro,relatime shared:5 master:3 - xfs /dev/loop\\0401 rw\n"
        "garbage line\n"
        "47 27 0:40 / /mnt/e rw - tmpfs  rw\n"
    )
    entries = parse_mountinfo_text(text.encode())
    assert [e.mount_id for e in entries] == [27, 46, 47]
    root, sub, empty_src = entries
    assert root.fs_type == "ext4" and root.mountpoint == "/" and not root.read_only
    assert root.dev == os.makedev(254, 0)
    assert sub.mountpoint == "/mnt/a b"
    assert sub.root == "/sub"
    assert sub.fs_type == "xfs" and sub.source == "/dev/loop 1"
    assert sub.read_only  # per-mount "ro"
    assert sub.parent_id == 27
    assert empty_src.source == "" and empty_src.fs_type == "tmpfs"


def test_read_only_from_super_options():
    (entry,) = parse_mountinfo_text(
        b"49 27 0:41 / /m2 rw,relatime - overlay overlay ro,lowerdir=rl::d1,redirect_dir=on\n"
    )
    assert entry.read_only


def test_unoctal():
    assert unoctal("/a\\040b\\134\\054c") == "/a b\\,c"
    assert unoctal("plain") == "plain"
    assert unoctal("\\x") == "\\x"


# The exact super options 6.18 showed for mounts made in /tmp/pfexp (see module docs).
MEASURED = [
    (
        "rw,lowerdir=/tmp/pfexp/l\\040a:/tmp/pfexp/l\\134\\054b:/tmp/pfexp/l\\134:c,"
        "upperdir=/tmp/pfexp/u,workdir=/tmp/pfexp/w,uuid=on",
        [
            ("lowerdir", "/tmp/pfexp/l a"),
            ("lowerdir", "/tmp/pfexp/l,b"),
            ("lowerdir", "/tmp/pfexp/l:c"),
            ("upperdir", "/tmp/pfexp/u"),
            ("workdir", "/tmp/pfexp/w"),
        ],
    ),
    ("ro,lowerdir=rl::d1,redirect_dir=on", [("lowerdir", "rl"), ("datadir", "d1")]),
    ("ro,lowerdir+=rl,datadir+=d1,redirect_dir=on", [("lowerdir", "rl"), ("datadir", "d1")]),
    (
        "rw,lowerdir=l\\134\\134q,upperdir=u\\134\\054x\\040y,workdir=w\\134:z,uuid=on",
        [("lowerdir", "l\\q"), ("upperdir", "u,x y"), ("workdir", "w:z")],
    ),
    (
        "ro,lowerdir=a:b::d1::d2",
        [("lowerdir", "a"), ("lowerdir", "b"), ("datadir", "d1"), ("datadir", "d2")],
    ),
    # Backslash escapes that were not octal-escaped (older kernels) still split right.
    ("rw,lowerdir=/x/l\\,1:/x/l\\:2,upperdir=/x/u,workdir=/x/w", [
        ("lowerdir", "/x/l,1"), ("lowerdir", "/x/l:2"), ("upperdir", "/x/u"),
        ("workdir", "/x/w"),
    ]),
    ("rw,lowerdir+=/a,lowerdir+=/b,datadir+=/c,userxattr", [
        ("lowerdir", "/a"), ("lowerdir", "/b"), ("datadir", "/c"),
    ]),
]


@pytest.mark.parametrize("opts,expected", MEASURED)
def test_overlay_layer_options(opts, expected):
    assert overlay_layer_options(opts) == expected


def test_kernel_show_helper_matches_measured_format():
    # Guards the helper the other tests use to write mountinfo lines.
    assert kernel_show("/tmp/pfexp/l,b") == "/tmp/pfexp/l\\134\\054b"
    assert kernel_show("/tmp/pfexp/l:c") == "/tmp/pfexp/l\\134:c"
    assert kernel_show("/tmp/pfexp/l a") == "/tmp/pfexp/l\\040a"


# --------------------------------------------------------------------------- mounted detection


def test_absolute_paths_matched_by_inode(tmp_path, layers):
    mi = write_mountinfo(
        tmp_path,
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
        overlay_line(
            "/mnt/ours",
            f"lowerdir={kernel_show(layers.lowers[0].path)}:{kernel_show(layers.lowers[1].path)},"
            f"upperdir={kernel_show(layers.upper.path)},workdir={kernel_show(layers.work.path)}",
        ),
    )
    assert overlay_mounts_using(layers, mi) == ["/mnt/ours"]
    uses = find_overlay_uses(layers, parse_mountinfo(mi))
    assert [(u.layer.name, u.option) for u in uses] == [
        ("upper", "upperdir"), ("lower:0", "lowerdir"), ("lower:1", "lowerdir"),
        ("work", "workdir"),
    ]


@pytest.mark.parametrize("name", ["l a", "l,b", "l:c", "l\\q", "tab\there"])
def test_escaped_layer_paths_matched(tmp_path, name):
    (lower,) = mkdirs(tmp_path, name)
    stack = build_stack(lowers=[str(lower)])
    mi = write_mountinfo(tmp_path, overlay_line("/mnt/e", f"lowerdir={kernel_show(str(lower))}"))
    assert overlay_mounts_using(stack, mi) == ["/mnt/e"]


def test_escaped_mountpoint_decoded(tmp_path, layers):
    mi = write_mountinfo(
        tmp_path, overlay_line("/mnt/with space", f"lowerdir={layers.lowers[1].path}")
    )
    assert overlay_mounts_using(layers, mi) == ["/mnt/with space"]


def test_same_directory_through_symlink_is_matched(tmp_path, layers):
    # The mount names the upper through a symlink: no string is equal, the inode is.
    link = tmp_path / "alias"
    link.symlink_to(layers.upper.path)
    (other,) = mkdirs(tmp_path, "otherlower")
    mi = write_mountinfo(
        tmp_path,
        overlay_line("/mnt/a", f"lowerdir={other},upperdir={link},workdir={tmp_path}/x"),
    )
    uses = find_overlay_uses(layers, parse_mountinfo(mi))
    assert [(u.layer.name, u.mountpoint) for u in uses] == [("upper", "/mnt/a")]


def test_same_basename_elsewhere_is_not_matched(tmp_path, layers):
    other = tmp_path / "elsewhere"
    up, wk, l0 = mkdirs(other, "upper", "work", "l0")
    mi = write_mountinfo(
        tmp_path,
        overlay_line("/mnt/b", f"lowerdir={l0},upperdir={up},workdir={wk}"),
        # Not an overlay: its options must be ignored even if they look like one.
        f"60 1 0:60 / /mnt/f rw - fuse.fuse-overlayfs fuse rw,lowerdir={layers.upper.path}",
    )
    assert overlay_mounts_using(layers, mi) == []


def test_data_layers_and_lowerdir_plus(tmp_path):
    l0, d0, d1 = mkdirs(tmp_path, "l0", "d0", "d1")
    stack = build_stack(options=[f"lowerdir={l0}::{d0}::{d1}"])
    mi = write_mountinfo(
        tmp_path,
        overlay_line("/mnt/legacy", f"lowerdir={tmp_path}/zz::{d1}", 901),
        overlay_line("/mnt/new", f"lowerdir+={tmp_path}/zz,datadir+={d0}", 902),
    )
    uses = find_overlay_uses(stack, parse_mountinfo(mi))
    assert [(u.mountpoint, u.layer.name, u.option) for u in uses] == [
        ("/mnt/legacy", "data:1", "datadir"),
        ("/mnt/new", "data:0", "datadir"),
    ]


def test_relative_path_suffix(tmp_path, monkeypatch):
    # Mounted as `lowerdir=ovt/l` from some cwd we do not know.
    (lower,) = mkdirs(tmp_path, "ovt/l")
    stack = build_stack(lowers=[str(lower)])
    monkeypatch.chdir("/")
    mi = write_mountinfo(tmp_path, overlay_line("/mnt/rel", "lowerdir=ovt/l"))
    uses = find_overlay_uses(stack, parse_mountinfo(mi))
    assert [(u.layer.name, u.given) for u in uses] == [("lower:0", "ovt/l")]
    assert "given as relative 'ovt/l'" in uses[0].describe()


@pytest.mark.parametrize("given", ["up", "pper", "x/upper/..", "t/l", "../l", "."])
def test_relative_path_needs_whole_components(tmp_path, monkeypatch, given):
    # D7-style substring logic must not come back: '/x/upper' does not end with '/up'.
    up, wk, lower = mkdirs(tmp_path / "x", "upper", "work", "lt/l")
    stack = build_stack(lowers=[str(lower)], upper=str(up), work=str(wk))
    monkeypatch.chdir("/")
    mi = write_mountinfo(tmp_path, overlay_line("/mnt/rel", f"lowerdir={given}"))
    assert overlay_mounts_using(stack, mi) == []


def test_relative_path_resolved_from_mountpoint_ancestor(tmp_path, monkeypatch):
    # docker's overlay2 layout: `lowerdir=l/ABC` relative to the parent of <id>/merged,
    # where l/ABC is a symlink to the layer. No suffix of our path matches.
    (layer,) = mkdirs(tmp_path, "store/diff")
    root = tmp_path / "docker"
    (merged,) = mkdirs(root, "c1/merged")
    (root / "l").mkdir()
    (root / "l" / "ABC").symlink_to(layer)
    stack = build_stack(lowers=[str(layer)])
    monkeypatch.chdir("/")
    mi = write_mountinfo(tmp_path, overlay_line(merged, "lowerdir=l/ABC"))
    (use,) = find_overlay_uses(stack, parse_mountinfo(mi))
    assert use.relative_base == str(root)
    assert use.mountpoint == str(merged)


def test_relative_path_resolved_from_cwd(tmp_path, monkeypatch):
    (layer,) = mkdirs(tmp_path, "far/away/layer")
    (cwd,) = mkdirs(tmp_path, "cwd")
    (cwd / "lnk").symlink_to(layer)
    monkeypatch.chdir(cwd)
    stack = build_stack(lowers=[str(layer)])
    mi = write_mountinfo(tmp_path, overlay_line("/mnt/elsewhere", "lowerdir=lnk"))
    (use,) = find_overlay_uses(stack, parse_mountinfo(mi))
    assert use.relative_base == str(cwd)
    monkeypatch.chdir("/")
    assert find_overlay_uses(stack, parse_mountinfo(mi)) == []


def test_relative_path_resolved_from_layer_ancestor(tmp_path, monkeypatch):
    # `lowerdir=cur` where cur is a symlink beside the layer: only resolving from the
    # layer's own ancestors finds it (no suffix matches, cwd and mountpoint are elsewhere).
    (layer,) = mkdirs(tmp_path, "store/v2")
    (tmp_path / "store" / "cur").symlink_to("v2")
    stack = build_stack(lowers=[str(layer)])
    monkeypatch.chdir("/")
    mi = write_mountinfo(tmp_path, overlay_line("/mnt/elsewhere", "lowerdir=cur"))
    (use,) = find_overlay_uses(stack, parse_mountinfo(mi))
    assert use.relative_base == str(tmp_path / "store") and not use.suffix_only


def test_relative_path_matched_by_name_only(tmp_path, monkeypatch):
    # `gone/../l` cannot be resolved from here (gone/ does not exist); its normalised form
    # is still a suffix of our layer path.
    (layer,) = mkdirs(tmp_path, "x/l")
    stack = build_stack(lowers=[str(layer)])
    monkeypatch.chdir("/")
    mi = write_mountinfo(tmp_path, overlay_line("/mnt/elsewhere", "lowerdir=gone/../l"))
    (use,) = find_overlay_uses(stack, parse_mountinfo(mi))
    assert use.suffix_only and use.relative_base is None
    assert "matched by name only" in use.describe()


def test_relative_upper_root_inode_corroboration(tmp_path, monkeypatch):
    up, wk, lower = mkdirs(tmp_path, "u", "w", "l")
    stack = build_stack(lowers=[str(lower)], upper=str(up), work=str(wk))
    monkeypatch.chdir("/")
    # An overlay root reports its upper root's st_ino: here the "mountpoint" is the upper
    # itself, which has that inode number; elsewhere it does not.
    mi = write_mountinfo(
        tmp_path,
        overlay_line(up, "lowerdir=zz,upperdir=u,workdir=w", 901),
        overlay_line(tmp_path, "lowerdir=zz,upperdir=u,workdir=w", 902),
    )
    uses = [u for u in find_overlay_uses(stack, parse_mountinfo(mi)) if u.layer.name == "upper"]
    assert [(u.mountpoint, u.root_inode_match) for u in uses] == [
        (str(up), True), (str(tmp_path), False),
    ]


def test_shared_lower_of_unrelated_overlay(tmp_path, layers):
    other_up, other_wk = mkdirs(tmp_path, "ou", "ow")
    mi = write_mountinfo(
        tmp_path,
        overlay_line(
            "/mnt/other", f"lowerdir={layers.lowers[1].path},upperdir={other_up},workdir={other_wk}"
        ),
    )
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(layers, want_write=True, mountinfo_path=mi)
    msg = raises_op(excinfo)
    assert f"lower:1 {layers.lowers[1].path}" in msg
    assert "/mnt/other" in msg and "its lowerdir" in msg
    assert "unmount it before repairing (checking with -n is allowed)" in msg
    pf = run_preflight(layers, want_write=False, mountinfo_path=mi)
    assert pf.mounted_by == ("/mnt/other",)
    assert any("lower:1" in n and "/mnt/other" in n for n in pf.notes)


def test_mounted_refusal_names_every_mountpoint(tmp_path, layers):
    mi = write_mountinfo(
        tmp_path,
        overlay_line("/mnt/one", f"lowerdir={layers.lowers[0].path}", 901),
        overlay_line("/mnt/two", f"lowerdir={layers.lowers[1].path}", 902),
    )
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(layers, want_write=True, mountinfo_path=mi)
    msg = raises_op(excinfo)
    assert "/mnt/one" in msg and "/mnt/two" in msg and "unmount them" in msg
    pf = run_preflight(layers, want_write=False, mountinfo_path=mi)
    assert pf.mounted_by == ("/mnt/one", "/mnt/two")


def test_nothing_mounted(layers, empty_mountinfo):
    pf = run_preflight(layers, want_write=True, mountinfo_path=empty_mountinfo)
    assert pf.mounted_by == ()
    assert set(pf.statuses) == {"upper", "lower:0", "lower:1", "work"}
    for name, st in pf.statuses.items():
        s = os.stat(st.layer.path)
        assert (st.st_dev, st.st_ino) == (s.st_dev, s.st_ino)
        assert st.xattr_ok and not st.read_only and not st.nested_overlay


# --------------------------------------------------------------------------- upper / work


@pytest.mark.parametrize(
    "upper,work",
    [("x/upper", "x/up"), ("x/up", "x/upper"), ("x/u", "x/u2"), ("x/u-w", "x/u")],
)
def test_sibling_prefixes_are_not_nested(tmp_path, empty_mountinfo, upper, work):
    up, wk, lower = mkdirs(tmp_path, upper, work, "l")
    stack = build_stack(lowers=[str(lower)], upper=str(up), work=str(wk))
    run_preflight(stack, want_write=True, mountinfo_path=empty_mountinfo)


@pytest.mark.parametrize("upper,work", [("x/u", "x/u/w"), ("x/u/w", "x/u"), ("x/u", "x/u")])
def test_nested_upper_and_work(tmp_path, empty_mountinfo, upper, work):
    up, wk, lower = mkdirs(tmp_path, upper, work, "l")
    stack = build_stack(lowers=[str(lower)], upper=str(up), work=str(wk))
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(stack, want_write=False, mountinfo_path=empty_mountinfo)
    assert "workdir and upperdir must be separate subtrees" in raises_op(excinfo)


def test_nested_through_symlinked_spelling(tmp_path, empty_mountinfo):
    up, lower = mkdirs(tmp_path, "x/u", "l")
    (up / "w").mkdir()
    (tmp_path / "alias").symlink_to(up)
    # build_stack resolves the spelling; then plain prefix logic sees it.
    stack = build_stack(lowers=[str(lower)], upper=str(up), work=str(tmp_path / "alias/w"))
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(stack, want_write=False, mountinfo_path=empty_mountinfo)
    assert "separate subtrees" in raises_op(excinfo)
    # A stack built without resolving (strings share no prefix): the ancestor walk by
    # device and inode still sees it.
    raw = Stack(
        lowers=(Layer(Role.LOWER, 0, str(lower), 1),),
        upper=Layer(Role.UPPER, 0, str(up), 0),
        work=Layer(Role.WORK, 0, str(tmp_path / "alias/w"), -1),
    )
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(raw, want_write=False, mountinfo_path=empty_mountinfo)
    assert "separate subtrees" in raises_op(excinfo)
    raw_rev = Stack(
        lowers=(Layer(Role.LOWER, 0, str(lower), 1),),
        upper=Layer(Role.UPPER, 0, str(tmp_path / "alias/w"), 0),
        work=Layer(Role.WORK, 0, str(up), -1),
    )
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(raw_rev, want_write=False, mountinfo_path=empty_mountinfo)
    assert "separate subtrees" in raises_op(excinfo)


def test_upper_and_work_on_different_filesystems(tmp_path, empty_mountinfo):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    up, lower = mkdirs(tmp_path, "u", "l")
    work = Path(os.path.realpath(shm)) / f"ovlfsck-pf-{os.getpid()}-w"
    work.mkdir()
    try:
        stack = build_stack(lowers=[str(lower)], upper=str(up), work=str(work))
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=False, mountinfo_path=empty_mountinfo)
        msg = raises_op(excinfo)
        assert msg.startswith("upperdir and workdir must be on the same filesystem")
        assert "lower" not in msg  # D7: the old tool blamed a "lower dir"
    finally:
        work.rmdir()


# --------------------------------------------------------------------------- layer roots


def _stack_with_positions(tmp_path):
    base = tmp_path / "pos"
    up, wk, l0, l1, l2, d0 = mkdirs(base, "upper", "work", "l0", "l1", "l2", "d0")
    return build_stack(
        options=[f"lowerdir={l0}:{l1}:{l2}::{d0},upperdir={up},workdir={wk}"]
    )


@pytest.mark.parametrize("name", ["upper", "lower:0", "lower:1", "lower:2", "data:0", "work"])
@pytest.mark.parametrize("kind", ["missing", "file", "symlink", "parent-is-file"])
def test_bad_layer_root_at_every_position(tmp_path, empty_mountinfo, name, kind):
    stack = _stack_with_positions(tmp_path)
    layer = stack.layer_by_name(name)
    path = Path(layer.path)
    path.rmdir()
    if kind == "file":
        path.write_text("x")
    elif kind == "symlink":
        path.symlink_to(tmp_path)
    elif kind == "parent-is-file":
        path.write_text("x")
        # A layer path below a regular file (ENOTDIR from lstat).
        layer = Layer(layer.role, layer.index, str(path / "sub"), layer.depth)
        stack = _replace_layer(stack, layer)
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(stack, want_write=False, mountinfo_path=empty_mountinfo)
    msg = raises_op(excinfo)
    reason = {
        "missing": "no such directory",
        "file": "not a directory",
        "symlink": "not a directory (a symbolic link)",
        "parent-is-file": "no such directory",
    }[kind]
    assert msg == f"{name} {layer.path}: {reason}"


def _replace_layer(stack: Stack, new: Layer) -> Stack:
    def swap(layer):
        return new if layer is not None and layer.name == new.name else layer

    return Stack(
        lowers=tuple(swap(x) for x in stack.lowers),
        datas=tuple(swap(x) for x in stack.datas),
        upper=swap(stack.upper),
        work=swap(stack.work),
        features=stack.features,
    )


def test_all_bad_layers_named_at_once(tmp_path, empty_mountinfo):
    stack = _stack_with_positions(tmp_path)
    for name in ("lower:1", "lower:2"):
        os.rmdir(stack.layer_by_name(name).path)
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(stack, want_write=False, mountinfo_path=empty_mountinfo)
    msg = raises_op(excinfo)
    assert "lower:1" in msg and "lower:2" in msg and "lower:0" not in msg


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_permission_denied_layer(tmp_path):
    # As an unprivileged user: a layer below a 0700 directory cannot be looked up, one
    # that others may not read cannot be opened, one they may not search cannot be walked.
    base = tmp_path / "private"
    (hidden,) = mkdirs(base, "hidden")
    open_dir = Path(f"/tmp/ovlfsck-pf-open-{os.getpid()}")
    open_dir.mkdir(mode=0o755)
    try:
        unreadable, unsearchable, fine = mkdirs(open_dir, "unreadable", "unsearchable", "fine")
        os.chmod(base, 0o700)
        os.chmod(unreadable, 0o733)  # others: -wx
        os.chmod(unsearchable, 0o744)  # others: r--
        order = [unreadable, hidden, unsearchable, fine]
        code = (
            "from ovlfsck.stack import build_stack\n"
            "from ovlfsck.preflight import run_preflight\n"
            "from ovlfsck.errors import OperationalError\n"
            "import sys\n"
            f"s = build_stack(lowers={[str(p) for p in order]!r}, options=['userxattr'])\n"
            "try:\n"
            "    run_preflight(s, want_write=False)\n"
            "except OperationalError as e:\n"
            "    print(e); sys.exit(e.exit_code)\n"
        )
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", code],
            capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        shutil.rmtree(open_dir)
    assert proc.returncode == 8, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (
        f"lower:0 {unreadable}: permission denied; lower:1 {hidden}: permission denied; "
        f"lower:2 {unsearchable}: permission denied"
    )


# --------------------------------------------------------------------------- read-only, fs type


def test_read_only_from_mount_options(tmp_path, layers):
    # The synthetic table says the mount holding the layers is ro (mount id 99999 does not
    # exist, so the containing mount is found by device and longest mountpoint).
    dev = os.stat(layers.upper.path).st_dev
    mi = write_mountinfo(
        tmp_path,
        f"99999 1 {os.major(dev)}:{os.minor(dev)} / / ro,relatime - xfs /dev/x rw",
    )
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(layers, want_write=True, mountinfo_path=mi)
    assert raises_op(excinfo) == (
        f"upper layer {layers.upper.path} is on a read-only filesystem; use -n to check it"
    )
    pf = run_preflight(layers, want_write=False, mountinfo_path=mi)
    assert all(s.read_only and s.fs_type == "xfs" for s in pf.statuses.values())
    assert "lower:0 is read-only: checked, never written" in pf.notes
    assert "lower:1 is read-only: checked, never written" in pf.notes


def test_read_only_lowers_are_fine_for_writing(tmp_path):
    (ro_base,) = mkdirs(tmp_path, "ro")
    (l0,) = mkdirs(ro_base, "l0")
    up, wk, l1 = mkdirs(tmp_path, "rw/u", "rw/w", "rw/l1")
    stack = build_stack(lowers=[str(l0), str(l1)], upper=str(up), work=str(wk))
    dev = os.stat(tmp_path).st_dev
    mm = f"{os.major(dev)}:{os.minor(dev)}"
    mi = write_mountinfo(
        tmp_path,
        f"99998 1 {mm} / / rw,relatime - ext4 /dev/x rw",
        f"99999 99998 {mm} {ro_base} {mi_escape(str(ro_base))} ro,relatime - ext4 /dev/x rw",
    )
    pf = run_preflight(stack, want_write=True, mountinfo_path=mi)
    assert pf.statuses["lower:0"].read_only and not pf.statuses["lower:1"].read_only
    assert not pf.statuses["upper"].read_only
    assert pf.notes == ("lower:0 is read-only: checked, never written",)


def test_layer_on_overlay_mount_is_nested(tmp_path, layers):
    dev = os.stat(layers.lowers[0].path).st_dev
    parent = os.path.dirname(layers.lowers[0].path)
    mi = write_mountinfo(
        tmp_path,
        f"99999 1 {os.major(dev)}:{os.minor(dev)} / {mi_escape(parent)} rw - overlay overlay "
        "rw,lowerdir=/nonexistent/a,upperdir=/nonexistent/b,workdir=/nonexistent/c",
    )
    pf = run_preflight(layers, want_write=True, mountinfo_path=mi)
    assert all(s.nested_overlay and s.fs_type == "overlay" for s in pf.statuses.values())
    assert any("lower:0" in n and "trusted.overlay.overlay.*" in n for n in pf.notes)
    assert pf.mounted_by == ()


# --------------------------------------------------------------------------- namespace


def setx(path, name, value=b"y"):
    xattr.set(str(path), name, value, nofollow=True)


@pytest.fixture
def ns_stack(tmp_path):
    up, wk, l0, l1 = mkdirs(tmp_path / "ns", "upper", "work", "l0", "l1")
    return build_stack(lowers=[str(l0), str(l1)], upper=str(up), work=str(wk))


def _xattrs_supported(path, prefix):
    try:
        setx(path, prefix + "probe")
        xattr.remove(str(path), prefix + "probe", nofollow=True)
        return True
    except OSError:
        return False


@pytest.fixture
def need_trusted(tmp_path):
    if not IS_ROOT or not _xattrs_supported(tmp_path, "trusted."):
        pytest.skip("needs root and trusted.* xattrs on the temp filesystem")


@pytest.fixture
def need_user(tmp_path):
    if not _xattrs_supported(tmp_path, "user."):
        pytest.skip("needs user.* xattrs on the temp filesystem")


def test_namespace_default_trusted(ns_stack):
    assert detect_namespace(ns_stack) == ("trusted", None)


def test_namespace_trusted_found(ns_stack, need_trusted):
    setx(ns_stack.upper.path, "trusted.overlay.opaque")
    assert detect_namespace(ns_stack) == ("trusted", None)


@pytest.mark.parametrize("where", ["upper", "work/index", "work", "lower:0", "lower:1"])
def test_namespace_user_found(ns_stack, need_user, where):
    if where == "work/index":
        path = Path(ns_stack.work.path) / "index"
        path.mkdir()
    else:
        path = ns_stack.layer_by_name(where).path
    setx(path, "user.overlay.origin", b"\x00\xfb")
    ns, note = detect_namespace(ns_stack)
    assert ns == "user"
    assert note is not None and "user.overlay.* xattrs found" in note and "userxattr" in note


def test_namespace_escaped_names_never_count(ns_stack, need_user, need_trusted):
    setx(ns_stack.upper.path, "trusted.overlay.overlay.opaque")
    setx(ns_stack.lowers[0].path, "user.overlay.overlay.opaque")
    assert detect_namespace(ns_stack) == ("trusted", None)
    # An escaped trusted name next to a private user name: user wins.
    setx(ns_stack.upper.path, "user.overlay.impure")
    assert detect_namespace(ns_stack)[0] == "user"
    # Names that only look alike are not overlay xattrs.
    xattr.remove(ns_stack.upper.path, "user.overlay.impure", nofollow=True)
    setx(ns_stack.upper.path, "user.overlayX")
    assert detect_namespace(ns_stack) == ("trusted", None)


def test_namespace_both_prefers_trusted_with_note(ns_stack, need_user, need_trusted):
    setx(ns_stack.upper.path, "trusted.overlay.uuid", b"0123456789abcdef")
    setx(ns_stack.lowers[1].path, "user.overlay.opaque")
    ns, note = detect_namespace(ns_stack)
    assert ns == "trusted" and note is not None and "both" in note and "lower:1" in note


def test_namespace_userxattr_option(ns_stack, need_trusted):
    setx(ns_stack.upper.path, "trusted.overlay.opaque")
    stack = Stack(
        lowers=ns_stack.lowers, upper=ns_stack.upper, work=ns_stack.work,
        features=Features(userxattr=True),
    )
    assert detect_namespace(stack) == ("user", None)


def test_run_preflight_reports_namespace(ns_stack, need_user, empty_mountinfo):
    setx(ns_stack.upper.path, "user.overlay.opaque")
    pf = run_preflight(ns_stack, want_write=True, mountinfo_path=empty_mountinfo)
    assert pf.namespace == "user"
    assert pf.namespace_note and "upper root" in pf.namespace_note


# --------------------------------------------------------------------------- privilege


def test_has_cap_sys_admin_parses_capeff(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t000001fffeffffff\n")
    assert has_cap_sys_admin(str(status)) is True
    status.write_text("CapEff:\t000001fffedfffff\n")  # bit 21 cleared
    assert has_cap_sys_admin(str(status)) is False
    status.write_text("CapEff:\t0000000000200000\n")
    assert has_cap_sys_admin(str(status)) is True
    # The real process: it has the capability exactly when it may set trusted.* xattrs.
    try:
        xattr.set(str(tmp_path), "trusted.ovlfsck-probe", b"1", nofollow=True)
        can_set = True
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("no trusted.* xattrs on the temp filesystem")
        can_set = False
    assert has_cap_sys_admin() is can_set


def test_no_cap_sys_admin_refuses_trusted(ns_stack, empty_mountinfo, monkeypatch):
    monkeypatch.setattr(preflight, "has_cap_sys_admin", lambda *a, **k: False)
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(ns_stack, want_write=False, mountinfo_path=empty_mountinfo)
    assert raises_op(excinfo) == (
        "cannot read trusted.overlay.* xattrs: run as root or use userxattr"
    )


def test_no_cap_sys_admin_fine_with_user_namespace(ns_stack, need_user, empty_mountinfo,
                                                   monkeypatch):
    monkeypatch.setattr(preflight, "has_cap_sys_admin", lambda *a, **k: False)
    setx(ns_stack.upper.path, "user.overlay.opaque")
    pf = run_preflight(ns_stack, want_write=True, mountinfo_path=empty_mountinfo)
    assert pf.namespace == "user"
    stack = Stack(lowers=ns_stack.lowers, features=Features(userxattr=True))
    assert run_preflight(stack, want_write=False, mountinfo_path=empty_mountinfo).namespace == "user"


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_real_process_without_cap_sys_admin(ns_stack, need_trusted):
    # The kernel hides trusted.* from such a process (ENODATA, not EACCES): it must refuse
    # rather than conclude that no overlay xattr exists.
    setx(ns_stack.upper.path, "trusted.overlay.opaque")
    code = (
        "import sys, xattr\n"
        "from ovlfsck.stack import build_stack\n"
        "from ovlfsck.preflight import run_preflight, has_cap_sys_admin\n"
        "from ovlfsck.errors import OperationalError\n"
        f"up = {ns_stack.upper.path!r}\n"
        "try:\n"
        "    xattr.get(up, 'trusted.overlay.opaque', nofollow=True); print('visible')\n"
        "except OSError as e:\n"
        "    print('errno', e.errno)\n"
        "print('cap', has_cap_sys_admin())\n"
        f"s = build_stack(lowers={[l.path for l in ns_stack.lowers]!r}, upper=up, "
        f"work={ns_stack.work.path!r})\n"
        "try:\n"
        "    run_preflight(s, want_write=False)\n"
        "except OperationalError as e:\n"
        "    print(e); sys.exit(e.exit_code)\n"
    )
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
         sys.executable, "-c", code],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 8, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"errno {errno.ENODATA}",
        "cap False",
        "cannot read trusted.overlay.* xattrs: run as root or use userxattr",
    ]


def _fake_get(failing_errno, only_path=None):
    real = xattr.get

    def fake(path, name, *args, **kwargs):
        if only_path is None or os.fspath(path) == only_path:
            raise OSError(failing_errno, os.strerror(failing_errno))
        return real(path, name, *args, **kwargs)

    return fake


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM])
def test_trusted_probe_denied(ns_stack, empty_mountinfo, monkeypatch, err):
    monkeypatch.setattr(preflight.xattr, "get", _fake_get(err, ns_stack.lowers[1].path))
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(ns_stack, want_write=False, mountinfo_path=empty_mountinfo)
    assert raises_op(excinfo) == (
        "cannot read trusted.overlay.* xattrs: run as root or use userxattr"
    )


def test_xattr_not_supported_on_a_layer(ns_stack, empty_mountinfo, monkeypatch):
    monkeypatch.setattr(preflight.xattr, "get", _fake_get(errno.EOPNOTSUPP, ns_stack.lowers[0].path))
    pf = run_preflight(ns_stack, want_write=True, mountinfo_path=empty_mountinfo)
    assert pf.statuses["lower:0"].xattr_ok is False
    assert pf.statuses["upper"].xattr_ok and pf.statuses["lower:1"].xattr_ok
    assert any(n.startswith(f"lower:0 {ns_stack.lowers[0].path}:") and "skipped" in n
               for n in pf.notes)


def test_xattr_io_error_is_operational(ns_stack, empty_mountinfo, monkeypatch):
    monkeypatch.setattr(preflight.xattr, "get", _fake_get(errno.EIO, ns_stack.upper.path))
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(ns_stack, want_write=False, mountinfo_path=empty_mountinfo)
    assert raises_op(excinfo) == (
        f"upper {ns_stack.upper.path}: cannot read xattrs: input/output error"
    )


def test_unreadable_mountinfo_is_operational(ns_stack, tmp_path):
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(ns_stack, want_write=False, mountinfo_path=str(tmp_path / "nope"))
    assert "cannot read" in raises_op(excinfo)
