"""The watch's counting of nginx's access log: a request nginx retried on the other upstream is one client
request with two attempts, the failed attempt counted against the upstream it failed on."""

from __future__ import annotations

from gauntlet.deploy.watch import attempts, router_stats

PORTS = {"stable": 8781, "canary": 8782}


def record(upstream: str, upstream_status: str, status: int = 200, request_time: float = 0.2) -> dict:
    """One access-log line as render_conf's log_format writes it (``$upstream_addr``, ``$upstream_status``)."""
    return {"t": 100.0, "upstream": upstream, "status": status, "upstream_status": upstream_status,
            "request_time": request_time, "upstream_time": "0.1", "uri": "/v1/chat/completions", "body": ""}


def test_a_retried_request_fails_once_on_the_canary_and_is_answered_by_stable() -> None:
    retried = record("127.0.0.1:8782, 127.0.0.1:8781", "502, 200", request_time=0.5)
    assert attempts(retried) == [("127.0.0.1:8782", "502"), ("127.0.0.1:8781", "200")]
    stats, share = router_stats([retried, record("127.0.0.1:8781", "200", request_time=0.1)], PORTS)
    assert (stats["canary"].requests, stats["canary"].errors, stats["canary"].error_rate) == (1, 1, 1.0)
    assert (stats["stable"].requests, stats["stable"].errors) == (2, 0)      # both client requests answered
    assert stats["stable"].p95_s == 0.5 and stats["canary"].p95_s is None   # the retried one's whole time
    assert share == 0.0                                                       # the canary answered nothing


def test_a_refused_attempt_and_one_that_never_got_a_status_both_count_as_failures() -> None:
    refused_then_ok = record("127.0.0.1:8781, 127.0.0.1:8782", "502, 200")
    timed_out_twice = record("127.0.0.1:8782, 127.0.0.1:8781", "504, -", status=504)
    stats, share = router_stats([refused_then_ok, timed_out_twice], PORTS)
    assert (stats["stable"].requests, stats["stable"].errors) == (2, 2)
    assert (stats["canary"].requests, stats["canary"].errors) == (2, 1)
    assert share == 100.0                                                     # the one answer came from the canary


def test_attempts_across_upstream_groups_and_a_request_no_upstream_took() -> None:
    assert attempts(record("127.0.0.1:8782 : 127.0.0.1:8781", "500 : 200")) == [
        ("127.0.0.1:8782", "500"), ("127.0.0.1:8781", "200")]
    stats, _ = router_stats([record("gauntlet_model", "502", status=502)], PORTS)   # "no live upstreams"
    assert all(s.requests == 0 for s in stats.values())
