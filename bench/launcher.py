"""Tiny process launcher, so that a child's peak RSS is its own (stdlib only).

A child's ru_maxrss also counts the resident set of the process it was forked or
vforked from, as it was at exec time (Linux keeps the old mm's high-water mark), so
children of the big bench process would all report the bench's own RSS. This
launcher stays small; the bench sends it one JSON request per line on stdin:
  {"argv": [...], "env": {...}, "stderr": PATH, "stdout": PATH, "timeout": SECONDS}
and reads one JSON line back: {"wall": s, "maxrss": bytes, "rc": exit code}.
"""
import json
import os
import sys
import threading
import time


def run(req):
    with open(req.get("stderr") or os.devnull, "wb") as err, open(os.devnull, "rb") as null_in, \
            open(req.get("stdout") or os.devnull, "wb") as null_out:
        actions = [(os.POSIX_SPAWN_DUP2, null_in.fileno(), 0), (os.POSIX_SPAWN_DUP2, null_out.fileno(), 1),
                   (os.POSIX_SPAWN_DUP2, err.fileno(), 2)]
        t0 = time.perf_counter()
        pid = os.posix_spawnp(req["argv"][0], req["argv"], req.get("env") or os.environ, file_actions=actions)
        timer = threading.Timer(req.get("timeout", 900), os.kill, (pid, 9))
        timer.start()
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
    rc = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
    return {"wall": wall, "maxrss": usage.ru_maxrss * 1024, "rc": rc}


def main():
    for line in sys.stdin:
        sys.stdout.write(json.dumps(run(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
