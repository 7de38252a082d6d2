"""The feature report on kernel-made layers: what each mount configuration leaves behind
is detected, and mounting with exactly the recommended options works and shows the same
merged view."""
import os

import pytest

from . import kutil

pytestmark = pytest.mark.kernel


def _lower(root):
    os.makedirs(os.path.join(root, "d", "sub"))
    for name in ("d/x", "d/sub/y", "f", "m"):
        with open(os.path.join(root, name), "w") as fh:
            fh.write(f"{name}\n")
    os.link(os.path.join(root, "f"), os.path.join(root, "f_link"))


def _workload(mnt, options):
    os.rename(os.path.join(mnt, "d"), os.path.join(mnt, "d_renamed"))
    if "metacopy" in options:
        os.chmod(os.path.join(mnt, "m"), 0o600)  # metadata-only copy-up
    else:
        with open(os.path.join(mnt, "f"), "a") as fh:  # hardlinked lower: indexed copy-up
            fh.write("more\n")
    os.unlink(os.path.join(mnt, "f_link"))


CASES = [
    # (mount options, features that must be reported, options that must be recommended)
    ("redirect_dir=on", {"redirect", "uuid"}, {"redirect_dir=on"}),
    ("redirect_dir=on,index=on", {"redirect", "index"}, {"redirect_dir=on", "index=on"}),
    ("redirect_dir=on,index=on,nfs_export=on", {"redirect", "index", "nfs_export"},
     {"redirect_dir=on", "index=on", "nfs_export=on"}),
    ("metacopy=on", {"metacopy", "redirect"}, {"metacopy=on"}),
]


@pytest.mark.parametrize("options, used, recommended", CASES, ids=[c[0] for c in CASES])
def test_features_of_kernel_made_layers(tmp_path, make_fs, options, used, recommended):
    fs = make_fs("ext4", 128, "feat")
    base = fs.path()
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    _lower(str(lower))
    with kutil.mount_overlay([lower], upper, work, mnt, options) as m:
        _workload(m, options)
        before = kutil.merged_view(m)
    rc, doc = kutil.check_json(kutil.stack_args([lower], upper, work))
    assert rc == 0, kutil.format_report(doc)
    feats = doc["features"]
    assert used <= set(feats["used"]), feats
    opts = set(filter(None, feats["mount_options"].split(",")))
    assert recommended <= opts, feats
    assert not feats["notes"], feats
    marker = kutil.dmesg_mark()
    with kutil.mount_overlay([lower], upper, work, mnt, feats["mount_options"]) as m:
        after = kutil.merged_view(m)
    assert not kutil.dmesg_overlay_since(marker), kutil.dmesg_overlay_since(marker)
    assert before == after, kutil.diff_views(before, after)
