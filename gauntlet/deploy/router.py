"""The traffic split: nginx in front of stable and canary, weighted round robin, reloaded gracefully.

Gauntlet writes ``nginx.conf`` under the deployment's folder in ``$GAUNTLET_HOME`` and starts nginx with that
folder as its prefix. A canary step rewrites the upstream weights and sends ``nginx -s reload``: the master
starts new workers with the new weights while the old ones finish the requests they hold, so a reload
drops no connection. At 100% the stable server stays in the upstream as ``backup`` (it gets traffic only
if the canary fails). A request whose upstream refuses it, drops it or answers 502 is sent once to the other
upstream (``proxy_next_upstream error timeout http_502 non_idempotent``: the chat POSTs are safe to repeat,
they change nothing on the server), so a server that dies takes no client request with it.

The old workers still route by the old weights until the requests they hold are done, so a server is
stopped only after they have exited (``apply(..., drain=True)``): otherwise the old workers' requests and
keepalive connections still reach the server being stopped.

The access log is JSON, one line per request: which upstream answered, status, times, and the request
body (the served prompts, for the drift check). The watch reads it (:mod:`gauntlet.deploy.watch`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel

from gauntlet.deploy.servers import pid_alive, stop_pid


class RouterError(RuntimeError):
    """nginx is missing, or refused its config."""


class Weights(BaseModel):
    canary: int = 0                 # percent; stable gets the rest

    @property
    def stable(self) -> int:
        return 100 - self.canary


DRAIN_TIMEOUT_S = 30.0      # the longest wait for the old workers before a server they route to stops

LOG_FORMAT = ('{"t":$msec,"upstream":"$upstream_addr","status":$status,"upstream_status":"$upstream_status",'
              '"request_time":$request_time,"upstream_time":"$upstream_response_time","uri":"$uri",'
              '"body":"$request_body"}')


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).is_file()), None)


def upstream_lines(host: str, stable_port: int | None, canary_port: int | None, weights: Weights) -> list[str]:
    """The ``server`` lines of the model upstream for these weights."""
    lines = []
    if stable_port is not None:
        if canary_port is not None and weights.canary >= 100:
            lines.append(f"server {host}:{stable_port} backup;")
        else:
            lines.append(f"server {host}:{stable_port} weight={weights.stable if canary_port else 1} "
                         "max_fails=1 fail_timeout=5s;")
    if canary_port is not None and weights.canary > 0:
        lines.append(f"server {host}:{canary_port} weight={weights.canary} max_fails=1 fail_timeout=5s;")
    if not lines:
        raise RouterError("nothing to route to: neither a stable nor a canary server")
    return lines


def render_conf(folder: Path, listen_host: str, listen_port: int, upstream: list[str]) -> str:
    folder = folder.resolve()
    servers = "\n        ".join(upstream)
    return f"""# Written by Gauntlet (gauntlet/deploy/router.py); rewritten at every canary step.
worker_processes 1;
daemon on;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format gauntlet escape=json '{LOG_FORMAT}';
    access_log {folder}/access.log gauntlet;
    client_body_temp_path {folder}/tmp/body;
    proxy_temp_path {folder}/tmp/proxy;
    fastcgi_temp_path {folder}/tmp/fastcgi;
    uwsgi_temp_path {folder}/tmp/uwsgi;
    scgi_temp_path {folder}/tmp/scgi;
    client_body_buffer_size 1m;       # request bodies stay in memory, so $request_body is logged
    upstream gauntlet_model {{
        {servers}
        keepalive 16;
    }}
    server {{
        listen {listen_host}:{listen_port};
        location / {{
            proxy_pass http://gauntlet_model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
            proxy_next_upstream error timeout http_502 non_idempotent;   # see the module's docstring
            proxy_next_upstream_tries 2;
            proxy_buffering off;          # streamed tokens reach the client as they come
        }}
        location = /nginx_status {{ stub_status; }}
    }}
}}
"""


class Router:
    """One nginx for one deployment, living in ``folder``."""

    def __init__(self, folder: Path, host: str, port: int):
        self.folder, self.host, self.port = Path(folder), host, port

    @property
    def conf(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.folder / "access.log"

    def pid(self) -> int | None:
        try:
            return int((self.folder / "nginx.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        return pid_alive(self.pid())

    def _nginx(self, *args: str) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RouterError("nginx is not installed: `apt-get install nginx` (Debian/Ubuntu), then deploy again")
        done = subprocess.run([binary, "-p", str(self.folder.resolve()), "-c", str(self.conf.resolve()), *args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RouterError(f"nginx {' '.join(args) or 'start'} failed: {done.stderr.strip()}")

    def write(self, stable_port: int | None, canary_port: int | None, weights: Weights) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        text = render_conf(self.folder, self.host, self.port, upstream_lines(self.host, stable_port, canary_port,
                                                                             weights))
        staged = self.conf.with_suffix(".next")
        staged.write_text(text)
        staged.replace(self.conf)
        self._nginx("-t", "-q")

    def apply(self, stable_port: int | None, canary_port: int | None, weights: Weights, drain: bool = False,
              log=print) -> float:
        """Write the config for these weights and start nginx or reload it; seconds until the new workers
        serve. ``drain``: return only once the old workers have finished what they hold and exited (up to
        ``DRAIN_TIMEOUT_S``), so that a server they still route to can be stopped."""
        started = time.monotonic()
        before = self.worker_pids()
        self.write(stable_port, canary_port, weights)
        if not self.running():
            self._nginx()
            return time.monotonic() - started
        self._nginx("-s", "reload")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (self.worker_pids() - before):
            time.sleep(0.02)
        serving_s = time.monotonic() - started
        if drain:
            self.wait_exited(before, log)
        return serving_s

    def wait_exited(self, workers: set[int], log=print) -> bool:
        """Wait until none of ``workers`` (the previous config's) is left; False, said in a log line, when
        some still run after ``DRAIN_TIMEOUT_S`` (a request longer than that is still being answered)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while workers & self.worker_pids():
            if time.monotonic() > deadline:
                log(f"nginx workers {sorted(workers & self.worker_pids())} of the previous config still run after "
                    f"{DRAIN_TIMEOUT_S:.0f} s: stopping the server anyway (their requests to it fail over)")
                return False
            time.sleep(0.05)
        return True

    def worker_pids(self) -> set[int]:
        master = self.pid()
        if not master:
            return set()
        try:
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except OSError:
            return set()
        return {int(p) for p in children}

    def stop(self) -> None:
        if self.running():
            with contextlib.suppress(RouterError):
                self._nginx("-s", "quit")
            stop_pid(self.pid(), grace_s=10)


def read_log(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The access log's records from byte ``offset`` on, and the offset after the last whole line."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records, offset + end
