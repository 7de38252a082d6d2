"""No false positives: layers written by the real kernel must check clean.

For every configuration, the lower tree is built on a fresh scratch filesystem, the overlay is
mounted with the configuration's options, a seeded random workload (``workload.run_workload``)
runs through the mount, the overlay is unmounted, and then

1. ``python -m ovlfsck check -n --json -o lowerdir=...,upperdir=...,workdir=...,<options>`` must
   exit 0, report ``exit_code`` 0 and no finding of any severity (the whole JSON report is
   printed in the assertion message otherwise);
2. ``check -n`` must not have modified any layer (full raw snapshot incl. xattrs and ctimes);
3. the kernel must mount the layers again read-write, and the merged view must equal the one
   seen just before the unmount (hardlink grouping is compared only with ``index=on``: without
   the index the kernel's in-memory st_ino of copied-up hardlinks differs from what a fresh
   mount reports, which is not an on-disk property).

Configurations: default, redirect_dir=on, index=on, index=on+nfs_export=on, metacopy=on,
userxattr (+ userxattr,index=on), xfs, lower on tmpfs with upper on ext4 (two filesystems),
index=on+redirect_dir=on with an unmount/remount in the middle of the workload, and a 2-lower
stack whose middle layer is a former upper.  Seeds: ``$OVLFSCK_KERNEL_SEEDS`` (comma list,
default ``1,2,3``); ops per workload: ``$OVLFSCK_KERNEL_OPS`` (default 400).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import kutil
from .workload import build_lower, run_workload

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(kutil.can_use_kernel() is not None,
                       reason=f"kernel tests need: {kutil.can_use_kernel()}"),
]

SEEDS = [int(s) for s in os.environ.get("OVLFSCK_KERNEL_SEEDS", "1,2,3").split(",") if s]
N_OPS = int(os.environ.get("OVLFSCK_KERNEL_OPS", "400"))
N_LOWER = 250


@dataclass(frozen=True)
class Config:
    name: str
    options: str
    fstype: str = "ext4"          # filesystem of upper+work (and lower unless lower_fs is set)
    lower_fs: str | None = None   # put the lower on a separate filesystem of this type

    @property
    def compare_links(self) -> bool:
        return links_are_persistent(self.options)


CONFIGS = [
    Config("default", ""),
    Config("redirect_dir", "redirect_dir=on"),
    Config("index", "index=on"),
    Config("nfs_export", "index=on,nfs_export=on"),
    Config("metacopy", "metacopy=on"),
    Config("userxattr", "userxattr"),
    Config("userxattr_index", "userxattr,index=on"),
    Config("xfs_index_redirect", "index=on,redirect_dir=on", fstype="xfs"),
    Config("tmpfs_lower_ext4_upper", "index=on,redirect_dir=on", lower_fs="tmpfs"),
    Config("xino_tmpfs_lower", "xino=on,index=on,redirect_dir=on", lower_fs="tmpfs"),
    Config("tmpfs_nfs_export", "index=on,nfs_export=on", fstype="tmpfs"),
]


# --------------------------------------------------------------------------- helpers


def links_are_persistent(options: str) -> bool:
    """Whether st_ino-based hardlink grouping survives a remount unchanged.

    Without the index, copy-up breaks lower hardlinks and the in-memory overlay inode of a
    copied-up alias still reports the lower st_ino until the next mount.  With ``userxattr`` the
    kernel cannot store ``user.overlay.origin`` on symlinks and special files (EPERM, ignored),
    so the same happens for those even with the index.
    """
    return "index=on" in options and "userxattr" not in options


def _oplog(tmp_path: Path, name: str):
    """A log callback writing every workload operation to tmp_path/<name>.log."""
    f = open(tmp_path / f"{name}.log", "a", encoding="utf-8", errors="surrogateescape")

    def log(line: str) -> None:
        f.write(line + "\n")
        f.flush()
    return log


def _workload(mnt, rng, n_ops, tmp_path, name, stats=None):
    stats = run_workload(mnt, rng, n_ops, log=_oplog(tmp_path, name), stats=stats)
    print(f"[{name}] workload ({tmp_path / (name + '.log')}):\n{stats.summary()}")
    assert not stats.unexpected, (
        "the kernel returned unexpected errors during the workload (the overlay itself is "
        f"unhappy, not ovlfsck):\n{stats.summary()}")
    return stats


def assert_checks_clean(lowers, upper, work, options: str, what: str) -> dict:
    """Run ``check -n --json`` on the unmounted stack and assert it is clean and read-only."""
    layers = {f"lower:{i}": p for i, p in enumerate(lowers)}
    if upper is not None:
        layers.update(upper=upper, work=work)
    for name, p in layers.items():
        print(f"[{what}] {name} {p} overlay xattrs: {kutil.xattr_summary(p)}")
    before = {name: kutil.layer_snapshot(p) for name, p in layers.items()}
    args = kutil.stack_args(lowers, upper, work, options)
    rc, report = kutil.check_json(args)
    # Zero findings of any severity: what the kernel itself writes is never a problem,
    # not even a warning (issue 3).
    findings = report["problems"]
    assert rc == 0 and not findings, (
        f"ovlfsck reported problems on layers the kernel made ({what}).\n"
        f"command: ovlfsck check -n --json {' '.join(args)}\n"
        f"exit code: {rc}; findings: {len(findings)}\n"
        f"report:\n{kutil.format_report(report)}")
    assert report.get("exit_code") == rc, (
        f"JSON exit_code {report.get('exit_code')} != process exit code {rc}\n"
        f"{kutil.format_report(report)}")
    after = {name: kutil.layer_snapshot(p) for name, p in layers.items()}
    for name in layers:
        assert before[name] == after[name], (
            f"`check -n` modified layer {name} ({layers[name]}):\n"
            + kutil.diff_views(before[name], after[name]))
    return report


def assert_remount_same(lowers, upper, work, mnt, options, expected_view, compare_links):
    """Mount again (rw) and compare the merged view with the one before the unmount."""
    with kutil.mount_overlay(lowers, upper, work, mnt, options) as m:
        info = kutil.mount_info(m) or ""
        view = kutil.merged_view(m)
    if upper is not None:
        assert info.split(",")[0] == "rw", f"kernel mounted the layers read-only: {info}"
    if not compare_links:
        view = {k: v[:6] for k, v in view.items()}
        expected_view = {k: v[:6] for k, v in expected_view.items()}
    assert view == expected_view, (
        "merged view after remount differs from the view before unmount:\n"
        + kutil.diff_views(expected_view, view, names=("before-unmount", "after-remount")))


def _layers(fs, prefix=""):
    paths = [fs.path(prefix + n) for n in ("upper", "work")]
    for p in paths:
        p.mkdir()
    return paths


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_kernel_made_stack_is_clean(cfg: Config, seed: int, make_fs, ovl_mnt, tmp_path):
    rng = random.Random(f"{cfg.name}-{seed}")
    fs = make_fs(cfg.fstype, name="main")
    lower_fs = make_fs(cfg.lower_fs, name="lowerfs") if cfg.lower_fs else fs
    lower = lower_fs.path("lower")
    print(f"[{cfg.name}] lower {build_lower(lower, rng, N_LOWER)}")
    upper, work = _layers(fs)

    with kutil.mount_overlay([lower], upper, work, ovl_mnt, cfg.options) as m:
        print(f"[{cfg.name}] mounted: {kutil.mount_info(m)}")
        _workload(m, rng, N_OPS, tmp_path, "workload")
        view = kutil.merged_view(m)

    assert_checks_clean([lower], upper, work, cfg.options, cfg.name)
    assert_remount_same([lower], upper, work, ovl_mnt, cfg.options, view, cfg.compare_links)


@pytest.mark.parametrize("seed", SEEDS)
def test_remount_in_the_middle_is_clean(seed, make_fs, ovl_mnt, tmp_path):
    """index=on,redirect_dir=on; the workload is split by an unmount/remount cycle."""
    options = "index=on,redirect_dir=on"
    rng = random.Random(f"remount-{seed}")
    fs = make_fs("ext4", name="main")
    lower = fs.path("lower")
    build_lower(lower, rng, N_LOWER)
    upper, work = _layers(fs)

    with kutil.mount_overlay([lower], upper, work, ovl_mnt, options) as m:
        stats = _workload(m, rng, N_OPS // 2, tmp_path, "workload")
    # the intermediate state is a legitimate, cleanly unmounted overlay too
    assert_checks_clean([lower], upper, work, options, "after first half")
    with kutil.mount_overlay([lower], upper, work, ovl_mnt, options) as m:
        _workload(m, rng, N_OPS - N_OPS // 2, tmp_path, "workload", stats=stats)
        view = kutil.merged_view(m)

    assert_checks_clean([lower], upper, work, options, "after second half")
    assert_remount_same([lower], upper, work, ovl_mnt, options, view,
                        links_are_persistent(options))


MULTI = [
    pytest.param("redirect_dir=on", "redirect_dir=on", id="redirect"),
    pytest.param("", "index=on", id="plain-then-index"),
]


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("opts_a,opts_b", MULTI)
def test_former_upper_as_middle_lower_is_clean(opts_a, opts_b, seed, make_fs, ovl_mnt, tmp_path):
    """Stack A = lower + upperA; then stack B = upperA:lower + upperB (2 lowers)."""
    rng = random.Random(f"multi-{opts_a}-{opts_b}-{seed}")
    fs = make_fs("ext4", name="main")
    lower = fs.path("lower")
    build_lower(lower, rng, N_LOWER)
    upper_a, work_a = _layers(fs, "a-")
    with kutil.mount_overlay([lower], upper_a, work_a, ovl_mnt, opts_a) as m:
        _workload(m, rng, N_OPS, tmp_path, "workload-a")
    assert_checks_clean([lower], upper_a, work_a, opts_a, "stack A")

    lowers = [upper_a, lower]
    upper_b, work_b = _layers(fs, "b-")
    with kutil.mount_overlay(lowers, upper_b, work_b, ovl_mnt, opts_b) as m:
        print(f"[stack B] mounted: {kutil.mount_info(m)}")
        _workload(m, rng, N_OPS, tmp_path, "workload-b")
        view = kutil.merged_view(m)

    assert_checks_clean(lowers, upper_b, work_b, opts_b, "stack B")
    assert_remount_same(lowers, upper_b, work_b, ovl_mnt, opts_b, view,
                        links_are_persistent(opts_b))
    # and the two lowers alone form a valid read-only stack
    assert_checks_clean(lowers, None, None, "", "stack B lowers only")
