"""`make demo`: build a damaged layer set from fixtures/demo.spec, check it (-n), repair it
(-y), check it again, and (where the kernel allows) mount it to show the merged view.

Exit status 0 when every step gave the expected exit code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from ovlfsck.cli import app, invoke
from ovlfsck.fixture import build

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step(title: str, argv: list[str], expect: int) -> bool:
    print(f"\n$ ovlfsck {' '.join(argv)}    # {title}", flush=True)
    code = invoke(app, argv, "ovlfsck")
    ok = code == expect
    print(f"[exit {code}{'' if ok else f', expected {expect}'}]", flush=True)
    return ok


def _show_merged(root: str, stack: list[str]) -> None:
    mnt = os.path.join(root, "merged")
    os.makedirs(mnt, exist_ok=True)
    opts = ",".join(stack) + ",redirect_dir=on"
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"(could not mount to show the merged view: {res.stderr.strip()})")
        return
    try:
        print(f"\nThe kernel mounts the repaired layers ({opts}); merged view:")
        shown = []
        for dirpath, dirnames, filenames in os.walk(mnt):
            rel = os.path.relpath(dirpath, mnt)
            shown += [os.path.normpath(os.path.join(rel, n)) for n in filenames]
            shown += [os.path.normpath(os.path.join(rel, d)) + "/" for d in dirnames]
        for path in sorted(shown):
            print(f"  {path}")
    finally:
        subprocess.run(["umount", mnt], check=False)


def demo(root: str) -> int:
    if os.geteuid() != 0:
        print("make demo needs root: whiteouts are character devices and the overlay xattrs are trusted.*",
              file=sys.stderr)
        return 8
    shutil.rmtree(root, ignore_errors=True)
    with open(os.path.join(HERE, "fixtures", "demo.spec")) as fh:
        layers = build(fh.read(), root)
    print(f"Built a damaged layer set from fixtures/demo.spec in {root}/ (see the DAMAGE comments there).")
    stack = [f"lowerdir={layers['lower:0']}", f"upperdir={layers['upper']}", f"workdir={layers['work']}"]
    opt = ["-o", ",".join(stack)]
    ok = _step("check only: finds the damage", ["check", "-n", *opt], 4)
    ok &= _step("repair everything that has a fix", ["check", "-y", *opt], 1)
    ok &= _step("check again: clean", ["check", "-n", *opt], 0)
    _show_merged(root, stack)
    journals = sorted(f for f in os.listdir(os.path.join(layers["work"], "ovlfsck")) if f.startswith("journal-"))
    if journals:
        print(f"\nEvery change is journaled; to put the damage back: "
              f"ovlfsck undo {os.path.join(layers['work'], 'ovlfsck', journals[-1])}")
    print("\ndemo: " + ("every step behaved as expected" if ok else "UNEXPECTED RESULT (see above)"))
    return 0 if ok else 1


def main() -> None:
    root = os.path.join(os.getcwd(), "demo") if len(sys.argv) < 2 or sys.argv[1] == "demo" else sys.argv[1]
    sys.exit(demo(root))


if __name__ == "__main__":
    main()
