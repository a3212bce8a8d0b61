"""CPU, memory, threads and open files of the server process and its generation worker (psutil).

Read by the sessions' `second` telemetry and by GET /healthz, so that soak tests see leaks from outside.
"""
from __future__ import annotations

import psutil


class ProcessStats:
    """Sums over this process and `pids` (the worker); CPU is percent of one core since the last call."""

    def __init__(self, pids: list[int]):
        self.procs = [psutil.Process()] + [psutil.Process(p) for p in pids]
        for p in self.procs:
            p.cpu_percent()  # the first reading is always 0: prime it

    def read(self) -> dict:
        cpu = rss = 0.0
        threads = files = 0
        for p in self.procs:
            try:
                with p.oneshot():
                    cpu += p.cpu_percent()
                    rss += p.memory_info().rss
                    threads += p.num_threads()
                    files += p.num_fds()
            except psutil.Error:  # the worker died: the server reports what is left
                pass
        return {"cpu_percent": round(cpu, 1), "rss_mb": round(rss / 2**20, 1), "threads": threads,
                "open_files": files, "pids": [p.pid for p in self.procs]}
