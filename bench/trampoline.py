"""Fork, exec a contender, reap it, and write its own wall time, peak RSS and exit status.

    python -S -I bench/trampoline.py RESULT_FILE PROGRAM [ARG...]

Why it exists: Linux carries a process's RSS high-water mark across exec (and a vfork child
shares its parent's), so a contender started straight from the benchmark would report the
benchmark's peak as its own ru_maxrss. This launcher is a bare interpreter (-S -I, no imports
beyond os/sys/time, about 5 MiB): the contender forked from it starts at that floor, and
ru_maxrss is a maximum, so any contender that peaks above it is measured exactly.
Standard library only, no `bench` imports: it must stay this small.
"""

import os
import sys
import time


def main() -> None:
    result, argv = sys.argv[1], sys.argv[2:]
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        except OSError as exc:
            os.write(2, f"trampoline: cannot run {argv[0]}: {exc}\n".encode())
        os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    with open(result, "w") as f:
        f.write(f"{wall!r} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}\n")


if __name__ == "__main__":
    main()
