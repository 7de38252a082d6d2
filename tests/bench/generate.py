#!/usr/bin/env python3
"""Generate a deterministic, clean overlayfs layer set shaped like a container image stack.

    generate.py --entries N --seed S --out DIR

DIR/lower1 (bottom image layer), DIR/lower0 (top image layer: merges into lower1's
directories, whites out some of its files, makes some directories opaque), DIR/upper (what
the kernel leaves after a container ran with index=on, redirect_dir=on: copy-ups with real
origin handles and impure parents, whiteouts, opaque directories, directory renames with
relative and absolute redirects plus the cover whiteout, indexed hardlinks) and DIR/work
(work/ and index/ with the index entries of the hardlinks, the index dir's `upper`).

Check it with: ovlfsck check -n --lower DIR/lower0 --lower DIR/lower1 --upper DIR/upper
--work DIR/work   (it must be clean). Needs root (whiteouts, trusted.* xattrs). The
handles are only realistic on a filesystem with a uuid (run.py uses a loop ext4).
Prints the number of entries (every directory entry of every layer) on stdout.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import xattr

from ovlfsck import handles

NS = "trusted.overlay."
S_IFCHR = 0o020000
WHITEOUT_DEV = os.makedev(0, 0)
# A few precomputed payloads: file contents are small, sizes shaped like an image layer.
_SIZES = (0, 0, 12, 60, 200, 512, 900, 1500, 3000, 4096)
_PAYLOAD = {n: (b"ovlfsck-bench-" * (n // 14 + 1))[:n] for n in _SIZES}


class Gen:
    def __init__(self, out: str, seed: int):
        self.out = out
        self.rng = random.Random(seed)
        self.count = 0
        self.uuid = b""
        self.L1 = os.path.join(out, "lower1")
        self.L0 = os.path.join(out, "lower0")
        self.U = os.path.join(out, "upper")
        self.W = os.path.join(out, "work")

    # ------------------------------------------------------------------ primitives
    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(path, mode)
        self.count += 1

    def file(self, path: str, size: int | None = None) -> None:
        if size is None:
            size = self.rng.choice(_SIZES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if size:
            os.write(fd, _PAYLOAD[size])
        os.close(fd)
        self.count += 1

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)
        self.count += 1

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)
        self.count += 1

    def whiteout(self, path: str) -> None:
        os.mknod(path, S_IFCHR, WHITEOUT_DEV)
        self.count += 1

    @staticmethod
    def setx(path: str, name: str, value: bytes) -> None:
        xattr.set(path, NS + name, value, nofollow=True)

    def origin(self, lower_path: str) -> bytes:
        return handles.encode_for(lower_path, self.uuid).encode()

    # ------------------------------------------------------------------ layers
    def build(self, entries: int) -> int:
        for d in (self.L1, self.L0, self.U, self.W):
            os.makedirs(d)
        os.mkdir(os.path.join(self.W, "work"), 0)
        os.mkdir(os.path.join(self.W, "index"), 0)
        self.uuid = handles.fs_uuid(self.L1) or handles.NULL_UUID
        rng = self.rng
        # One package in lower1 is 1 + 3 * (1 + 14 files + 1 symlink) = 49 entries; lower0
        # adds ~half as much again, the upper ~a fifth: ~85 entries per package overall.
        npkg = max(4, round(entries / 69.5))
        subs = ("bin", "lib", "share")
        files_per_sub = 14
        # ---------------- lower1: the base image
        for p in range(npkg):
            pd = os.path.join(self.L1, f"pkg{p:05d}")
            self.mkdir(pd)
            for s in subs:
                sd = os.path.join(pd, s)
                self.mkdir(sd)
                for f in range(files_per_sub):
                    self.file(os.path.join(sd, f"f{f:02d}"))
                self.symlink(f"f{rng.randrange(files_per_sub):02d}", os.path.join(sd, "link"))
            if p % 10 == 3:  # a hardlink pair (copied up through the index below)
                self.link(os.path.join(pd, "bin", "f00"), os.path.join(pd, "bin", "f00.hl"))
        # ---------------- lower0: the next image layer
        merged = {}  # pkg -> set of subdirs present in lower0 (topmost lower for those)
        for p in range(npkg):
            if p % 2:  # half of the packages are touched by the second layer
                continue
            pd = os.path.join(self.L0, f"pkg{p:05d}")
            self.mkdir(pd)
            merged[p] = set()
            for s in subs:
                sd = os.path.join(pd, s)
                self.mkdir(sd)
                merged[p].add(s)
                if s == "share" and p % 8 == 0:  # rm -rf share; mkdir share: opaque
                    self.setx(sd, "opaque", b"y")
                    for f in range(6):
                        self.file(os.path.join(sd, f"n{f:02d}"))
                    continue
                for f in range(files_per_sub, files_per_sub + 8):  # new files
                    self.file(os.path.join(sd, f"f{f:02d}"))
                if s == "lib" and p % 4 == 0:  # removed files of the layer beneath
                    self.whiteout(os.path.join(sd, "f05"))
                    self.whiteout(os.path.join(sd, "f06"))
        for a in range(max(1, npkg // 10)):  # packages only in lower0
            ad = os.path.join(self.L0, f"app{a:05d}")
            self.mkdir(ad)
            for f in range(10):
                self.file(os.path.join(ad, f"a{f:02d}"))

        def top_lower(rel: str) -> str:
            """The topmost lower object of a merged-view path (rel is 'pkgNNNNN/...')."""
            p0 = os.path.join(self.L0, rel)
            return p0 if os.path.lexists(p0) else os.path.join(self.L1, rel)

        # ---------------- upper: what a running container left behind
        up_root = self.U
        self.setx(up_root, "origin", self.origin(self.L0))  # index=on: the root's origin
        self.setx(up_root, "impure", b"y")

        def copy_up_dir(rel: str) -> str:
            """Copy up the merged directory rel (and its parents) as the kernel does."""
            parts = rel.split("/")
            for i in range(1, len(parts) + 1):
                r = "/".join(parts[:i])
                ud = os.path.join(self.U, r)
                if not os.path.isdir(ud):
                    self.mkdir(ud)
                    self.setx(ud, "origin", self.origin(top_lower(r)))
                if i < len(parts) or True:
                    pass
            for i in range(1, len(parts)):  # parents of origin-carrying children are impure
                self.setx(os.path.join(self.U, "/".join(parts[:i])), "impure", b"y")
            return os.path.join(self.U, rel)

        def mark_impure(ud: str) -> None:
            self.setx(ud, "impure", b"y")

        index_dir = os.path.join(self.W, "index")
        abs_targets = []
        for p in range(npkg):
            pkg = f"pkg{p:05d}"
            kind = p % 5
            if kind == 0:  # files modified: copy-up with origin, new files, deletions
                ud = copy_up_dir(f"{pkg}/bin")
                mark_impure(ud)
                for f in (1, 2, 3):
                    self.file(os.path.join(ud, f"f{f:02d}"))
                    self.setx(os.path.join(ud, f"f{f:02d}"), "origin",
                              self.origin(top_lower(f"{pkg}/bin/f{f:02d}")))
                self.whiteout(os.path.join(ud, "f04"))
                for f in range(5):
                    self.file(os.path.join(ud, f"new{f}"))
            elif kind == 1:  # rm -rf lib; mkdir lib -> opaque
                ud = copy_up_dir(pkg)
                od = os.path.join(ud, "lib")
                self.mkdir(od)
                self.setx(od, "opaque", b"y")
                for f in range(4):
                    self.file(os.path.join(od, f"o{f}"))
            elif kind == 2:  # mv pkg/share pkg/share.old: relative redirect
                ud = copy_up_dir(pkg)
                mark_impure(ud)
                rd = os.path.join(ud, "share.old")
                self.mkdir(rd)
                self.setx(rd, "redirect", b"share")
                self.setx(rd, "origin", self.origin(top_lower(f"{pkg}/share")))
                self.whiteout(os.path.join(ud, "share"))
            elif kind == 3:  # mv pkgA/lib pkgB/moved-lib: absolute redirect
                abs_targets.append(pkg)
            else:  # plain new content and a deleted file at the package level
                ud = copy_up_dir(f"{pkg}/lib")
                self.whiteout(os.path.join(ud, "f10"))
                for f in range(3):
                    self.file(os.path.join(ud, f"extra{f}"))
            if p % 10 == 3:  # echo >> bin/f00: copied up through the index (f00.hl shares it)
                ud = copy_up_dir(f"{pkg}/bin")
                mark_impure(ud)
                uf = os.path.join(ud, "f00")
                self.file(uf, 60)
                fh = self.origin(os.path.join(self.L1, pkg, "bin", "f00"))
                self.setx(uf, "origin", fh)
                self.setx(uf, "nlink", b"U+0")
                self.link(uf, os.path.join(index_dir, fh.hex()))
        # absolute redirects: pkg(p) lib moved under the next package
        for src in abs_targets:
            p = int(src[3:])
            dst = f"pkg{(p + 1) % npkg:05d}"
            ud_src = copy_up_dir(src)
            self.whiteout(os.path.join(ud_src, "lib"))
            ud_dst = copy_up_dir(dst)
            mark_impure(ud_dst)
            rd = os.path.join(ud_dst, f"moved-{src}")
            self.mkdir(rd)
            self.setx(rd, "redirect", f"/{src}/lib".encode())
            self.setx(rd, "origin", self.origin(top_lower(f"{src}/lib")))
        for f in range(20):  # new files at the top of the upper
            self.file(os.path.join(self.U, f"etc-{f}"))
        self.setx(index_dir, "upper",
                  handles.encode_for(self.U, self.uuid, upper=True).encode())
        return self.count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if os.path.exists(a.out) and os.listdir(a.out):
        ap.error(f"{a.out} exists and is not empty")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.monotonic()
    n = Gen(a.out, a.seed).build(a.entries)
    print(n)
    print(f"generated {n} entries in {time.monotonic() - t0:.1f}s under {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
