"""Sample a running server with py-spy and list where its time goes (``run.py --profile``).

py-spy (PyPI ``py-spy``) attaches to the PID without restarting the process.
Its raw output has one line per distinct stack with a sample count. The
summary gives each function's share of the samples: inclusive counts a sample
when the function is anywhere on the stack, self only when it is on top.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from pathlib import Path

from harness import BrokenRun

_LINE_NUMBER = re.compile(r":\d+\)$")


class Profiler:
    """One py-spy recording of one process, started before a load and read after it."""

    def __init__(self, pid: int, seconds: int, output: Path, rate: int = 250) -> None:
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            raise BrokenRun("--profile needs py-spy: install it with 'pip install py-spy'")
        self.output = output
        self.log_path = output.with_suffix(".log")
        self.process = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
             "--format", "raw", "--nonblocking", "--output", str(output)],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
        )

    def finish(self, timeout: float = 60.0, top: int = 60) -> dict:
        """Wait for py-spy to write its file and return the summary."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise BrokenRun(f"py-spy did not finish within {timeout:.0f} s") from None
        if self.process.returncode != 0 or not self.output.exists():
            raise BrokenRun(f"py-spy failed (exit {self.process.returncode}): "
                            f"{self.log_path.read_text(errors='replace')[-500:]}")
        return summarise_raw(self.output, top)


def summarise_raw(path: Path, top: int = 60) -> dict:
    """Return the ``top`` functions by inclusive and by self share of py-spy's raw samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if total == 0:
        raise BrokenRun(f"py-spy recorded no samples in {path}")
    return {
        "samples": total,
        "inclusive_percent": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common(top)],
        "self_percent": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)],
    }
