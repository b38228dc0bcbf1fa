"""One peer's training process, timed from launch to exit, its output kept and timestamped.

`run_timed(cmd, log_dir, name, stderr_marker)` launches `cmd`, copies its stdout and stderr to
`<log_dir>/<name>.stdout` / `.stderr` (and echoes stderr, where progress bars go), and returns a
`TimedProcess`: the exit status, the seconds from launch to exit, the stdout text, and the seconds
from launch to the first time `stderr_marker` appeared on stderr. All times are `time.time()`
differences, so a child may report its own moments as Unix times and the caller can put them on
the same scale (`seconds_since_launch`).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

__all__ = ["TimedProcess", "run_timed"]

_CHUNK = 65536


@dataclasses.dataclass(frozen=True)
class TimedProcess:
    """A finished process.

    Attributes:
      returncode: its exit status.
      launched_at: Unix time just before it was launched.
      seconds: launch to exit.
      marker_seconds: launch to the first appearance of the stderr marker (None: it never appeared).
      stdout: everything it wrote to stdout.
      stdout_path, stderr_path: where its output was copied.
    """

    returncode: int
    launched_at: float
    seconds: float
    marker_seconds: Optional[float]
    stdout: str
    stdout_path: str
    stderr_path: str

    def seconds_since_launch(self, unix_time: float) -> float:
        return unix_time - self.launched_at


class _Copier(threading.Thread):
    """Copies one pipe to a file (and optionally to a stream) as it arrives, noting when a marker first shows."""

    def __init__(self, pipe, path: str, echo, marker: Optional[bytes]):
        super().__init__(daemon=True, name=f"copy {os.path.basename(path)}")
        self._pipe, self._path, self._echo, self._marker = pipe, path, echo, marker
        self.marker_time: Optional[float] = None
        self.data = bytearray()

    def run(self) -> None:
        fd = self._pipe.fileno()
        # A marker may straddle two reads: search the new bytes with the tail of the previous ones.
        keep = len(self._marker) - 1 if self._marker else 0
        with open(self._path, "wb") as out:
            while True:
                chunk = os.read(fd, _CHUNK)  # blocks until the child writes or closes the pipe
                if not chunk:
                    break
                now = time.time()
                if self._marker and self.marker_time is None:
                    window = bytes(self.data[len(self.data) - keep:]) + chunk if keep else chunk
                    if self._marker in window:
                        self.marker_time = now
                self.data += chunk
                out.write(chunk)
                if self._echo is not None:
                    self._echo.write(chunk)
                    self._echo.flush()


def run_timed(cmd: Sequence[str], log_dir: str, name: str, stderr_marker: Optional[str] = None,
              echo_stderr: bool = True, env: Optional[dict] = None, cwd: Optional[str] = None) -> TimedProcess:
    """Runs `cmd` to its end; see the module docstring."""
    os.makedirs(log_dir, exist_ok=True)
    stdout_path = os.path.join(log_dir, f"{name}.stdout")
    stderr_path = os.path.join(log_dir, f"{name}.stderr")
    launched_at = time.time()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    copiers = [_Copier(proc.stdout, stdout_path, None, None),
               _Copier(proc.stderr, stderr_path, sys.stderr.buffer if echo_stderr else None,
                       stderr_marker.encode() if stderr_marker else None)]
    for c in copiers:
        c.start()
    try:
        returncode = proc.wait()
        ended_at = time.time()
    except BaseException:
        proc.kill()  # Ctrl-C in the comparison ends the peer too
        proc.wait()
        raise
    finally:
        for c in copiers:
            c.join()
        proc.stdout.close()
        proc.stderr.close()
    marker_time = copiers[1].marker_time
    return TimedProcess(returncode=returncode, launched_at=launched_at, seconds=ended_at - launched_at,
                        marker_seconds=None if marker_time is None else marker_time - launched_at,
                        stdout=copiers[0].data.decode(errors="replace"), stdout_path=stdout_path,
                        stderr_path=stderr_path)
