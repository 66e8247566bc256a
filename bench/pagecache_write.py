"""How much kernel time writing fresh page cache costs on this machine, with no network at all.

    python bench/pagecache_write.py [--threads N] [--gib G] [--rounds R]

Each round writes G GiB of the same 1 MiB buffer with `os.pwrite` into a preallocated file from
N threads and prints wall, system and user seconds. On a small VM the system time of identical
rounds can differ several-fold; that spread, not the client, sets the floor for big downloads.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time


def write_round(path: str, size: int, threads: int, buf: bytes) -> tuple[float, float, float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        share = size // threads
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()

        def writer(index: int) -> None:
            for offset in range(index * share, (index + 1) * share, len(buf)):
                os.pwrite(fd, buf, offset)

        workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        after = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter() - started, after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gib", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    buf = os.urandom(1 << 20)
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            os.sync()
            wall, system, user = write_round(os.path.join(folder, "pagecache.bin"), args.gib << 30, args.threads, buf)
            print(f"round {round_}: {args.gib} GiB, {args.threads} thread(s): "
                  f"wall {wall:.2f} s, system {system:.2f} s, user {user:.2f} s", flush=True)


if __name__ == "__main__":
    main()
