"""The ``deploy:`` section: how the champion is served, how a new one is canaried, and when it is rolled back.

Defaults fit the CPU (``transformers serve``, nginx, everything on 127.0.0.1); ``backend: vllm`` renders the
same rollout for a GPU box (``vllm serve``). The KServe manifest is rendered from this section too.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gauntlet.config.base import Strict


class CanaryStep(Strict):
    weight: int = Field(..., ge=1, le=100, description="the canary's share of traffic, in percent")
    watch_s: float = Field(..., gt=0, description="how long this step is watched before the next")


class Thresholds(Strict):
    """A canary breaching any of these during a step is rolled back; stable's numbers in the same window
    are the reference where a ratio is asked for."""

    max_error_rate: float = Field(0.05, ge=0, le=1, description="failed requests / requests at the router (5xx, "
                                                                "timeouts, refused)")
    max_p95_latency_s: float = Field(10.0, gt=0, description="canary p95 request time at the router, seconds")
    max_p95_ratio: float | None = Field(3.0, gt=0, description="canary p95 / stable p95; None: no relative limit")
    min_tokens_per_s_ratio: float | None = Field(0.3, gt=0, description="canary tokens/s / stable tokens/s")
    max_quality_drop: float = Field(0.1, ge=0, description="the probe's score: largest drop against stable, "
                                                            "applied like gate.max_regression")
    max_drift_psi: float = Field(0.25, gt=0, description="population stability index of served prompts against "
                                                         "the training data (0.1 small, 0.25 large)")
    min_requests: int = Field(5, ge=1, description="fewer canary requests in a window cannot be judged: the step "
                                                   "is watched again once, then counted as a breach")


class ProbeSpec(Strict):
    """The quality probe: a fixed prompt set (alpaca rows with the expected ``output``) sent to stable and
    canary alike in every step, scored by exact match like the gate's generative tasks."""

    file: str | None = Field(None, description="DVC-tracked JSONL; default: the run config's data.eval")
    limit: int = Field(8, ge=1, description="rows of the file used (the first N)")
    max_tokens: int = Field(16, ge=1)


ALERTS = ("error_rate", "p95_latency")   # the rules gauntlet deploy renders (gauntlet/deploy/alarms.py)


class AlertSpec(Strict):
    """The Prometheus alert rules on the stable version (``alerts.yml`` beside ``prometheus.yml``); a firing
    rule rolls @champion back through Alertmanager and the alarm receiver, unless it is warn-only."""

    error_rate: float = Field(0.05, gt=0, le=1, description="stable's failed / all attempts over window_s")
    p95_factor: float = Field(2.0, gt=0, description="stable's p95 over window_s against its baseline (the p95 its "
                                                     "canary steps measured; else thresholds.max_p95_latency_s)")
    window_s: int = Field(60, ge=2, description="the rate() window, seconds (at least two scrapes)")
    for_s: int = Field(10, ge=0, description="how long a rule must hold before it fires, seconds")
    warn_only: list[str] = Field([], description=f"rules that only notify; of {', '.join(ALERTS)}")
    receiver_url: str = Field("http://127.0.0.1:8799", description="the alarm receiver Alertmanager posts to "
                                                                   "(python -m gauntlet.deploy.alarms)")

    @field_validator("warn_only")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        if unknown := [n for n in names if n not in ALERTS]:
            raise ValueError(f"unknown alert {unknown}; the alerts are {list(ALERTS)}, e.g. warn_only: [p95_latency]")
        return names


class KServeSpec(Strict):
    namespace: str = "default"
    storage_uri: str = Field("s3://models/{name}/{version}",
                             description="where KServe reads a version; {name} and {version} are filled in")
    runtime: str = Field("kserve-huggingfaceserver", description="a ServingRuntime installed in the cluster")
    gpus: int = Field(1, ge=0)


class DeploySpec(Strict):
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: `transformers serve` on the CPU; vllm: `vllm serve` on a GPU")
    host: str = "127.0.0.1"
    router_port: int = Field(8780, ge=1, le=65535, description="nginx: where clients send requests")
    stable_port: int = Field(8781, ge=1, le=65535)
    canary_port: int = Field(8782, ge=1, le=65535)
    metrics_port: int = Field(8783, ge=1, le=65535, description="the metrics exporter Prometheus scrapes "
                                                                "(the next free port if taken)")
    steps: list[CanaryStep] = Field(
        default_factory=lambda: [CanaryStep(weight=10, watch_s=60), CanaryStep(weight=50, watch_s=60),
                                 CanaryStep(weight=100, watch_s=60)],
        description="the canary's weights, rising, ending at 100")
    thresholds: Thresholds = Thresholds()
    probe: ProbeSpec = ProbeSpec()
    drift_reference: str | None = Field(None, description="JSONL of training prompts; default: data.train")
    start_timeout_s: float = Field(300.0, gt=0, description="how long a server may take to answer /health")
    kserve: KServeSpec = KServeSpec()
    alerts: AlertSpec = AlertSpec()

    @field_validator("steps")
    @classmethod
    def _rising_to_100(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        weights = [s.weight for s in steps]
        if not steps:
            raise ValueError("at least one step is needed; e.g. [{weight: 10, watch_s: 60}, {weight: 100, watch_s: 60}]")
        if any(b <= a for a, b in pairwise(weights)):
            raise ValueError(f"weights must rise step by step; got {weights}")
        if weights[-1] != 100:
            raise ValueError(f"the last step must send the canary 100% of the traffic; got {weights[-1]}")
        return steps

    @model_validator(mode="after")
    def _distinct_ports(self) -> DeploySpec:
        ports = [self.router_port, self.stable_port, self.canary_port]
        if len(set(ports)) != 3:
            raise ValueError(f"router_port, stable_port and canary_port must differ; got {ports}")
        return self
