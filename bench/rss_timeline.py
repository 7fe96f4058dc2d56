"""Peak memory of a command, stage by stage: which part of a run sets its peak.

    python bench/rss_timeline.py [--every 0.5] [--json OUT] -- sdport parity txt2img CKPT --h5 H5 ...

Runs the command with its stderr on a pseudo-terminal (so sdport draws its progress bars, which name
the stage: "reference sampler", "step 0 reference pass", "native sampler", ...), samples its
/proc/PID/status (VmRSS, RssAnon, RssFile) every `--every` seconds and tags each sample with the stage
the command last reported. Prints the peak of each
stage in order, and the process's own peak (VmHWM, what ru_maxrss reports). Linux only.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in FIELDS:
                    out[k] = int(v.split()[0]) // 1024  # kB -> MiB
    except OSError:
        pass
    return out


def _stage(line: str) -> str | None:
    """'parity txt2img: step 0 reference pass: 12/449 layers, ...' -> 'step 0 reference pass'."""
    parts = [p.strip() for p in line.split(":")]
    if len(parts) >= 3 and re.search(r"\d+/\d+|\d+ \w+/s", parts[2]):
        return parts[1]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give the command after --")
    t0 = time.monotonic()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # bars need a width
    p = subprocess.Popen(cmd, stderr=slave)
    os.close(slave)
    state = {"stage": "start"}
    order: list[str] = []
    peaks: dict[str, dict[str, int]] = {}
    hwm = {"VmHWM": 0}

    def read_stderr():
        tail = ""
        while True:
            try:
                chunk = os.read(master, 65536).decode("utf-8", "replace")
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            *lines, tail = re.split(r"[\r\n]", tail + chunk)
            for line in lines:
                s = _stage(line)
                if s:
                    state["stage"] = s

    threading.Thread(target=read_stderr, daemon=True).start()
    while p.poll() is None:
        s = _status(p.pid)
        if s:
            st = state["stage"]
            if st not in peaks:
                order.append(st)
                peaks[st] = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "first_s": round(time.monotonic() - t0, 1)}
            for k in ("VmRSS", "RssAnon", "RssFile"):
                peaks[st][k] = max(peaks[st][k], s.get(k, 0))
            hwm["VmHWM"] = max(hwm["VmHWM"], s.get("VmHWM", 0))
        time.sleep(a.every)
    wall = time.monotonic() - t0
    print(f"{'stage':<40} {'from s':>8} {'VmRSS':>8} {'anon':>8} {'file':>8}  (MiB)")
    for st in order:
        r = peaks[st]
        print(f"{st[:40]:<40} {r['first_s']:>8} {r['VmRSS']:>8} {r['RssAnon']:>8} {r['RssFile']:>8}")
    print(f"peak (VmHWM, last sample): {hwm['VmHWM']} MiB; exit {p.returncode}; {wall:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "rss_timeline", "command": cmd, "every_s": a.every, "stages": [
                {"stage": st, **peaks[st]} for st in order], "peak_vmhwm_mib": hwm["VmHWM"], "exit": p.returncode,
                "wall_s": wall}, f, indent=1)
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
