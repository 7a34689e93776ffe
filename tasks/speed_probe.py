"""Stage ``speed_probe``: tokens/s at batch 1 and at a large batch, time to first token, peak memory, size.

Key: the model's content hash, the engine protocol (the same backend and device that evaluated it) and
the probe's settings.
"""

from __future__ import annotations

from gauntlet.config.eval import EvalSpec
from gauntlet.eval.engine import engine_for
from gauntlet.eval.protocol import engine_protocol
from gauntlet.eval.speed import probe_speed
from gauntlet.refs import ModelRef, PerfProbe
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tracking import flatten_params


@stage("speed_probe", key=lambda spec, model, variant: [model.sha, engine_protocol(spec), spec.speed_probe],
       params=lambda spec, model, variant: {**flatten_params("speed_probe", spec.speed_probe.model_dump()),
                                            **flatten_params("eval", engine_protocol(spec)), "model.sha": model.sha},
       run_name="speed-probe-{variant}")
def speed_probe(spec: EvalSpec, model: ModelRef, variant: str, stage: StageRun) -> PerfProbe:
    with engine_for(spec, model) as engine:
        perf = probe_speed(engine, spec.speed_probe)
    stage.metrics(perf.model_dump(), prefix="perf.")
    stage.log.info(f"{variant}: {perf.tokens_per_s:.1f} tok/s (batch 1), {perf.tokens_per_s_large_batch:.1f} tok/s "
                   f"(batch {perf.large_batch}), TTFT p50 {perf.ttft_p50_ms:.1f} ms")
    return perf
