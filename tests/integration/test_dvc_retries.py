"""A DVC remote that does not answer at first (a real HTTP remote whose server starts late): the pull is
tried again with a growing delay, and nothing is reproduced or pushed meanwhile (real DVC repos, nothing
mocked)."""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import threading
from pathlib import Path

import pytest

from gauntlet.data.dvc import DataUnavailable, pull_data
from tests.integration.test_data import forget_local_data, home, lock_md5s, produce, repo, spec_for  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FileServer:
    """http.server on a fixed port serving the folder that a local remote filled (DVC's HTTP remote layout)."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.server = folder, port, None

    def start(self) -> None:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(self.folder))
        handler.log_message = lambda *args: None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


class StartAfterRetries(logging.Handler):
    """Starts ``server`` when the pull reports its ``n``-th failed attempt (before it waits to try again)."""

    def __init__(self, server: FileServer, n: int):
        super().__init__(logging.WARNING)
        self.server, self.n, self.failed = server, n, 0

    def emit(self, record: logging.LogRecord) -> None:
        if "`dvc pull` attempt" in record.getMessage():
            self.failed += 1
            if self.failed == self.n:
                self.server.start()


@pytest.fixture
def remote_served_late(repo, home, tmp_path):  # noqa: F811
    """The data pushed to a folder, then the repo switched to an HTTP remote serving it from a server
    that is not running yet; a clone without the data."""
    produce(repo, home, push=True)
    forget_local_data(repo)
    port = free_port()
    (repo / ".dvc" / "config").write_text(f"[core]\n    remote = web\n['remote \"web\"']\n"
                                          f"    url = http://127.0.0.1:{port}\n")
    server = FileServer(tmp_path / "remote", port)
    yield server
    server.stop()


def test_a_pull_that_fails_twice_then_works(repo, remote_served_late, caplog):  # noqa: F811
    """Without the retries (HEAD before this change) the first failure leads to `dvc repro` and a push."""
    lock_before = (repo / "dvc.lock").read_bytes()
    expected = lock_md5s(repo)
    starter = StartAfterRetries(remote_served_late, n=2)
    logging.getLogger("gauntlet.data.dvc").addHandler(starter)
    try:
        with caplog.at_level(logging.INFO, logger="gauntlet.data.dvc"):
            ref = pull_data(spec_for(repo, reproducible=True), root=repo, backoff_s=0.2)
    finally:
        logging.getLogger("gauntlet.data.dvc").removeHandler(starter)
    assert starter.failed == 2
    assert ref.file_md5 == expected
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert "reproducing" not in caplog.text and "pulled data/demo" in caplog.text
    assert "Connection refused" in caplog.text


def test_a_remote_that_never_answers_reproduces_nothing(repo, remote_served_late):  # noqa: F811
    lock_before = (repo / "dvc.lock").read_bytes()
    with pytest.raises(DataUnavailable, match=r"failed 3 times: the DVC remote does not answer.*Nothing was "
                                              r"reproduced or pushed"):
        pull_data(spec_for(repo, reproducible=True), root=repo, attempts=3, backoff_s=0.1)
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert not (repo / "data" / "demo" / "train.jsonl").exists()
