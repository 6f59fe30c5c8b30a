"""Process memory readings shared by the CPU benchmarks (Linux /proc; None where unsupported)."""

from __future__ import annotations

import re


def status_mib(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (e.g. VmRSS, VmHWM) in MiB."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
