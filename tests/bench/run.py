#!/usr/bin/env python3
"""Benchmark `ovlfsck check -n` against a one-pass Python floor, in one run.

    run.py --entries 200000 [--also 1000000] [--json OUT] [--seed S] [--no-strace] [--no-repair]

For each size: make a sparse ext4 image, loop-mount it (a real uuid, so real handles),
generate the layer set (generate.py) and sync it, then measure, each in a fresh subprocess:
  floor   scandir + lstat + listxattr over every entry of every layer
  ovlfsck python -m ovlfsck check -n (every check enabled)
warm (run twice, the second one counts; --repeat N: the fastest of N after the first) and
cold (sync; drop_caches before), wall time; CPU time (user + system, child processes
included); peak RSS (ru_maxrss of the largest process); syscalls per entry (strace -c -f,
child processes included, if installed). Bytecode caching is on for the measured runs.
Then, for the first size (unless --no-repair), the repair throughput: `ovlfsck record` on
the set, a tar copy (xattrs kept, then synced) to a second, new ext4 (another uuid: every
stored handle is stale), and on the copy, page cache warm from the copy, the floor and one
`check -y` (it writes, so it runs once); a `check -n` afterwards must exit 0.
Needs root. Always unmounts and detaches the loop devices.
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


# The measured commands run with bytecode caching on: an installed ovlfsck has its .pyc
# files (pip writes them), while PYTHONDONTWRITEBYTECODE (set in some sandboxes) would make
# every run compile ovlfsck's sources again (~0.15 s). The warm-up run writes them.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def measure(cmd: list[str], ok_rc=(0,)) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (KiB) and CPU seconds (user + system, the command and its own
    children, e.g. ovlfsck's prefetch process) of cmd, run through a fresh wrapper process so
    that RUSAGE_CHILDREN holds this one command only. Peak RSS is that of the largest single
    process (ru_maxrss), not a sum."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter()\n"
               "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
               "dt = time.perf_counter() - t\n"
               "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "print(json.dumps([dt, u.ru_maxrss, u.ru_utime + u.ru_stime, p.returncode,\n"
               "                  p.stderr.decode()[-2000:]]))\n")
    out = subprocess.run([PY, "-c", wrapper, *cmd], check=True, capture_output=True, text=True,
                         env=ENV)
    dt, rss, cpu, rc, err = json.loads(out.stdout)
    if rc not in ok_rc:
        raise SystemExit(f"{cmd[:4]}... exited {rc}: {err}")
    return dt, rss, cpu


def syscalls(cmd: list[str]) -> int | None:
    strace = shutil.which("strace")
    if not strace:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as tf:
        subprocess.run([strace, "-c", "-f", "-o", tf.name, *cmd],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        text = tf.read()
    m = re.search(r"^-+.*\n\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total\s*$", text, re.M)
    if not m:  # fall back: the last line's calls column
        last = [l for l in text.splitlines() if l.strip().endswith("total")]
        nums = re.findall(r"\d+", last[-1]) if last else []
        return int(nums[3]) if len(nums) > 3 else None
    return int(m.group(1))


# --direct-io: the loop device reads its image with O_DIRECT, as a disk would be read (a
# buffered loop also caches the image file and reads it ahead, which a real disk does not).
DIRECT_IO = False


def new_ext4(img: str, size_gib: int, mnt: str, opened: list) -> None:
    """A sparse image with a fresh ext4 (its own uuid; enough inodes for small files: one
    per ~4 KiB), loop-mounted at mnt. What was set up goes into `opened`, for teardown()."""
    with open(img, "wb") as fh:
        fh.truncate(size_gib << 30)
    sh("mkfs.ext4", "-q", "-F", "-i", "4096", img)
    loop = sh("losetup", "--find", "--show", *(["--direct-io=on"] if DIRECT_IO else []), img)
    opened.append(("loop", loop))
    sh("mount", loop, mnt)
    opened.append(("mount", mnt))


def teardown(opened: list) -> None:
    """Unmount and detach what new_ext4() set up, newest first (also after a failure)."""
    while opened:
        kind, what = opened.pop()
        subprocess.run(["umount", what] if kind == "mount" else ["losetup", "-d", what])


def one_size(entries: int, seed: int, use_strace: bool, log, repeat: int = 1,
             repair: bool = False) -> dict:
    img_dir = tempfile.mkdtemp(prefix="ovlfsck-bench-")
    img = os.path.join(img_dir, "fs.img")
    mnt = os.path.join(img_dir, "mnt")
    os.mkdir(mnt)
    size_gib = max(2, entries * 12 // 1_000_000 + 2)
    opened: list[tuple[str, str]] = []
    try:
        new_ext4(img, size_gib, mnt, opened)
        out = os.path.join(mnt, "set")
        t = time.perf_counter()
        n = int(sh(PY, os.path.join(HERE, "generate.py"), "--entries", str(entries),
                   "--seed", str(seed), "--out", out))
        gen_s = time.perf_counter() - t
        log(f"[{entries}] generated {n} entries in {gen_s:.1f}s")
        # The generator's writes go to disk now, not during the measurements: on 2 cores
        # the write-back (ext4, then the loop device's image file) would take CPU from
        # whichever command runs first, for longer the larger the set.
        t = time.perf_counter()
        os.sync()
        log(f"[{entries}] synced in {time.perf_counter() - t:.1f}s")
        layers = [os.path.join(out, x) for x in ("lower0", "lower1", "upper", "work")]
        floor_cmd = [PY, "-c", FLOOR, *layers]
        ovl_cmd = [PY, "-m", "ovlfsck", "check", "-n", "-q",
                   "--lower", layers[0], "--lower", layers[1],
                   "--upper", layers[2], "--work", layers[3]]
        res = {"entries_requested": entries, "entries": n, "seed": seed, "generate_s": gen_s,
               "repeat": repeat}
        for name, cmd in (("floor", floor_cmd), ("ovlfsck", ovl_cmd)):
            measure(cmd)
            # --repeat N: the fastest of N runs (a shared machine only ever adds time).
            warm, rss, warm_cpu = min(measure(cmd) for _ in range(repeat))
            colds = []
            for _ in range(repeat):
                drop_caches()
                colds.append(measure(cmd))
            cold, rss_cold, cold_cpu = min(colds)
            sc = syscalls(cmd) if use_strace else None
            res[name] = {"warm_s": warm, "cold_s": cold, "peak_rss_kib": max(rss, rss_cold),
                         "warm_cpu_s": warm_cpu, "cold_cpu_s": cold_cpu,
                         "syscalls": sc, "syscalls_per_entry": sc / n if sc else None}
            log(f"[{entries}] {name}: warm {warm:.2f}s (cpu {warm_cpu:.2f}s) cold {cold:.2f}s "
                f"(cpu {cold_cpu:.2f}s) rss {max(rss, rss_cold) / 1024:.0f} MiB syscalls {sc}")
        if repair:
            res["repair"] = repair_run(out, img_dir, size_gib, layers, n, log)
        f, o = res["floor"], res["ovlfsck"]
        res["ratio"] = {"warm": o["warm_s"] / f["warm_s"], "cold": o["cold_s"] / f["cold_s"],
                        "cpu": o["warm_cpu_s"] / f["warm_cpu_s"] if f["warm_cpu_s"] else None,
                        "rss": o["peak_rss_kib"] / f["peak_rss_kib"],
                        "syscalls": (o["syscalls"] / f["syscalls"]
                                     if o["syscalls"] and f["syscalls"] else None)}
        return res
    finally:
        teardown(opened)
        shutil.rmtree(img_dir, ignore_errors=True)


def _check_cmd(layers: list[str], *flags: str) -> list[str]:
    return [PY, "-m", "ovlfsck", "check", *flags, "--lower", layers[0], "--lower", layers[1],
            "--upper", layers[2], "--work", layers[3]]


def repair_run(src: str, img_dir: str, size_gib: int, layers: list[str], n: int, log) -> dict:
    """Repair throughput (issue 5): `ovlfsck record` on the set, copy it with tar (xattrs
    kept) to a second, new ext4 (another uuid: every stored handle is stale), then on the
    copy, page cache warm from the copy: the floor, and `check -y` once (it writes). A
    `check -n` afterwards must exit 0, or the run is not counted."""
    img2 = os.path.join(img_dir, "copy.img")
    mnt2 = os.path.join(img_dir, "copy")
    os.mkdir(mnt2)
    opened: list[tuple[str, str]] = []
    try:
        t = time.perf_counter()
        sh(PY, "-m", "ovlfsck", "record", "--json", "--lower", layers[0],
           "--lower", layers[1], "--upper", layers[2], "--work", layers[3], env=ENV)
        record_s = time.perf_counter() - t
        # check -n of the layers where they are, with their record beside them (users keep
        # one): the record must not be read (nothing is stale), so time and memory stay
        # those of a check without it.
        with_rec = _check_cmd(layers, "-n", "-q")
        measure(with_rec)
        rec_check_s, rec_check_rss, _cpu = measure(with_rec)
        log(f"[{n}] check -n with the record present: {rec_check_s:.2f}s, "
            f"peak RSS {rec_check_rss / 1024:.0f} MiB")
        new_ext4(img2, size_gib, mnt2, opened)
        t = time.perf_counter()
        subprocess.run(f"tar -C {src} --xattrs --xattrs-include='*' -cf - . | "
                       f"tar -C {mnt2} --xattrs --xattrs-include='*' -xpf -",
                       shell=True, check=True)
        # A copy is done when it is on disk: otherwise the first sync of check -y (its
        # journal's) would write back the whole copy and be counted as repair time.
        os.sync()
        copy_s = time.perf_counter() - t
        copied = [os.path.join(mnt2, os.path.basename(x)) for x in layers]
        log(f"[{n}] record {record_s:.1f}s, tar copy to a new ext4 {copy_s:.1f}s")
        floor_cmd = [PY, "-c", FLOOR, *copied]
        measure(floor_cmd)
        floor_s, floor_rss, floor_cpu = measure(floor_cmd)
        fix_cmd = _check_cmd(copied, "-y", "--json")
        t = time.perf_counter()
        proc = subprocess.run(fix_cmd, capture_output=True, text=True, env=ENV)
        fix_s = time.perf_counter() - t
        if proc.returncode not in (0, 1):
            raise SystemExit(f"check -y on the copy exited {proc.returncode}: {proc.stderr[-2000:]}")
        doc = json.loads(proc.stdout)
        fixed: dict[str, int] = {}
        for p in doc.get("problems", []):
            if p.get("fixed"):
                fixed[p["code"]] = fixed.get(p["code"], 0) + 1
        after = subprocess.run(_check_cmd(copied, "-n", "-q"), capture_output=True, text=True,
                               env=ENV)
        log(f"[{n}] repair: floor {floor_s:.2f}s, check -y {fix_s:.2f}s "
            f"(x{fix_s / floor_s:.2f}), fixed {fixed}, check -n afterwards exit {after.returncode}")
        return {"record_s": record_s, "check_n_with_record_s": rec_check_s,
                "check_n_with_record_rss_kib": rec_check_rss,
                "copy_s": copy_s, "floor_s": floor_s, "check_y_s": fix_s,
                "ratio": fix_s / floor_s, "check_y_exit": proc.returncode, "fixed": fixed,
                "check_n_after_exit": after.returncode}
    finally:
        teardown(opened)


def machine() -> dict:
    mem = ""
    with open("/proc/meminfo") as fh:
        mem = fh.readline().split(":")[1].strip()
    return {"nproc": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "fs": "ext4 on a loop device (sparse image)"}


def table(results: list[dict]) -> str:
    rows = ["| entries | tool | warm s | cold s | warm CPU s | peak RSS MiB | syscalls/entry |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        for name in ("floor", "ovlfsck"):
            m = r[name]
            spe = f"{m['syscalls_per_entry']:.2f}" if m["syscalls_per_entry"] else "n/a"
            cpu = f"{m['warm_cpu_s']:.2f}" if m.get("warm_cpu_s") is not None else "n/a"
            rows.append(f"| {r['entries']} | {name} | {m['warm_s']:.2f} | {m['cold_s']:.2f} | "
                        f"{cpu} | {m['peak_rss_kib'] / 1024:.0f} | {spe} |")
        q = r["ratio"]
        sq = f"{q['syscalls']:.2f}" if q["syscalls"] else "n/a"
        qc = f"{q['cpu']:.2f}" if q.get("cpu") else "n/a"
        rows.append(f"| {r['entries']} | ovlfsck/floor | {q['warm']:.2f} | {q['cold']:.2f} | "
                    f"{qc} | {q['rss']:.2f} | {sq} |")
    for r in results:
        rep = r.get("repair")
        if rep:
            rows.append(f"\nrepair ({r['entries']} entries copied to a new ext4 with tar, record made "
                        f"before): check -y {rep['check_y_s']:.2f}s, floor on the copy "
                        f"{rep['floor_s']:.2f}s, x{rep['ratio']:.2f}; fixed {rep['fixed']}; "
                        f"check -n afterwards exit {rep['check_n_after_exit']}; check -n of the "
                        f"original with its record present {rep['check_n_with_record_s']:.2f}s, "
                        f"peak RSS {rep['check_n_with_record_rss_kib'] / 1024:.0f} MiB")
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
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure warm and cold N times each and keep the fastest (default 1)")
    ap.add_argument("--no-repair", action="store_true",
                    help="skip the repair-throughput run (record, copy to a new ext4, check -y)")
    ap.add_argument("--direct-io", action="store_true",
                    help="loop devices read their image with O_DIRECT (closer to a real disk)")
    a = ap.parse_args(argv)
    global DIRECT_IO
    DIRECT_IO = a.direct_io
    if os.geteuid() != 0:
        ap.error("needs root (loop mount, whiteouts, trusted.* xattrs, drop_caches)")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if not shutil.which("strace") and not a.no_strace:
        log("strace not installed: syscalls per entry skipped (apt-get install -y strace)")
    results = [one_size(n, a.seed, not a.no_strace, log, max(1, a.repeat),
                        repair=(i == 0 and not a.no_repair))
               for i, n in enumerate([a.entries, *a.also])]
    doc = {"machine": {**machine(), "loop_direct_io": a.direct_io}, "results": results}
    print(table(results))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
