"""Scenarios for the codes of issue 2: whiteouts, opaque, redirects, impure, index names."""
from __future__ import annotations

import os
import subprocess

from .helpers import (
    Bed,
    getx,
    mkdir,
    mkwhiteout,
    mkxwhiteout,
    rmx,
    setx,
    write,
)

from .registry import Scenario, add_dir, drop_under, scenario

# =========================================================================== whiteouts


def _ovl101():
    def build(b: Bed):
        write(b.L(0, "d", "a"), "a\n")
        with b.mounted() as m:
            write(m / "d" / "new", "n\n")  # copies d up: a merged directory
    def damage(b: Bed):
        mkwhiteout(b.U("d", "zqghost"))  # hides nothing: no lower d/zqghost
    return Scenario("OVL101", build, damage, "upper", "d/zqghost")


def _ovl102():
    def build(b: Bed):
        write(b.L(0, "d", "a"), "a\n")
        with b.mounted() as m:
            subprocess.run(["rm", "-rf", str(m / "d")], check=True)
            os.mkdir(m / "d")  # mkdir over a whiteout: upper d gets opaque=y
            write(m / "d" / "b", "b\n")
        assert getx(b.U("d"), "opaque") == b"y"
    def damage(b: Bed):
        mkwhiteout(b.U("d", "a"))
    return Scenario("OVL102", build, damage, "upper", "d/a")


def _ovl103():
    def build(b: Bed):
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            os.mkdir(m / "zqpure")
            write(m / "zqpure" / "x", "x\n")
        assert getx(b.U("zqpure"), "opaque") is None
    def damage(b: Bed):
        mkwhiteout(b.U("zqpure", "zqw"))  # readdir of a pure upper dir lists it (H21)
    return Scenario("OVL103", build, damage, "upper", "zqpure/zqw")


def _ovl104():
    def build(b: Bed):
        write(b.L(0, "zqd", "f"), "lower f\n")
        write(b.L(0, "zqd", "g"), "g\n")
        with b.mounted() as m:
            os.unlink(m / "zqd" / "f")  # the kernel leaves a 0/0 whiteout in upper zqd
    def damage(b: Bed):
        os.unlink(b.U("zqd", "f"))
        mkxwhiteout(b.U("zqd", "f"))  # same meaning for lookup, but readdir lists it (X2)
    return Scenario("OVL104", build, damage, "upper", "zqd/f")


def _ovl105():
    def build(b: Bed):
        # l0 (top lower) was made by a tool that writes xattr whiteouts; l1 beneath.
        write(b.L(1, "zqd", "f"), "bottom f\n")
        write(b.L(1, "zqd", "g"), "g\n")
        mkdir(b.L(0, "zqd"))
        mkxwhiteout(b.L(0, "zqd", "f"))
        setx(b.L(0, "zqd"), "opaque", b"x")
        with b.mounted() as m:
            assert sorted(os.listdir(m / "zqd")) == ["g"]  # the marker makes readdir filter f
            write(m / "new", "n\n")
    def damage(b: Bed):
        rmx(b.L(0, "zqd"), "opaque")  # marker lost: readdir lists f, lookup says ENOENT (X1 e)
    return Scenario("OVL105", build, damage, "lower:0", "zqd", nlowers=2,
                    fix_args=("--repair-lowers",))


# =========================================================================== opaque


def _merged_dir_build(b: Bed):
    write(b.L(0, "zqd", "a"), "a\n")
    with b.mounted() as m:
        write(m / "zqd" / "b", "b\n")  # copies zqd up: merged with the lower zqd


def _ovl201():
    def damage(b: Bed):
        setx(b.U("zqd"), "opaque", b"yes")  # ignored by the kernel (H12a)
    return Scenario("OVL201", _merged_dir_build, damage, "upper", "zqd")


def _ovl202():
    def build(b: Bed):
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            write(m / "zqf", "f\n")
    def damage(b: Bed):
        setx(b.U("zqf"), "opaque", b"y")
    return Scenario("OVL202", build, damage, "upper", "zqf")


def _ovl203():
    def damage(b: Bed):
        setx(b.U("zqd"), "opaque", b"x")  # no meaning on the upper (H12d)
    return Scenario("OVL203", _merged_dir_build, damage, "upper", "zqd")


# =========================================================================== redirects


def _renamed_dir_build(b: Bed):
    """redirect_dir=on: lower zqd/a renamed to zqdm through the mount, plus an own child."""
    write(b.L(0, "zqd", "a"), "a\n")
    write(b.L(0, "zqfile"), "a file\n")
    with b.mounted() as m:
        os.rename(m / "zqd", m / "zqdm")
        write(m / "zqdm" / "zqown", "own\n")
    assert getx(b.U("zqdm"), "redirect") == b"zqd"


def _bad_redirect(code: str, value: bytes, sig: tuple[str, ...] = ()):
    def damage(b: Bed):
        setx(b.U("zqdm"), "redirect", value)
    # The directory stops merging: what came from the lower zqd is gone, its own child stays.
    return Scenario(code, _renamed_dir_build, damage, "upper", "zqdm", options="redirect_dir=on",
                    expect=drop_under("zqdm", keep=("zqdm/zqown",)), kernel_sig=sig)


def _ovl301():
    return _bad_redirect("OVL301", b"zqa/b", (r"invalid redirect",))


def _ovl302():
    return _bad_redirect("OVL302", b"/zq/../zqd")


def _ovl303():
    return _bad_redirect("OVL303", b"/zqgone")


def _ovl304():
    return _bad_redirect("OVL304", b"/zqfile")


