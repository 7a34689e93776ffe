"""The traffic split: nginx in front of stable and canary, weighted round robin, reloaded gracefully.

Gauntlet writes ``nginx.conf`` under the deployment's folder in ``$GAUNTLET_HOME`` and starts nginx with that
folder as its prefix. A canary step rewrites the upstream weights and sends ``nginx -s reload``: the master
starts new workers with the new weights while the old ones finish the requests they hold, so a reload
drops no connection. At 100% the stable server stays in the upstream as ``backup`` (it gets traffic only
if the canary fails); a canary that refuses connections is skipped (``proxy_next_upstream error``; a
request already sent to it is not retried, POST not being idempotent, so only requests in flight are lost).

The access log is JSON, one line per request: which upstream answered, status, times, and the request
body (the served prompts, for the drift check). The watch reads it (:mod:`gauntlet.deploy.watch`).
"""

from __future__ import annotations

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
            proxy_next_upstream error timeout;
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

    def apply(self, stable_port: int | None, canary_port: int | None, weights: Weights) -> float:
        """Write the config for these weights and start nginx or reload it; seconds until the new workers
        serve (the old ones finish what they hold)."""
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
        return time.monotonic() - started

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
            try:
                self._nginx("-s", "quit")
            except RouterError:
                pass
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
