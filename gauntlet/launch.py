"""One launcher for every program Gauntlet runs as a subprocess (the trainer, the quantizer).

:func:`launch` starts the command in its own process group (so a stop reaches the launcher and every
worker it spawned), streams its output (chosen lines to ``echo``, everything to an optional log file,
the last lines kept for the error message), records the process-group id in a pid file while it runs,
stops the whole group (TERM, then KILL) when the caller is interrupted or the time limit passes, and
reads back the program's result file. Arguments travel as a JSON file written with :func:`write_args`.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gauntlet.files import write_json, write_text


class ProgramTimeout(RuntimeError):
    """The program ran past its time limit and was stopped."""


@dataclass(frozen=True)
class Finished:
    code: int
    tail: list[str]                 # the last lines of output (progress bars left out)
    result: dict | None             # the result file's JSON, when the program wrote one

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.result is not None

    @property
    def how(self) -> str:
        """How it ended, in words: 'exited with code 1', 'was killed by SIGKILL'."""
        if self.code < 0:
            return f"was killed by {signal.Signals(-self.code).name}"
        return f"exited with code {self.code}"

    def last_lines(self) -> str:
        return "\n".join(self.tail)


def write_args(path: Path, args: dict) -> Path:
    """The program's arguments file (JSON, human-readable: it is also logged as an artifact)."""
    return write_json(path, args)


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop every process of ``proc``'s process group: TERM, then KILL after ``grace_s`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def launch(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, result_file: Path | None = None,
           log_file: Path | None = None, pid_file: Path | None = None, echo: Callable[[str], None] = print,
           show: Callable[[str], bool] = lambda line: True, timeout_s: float | None = None,
           tail_lines: int = 40, grace_s: float = 20.0) -> Finished:
    """Run ``cmd`` to its end (see the module docstring); ProgramTimeout past ``timeout_s`` seconds."""
    if result_file is not None:
        result_file.unlink(missing_ok=True)   # never read an earlier attempt's result
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    log = open(log_file, "w") if log_file is not None else None  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
    if pid_file is not None:
        write_text(pid_file, f"{proc.pid}\n")
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        stop_group(proc, grace_s)

    timer = threading.Timer(timeout_s, on_timeout) if timeout_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if log is not None:
                log.write(raw)
            line = raw.rstrip()
            if "%|" not in line:       # progress bars are no help in an error message
                tail.append(line)
            if show(line):
                echo(line)
        code = proc.wait()
    except BaseException:              # interrupted, cancelled: the program must not outlive its caller
        stop_group(proc, grace_s)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        if proc.stdout:
            proc.stdout.close()
        if log is not None:
            log.close()
    if timed_out.is_set():
        raise ProgramTimeout(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} … ran past its time limit of {timeout_s:.0f}s "
                             "and was stopped; last lines:\n" + "\n".join(tail))
    result = None
    if result_file is not None and result_file.exists():
        result = json.loads(result_file.read_text())
    return Finished(code=code, tail=list(tail), result=result)
