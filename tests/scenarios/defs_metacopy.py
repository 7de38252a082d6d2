"""Scenarios for the issue-3 metacopy codes (registered with @scenario()).

Each layer set is made by the kernel with metacopy=on (a chmod through the mount makes a
metadata-only copy-up: a sparse upper file with an empty metacopy xattr and an origin),
damaged offline, and must mount cleanly with the same options after the repair.
"""
from __future__ import annotations

import os
import subprocess

from .helpers import Bed, getx, setx, write
from .registry import Scenario, scenario

MC = "metacopy=on"


def _metacopy_build(b: Bed, *others: str) -> None:
    """Lower zqd/zqm (+ others), then a metadata-only copy-up of zqd/zqm."""
    write(b.L(0, "zqd", "zqm"), "lower data m\n")
    for name in others:
        write(b.L(0, "zqd", name), f"lower data {name}\n")
    with b.mounted() as m:
        os.chmod(m / "zqd" / "zqm", 0o600)
    assert getx(b.U("zqd", "zqm"), "metacopy") == b""
    assert getx(b.U("zqd", "zqm"), "origin")
    assert os.path.getsize(b.U("zqd", "zqm")) == len("lower data m\n")


def _ovl801():
    def damage(b: Bed):
        setx(b.U("zqd", "zqm"), "metacopy", b"\x00\x00")  # EIO on every lookup (H11a)
    return Scenario("OVL801", _metacopy_build, damage, "upper", "zqd/zqm", options=MC,
                    kernel_sig=(r"has too small xattr",))


def _ovl802():
    def damage(b: Bed):
        setx(b.U("zqd", "zqm"), "metacopy", b"\x01\x04\x00\x00\x00")  # version 1, bad length
    return Scenario("OVL802", _metacopy_build, damage, "upper", "zqd/zqm", options=MC,
                    kernel_sig=(r"unsupported version", r"invalid xattr size"))


def _ovl803():
    def build(b: Bed):
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            os.mkdir(m / "zqdir")
            write(m / "zqdir" / "f", "f\n")
    def damage(b: Bed):
        setx(b.U("zqdir"), "metacopy", b"")  # ignored on a directory
    return Scenario("OVL803", build, damage, "upper", "zqdir", options=MC)


def _ovl804():
    def damage(b: Bed):
        # A relative redirect to a name that is in no lower layer: EIO (H10); the origin
        # still names the lower zqd/zqm found at the file's own path.
        setx(b.U("zqd", "zqm"), "redirect", b"zqgone")
    return Scenario("OVL804", _metacopy_build, damage, "upper", "zqd/zqm", options=MC,
                    kernel_sig=(r"metacopy with no lower data found",))


def _ovl805():
    def damage(b: Bed):
        setx(b.U("zqd", "zqm"), "redirect", b"zqa/b")  # EINVAL: invalid redirect
    return Scenario("OVL805", _metacopy_build, damage, "upper", "zqd/zqm", options=MC,
                    kernel_sig=(r"invalid redirect",))


def _ovl807():
    def build(b: Bed):
        _metacopy_build(b, "zqother")
    def damage(b: Bed):
        # The redirect leads to another existing lower file: with index=on the lookup
        # fails ESTALE (H29), naming the lower file found.
        setx(b.U("zqd", "zqm"), "redirect", b"zqother")
    return Scenario("OVL807", build, damage, "upper", "zqd/zqm", options=MC + ",index=on",
                    kernel_sig=(r"failed to verify origin",))


def _ovl851():
    def build(b: Bed):
        write(b.L(0, "zqd", "zqp"), "protected\n")
        with b.mounted() as m:
            subprocess.run(["chattr", "+a", str(m / "zqd" / "zqp")], check=True)
        assert getx(b.U("zqd", "zqp"), "protattr") == b"a"
    def damage(b: Bed):
        setx(b.U("zqd", "zqp"), "protattr", b"x")  # ignored: the file is no longer append-only
    # The fix removes the unusable value: the file stays as the kernel shows it now (not
    # append-only), so the merged view is the same either way.
    return Scenario("OVL851", build, damage, "upper", "zqd/zqp",
                    kernel_sig=(r"incompatible overlay.protattr format",))


for _fn in (_ovl801, _ovl802, _ovl803, _ovl804, _ovl805, _ovl807, _ovl851):
    scenario()(_fn)
