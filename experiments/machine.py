"""Facts about the machine and this process that every benchmark reports beside its numbers.

A benchmark script runs as ``python experiments/<name>/run.py``; it reaches this module with::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from machine import cpu_name, rss_mb

Memory figures are Linux ``/proc`` readings in MiB (NaN where ``/proc`` is missing).
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def proc_status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS`` now, ``VmHWM`` the peak), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """The resident set size of this process now, MiB."""
    return proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The largest resident set size this process ever had (``ru_maxrss``), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> None:
    """Make ``VmHWM`` (the peak RSS) restart from the current RSS (Linux >= 4.0); ``ru_maxrss``
    is not reset."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def malloc_trim() -> None:
    """Hand memory glibc keeps for reuse back to the system, so the RSS shows what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def load_average() -> str:
    """``uptime``'s three load averages (1, 5, 15 minutes), for the note beside absolute times."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


__all__ = ["cpu_name", "proc_status_mb", "rss_mb", "peak_rss_mb", "reset_peak_rss", "malloc_trim", "load_average"]
