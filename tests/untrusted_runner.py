"""Runs sdport commands on hostile files, one forked child per command, and reports how each ended.

Usage: python untrusted_runner.py CASES.json RESULTS.json. CASES is a list of {"id", "argv", "out"}.
torch and sdport are imported once here; each child runs one command through the click entry point
with a 30 s alarm, its stdout and stderr in files. The parent records the exit code or the signal,
the wall time, and the child's peak RSS above what it had when it started (os.wait4's rusage).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

LIMIT_S = 30


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def run(case: dict, cli) -> dict:
    out_dir = case["out"]
    stdout, stderr = os.path.join(out_dir, "..", case["id"] + ".stdout"), os.path.join(out_dir, "..", case["id"] + ".stderr")
    start_file = os.path.join(out_dir, "..", case["id"] + ".rss")
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: one command, then exit with its status
        code = 70
        try:
            with open(start_file, "w") as f:
                f.write(str(_rss_kib()))
            signal.alarm(LIMIT_S)
            fd_out, fd_err = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd_out, 1)
            os.dup2(fd_err, 2)
            os.chdir(out_dir)
            try:
                cli.main(args=case["argv"], prog_name="sdport", standalone_mode=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 71
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    with open(start_file) as f:
        start = int(f.read() or 0)
    with open(stdout, errors="replace") as f1, open(stderr, errors="replace") as f2:
        out, err = f1.read(), f2.read()
    return {"id": case["id"], "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, "wall_s": wall,
            "rss_above_start_mib": max(0, usage.ru_maxrss - start) / 1024, "stdout": out, "stderr": err}


def main() -> None:
    import torch  # noqa: F401 (imported before forking, as every command needs it)

    # What the commands import on first use, imported once here so each child starts warm.
    import sdport.convert.convert  # noqa: F401
    import sdport.convert.inspect  # noqa: F401
    import sdport.models.pipeline  # noqa: F401
    import sdport.parity.harness  # noqa: F401
    from sdport import cli

    cases = json.load(open(sys.argv[1]))
    results = [run(c, cli) for c in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
