"""Helpers for tests/kernel/test_migration_kernel.py: the original layer set, the copy tools,
ovlfsck runs with JSON output, views, NFS file handles, before/after snapshots.

Everything that mounts goes through kutil (mount_overlay / LoopFS), so every mount is
undone whatever happens.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from ovlfsck import handles

from . import kutil, workload
from .test_record_kernel import _lower as record_lower
from .test_record_kernel import _ops as record_ops

LAYERS = ("lower", "upper", "work")

# --------------------------------------------------------------------------- the original


def more_ops(mnt: str) -> None:
    """Operations on top of test_record_kernel._ops (which renames d2 -> d2moved and
    d3/deep -> deep2): nested renames, a rename into a renamed dir, a second link through
    the overlay to a lower file that already has lower links, a rename of an indexed alias."""
    m = lambda *p: os.path.join(mnt, *p)  # noqa: E731
    os.rename(m("d2moved", "sub"), m("d2moved", "sub_r"))  # rename inside a renamed dir
    os.rename(m("deep2"), m("d2moved", "sub_r", "deep3"))  # renamed dir into a renamed dir
    os.makedirs(m("n1", "n2"))
    os.rename(m("n1"), m("n1moved"))  # an upper-only dir: no redirect needed
    os.link(m("d2moved", "hl2"), m("d1", "hl3"))  # link to the lower alias of the copied-up d1/hl
    os.rename(m("f3"), m("d4", "f3moved"))  # an indexed file renamed into an opaque dir


@dataclass
class Layers:
    base: str  # holds lower/ upper/ work/ and nothing else

    @property
    def lower(self) -> str:
        return os.path.join(self.base, "lower")

    @property
    def upper(self) -> str:
        return os.path.join(self.base, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.base, "work")

    def opts(self, options: str) -> str:
        return kutil.overlay_options([self.lower], self.upper, self.work, options)

    def mount(self, mnt, options: str):
        return kutil.mount_overlay([self.lower], self.upper, self.work, mnt, options)


@dataclass
class Original:
    variant: str
    options: str
    layers: Layers
    view: dict  # kutil.merged_view while the kernel had it mounted after the workload
    groups: list  # sorted lists of merged paths sharing one (st_dev, st_ino), any nlink
    stats: str  # workload summary
    check: tuple = ()  # (exit code, report) of check -n on the original
    snapshot: dict = field(default_factory=dict)  # layer_snapshots (work/ovlfsck excluded)
    fs: object = None  # the kutil.LoopFS holding it


def link_groups(root) -> list:
    """Sets of paths (non-directories) under *root* that are one inode, whatever st_nlink
    says: a broken overlay nlink must not hide a group."""
    by_ino: dict = {}
    for rel, _a, st in kutil._walk(os.fspath(root)):
        if not stat.S_ISDIR(st.st_mode):
            by_ino.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return sorted(sorted(v) for v in by_ino.values() if len(v) > 1)


class TarSafeWorkload(workload.Workload):
    """workload.Workload whose ``link`` op never links fifos or device nodes.

    GNU tar (1.34) archives every name of a hardlinked fifo or device node as a separate
    inode (it keeps hardlinks of regular files and symlinks only). With index=on a copied-up
    lower fifo/device with several links, and with nfs_export=on EVERY copied-up fifo/device
    (chmod, chown, rename, link...), is one inode with its work/index entry, so a tar copy of
    those layers cannot be faithful. The tar cases therefore use layers made with no special
    file in the random lower tree (build_original(tar_safe=True)) and with this workload.
    """

    def op_link(self):
        self.others = [o for o in self.others if os.path.islink(self.a(o))]
        return super().op_link()


def build_original(parent: str, variant: str, options: str, mnt: str, *,
                   lower_seed: int, ops_seed: int, n_lower: int, n_ops: int,
                   tar_safe: bool = False) -> Original:
    """Layers under *parent*/orig, written by the real kernel (mounted with *options*)."""
    layers = Layers(os.path.join(parent, "orig"))
    for d in LAYERS:
        os.makedirs(getattr(layers, d))
    record_lower(layers.lower)
    workload.build_lower(os.path.join(layers.lower, "rnd"), random.Random(lower_seed), n_lower)
    if tar_safe:  # see TarSafeWorkload
        for _rel, a, st in list(kutil._walk(os.path.join(layers.lower, "rnd"))):
            if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                os.unlink(a)
    with layers.mount(mnt, options) as m:
        record_ops(m)
        more_ops(m)
        rnd, rng = os.path.join(m, "rnd"), random.Random(ops_seed)
        if tar_safe:
            w = TarSafeWorkload(rnd, rng)
            for _ in range(n_ops):
                w.step()
            stats = w.stats
        else:
            stats = workload.run_workload(rnd, rng, n_ops)
        view = kutil.merged_view(m)
        groups = link_groups(m)
    if stats.unexpected:
        raise AssertionError("the kernel workload failed unexpectedly:\n" + stats.summary())
    return Original(variant, options, layers, view, groups, stats.summary())


# --------------------------------------------------------------------------- copy tools

FAITHFUL_TOOLS = ("tar", "cp", "rsync")
LOSSY_TOOLS = ("rsync-a", "rsync-aX", "tar-no-include")

_TAR_X = "--xattrs --xattrs-include='*'"


def copy_command(tool: str, src: str, dst: str) -> str:
    """The shell command that copies *src* (holding lower/upper/work) to *dst* (absent)."""
    if tool == "tar":  # docs/migration.md step 3, both sides with the flags, -p
        return (f"mkdir {dst} && set -o pipefail && tar {_TAR_X} -cpf - -C {src} lower upper work"
                f" | tar {_TAR_X} -xpf - -C {dst}")
    if tool == "cp":  # one run
        return f"cp -a {src} {dst}"
    if tool == "rsync":  # one run
        return f"mkdir {dst} && rsync -aHAX --numeric-ids {src}/ {dst}/"
    if tool == "rsync-a":  # no -X (and, being plain -a, no -H either)
        return f"mkdir {dst} && rsync -a {src}/ {dst}/"
    if tool == "rsync-aX":  # xattrs, but no -H
        return f"mkdir {dst} && rsync -aX {src}/ {dst}/"
    if tool == "tar-no-include":  # --xattrs but no --xattrs-include: trusted.* dropped
        return (f"mkdir {dst} && set -o pipefail && tar --xattrs -cpf - -C {src} lower upper work"
                f" | tar --xattrs -xpf - -C {dst}")
    raise AssertionError(tool)


def copy_layers(tool: str, src: str, dst: str) -> None:
    for p in (src, dst):
        kutil._check_layer_path(p)
        if any(c in p for c in " '\"$`;&|<>*?"):
            raise ValueError(f"path unsuitable for the shell: {p!r}")
    assert not os.path.lexists(dst), dst
    cmd = copy_command(tool, src, dst)
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"copy failed ({p.returncode}): {cmd}\n{p.stderr[-3000:]}")


def tool_available(tool: str) -> Optional[str]:
    exe = tool.split("-")[0]
    return None if shutil.which(exe) else f"{exe} not installed"


# --------------------------------------------------------------------------- ovlfsck runs


def ovlfsck_json(*args: str) -> tuple[int, dict, str]:
    """Run ovlfsck with --json; (exit code, parsed stdout, stderr). Fails on non-JSON."""
    p = kutil.run_ovlfsck(*args, "--json", timeout=300)
    try:
        doc = json.loads(p.stdout)
        assert isinstance(doc, dict)
    except (ValueError, AssertionError):
        raise AssertionError(f"ovlfsck {' '.join(args[:2])} --json printed no JSON object "
                             f"(exit {p.returncode})\nstdout: {p.stdout[:3000]}\n"
                             f"stderr: {p.stderr[-3000:]}") from None
    return p.returncode, doc, p.stderr


def check(layers: Layers, options: str, mode: str) -> tuple[int, dict]:
    code, doc, _err = ovlfsck_json("check", mode, "-o", layers.opts(options))
    return code, doc


def fmt_problems(doc: dict, limit: int = 12, width: int = 800) -> str:
    """Exit code and counts, the findings per code, then the findings NOT fixed (the fixed
    ones only when nothing else is listed)."""
    probs = doc.get("problems") or []
    c = doc.get("counts") or {}
    head = (f"  exit {doc.get('exit_code')}, found {c.get('found')} fixed {c.get('fixed')} "
            f"left {c.get('left')}" + (f", error: {doc['error']}" if doc.get("error") else "")
            if c else "")
    per: dict = {}
    for p in probs:
        key = (p["code"], p["severity"], "fixed" if p.get("fixed") else "not fixed")
        per[key] = per.get(key, 0) + 1
    summary = "  by code: " + ", ".join(f"{k[0]} {k[1]} {k[2]} x{n}" for k, n in sorted(per.items()))
    shown = [p for p in probs if not p.get("fixed")] or probs
    lines = []
    for p in shown[:limit]:
        line = (f"    {p['code']} {p['severity']}{' FIXED' if p.get('fixed') else ''} "
                f"{p.get('layer')}:{p.get('path')}: {p.get('message')}"
                + (f" [{p['note']}]" if p.get("note") else ""))
        lines.append(line if len(line) <= width else line[:width] + "...")
    if len(shown) > limit:
        lines.append(f"    ... and {len(shown) - limit} more")
    return "\n".join(([head] if head else []) + [summary] + lines)


def codes(doc: dict, severities=("error", "warning", "info")) -> set:
    return {p["code"] for p in doc.get("problems") or [] if p.get("severity") in severities}


def errors(doc: dict) -> list:
    return [p for p in doc.get("problems") or [] if p.get("severity") == "error"]


def problem_keys(doc: dict, severities=("error", "warning", "info")) -> set:
    return {(p["code"], p.get("layer"), p.get("path")) for p in doc.get("problems") or []
            if p.get("severity") in severities}


# --------------------------------------------------------------------------- views, handles


def take_handles(mnt: str, view: dict) -> dict:
    """NFS file handles (name_to_handle_at on the overlay) of every merged object but
    sockets: path -> (fid_type, fid, lstat)."""
    out = {}
    for rel in sorted(view):
        p = mnt if rel == "." else os.path.join(mnt, rel)
        out[rel] = (*handles.name_to_handle(p), os.lstat(p))
    return out


def decode_handles(mnt: str, taken: dict, limit: int = 30) -> list[str]:
    """open_by_handle_at every handle with a mount fd of the overlay at *mnt*; the object
    must be the one at the same merged path now. Returns problems (empty when all decode)."""
    bad = []
    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for rel, (fid_type, fid, st0) in taken.items():
            p = mnt if rel == "." else os.path.join(mnt, rel)
            try:
                fd = handles.open_by_handle_at(mfd, fid_type, fid, os.O_PATH)
            except OSError as e:
                bad.append(f"{rel}: open_by_handle_at: {os.strerror(e.errno)}")
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            now = os.lstat(p)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino) or \
                    stat.S_IFMT(st.st_mode) != stat.S_IFMT(now.st_mode):
                bad.append(f"{rel}: decodes to ino {st.st_ino} mode {st.st_mode:o}, the path is "
                           f"ino {now.st_ino} mode {now.st_mode:o}")
            elif st.st_ino != st0.st_ino:
                bad.append(f"{rel}: st_ino changed across the remount ({st0.st_ino} -> {st.st_ino})")
            if len(bad) >= limit:
                bad.append("... (stopped)")
                break
    finally:
        os.close(mfd)
    return bad


def alias_writes(mnt: str, groups: list) -> list[str]:
    """Append a token through the last alias of each regular-file hardlink group; every
    alias must show it. Returns problems."""
    bad = []
    for i, group in enumerate(groups):
        paths = [os.path.join(mnt, g) for g in group]
        if not stat.S_ISREG(os.lstat(paths[0]).st_mode):
            continue
        token = f"\nalias-write-{i}\n".encode()
        with open(paths[-1], "ab") as f:
            f.write(token)
        for p, rel in zip(paths, group):
            with open(p, "rb") as f:
                if not f.read().endswith(token):
                    bad.append(f"write through {group[-1]} not seen through {rel} (group {group})")
        inos = {os.lstat(p).st_ino for p in paths}
        if len(inos) != 1:
            bad.append(f"group {group} came apart after the write: inos {sorted(inos)}")
    return bad


# --------------------------------------------------------------------------- layer state


def snapshot(layers: Layers) -> dict:
    """layer_snapshot of each layer; ovlfsck's own state dir (work/ovlfsck) left out."""
    out = {}
    for name in LAYERS:
        snap = kutil.layer_snapshot(getattr(layers, name))
        if name == "work":  # ovlfsck's own state (record, journals, quarantine) left out
            snap = {k: v for k, v in snap.items() if k != "ovlfsck" and not k.startswith("ovlfsck/")}
            r = snap["."]  # its link count and times change with work/ovlfsck
            snap["."] = r[:6] + (None, r[7], None, None) + r[10:]
        out[name] = snap
    return out


def _restorable(entry: tuple) -> tuple:
    # layer_snapshot: type mode uid gid size ino nlink rdev mtime ctime payload xattrs.
    # ctime cannot be restored by anyone; a directory's mtime changes when an entry is
    # moved out (quarantine) and back (undo).
    t = entry[0]
    return entry[:8] + ((None if t == "d" else entry[8]),) + entry[10:]


def diff_snapshots(a: dict, b: dict, restorable: bool = False, limit: int = 30) -> str:
    out = []
    for layer in LAYERS:
        sa, sb = a[layer], b[layer]
        if restorable:
            sa = {k: _restorable(v) for k, v in sa.items()}
            sb = {k: _restorable(v) for k, v in sb.items()}
        d = kutil.diff_views(sa, sb, limit=limit)
        if d:
            out.append(f" {layer}:\n{d}")
    return "\n".join(out)


def file_contents(root: str) -> dict:
    """sha256 -> one path, for every regular file under *root*."""
    out: dict = {}
    if not os.path.isdir(root):
        return out
    for rel, a, st in kutil._walk(root):
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(a, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out.setdefault(h.hexdigest(), rel)
    return out
