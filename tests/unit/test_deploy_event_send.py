"""A command that moved @champion (``gauntlet promote`` / ``rollback``) sends gauntlet.champion.moved and
exits within tasks/events.py's SEND_TIMEOUT_S, even when the Prefect server takes the connection and never
answers (a real silent TCP server; the process is a fresh interpreter, so its exit is timed too)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from gauntlet.tasks.events import SEND_TIMEOUT_S

CHILD = """
import json, time
started = time.monotonic()
import prefect.events.clients                      # imported by any command before it sends (seconds)
from gauntlet.tasks.events import emit_champion_moved
imported = time.monotonic()
sent = emit_champion_moved("send-bound", "2", "1", "promote", "test", wait=True)
print(json.dumps({"sent": sent, "import_s": imported - started, "send_s": time.monotonic() - imported}))
"""


def test_the_event_send_of_a_command_is_bounded_when_the_server_never_answers(tmp_path) -> None:
    with socket.socket() as silent:           # accepts connections (the kernel's backlog), answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/api",
               "PREFECT_HOME": str(tmp_path / "prefect")}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
        wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["sent"] is False
    assert child["send_s"] <= SEND_TIMEOUT_S + 0.5, child
    assert wall - child["import_s"] - child["send_s"] < 3, (wall, child)    # no drain left for the exit
