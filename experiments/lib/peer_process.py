"""One peer's training process, timed from launch to exit, its output kept and timestamped.

`run_timed(cmd, log_dir, name)` launches `cmd`, copies its stdout and stderr to
`<log_dir>/<name>.stdout` / `.stderr` (and echoes stderr, where progress bars go), and returns a
`TimedProcess`: the exit status, the seconds from launch to exit and the stdout text. All times are `time.time()`
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
      stdout: everything it wrote to stdout.
      stdout_path, stderr_path: where its output was copied.
    """

    returncode: int
    launched_at: float
    seconds: float
    stdout: str
    stdout_path: str
    stderr_path: str

    def seconds_since_launch(self, unix_time: float) -> float:
        return unix_time - self.launched_at


class _Copier(threading.Thread):
    """Copies one pipe to a file (and optionally to a stream) as it arrives, keeping what it copied."""

    def __init__(self, pipe, path: str, echo):
        super().__init__(daemon=True, name=f"copy {os.path.basename(path)}")
        self._pipe, self._path, self._echo = pipe, path, echo
        self.data = bytearray()

    def run(self) -> None:
        fd = self._pipe.fileno()
        with open(self._path, "wb") as out:
            while True:
                chunk = os.read(fd, _CHUNK)  # blocks until the child writes or closes the pipe
                if not chunk:
                    break
                self.data += chunk
                out.write(chunk)
                if self._echo is not None:
                    self._echo.write(chunk)
                    self._echo.flush()


def run_timed(cmd: Sequence[str], log_dir: str, name: str, echo_stderr: bool = True, env: Optional[dict] = None, cwd: Optional[str] = None) -> TimedProcess:
    """Runs `cmd` to its end; see the module docstring."""
    os.makedirs(log_dir, exist_ok=True)
    stdout_path = os.path.join(log_dir, f"{name}.stdout")
    stderr_path = os.path.join(log_dir, f"{name}.stderr")
    launched_at = time.time()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    copiers = [_Copier(proc.stdout, stdout_path, None),
               _Copier(proc.stderr, stderr_path, sys.stderr.buffer if echo_stderr else None)]
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
    return TimedProcess(returncode=returncode, launched_at=launched_at, seconds=ended_at - launched_at,
                        stdout=copiers[0].data.decode(errors="replace"), stdout_path=stdout_path,
                        stderr_path=stderr_path)