def _ovl305():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            os.rename(m / "zqd", m / "zqdm")
            os.rename(m / "zqdm", m / "zqd")  # renamed back: the kernel keeps redirect "zqd"
    def damage(b: Bed):
        # Nothing to damage: the kernel itself left the self redirect.
        assert getx(b.U("zqd"), "redirect") == b"zqd"
    return Scenario("OVL305", build, damage, "upper", "zqd", options="redirect_dir=on")


def _ovl306():
    def build(b: Bed):
        write(b.L(0, "zqp", "zqd", "a"), "a\n")
        write(b.L(0, "zqp", "other"), "o\n")
        with b.mounted() as m:
            os.mkdir(m / "zqq")
            os.rename(m / "zqp" / "zqd", m / "zqq" / "zqdm")  # redirect "/zqp/zqd"
        assert getx(b.U("zqq", "zqdm"), "redirect") == b"/zqp/zqd"
        assert os.stat(b.U("zqp", "zqd")).st_rdev == 0
    def damage(b: Bed):
        # The copy of the upper lost zqp (with the whiteout at the old location in it).
        subprocess.run(["rm", "-rf", str(b.U("zqp"))], check=True)
    return Scenario("OVL306", build, damage, "upper", "zqp/zqd", options="redirect_dir=on",
                    kernel_sig=(r"failed to get inode",))


def _ovl307():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            os.rename(m / "zqd", m / "zqdm")
            os.mkdir(m / "zqdx")  # new dir in a merged dir: opaque=y
        assert getx(b.U("zqdx"), "opaque") == b"y"
    def damage(b: Bed):
        # A forged claim on the same lower directory (no origin to back it).
        rmx(b.U("zqdx"), "opaque")
        setx(b.U("zqdx"), "redirect", b"zqd")
    return Scenario("OVL307", build, damage, "upper", "zqdx", options="redirect_dir=on",
                    kernel_sig=(r"failed to get inode",))


def _ovl308():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            os.rename(m / "zqd", m / "zqdm")
    def damage(b: Bed):
        # The whiteout at the old location became a plain directory: zqd merges again.
        os.unlink(b.U("zqd"))
        mkdir(b.U("zqd"))
    # The origin of zqdm proves the rename: the plain zqd loses its claim (made opaque).
    return Scenario("OVL308", build, damage, "upper", "zqd", options="redirect_dir=on",
                    expect=add_dir("zqd"), kernel_sig=(r"failed to get inode",))


def _ovl309():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            write(m / "zqd" / "b", "b\n")
    def damage(b: Bed):
        setx(b.L(0, "zqd"), "redirect", b"/zqnowhere")  # lowermost: never read
    return Scenario("OVL309", build, damage, "lower:0", "zqd", fix_args=("--repair-lowers",))


def _ovl310():
    def build(b: Bed):
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            write(m / "zqf", "f\n")
    def damage(b: Bed):
        setx(b.U("zqf"), "redirect", b"/keep")  # ignored: not a metacopy file
    return Scenario("OVL310", build, damage, "upper", "zqf")


def _ovl311():
    def build(b: Bed):
        write(b.L(0, "zqe", "a"), "a\n")
        write(b.L(0, "zqx", "zqhidden"), "h\n")
        with b.mounted() as m:
            subprocess.run(["rm", "-rf", str(m / "zqx")], check=True)
            os.rename(m / "zqe", m / "zqx")  # upper zqx: redirect "zqe"; lower zqx stays hidden
            write(m / "zqx" / "zqown", "own\n")
        assert getx(b.U("zqx"), "redirect") == b"zqe"
        assert getx(b.U("zqx"), "opaque") is None
    def damage(b: Bed):
        setx(b.U("zqx"), "redirect", b"/zqgone")  # dangling
    # Removing the redirect would merge zqx with the lower zqx; -y also makes it opaque, so
    # neither the lower zqe content nor the lower zqx content shows in it.
    return Scenario("OVL311", build, damage, "upper", "zqx", options="redirect_dir=on",
                    expect=drop_under("zqx", keep=("zqx/zqown",)), reported_as="OVL303")


# =========================================================================== impure, index


def _ovl401():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            with open(m / "zqd" / "a", "a") as fh:
                fh.write("more\n")  # copy-up of a: origin on a, impure on zqd
        assert getx(b.U("zqd"), "impure") == b"y"
    def damage(b: Bed):
        rmx(b.U("zqd"), "impure")
    return Scenario("OVL401", build, damage, "upper", "zqd")


def _ovl601():
    def build(b: Bed):
        write(b.L(0, "zqf"), "f\n")
        os.link(b.L(0, "zqf"), b.L(0, "zqf2"))
        with b.mounted() as m:
            with open(m / "zqf", "a") as fh:
                fh.write("more\n")  # a lower hardlink: copied up through the index
        assert [n for n in os.listdir(b.W("index")) if not n.startswith("#")]
    def damage(b: Bed):
        write(b.W("index", "zqjunk"), "junk\n")
    return Scenario("OVL601", build, damage, "work", "index/zqjunk", options="index=on",
                    kernel_sig=(r"failed to verify index", r"failed index dir cleanup"))


for _fn in (_ovl101, _ovl102, _ovl103, _ovl104, _ovl105, _ovl201, _ovl202, _ovl203, _ovl301,
            _ovl302, _ovl303, _ovl304, _ovl305, _ovl306, _ovl307, _ovl308, _ovl309, _ovl310,
            _ovl311, _ovl401, _ovl601):
    scenario()(_fn)


