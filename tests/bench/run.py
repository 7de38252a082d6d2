#!/usr/bin/env python3
"""Benchmark `ovlfsck check -n` against a one-pass Python floor, in one run.

    run.py --entries 200000 [--also 1000000] [--json OUT] [--seed S] [--no-strace]

For each size: make a sparse ext4 image, loop-mount it (a real uuid, so real handles),
generate the layer set (generate.py), then measure, each in a fresh subprocess:
  floor   scandir + lstat + listxattr over every entry of every layer
  ovlfsck python -m ovlfsck check -n (every check enabled)
warm (run twice, the second one counts) and cold (sync; drop_caches before), wall time;
peak RSS (ru_maxrss of the child); syscalls per entry (strace -c -f, if installed).
Needs root. Always unmounts and detaches the loop device.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

FLOOR = r"""
import os, sys
n = 0
def walk(d):
    global n
    with os.scandir(d) as it:
        for e in it:
            n += 1
            p = e.path
            os.lstat(p)
            os.listxattr(p, follow_symlinks=False)
            if e.is_dir(follow_symlinks=False):
                walk(p)
for root in sys.argv[1:]:
    os.lstat(root); os.listxattr(root, follow_symlinks=False)
    walk(root)
print(n)
"""


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def measure(cmd: list[str], ok_rc=(0,)) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of cmd, run through a fresh wrapper process so that
    RUSAGE_CHILDREN holds this one command only."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter()\n"
               "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
               "dt = time.perf_counter() - t\n"
               "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
               "print(json.dumps([dt, r, p.returncode, p.stderr.decode()[-2000:]]))\n")
    out = subprocess.run([PY, "-c", wrapper, *cmd], check=True, capture_output=True, text=True)
    dt, rss, rc, err = json.loads(out.stdout)
    if rc not in ok_rc:
        raise SystemExit(f"{cmd[:4]}... exited {rc}: {err}")
    return dt, rss


def syscalls(cmd: list[str]) -> int | None:
    strace = shutil.which("strace")
    if not strace:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as tf:
        subprocess.run([strace, "-c", "-f", "-o", tf.name, *cmd],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = tf.read()
    m = re.search(r"^-+.*\n\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total\s*$", text, re.M)
    if not m:  # fall back: the last line's calls column
        last = [l for l in text.splitlines() if l.strip().endswith("total")]
        nums = re.findall(r"\d+", last[-1]) if last else []
        return int(nums[3]) if len(nums) > 3 else None
    return int(m.group(1))


def one_size(entries: int, seed: int, use_strace: bool, log) -> dict:
    img_dir = tempfile.mkdtemp(prefix="ovlfsck-bench-")
    img = os.path.join(img_dir, "fs.img")
    mnt = os.path.join(img_dir, "mnt")
    os.mkdir(mnt)
    size_gib = max(2, entries * 12 // 1_000_000 + 2)
    loop = None
    mounted = False
    try:
        with open(img, "wb") as fh:
            fh.truncate(size_gib << 30)
        # enough inodes for the entries (small files: one inode per ~4 KiB)
        sh("mkfs.ext4", "-q", "-F", "-i", "4096", img)
        loop = sh("losetup", "--find", "--show", img)
        sh("mount", loop, mnt)
        mounted = True
        out = os.path.join(mnt, "set")
        t = time.perf_counter()
        n = int(sh(PY, os.path.join(HERE, "generate.py"), "--entries", str(entries),
                   "--seed", str(seed), "--out", out))
        gen_s = time.perf_counter() - t
        log(f"[{entries}] generated {n} entries in {gen_s:.1f}s")
        layers = [os.path.join(out, x) for x in ("lower0", "lower1", "upper", "work")]
        floor_cmd = [PY, "-c", FLOOR, *layers]
        ovl_cmd = [PY, "-m", "ovlfsck", "check", "-n", "-q",
                   "--lower", layers[0], "--lower", layers[1],
                   "--upper", layers[2], "--work", layers[3]]
        res = {"entries_requested": entries, "entries": n, "seed": seed, "generate_s": gen_s}
        for name, cmd in (("floor", floor_cmd), ("ovlfsck", ovl_cmd)):
            measure(cmd)
            warm, rss = measure(cmd)
            drop_caches()
            cold, rss_cold = measure(cmd)
            sc = syscalls(cmd) if use_strace else None
            res[name] = {"warm_s": warm, "cold_s": cold, "peak_rss_kib": max(rss, rss_cold),
                         "syscalls": sc, "syscalls_per_entry": sc / n if sc else None}
            log(f"[{entries}] {name}: warm {warm:.2f}s cold {cold:.2f}s "
                f"rss {max(rss, rss_cold) / 1024:.0f} MiB syscalls {sc}")
        f, o = res["floor"], res["ovlfsck"]
        res["ratio"] = {"warm": o["warm_s"] / f["warm_s"], "cold": o["cold_s"] / f["cold_s"],
                        "rss": o["peak_rss_kib"] / f["peak_rss_kib"],
                        "syscalls": (o["syscalls"] / f["syscalls"]
                                     if o["syscalls"] and f["syscalls"] else None)}
        return res
    finally:
        if mounted:
            subprocess.run(["umount", mnt])
        if loop:
            subprocess.run(["losetup", "-d", loop])
        shutil.rmtree(img_dir, ignore_errors=True)


def machine() -> dict:
    mem = ""
    with open("/proc/meminfo") as fh:
        mem = fh.readline().split(":")[1].strip()
    return {"nproc": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "fs": "ext4 on a loop device (sparse image)"}


def table(results: list[dict]) -> str:
    rows = ["| entries | tool | warm s | cold s | peak RSS MiB | syscalls/entry |",
            "|---|---|---|---|---|---|"]
    for r in results:
        for name in ("floor", "ovlfsck"):
            m = r[name]
            spe = f"{m['syscalls_per_entry']:.2f}" if m["syscalls_per_entry"] else "n/a"
            rows.append(f"| {r['entries']} | {name} | {m['warm_s']:.2f} | {m['cold_s']:.2f} | "
                        f"{m['peak_rss_kib'] / 1024:.0f} | {spe} |")
        q = r["ratio"]
        sq = f"{q['syscalls']:.2f}" if q["syscalls"] else "n/a"
        rows.append(f"| {r['entries']} | ovlfsck/floor | {q['warm']:.2f} | {q['cold']:.2f} | "
                    f"{q['rss']:.2f} | {sq} |")
    if len(results) > 1:
        a, b = results[0]["ovlfsck"], results[-1]["ovlfsck"]
        rows.append(f"\n{results[-1]['entries']}/{results[0]['entries']} ovlfsck: warm time "
                    f"x{b['warm_s'] / a['warm_s']:.2f}, RSS x{b['peak_rss_kib'] / a['peak_rss_kib']:.2f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--also", type=int, action="append", default=[],
                    help="another size measured in the same run (e.g. 1000000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-strace", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (loop mount, whiteouts, trusted.* xattrs, drop_caches)")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if not shutil.which("strace") and not a.no_strace:
        log("strace not installed: syscalls per entry skipped (apt-get install -y strace)")
    results = [one_size(n, a.seed, not a.no_strace, log) for n in [a.entries, *a.also]]
    doc = {"machine": machine(), "results": results}
    print(table(results))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
