"""The one launcher every program goes through (gauntlet/launch.py): real subprocesses, no mocks."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from gauntlet.launch import ProgramTimeout, launch, write_args


def program(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "program.py"
    script.write_text("import json, os, subprocess, sys, time\n" + body)
    return [sys.executable, "-u", str(script)]


def alive(pid: int, wait_s: float = 5.0) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_arguments_result_tail_and_echo(tmp_path: Path) -> None:
    args = write_args(tmp_path / "args.json", {"n": 3})
    cmd = program(tmp_path, "a = json.load(open(sys.argv[1]))\n"
                            "for i in range(a['n']): print(f'[prog] line {i}')\n"
                            "print('noise 50%|####')\n"
                            "json.dump({'done': a['n']}, open(sys.argv[2], 'w'))\n")
    seen: list[str] = []
    finished = launch(cmd + [str(args), str(tmp_path / "result.json")], cwd=tmp_path, result_file=tmp_path / "result.json",
                      log_file=tmp_path / "log.txt", pid_file=tmp_path / "pid", echo=seen.append,
                      show=lambda line: line.startswith("[prog]"))
    assert finished.ok and finished.result == {"done": 3} and finished.code == 0
    assert seen == ["[prog] line 0", "[prog] line 1", "[prog] line 2"]
    assert finished.tail == seen                        # progress bars stay out of the error message's tail
    assert "noise 50%" in (tmp_path / "log.txt").read_text() and not (tmp_path / "pid").exists()


def test_a_failed_program_says_how_and_an_old_result_is_never_read(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text('{"from": "an earlier attempt"}')
    finished = launch(program(tmp_path, "print('boom'); sys.exit(3)\n"), cwd=tmp_path,
                      result_file=tmp_path / "result.json", echo=lambda _: None)
    assert not finished.ok and finished.code == 3 and finished.result is None
    assert finished.how == "exited with code 3" and finished.last_lines() == "boom"


def test_the_time_limit_stops_the_whole_process_group(tmp_path: Path) -> None:
    cmd = program(tmp_path, "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                            "print(child.pid, flush=True)\n"
                            "time.sleep(60)\n")
    pids: list[str] = []
    started = time.monotonic()
    with pytest.raises(ProgramTimeout, match="time limit of 2s"):
        launch(cmd, cwd=tmp_path, echo=pids.append, timeout_s=2, grace_s=2)
    assert time.monotonic() - started < 30
    assert pids and not alive(int(pids[0]))             # the grandchild went down with its group


def test_an_interrupted_caller_stops_the_program(tmp_path: Path) -> None:
    cmd = program(tmp_path, "print('started', os.getpid(), flush=True)\ntime.sleep(60)\n")
    pid: list[int] = []

    def echo(line: str) -> None:
        pid.append(int(line.split()[1]))
        raise KeyboardInterrupt    # Ctrl-C, or a cancelled flow, while the program runs

    with pytest.raises(KeyboardInterrupt):
        launch(cmd, cwd=tmp_path, echo=echo, grace_s=2)
    assert pid and not alive(pid[0])


def test_write_args_is_readable_json(tmp_path: Path) -> None:
    path = write_args(tmp_path / "deep" / "args.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
