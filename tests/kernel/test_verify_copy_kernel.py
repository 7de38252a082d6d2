"""verify-copy on kernel-made layers (index=on,redirect_dir=on) copied by real tools to
another ext4: a faithful tar finds nothing; lossy copies are named with the right advice."""
import os
import shutil
import subprocess

import pytest

from ovlfsck.stack import build_stack
from ovlfsck.verify_copy import (HARDLINK, INDEX_LINK, WHITEOUT, XATTR, advice, format_text,
                                 verify_copy)

from . import kutil

pytestmark = pytest.mark.kernel

OPTIONS = "index=on,redirect_dir=on"


def _lower(root):
    os.makedirs(os.path.join(root, "d", "sub"))
    os.makedirs(os.path.join(root, "rmd"))
    for name in ("d/x", "d/sub/y", "f", "gone", "rmd/z"):
        with open(os.path.join(root, name), "w") as fh:
            fh.write(f"{name}\n")
    os.link(os.path.join(root, "f"), os.path.join(root, "f_link"))
    os.link(os.path.join(root, "d/x"), os.path.join(root, "x_link"))


def _workload(mnt):
    with open(os.path.join(mnt, "f"), "a") as fh:  # lower hardlink: indexed copy-up
        fh.write("more\n")
    os.link(os.path.join(mnt, "f"), os.path.join(mnt, "f_new"))  # an upper hardlink too
    os.rename(os.path.join(mnt, "d"), os.path.join(mnt, "d2"))  # redirect
    os.unlink(os.path.join(mnt, "gone"))  # whiteout
    os.unlink(os.path.join(mnt, "x_link"))  # whiteout over an indexed-able lower hardlink
    shutil.rmtree(os.path.join(mnt, "rmd"))
    os.mkdir(os.path.join(mnt, "rmd"))  # opaque


def _original(make_fs):
    fs = make_fs("ext4", 64, "src")
    base = fs.path()
    for n in ("lower", "upper", "work", "mnt"):
        (base / n).mkdir()
    _lower(str(base / "lower"))
    with kutil.mount_overlay([base / "lower"], base / "upper", base / "work", base / "mnt",
                             OPTIONS) as m:
        _workload(m)
    os.rmdir(base / "mnt")
    return base


def _stack(base):
    return build_stack([f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work"])


def _sh(cmd):
    subprocess.run(cmd, shell=True, check=True, capture_output=True)


def _copy(method, src, dst):
    os.makedirs(dst)
    if method == "tar-xattrs-include":
        _sh(f"tar --xattrs --xattrs-include='*' --acls -cpf - -C {src} lower upper work | "
            f"tar --xattrs --xattrs-include='*' --acls -xpf - -C {dst}")
    elif method == "tar-xattrs-only":
        _sh(f"tar --xattrs -cpf - -C {src} lower upper work | tar --xattrs -xpf - -C {dst}")
    elif method == "rsync-a":
        _sh(f"rsync -a {src}/ {dst}/")
    elif method == "rsync-aHAX":
        _sh(f"rsync -aHAX --numeric-ids {src}/ {dst}/")
    elif method == "cp-a-one-run":
        os.rmdir(dst)
        _sh(f"cp -a {src} {dst}")
    elif method == "cp-a-separate":
        for part in ("lower", "upper", "work"):
            _sh(f"cp -a {src}/{part} {dst}/{part}")
    else:  # pragma: no cover
        raise AssertionError(method)


# method -> the loss kinds that must be found (exactly)
CASES = {
    "tar-xattrs-include": set(),
    "rsync-aHAX": set(),
    "cp-a-one-run": set(),
    "tar-xattrs-only": {XATTR},
    "rsync-a": {XATTR, INDEX_LINK, HARDLINK},
    "cp-a-separate": {INDEX_LINK},
}


@pytest.mark.parametrize("method", list(CASES))
def test_verify_copy_of_kernel_layers(make_fs, method):
    if method.startswith("rsync") and shutil.which("rsync") is None:
        pytest.skip("rsync not installed")
    src = _original(make_fs)
    dst_fs = make_fs("ext4", 64, "dst")
    dst = dst_fs.path("copy")
    _copy(method, src, dst)
    res = verify_copy(_stack(src), _stack(dst), "trusted")
    text = format_text(res)
    found = {x.kind for x in res.losses}
    assert found == CASES[method], text
    assert WHITEOUT not in found
    assert res.entries > 15
    if XATTR in found:
        lost = {x.original.split("=")[0] for x in res.losses if x.kind == XATTR}
        assert {"trusted.overlay.origin", "trusted.overlay.redirect",
                "trusted.overlay.opaque"} <= lost, text
        assert advice(XATTR) in text
    if INDEX_LINK in found:
        links = [x for x in res.losses if x.kind == INDEX_LINK]
        assert all(x.layer == "work" and x.path.startswith("index/") for x in links), text
        assert all("upper:" in x.original for x in links), text
        assert "-H" in text and "separate" in text
    if not found:
        assert "kept everything" in text
