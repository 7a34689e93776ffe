"""A bounded load generator: chat requests through the router from a few threads, every outcome counted
(the deploy tests and benchmarks/deploy_router.py)."""

from __future__ import annotations

import threading
import time

from pydantic import BaseModel

from gauntlet.deploy.servers import chat


class LoadResult(BaseModel):
    sent: int = 0
    ok: int = 0
    failed: int = 0
    latencies_s: list[float] = []
    failures: list[str] = []
    seconds: float = 0.0


def generate(url: str, served_name: str, prompts: list[str], *, concurrency: int = 2, max_requests: int = 1000,
             stop: threading.Event | None = None, max_tokens: int = 4, timeout_s: float = 60.0) -> LoadResult:
    """Send up to ``max_requests`` requests (until ``stop`` is set) from ``concurrency`` threads."""
    result, lock, stop = LoadResult(), threading.Lock(), stop or threading.Event()
    started = time.monotonic()

    def worker(offset: int) -> None:
        i = offset
        while not stop.is_set():
            with lock:
                if result.sent >= max_requests:
                    return
                result.sent += 1
            t0 = time.monotonic()
            try:
                chat(url, served_name, prompts[i % len(prompts)], max_tokens, timeout_s)
                with lock:
                    result.ok += 1
                    result.latencies_s.append(time.monotonic() - t0)
            except Exception as e:
                with lock:
                    result.failed += 1
                    result.failures.append(f"{type(e).__name__}: {e}"[:200])
            i += concurrency

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    return result
