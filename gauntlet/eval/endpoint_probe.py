"""The speed probe of an endpoint, from streamed requests (httpx): time to first token and output tokens/s, one
request at a time and with ``endpoint.num_concurrent`` in flight; retried with backoff like every endpoint request.
Imported by the speed probe only (gauntlet/eval/speed.py), so a task's score never depends on it. No Prefect.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gauntlet.config.endpoint import EndpointEvalSpec, EndpointSpec
from gauntlet.eval.endpoint import EndpointError, headers, with_retries
from gauntlet.eval.speed import percentile, probe_prompts
from gauntlet.refs import PerfProbe

log = logging.getLogger(__name__)


@dataclass
class Streamed:
    ttft_s: float | None
    seconds: float
    tokens: int
    counted: bool   # tokens from the stream's usage (else: its text chunks)


def _events(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.startswith("data:") and (data := line[5:].strip()) and data != "[DONE]":
            event = json.loads(data)
            if isinstance(event, dict) and event.get("error"):
                raise EndpointError(f"endpoint stream error: {event['error']}")
            yield event


def stream_once(client: Any, ep: EndpointSpec, prompt: str, max_tokens: int) -> Streamed:
    """One streamed greedy request: time to its first text, its whole time, its output tokens."""
    body: dict[str, Any] = {"model": ep.model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": prompt}]} if ep.chat else {"prompt": prompt})
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None

    def call() -> Any:
        return client.send(client.build_request("POST", ep.url, json=body), stream=True)

    response = with_retries(ep, ep.url, call)
    try:
        for event in _events(response.iter_lines()):
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if text:
                    first = first if first is not None else time.perf_counter() - t0
                    chunks += 1
    finally:
        response.close()
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") is not None else chunks
    return Streamed(first, time.perf_counter() - t0, tokens, usage is not None)


def probe_endpoint(spec: EndpointEvalSpec, probe: Any) -> PerfProbe:
    """The speed probe (``SpeedProbeSpec``) on the endpoint, from streamed requests: time to first token (mean, p50,
    p95) and output tokens/s of the prompts one at a time, then of ``large_batch`` prompts with at most
    ``endpoint.num_concurrent`` in flight (the rate limit; ``large_batch`` records how many). Memory and size are the
    server's: None."""
    import httpx

    ep, prompts = spec.endpoint, probe_prompts(probe.prompts)
    with httpx.Client(timeout=ep.timeout_s, headers=headers(spec.api_key)) as client:
        stream_once(client, ep, prompts[0], 2)   # warm-up, not measured
        single = [stream_once(client, ep, p, probe.max_new_tokens) for p in prompts]
        concurrent = min(probe.large_batch, ep.num_concurrent)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            batch = list(pool.map(lambda p: stream_once(client, ep, p, probe.max_new_tokens),
                                  probe_prompts(probe.large_batch)))
        batch_s = time.perf_counter() - t0
    ttft = [s.ttft_s if s.ttft_s is not None else s.seconds for s in single]
    counted = all(s.counted for s in single + batch)
    perf = PerfProbe(backend=ep.api, device="endpoint", device_name=ep.base_url,
                     tokens_per_s=sum(s.tokens for s in single) / sum(s.seconds for s in single),
                     tokens_per_s_large_batch=sum(s.tokens for s in batch) / batch_s, large_batch=concurrent,
                     first_token_latency_ms=1000 * statistics.fmean(ttft), ttft_p50_ms=1000 * percentile(ttft, 50),
                     ttft_p95_ms=1000 * percentile(ttft, 95), peak_memory_gb=None, size_on_disk_gb=None,
                     prompts=probe.prompts, max_new_tokens=probe.max_new_tokens,
                     note="streamed; output tokens " + ("from the stream's usage" if counted else
                                                        "counted as text chunks (no usage in the stream)"))
    log.info("speed probe (%s at %s): %.1f tok/s one at a time, %.1f tok/s with %d in flight, TTFT p50 %.1f ms; %s",
             ep.api, ep.base_url, perf.tokens_per_s, perf.tokens_per_s_large_batch, concurrent, perf.ttft_p50_ms,
             perf.note)
    return perf
