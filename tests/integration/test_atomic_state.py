"""State files written whole or not at all: a writer killed (SIGKILL) mid-write leaves the previous good file;
an unreadable receipt is a cache miss, logged, and the stage computes again."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from gauntlet.files import write_json
from tests.helpers import REPO

# Rewrites one 4 MB JSON file as fast as it can, the way a receipt, report.json or the leaderboard is written.
WRITER = """
import sys
from gauntlet.files import write_json
i = 0
while True:
    i += 1
    write_json(sys.argv[1], {"version": i, "pad": "x" * (4 << 20)})
"""


def test_a_writer_killed_mid_write_leaves_the_last_good_file(tmp_path: Path) -> None:
    """Ten kills at random moments; after each the file parses whole. (With a plain `path.write_text`, the
    first kill already leaves a truncated file.)"""
    target = tmp_path / "report.json"
    write_json(target, {"version": 0, "pad": "x" * (4 << 20)})
    rng = random.Random(0)
    seen = set()
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO)
        time.sleep(1.0 + rng.random())   # past the start-up, into the writing
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = json.loads(target.read_text())
        assert len(report["pad"]) == 4 << 20
        seen.add(report["version"])
    assert seen != {0}, "the writer never got to write: the kills proved nothing"
