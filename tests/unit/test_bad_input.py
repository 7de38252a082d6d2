"""Bad input never produces a traceback: every failure is one sentence and an fsck exit code.

No mount is needed: layers are tmp directories (as root, trusted.* xattrs, mknod and
chown work).  Most runs go through the real CLI in-process (`cli.invoke(cli.app, ...)`,
which is what `python -m ovlfsck` runs, minus the interpreter start); a few go through a
subprocess to see the real entry point's stderr.

Covered:
* missing layers and non-directory layers (file, FIFO, socket, device, dangling symlink,
  symlink loop) at every position: exit 8, one line on stderr, nothing created;
* unreadable things: EIO from readdir and from listxattr (injected with monkeypatch:
  root reads everything and a real EIO needs a broken device), entries vanishing between
  readdir and lstat (a real race, made deterministic), FIFOs/sockets/devices where
  directories are expected (work/index, <work>/ovlfsck) and elsewhere in the layers;
* names with newlines, tabs, escapes and non-UTF-8 bytes in every layer and in the layer
  roots: paths are escaped in the text and JSON reports, the JSON stays valid, -y fixes them;
* symlink loops inside layers (ignored) and as layer roots (exit 8);
* a property-based test writing arbitrary bytes into every overlay xattr of files and
  directories of upper and lower (OVLFSCK_PROP_EXAMPLES overrides the 60 examples);
* `undo` of things that are not journals, of a journal twice, and a partial undo (exit 8);
* usage errors (exit 16) and the refusal to ask questions without a terminal (exit 8).

Regression tests for bugs these tests found: --json printed nothing on an operational
error; an entry vanishing between readdir and lstat aborted the run; an xattr whiteout
carrying a stray opaque/redirect xattr made -y apply a second fix to an object already moved.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import xattr
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ovlfsck.cli import app, invoke

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, trusted.* xattrs)")

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = ("opaque", "redirect", "origin", "impure", "nlink", "upper", "uuid", "metacopy",
            "protattr", "whiteout")


# --------------------------------------------------------------------------- helpers


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the ovlfsck CLI in-process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = invoke(app, [os.fspath(a) if isinstance(a, Path) else a for a in args], "ovlfsck")
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    return rc, out, err


def sub(*args, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run `python -m ovlfsck` in a subprocess (bytes in, text out)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), LC_ALL="C.UTF-8")
    p = subprocess.run([sys.executable, "-m", "ovlfsck", *map(os.fsencode, args)],
                       capture_output=True, stdin=stdin, env=env, timeout=120)
    p.stdout = p.stdout.decode("utf-8", "replace")
    p.stderr = p.stderr.decode("utf-8", "replace")
    assert "Traceback" not in p.stderr, p.stderr
    return p


def parse_json(out: str, rc: int) -> dict:
    doc = json.loads(out)
    assert isinstance(doc, dict) and doc["schema"] == "ovlfsck/1"
    assert doc["exit_code"] == rc
    return doc


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("ovlfsck: "), lines[0]
    return lines[0]


def printable(text: str) -> bool:
    """No raw control characters and no lone surrogates (undecodable bytes) left."""
    return not any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in text)


def mkwhiteout(path) -> None:
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def getx_or_none(path, suffix: str):
    try:
        return xattr.get(os.fsencode(path), f"trusted.overlay.{suffix}", nofollow=True)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def setx(path, suffix: str, value: bytes) -> None:
    xattr.set(os.fsencode(path), f"trusted.overlay.{suffix}", value, nofollow=True)


class Layers:
    """zqlower0, zqlower1, zqupper, zqwork under one base (distinctive names: the pre-flight
    matches overlays mounted elsewhere with relative layer paths by their trailing names)."""

    def __init__(self, base: Path, nlowers: int = 1) -> None:
        self.base = base
        self.lowers = [base / f"zqlower{i}" for i in range(nlowers)]
        self.upper = base / "zqupper"
        self.work = base / "zqwork"
        for d in (*self.lowers, self.upper, self.work):
            d.mkdir(parents=True, exist_ok=True)

    def args(self, lowers=None, upper=None, work=None) -> list:
        out = []
        for low in (lowers if lowers is not None else self.lowers):
            out += ["--lower", low]
        return out + ["--upper", upper or self.upper, "--work", work or self.work]


def snapshot(root, skip=(), times=True) -> dict:
    """Every object under root (no symlink followed): type, mode, owner, rdev, size, inode,
    link count, content hash / link target, all xattrs; with times=True also mtime and
    ctime of everything.  Relative paths in `skip` (and what is below) are left out."""
    out = {}
    root = os.fsencode(root)

    def visit(path: bytes, rel: bytes) -> None:
        st_ = os.lstat(path)
        rec = [stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid,
               st_.st_rdev, st_.st_ino]
        rec.append(None if stat.S_ISDIR(st_.st_mode) else (st_.st_size, st_.st_nlink))
        if stat.S_ISREG(st_.st_mode):
            with open(path, "rb") as fh:
                rec.append(hashlib.sha256(fh.read()).hexdigest())
        elif stat.S_ISLNK(st_.st_mode):
            rec.append(os.readlink(path))
        try:
            rec.append(sorted((n, xattr.get(path, n, nofollow=True))
                              for n in xattr.list(path, nofollow=True)))
        except OSError as exc:
            rec.append(exc.errno)
        if times:
            rec += [st_.st_mtime_ns, st_.st_ctime_ns]
        elif not stat.S_ISDIR(st_.st_mode):
            rec.append(st_.st_mtime_ns)
        out[rel] = tuple(rec)
        if stat.S_ISDIR(st_.st_mode):
            for name in sorted(os.listdir(path)):
                r = rel + b"/" + name if rel else name
                if r not in skip:
                    visit(os.path.join(path, name), r)

    visit(root, b"")
    return out


# =========================================================================== missing / not a dir


def _make_bad(kind: str, path: Path) -> None:
    if kind == "missing":
        return
    if kind == "file":
        path.write_text("not a directory\n")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(os.fspath(path))
        finally:
            s.close()
    elif kind == "chardev":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    elif kind == "dangling-symlink":
        os.symlink(path.parent / "nowhere" / "at-all", path)
    elif kind == "symlink-loop":
        os.symlink(path.name + "-b", path)
        os.symlink(path.name, path.parent / (path.name + "-b"))
    elif kind == "symlink-to-file":
        target = path.parent / (path.name + "-target")
        target.write_text("x\n")
        os.symlink(target, path)
    else:  # pragma: no cover
        raise AssertionError(kind)


BAD_KINDS = ("missing", "file", "fifo", "socket", "chardev", "dangling-symlink",
             "symlink-loop", "symlink-to-file")
POSITIONS = ("lower:0", "lower:1", "upper", "work")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("mode", ("-n", "-y"))
def test_bad_layer_root_is_one_line_and_exit_8(tmp_path, capsys, position, kind, mode):
    lay = Layers(tmp_path / "stack", nlowers=2)
    bad = tmp_path / "stack" / f"zqbad-{kind}"
    _make_bad(kind, bad)
    lowers = list(lay.lowers)
    upper, work = lay.upper, lay.work
    if position.startswith("lower"):
        lowers[int(position[-1])] = bad
    elif position == "upper":
        upper = bad
    else:
        work = bad
    # something a -y run would want to fix, so that a run going on would write
    mkwhiteout(lay.upper / "zqorphan")
    before = snapshot(tmp_path)
    for extra in ((), ("--json",)):
        rc, out, err = cli(capsys, "check", mode, *extra, *lay.args(lowers, upper, work))
        assert rc == 8, (rc, out, err)
        line = one_line(err)
        # names the layer (as given, or resolved: layer roots are symlink-resolved)
        assert position in line and ("zqbad" in line or os.path.realpath(bad) in line), line
        assert out.strip() == "" or parse_json(out, rc)["exit_code"] == 8
    assert snapshot(tmp_path) == before, "a refused run changed something"
    assert not os.path.lexists(bad) or kind != "missing"


def test_bad_layer_root_through_the_real_entry_point(tmp_path):
    lay = Layers(tmp_path)
    missing = tmp_path / "zqmissing"
    for args in (lay.args([missing]), lay.args(upper=missing), lay.args(work=missing),
                 lay.args([Path("/dev/null")])):
        for mode in ("-n", "-y", "-p"):
            p = sub("check", mode, *args)
            assert p.returncode == 8, p
            one_line(p.stderr)
    p = sub("-n", *lay.args([missing]))  # `check` is the default command
    assert p.returncode == 8 and "zqmissing" in one_line(p.stderr)


def test_all_bad_lowers_are_named_in_one_line(tmp_path, capsys):
    lay = Layers(tmp_path, nlowers=3)
    shutil.rmtree(lay.lowers[1])
    lay.lowers[2].rmdir()
    lay.lowers[2].write_text("x")
    rc, out, err = cli(capsys, "check", "-n", *lay.args())
    line = one_line(err)
    assert rc == 8 and "zqlower1" in line and "zqlower2" in line, line


def test_json_report_even_on_an_operational_error(tmp_path, capsys):
    lay = Layers(tmp_path)
    rc, out, err = cli(capsys, "check", "-n", "--json", *lay.args([tmp_path / "zqmissing"]))
    assert rc == 8
    doc = parse_json(out, rc)
    assert doc["exit_code"] == 8 and "zqmissing" in doc.get("error", "")


# =========================================================================== unreadable


def _healthy(lay: Layers) -> None:
    (lay.lowers[0] / "d").mkdir()
    (lay.lowers[0] / "d" / "a").write_text("a\n")
    (lay.upper / "d").mkdir()
    (lay.upper / "d" / "x").write_text("x\n")
    (lay.upper / "d" / "sub").mkdir()
    (lay.upper / "d" / "sub" / "y").write_text("y\n")
    (lay.upper / "pure").mkdir()
    mkwhiteout(lay.upper / "pure" / "zqw")  # OVL103, fixable: makes -y write something


@pytest.mark.parametrize("mode", ("-n", "-y"))
def test_eio_from_readdir_is_ovl901_and_exit_12(tmp_path, capsys, monkeypatch, mode):
    lay = Layers(tmp_path)
    _healthy(lay)
    bad = os.fspath(lay.upper / "d")
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.fspath(path) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    before = snapshot(tmp_path, skip=(b"zqwork/ovlfsck",), times=False)
    rc, out, err = cli(capsys, "check", mode, "--json", *lay.args())
    doc = parse_json(out, rc)
    hits = [p for p in doc["problems"] if p["code"] == "OVL901"]
    # -n: a problem left (4) and an operational error (8); -y also fixed the rest (1).
    assert rc == (12 if mode == "-n" else 13) and [(p["layer"], p["path"]) for p in hits] == [("upper", "d")], doc
    assert hits[0]["fixed"] is False and hits[0]["action"] is None
    assert "Input/output error" in doc.get("error", ""), doc
    if mode == "-y":  # the rest is still repaired
        assert any(p["code"] == "OVL103" and p["fixed"] for p in doc["problems"]), doc
    else:
        assert snapshot(tmp_path, times=False) == before
    # the text report says it too, on one line per problem
    rc2, out2, err2 = cli(capsys, "check", "-n", *lay.args())
    assert rc2 == 12 and "upper:d:" in out2 and "Input/output error" in out2 + err2, out2 + err2


def test_eio_from_listxattr_is_one_line_exit_8(tmp_path, capsys, monkeypatch):
    lay = Layers(tmp_path)
    _healthy(lay)
    bad = os.fsencode(lay.upper / "d" / "x")
    real = xattr.list

    def xlist(item, *a, **kw):
        if os.fsencode(item) == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), item)
        return real(item, *a, **kw)

    monkeypatch.setattr(xattr, "list", xlist)
    for mode in ("-n", "-y"):
        rc, out, err = cli(capsys, "check", mode, *lay.args())
        assert rc & 8 and rc in (8, 12), (rc, out, err)
        assert err.strip() or out.strip()
        assert "Traceback" not in out + err


VANISHING = {
    "whiteout": lambda p: mkwhiteout(p),
    "dir": lambda p: (os.mkdir(p), Path(p, "f").write_text("f\n")),
    "file": lambda p: Path(p).write_text("g\n"),
    "empty-file": lambda p: Path(p).write_text(""),
}


@pytest.mark.parametrize("kind", [
    "whiteout",
    "dir",
    "file",
    "empty-file",
])
def test_entries_vanishing_during_the_walk(tmp_path, capsys, monkeypatch, kind):
    """An entry removed between readdir and lstat/xattr reads (another process racing us) is
    skipped like an entry that was never there (fsio.Kind.GONE): the run goes on and reports
    everything else; a vanished directory may be reported as unreadable (OVL901)."""
    lay = Layers(tmp_path)
    _healthy(lay)
    setx(lay.upper, "impure", b"y")
    target = os.fspath(lay.upper / "d")
    doomed = os.path.join(target, "gone")
    VANISHING[kind](doomed)
    real = os.scandir

    class Racing:
        """Lists the directory, then removes the doomed entry before it is looked at."""

        def __init__(self, it):
            self.entries = list(it)
            it.close()
            if os.path.isdir(doomed):
                shutil.rmtree(doomed)
            else:
                os.unlink(doomed)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return iter(self.entries)

        def close(self):
            pass

    state = {"armed": True}

    def scandir(path="."):
        it = real(path)
        if not isinstance(path, int) and os.fspath(path) == target and state["armed"]:
            state["armed"] = False
            return Racing(it)
        return it

    monkeypatch.setattr(os, "scandir", scandir)
    rc, out, err = cli(capsys, "check", "-n", "--json", *lay.args())
    assert out.strip(), f"exit {rc}, no JSON report; stderr: {err}"
    doc = parse_json(out, rc)
    # the rest of the stack was checked: the whiteout in the pure dir is still found
    assert any(p["code"] == "OVL103" for p in doc["problems"]), doc
    others = [p for p in doc["problems"] if "gone" in p["path"] and p["code"] != "OVL901"]
    assert not others, doc
    assert rc == (12 if kind == "dir" else 4), doc


@pytest.mark.parametrize("where", ("index", "work", "ovlfsck"))
@pytest.mark.parametrize("kind", ("fifo", "socket", "chardev", "file"))
def test_special_files_where_workdir_directories_belong(tmp_path, capsys, where, kind):
    """work/index, work/work or <work>/ovlfsck (the journal dir) is not a directory."""
    lay = Layers(tmp_path)
    _healthy(lay)
    _make_bad(kind, lay.work / where)
    rc, out, err = cli(capsys, "check", "-n", "--json", *lay.args())
    parse_json(out, rc)
    assert rc == 4  # OVL103 and OVL401 of _healthy()
    rc, out, err = cli(capsys, "check", "-y", "--json", *lay.args())
    if where == "ovlfsck":
        # nowhere to journal: nothing may be changed without a journal; every problem is
        # left (4) and the failure to journal is an operational error (8)
        assert rc == 12 and os.path.lexists(lay.upper / "pure" / "zqw"), (rc, out, err)
        assert getx_or_none(lay.upper, "impure") is None
        assert not stat.S_ISDIR(os.lstat(lay.work / where).st_mode)
    else:
        assert rc == 1, (rc, out, err)
        assert parse_json(out, rc)["journal"]


def test_special_files_everywhere_in_the_layers(tmp_path, capsys):
    lay = Layers(tmp_path, nlowers=2)
    for i, root in enumerate((*lay.lowers, lay.upper)):
        d = root / "d"
        d.mkdir()
        os.mkfifo(d / "fifo")
        _make_bad("socket", d / "sock")
        os.mknod(d / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        os.mknod(d / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(d / f"chr-not-whiteout{i}", stat.S_IFCHR, os.makedev(0, 1))
        for n in ("fifo", "sock", "blk"):
            setx(d / n, "opaque", b"y")
        os.mkfifo(root / "x")  # a FIFO where the other layers have a directory
    (lay.lowers[1] / "x").unlink()
    (lay.lowers[1] / "x").mkdir()
    (lay.lowers[1] / "x" / "y").write_text("y\n")
    rc, out, err = cli(capsys, "check", "-n", "--json", *lay.args())
    doc = parse_json(out, rc)
    assert rc == 4 and {p["code"] for p in doc["problems"]} >= {"OVL202"}, doc
    rc, out, err = cli(capsys, "check", "-y", "--repair-lowers", "--json", *lay.args())
    assert rc == 1, (rc, out)
    rc, out, err = cli(capsys, "check", "-n", *lay.args())
    assert rc == 0, out


# =========================================================================== odd names

ODD_NAMES = [b"new\nline", b"tab\there", b"esc\x1b[31mred", b"bad\xffutf8", b"\xfe\xff",
             b"cr\rret", b"del\x7f", b" lead-space", b"-dash", b"caf\xc3\xa9"]


def _shown(raw: bytes) -> str:
    """How a name must appear in the reports: control characters and undecodable bytes as
    \\xNN, valid UTF-8 as is."""
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if 32 <= ord(c) != 127 else f"\\x{ord(c):02x}" for c in text)


def test_odd_names_in_every_layer_are_escaped(tmp_path, capsys):
    lay = Layers(tmp_path, nlowers=2)
    lo0, lo1, up, wk = (os.fsencode(p) for p in (*lay.lowers, lay.upper, lay.work))
    expect = set()
    os.mkdir(os.path.join(wk, b"index"))
    for raw in ODD_NAMES:
        for root in (lo0, lo1, up):
            os.mkdir(os.path.join(root, raw))
        # upper: an orphan whiteout in a merged dir (OVL101)
        mkwhiteout(os.path.join(up, raw, b"wo" + raw))
        expect.add(("OVL101", "upper", _shown(raw) + "/" + _shown(b"wo" + raw)))
        # lower:1 (lowermost): a whiteout hides nothing there (OVL101)
        mkwhiteout(os.path.join(lo1, raw, b"low" + raw))
        expect.add(("OVL101", "lower:1", _shown(raw) + "/" + _shown(b"low" + raw)))
        # lower:0: a file with an opaque xattr (OVL202)
        open(os.path.join(lo0, raw, b"f" + raw), "w").close()
        setx(os.path.join(lo0, raw, b"f" + raw), "opaque", b"y")
        expect.add(("OVL202", "lower:0", _shown(raw) + "/" + _shown(b"f" + raw)))
        # work: a junk index entry (OVL601)
        open(os.path.join(wk, b"index", b"junk" + raw), "w").close()
        expect.add(("OVL601", "work", "index/" + _shown(b"junk" + raw)))
    setx(up, "impure", b"y")

    rc, out, err = cli(capsys, "check", "-n", "--json", *lay.args())
    doc = parse_json(out, rc)
    got = {(p["code"], p["layer"], p["path"]) for p in doc["problems"]}
    assert rc == 4 and expect <= got, sorted(expect - got)
    for p in doc["problems"]:
        assert printable(p["path"]) and printable(p["message"]), p
    assert out.isascii()  # ensure_ascii: safe for any consumer

    rc, out, err = cli(capsys, "check", "-n", *lay.args())
    assert rc == 4
    lines = out.splitlines()
    for code, layer, path in expect:
        assert any(ln.startswith(f"{layer}:{path}: ") and code in ln for ln in lines), (code, layer, path)
    assert printable(out.replace("\n", ""))

    rc, out, err = cli(capsys, "check", "-y", "--repair-lowers", "--json", *lay.args())
    doc = parse_json(out, rc)
    assert rc == 1 and {(p["code"], p["layer"], p["path"]) for p in doc["problems"] if p["fixed"]} >= expect
    assert cli(capsys, "check", "-n", *lay.args())[0] == 0
    rc, out, err = cli(capsys, "undo", doc["journal"])
    assert rc == 0, out + err
    assert cli(capsys, "check", "-n", *lay.args())[0] == 4


def test_odd_names_as_layer_roots(tmp_path):
    base = os.fsencode(tmp_path)
    lower = os.path.join(base, b"zqlow\n\xffer")
    upper = os.path.join(base, b"zqup\tper")
    work = os.path.join(base, b"zqwo\xferk")
    for d in (lower, upper, work):
        os.mkdir(d)
    mkwhiteout(os.path.join(upper, b"zz\n"))
    args = (b"--lower", lower, b"--upper", upper, b"--work", work)
    p = sub("check", "-n", "--json", *args)
    doc = parse_json(p.stdout, p.returncode)
    assert p.returncode == 4 and [x["path"] for x in doc["problems"]] == ["zz\\x0a"], doc
    p = sub("check", "-y", "--json", *args)
    doc = parse_json(p.stdout, p.returncode)
    assert p.returncode == 1 and doc["journal"]
    assert sub("check", "-n", *args).returncode == 0
    journal = os.path.join(work, b"ovlfsck", os.fsencode(os.path.basename(doc["journal"])))
    assert sub("undo", journal).returncode == 0
    assert os.path.lexists(os.path.join(upper, b"zz\n"))


# =========================================================================== symlink loops


def test_symlink_loops_inside_layers_are_ignored(tmp_path, capsys):
    lay = Layers(tmp_path)
    for root in (lay.lowers[0], lay.upper, lay.work):
        os.symlink("b", root / "a")
        os.symlink("a", root / "b")
        os.symlink("self", root / "self")
    (lay.lowers[0] / "d").mkdir()
    (lay.upper / "d").mkdir()
    os.symlink("../d/loop", lay.upper / "d" / "loop")
    os.symlink("loop2", lay.lowers[0] / "d" / "loop2")
    setx(lay.upper, "impure", b"y")
    (lay.work / "index").mkdir()
    os.symlink("l2", lay.work / "index" / "#l1")
    os.symlink("#l1", lay.work / "index" / "l2")  # junk name: OVL601, a symlink
    before = snapshot(tmp_path)
    rc, out, err = cli(capsys, "check", "-n", "--json", *lay.args())
    doc = parse_json(out, rc)
    # The temporary #l1 (a symlink) is only info: the kernel removes it at mount (OVL706).
    assert rc == 4 and sorted((p["code"], p["path"]) for p in doc["problems"]) == [
        ("OVL601", "index/l2"), ("OVL706", "index/#l1")], doc
    assert snapshot(tmp_path) == before
    rc, out, err = cli(capsys, "check", "-y", "--json", *lay.args())
    assert rc == 1, out
    assert cli(capsys, "check", "-n", *lay.args())[0] == 0
    # the loop was moved, never followed: the other end is untouched
    assert os.readlink(lay.work / "index" / "#l1") == "l2"


@pytest.mark.parametrize("position", POSITIONS)
def test_symlink_loop_as_layer_root(tmp_path, position):
    lay = Layers(tmp_path / "s", nlowers=2)
    loop = tmp_path / "zqloop"
    _make_bad("symlink-loop", loop)
    kw = {"lower:0": dict(lowers=[loop, lay.lowers[1]]), "lower:1": dict(lowers=[lay.lowers[0], loop]),
          "upper": dict(upper=loop), "work": dict(work=loop)}[position]
    for mode in ("-n", "-y"):
        p = sub("check", mode, *lay.args(**kw))
        assert p.returncode == 8, p
        assert "zqloop" in one_line(p.stderr)


# =========================================================================== undo


def _repaired(tmp_path, capsys) -> tuple[Layers, str]:
    lay = Layers(tmp_path)
    mkwhiteout(lay.upper / "zz")
    (lay.upper / "p").mkdir()
    mkwhiteout(lay.upper / "p" / "w")
    rc, out, err = cli(capsys, "check", "-y", "--json", *lay.args())
    assert rc == 1
    return lay, parse_json(out, rc)["journal"]


@pytest.mark.parametrize("what", ["missing", "directory", "empty", "garbage", "binary",
                                  "header-only-junk", "fifo"])
def test_undo_of_something_that_is_not_a_journal(tmp_path, capsys, what):
    lay, journal = _repaired(tmp_path, capsys)
    bad = tmp_path / f"zqbad-{what}.jsonl"
    if what == "directory":
        bad.mkdir()
    elif what == "empty":
        bad.write_text("")
    elif what == "garbage":
        bad.write_text("this is not a journal\n{\n")
    elif what == "binary":
        bad.write_bytes(os.urandom(512) + b"\xff\n\0")
    elif what == "header-only-junk":
        lines = Path(journal).read_text().splitlines()
        bad.write_text(lines[0] + "\n" + '{"rec": "op", "seq": "x", "op": "nope", "layer": 7}\n')
    elif what == "fifo":
        os.mkfifo(bad)
    before = snapshot(tmp_path)
    rc, out, err = cli(capsys, "undo", bad)
    assert rc == 8, (rc, out, err)
    line = one_line(err)
    assert "zqbad" in line or what == "header-only-junk", line
    assert snapshot(tmp_path) == before


def test_undo_twice_is_refused(tmp_path, capsys):
    lay, journal = _repaired(tmp_path, capsys)
    assert cli(capsys, "undo", journal)[0] == 0
    rc, out, err = cli(capsys, "undo", journal)
    assert rc == 8 and "already undone" in one_line(err)


def test_undo_that_cannot_revert_a_step_does_not_exit_0(tmp_path, capsys):
    lay, journal = _repaired(tmp_path, capsys)
    """A partial revert must not look like success to a script (it was exit 0 once)."""
    mkwhiteout(lay.upper / "zz")  # something else now sits where the quarantined one goes back
    rc, out, err = cli(capsys, "undo", journal)
    assert "refused" in out, out
    assert rc == 8, (rc, out, err)
    assert "could not be reverted" in one_line(err)
    assert os.path.lexists(lay.upper / "p" / "w")  # the other step was reverted


# =========================================================================== usage


@pytest.mark.parametrize("argv", [
    ["check", "--bogus"],
    ["check", "-n", "-y"],
    ["check", "-n", "-p"],
    ["check", "-y", "-p"],
    ["check", "-n", "--severity", "OVL101"],
    ["check", "-n", "--severity", "OVL999=error"],
    ["check", "-n", "--severity", "OVL101=fatal"],
    ["check", "-n", "--severity", "=error"],
    ["check", "-n"],  # no layers at all
    ["check", "-n", "-o", "upperdir=/x"],  # no lower
    ["check", "-n", "-o", "lowerdir=/a,index=maybe"],
    ["check", "-n", "--lower", "/a", "--upper", "/b"],  # upper without work
    ["bogus-command"],
    ["explain", "NOPE"],
    ["undo"],
])
def test_usage_errors_exit_16(tmp_path, capsys, argv):
    rc, out, err = cli(capsys, *argv)
    assert rc == 16, (rc, out, err)


def test_usage_errors_through_the_real_entry_point(tmp_path):
    lay = Layers(tmp_path)
    for argv in (["check", "--bogus", *lay.args()], ["-n", "-y", *lay.args()],
                 ["check", "-n", "--severity", "nope=error", *lay.args()], ["--bogus"]):
        p = sub(*argv)
        assert p.returncode == 16, (argv, p)
        assert p.stderr.strip()


def test_no_mode_without_a_terminal_exits_8_and_names_the_options(tmp_path):
    lay = Layers(tmp_path)
    mkwhiteout(lay.upper / "zqorphan")
    before = snapshot(tmp_path)
    for stdin in (subprocess.DEVNULL, subprocess.PIPE):
        p = sub("check", *lay.args(), stdin=stdin)
        assert p.returncode == 8, p
        line = one_line(p.stderr)
        for opt in ("-n", "-p", "-y"):
            assert opt in line, line
    assert snapshot(tmp_path) == before


# =========================================================================== stale findings


@pytest.mark.parametrize("layer,suffix", [("upper", "opaque"), ("lower", "opaque"),
                                          ("upper", "redirect")])
def test_xattr_whiteout_with_a_stray_xattr_is_fixed_once(tmp_path, capsys, layer, suffix):
    lay = Layers(tmp_path)
    root = lay.upper if layer == "upper" else lay.lowers[0]
    z = root / "z"
    z.write_text("")
    setx(z, "whiteout", b"")
    setx(z, suffix, b"y" if suffix == "opaque" else b"/elsewhere")
    args = [*lay.args(), "--repair-lowers", "--severity", "OVL310=error"]
    rc, out, err = cli(capsys, "check", "-n", "--json", *args)
    assert rc == 4
    rc, out, err = cli(capsys, "check", "-y", "--json", *args)
    doc = parse_json(out, rc)
    assert rc == 1 and "error" not in doc, doc
    assert cli(capsys, "check", "-n", *args)[0] == 0


# =========================================================================== property-based


def _tree(base: Path) -> tuple[Layers, dict[str, Path]]:
    """A small stack plus an `outside` tree that symlinks in the layers point to."""
    lay = Layers(base / "layers")
    lo, up = lay.lowers[0], lay.upper
    outside = base / "outside"
    (outside / "zqd" / "x").mkdir(parents=True)
    (outside / "secret").write_text("s\n")
    (lo / "d" / "sub").mkdir(parents=True)
    (lo / "d" / "a").write_text("a\n")
    (lo / "e").mkdir()
    (lo / "f").write_text("f\n")
    (lo / "z").write_text("")
    (lo / "s" / "x").mkdir(parents=True)
    (up / "d").mkdir()
    (up / "d" / "b").write_text("b\n")
    (up / "e2").mkdir()
    (up / "f").write_text("F\n")
    (up / "z").write_text("")
    mkwhiteout(up / "e")
    os.symlink("../../outside", up / "s")  # relative, out of the layer
    os.symlink(outside, up / "t")  # absolute
    os.symlink(outside / "zqd", lo / "t")
    setx(up, "impure", b"y")  # a clean stack to start from (upper d is merged)
    targets = {
        "upper:.": up, "upper:d": up / "d", "upper:d/b": up / "d" / "b", "upper:e2": up / "e2",
        "upper:f": up / "f", "upper:z": up / "z",
        "lower:d": lo / "d", "lower:d/sub": lo / "d" / "sub", "lower:e": lo / "e",
        "lower:f": lo / "f", "lower:z": lo / "z", "lower:s": lo / "s",
    }
    return lay, targets


INTERESTING = [
    b"", b"\0", b"y", b"x", b"n", b"yes", b"0", b"/", b"//", b".", b"..", b"/..", b"/../..",
    b"../../outside", b"/../../outside/zqd", b"/s/x", b"/t", b"/t/x", b"s", b"t", b"/d",
    b"d", b"e", b"/e", b"/f", b"/d/sub", b"sub", b"/e2", b"a/b", b"/a//b", b"/a/", b"/\0/x",
    b"U+1", b"L-5", b"U", b"ai", b"ia", b"zz", b"\xff\xfe", b"/" + b"a/" * 200 + b"a",
    b"/" + b"a" * 300, b"a" * 4096, b"\n", b"d\n",
    bytes.fromhex("00fb1d00010c3664b7ffbf408182dd84ed33ee52e00c0000003d3553a2"),
    bytes.fromhex("00fb1d04010c3664b7ffbf408182dd84ed33ee52e001080000e231bd84"),
    bytes.fromhex("00fb15"), bytes.fromhex("00fa1d0001"), bytes(16), bytes(4), b"\0\0\0\0\0\0",
]
# Values that mean something for one xattr (and, as "@fh:<target>", the real file handle
# of one of the tree's objects, as the kernel would store it in an origin/upper xattr).
PER_SUFFIX = {
    "opaque": [b"y", b"x", b"yes", b"n", b"0"],
    "redirect": [b"d", b"e", b"f", b"s", b"t", b"sub", b"/d", b"/e", b"/f", b"/e2", b"/d/sub",
                 b"/s/x", b"/t", b"/t/x", b"/z", b"/..", b"..", b"/", b"//d", b"d/", b"/d/"],
    "origin": ["@fh:lower:d", "@fh:lower:e", "@fh:lower:f", "@fh:lower:d/sub", "@fh:upper:d",
               b"", bytes.fromhex("00fb15")],
    "upper": ["@fh:upper:.", "@fh:upper:d", b""],
    "impure": [b"y", b"n", b""],
    "nlink": [b"U+1", b"L-5", b"U", b"L+999999999999", b"U-0"],
    "uuid": [bytes(16), bytes(range(16)), b"\0\0"],
    "metacopy": [b"", b"\0\x04\0\0", bytes(4) + bytes(28), b"\0"],
    "protattr": [b"a", b"i", b"ai", b"ia", b"x" * 40],
    "whiteout": [b"", b"y"],
}
TARGETS = ["upper:.", "upper:d", "upper:d/b", "upper:e2", "upper:f", "upper:z",
           "lower:d", "lower:d/sub", "lower:e", "lower:f", "lower:z", "lower:s"]


@st.composite
def _assignment(draw):
    target = draw(st.sampled_from(TARGETS))
    suffix = draw(st.sampled_from(SUFFIXES))
    value = draw(st.one_of(st.sampled_from(PER_SUFFIX[suffix]), st.sampled_from(INTERESTING),
                           st.binary(max_size=64), st.binary(min_size=200, max_size=4096)))
    return target, suffix, value


ASSIGNMENTS = st.lists(_assignment(), min_size=1, max_size=8)


def _value(value, targets) -> bytes:
    if isinstance(value, bytes):
        return value
    from ovlfsck import handles

    path = os.fspath(targets[value[len("@fh:"):]])
    uuid = handles.fs_uuid(path)
    if uuid is None:
        return b""
    return handles.encode_for(path, uuid, upper=value.startswith("@fh:upper")).encode()


def _outside_state(base: Path) -> dict:
    """Everything under base that is not inside a layer, plus base's own entries."""
    return {"base": sorted(os.listdir(base)), "layers": sorted(os.listdir(base / "layers")),
            "outside": snapshot(base / "outside")}


@settings(max_examples=int(os.environ.get("OVLFSCK_PROP_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(assignments=ASSIGNMENTS)
def test_arbitrary_overlay_xattr_values(capsys, assignments):
    """Whatever bytes are in the overlay xattrs: -n exits 0 or 4 (valid JSON, escaped paths,
    nothing changed); -y --repair-lowers fixes everything (exit 0 or 1: every problem that
    can arise here has a fix), writes nothing outside the layers, a second -n then exits 0,
    and undo restores the layers."""
    base = Path(tempfile.mkdtemp(prefix="ovlfsck-prop-"))
    try:
        lay, targets = _tree(base)
        for target, suffix, value in assignments:
            try:
                setx(targets[target], suffix, _value(value, targets))
            except OSError as exc:  # too big for the filesystem: that value is not written
                assert exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE), exc
        args = lay.args()
        before = snapshot(base)
        layers_before = {n: snapshot(p, skip=(b"ovlfsck",), times=False)
                         for n, p in (("lower", lay.lowers[0]), ("upper", lay.upper), ("work", lay.work))}

        rc, out, err = cli(capsys, "check", "-n", "--json", *args)
        doc = parse_json(out, rc)
        assert rc in (0, 4), (rc, doc)
        event(f"-n exit {rc}")
        for code in sorted({p["code"] for p in doc["problems"]}):
            event(f"reported {code}")
        assert all(printable(p["path"]) and printable(p["message"]) for p in doc["problems"])
        assert snapshot(base) == before, "-n changed something"

        outside = _outside_state(base)
        rc, out, err = cli(capsys, "check", "-y", "--repair-lowers", "--json", *args)
        doc = parse_json(out, rc)
        # -y fixes everything that has a fix; what is left must be a problem with no fix
        # (e.g. a metacopy file in the lowermost layer has no data anywhere: OVL804).
        left = [p for p in doc["problems"] if p["severity"] == "error" and not p["fixed"]]
        assert rc in (0, 1) or (rc in (4, 5) and all(p["action"] is None for p in left)), (rc, doc)
        event(f"-y exit {rc}")
        assert _outside_state(base) == outside, "-y wrote outside the layers"
        if rc == 1:
            # "A second run right after a successful -y run must exit 0."
            rc2, out2, _ = cli(capsys, "check", "-n", "--json", *args)
            assert rc2 == 0, (assignments, json.loads(out2)["problems"], doc["problems"])
        if doc["journal"]:
            rc3, out3, err3 = cli(capsys, "undo", doc["journal"])
            assert rc3 == 0 and "refused" not in out3, out3 + err3
            after = {n: snapshot(p, skip=(b"ovlfsck",), times=False)
                     for n, p in (("lower", lay.lowers[0]), ("upper", lay.upper), ("work", lay.work))}
            assert after == layers_before, "undo did not restore the layers"
            assert _outside_state(base) == outside
    finally:
        shutil.rmtree(base, ignore_errors=True)
