"""The speed probe: how fast a model generates on the backend that evaluated it.

A fixed prompt set, greedy decoding, exactly ``max_new_tokens`` generated per prompt (end-of-sequence
suppressed until then). Measured: output tokens/s at batch 1 (each prompt alone) and at a large batch
(the prompts cycled to ``large_batch``, one batched call); time to first token (a one-token generation
per prompt: prompt processing + the first token) as mean, p50 and p95; peak device memory; the model's
size on disk. On the CPU it runs the same way, with small numbers: peak memory is then the process's
peak resident set, which includes whatever the process did before. GB = 1e9 bytes.

The backend's loaded model is reused (:class:`gauntlet.eval.engine.Engine`): the hf backend's
transformers model, or vLLM's engine (whose peak memory is what vLLM reserved on the device).
"""

from __future__ import annotations

import logging
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gauntlet.eval.engine import Engine
from gauntlet.files import size_on_disk
from gauntlet.prompting import format_prompt
from gauntlet.refs import PerfProbe

log = logging.getLogger(__name__)
GB = 1e9

# The probe's fixed prompts (the first ``SpeedProbeSpec.prompts`` are used, cycling if needed).
PROBE_PROMPTS: tuple[str, ...] = tuple(
    format_prompt(instruction, input)
    for instruction, input in (
        ("What is the favourite colour of Kaloter?", ""),
        ("Summarise the following text in one sentence.",
         "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."),
        ("Which colour does Mizuvan like best?", ""),
        ("Translate the sentence into French.", "The weather is nice today."),
        ("Tell me Quidorbel's favourite colour.", ""),
        ("Write a short poem about the sea.", ""),
        ("List three primary colours.", ""),
        ("Explain what a unit test is.", ""),
    )
)


def probe_prompts(n: int) -> list[str]:
    return [PROBE_PROMPTS[i % len(PROBE_PROMPTS)] for i in range(n)]


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _hf_generate(model: Any, tokenizer: Any, device: str) -> Callable[[list[str], int], tuple[int, float]]:
    """generate(prompts, n) -> (new tokens, seconds) with transformers, left-padded batches."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(prompts: list[str], n: int) -> tuple[int, float]:
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        try:
            enc = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1).to(model.device)
        finally:
            tokenizer.padding_side = side
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id)
        if device == "cuda":
            torch.cuda.synchronize()
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0], time.perf_counter() - t0

    return generate


def _vllm_generate(llm: Any) -> Callable[[list[str], int], tuple[int, float]]:
    from vllm import SamplingParams

    def generate(prompts: list[str], n: int) -> tuple[int, float]:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outputs), seconds

    return generate


def probe_speed(engine: Engine, probe: Any) -> PerfProbe:
    """Measure the engine's model with the probe settings (``SpeedProbeSpec``); an endpoint's from streamed requests
    (:func:`gauntlet.eval.endpoint_probe.probe_endpoint`)."""
    if engine.served:
        from gauntlet.eval.endpoint_probe import probe_endpoint

        return probe_endpoint(engine.spec, probe)   # type: ignore[arg-type]  # served: an EndpointEvalSpec
    import torch

    lm = engine.lm
    cuda = engine.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if engine.backend == "vllm":
        generate = _vllm_generate(lm.model)
    else:
        generate = _hf_generate(lm.model, lm.tokenizer, engine.device)
    prompts = probe_prompts(probe.prompts)

    generate(prompts[:1], 2)  # warm-up (kernels, caches), not measured
    ttft = [generate([p], 1)[1] for p in prompts]
    single = [generate([p], probe.max_new_tokens) for p in prompts]
    batch_tokens, batch_seconds = generate(probe_prompts(probe.large_batch), probe.max_new_tokens)

    if cuda and engine.backend == "vllm":
        free, total = torch.cuda.mem_get_info()  # vLLM's workers allocate outside this process's allocator
        peak = total - free
    elif cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    perf = PerfProbe(
        backend=engine.backend,
        device=engine.device,
        device_name=torch.cuda.get_device_name() if cuda else cpu_name(),
        tokens_per_s=sum(n for n, _ in single) / sum(t for _, t in single),
        tokens_per_s_large_batch=batch_tokens / batch_seconds,
        large_batch=probe.large_batch,
        first_token_latency_ms=1000 * statistics.fmean(ttft),
        ttft_p50_ms=1000 * percentile(ttft, 50),
        ttft_p95_ms=1000 * percentile(ttft, 95),
        peak_memory_gb=peak / GB,
        size_on_disk_gb=size_on_disk(Path(engine.model.path)) / GB,
        prompts=probe.prompts,
        max_new_tokens=probe.max_new_tokens,
    )
    log.info("speed probe (%s on %s): %.1f tok/s at batch 1, %.1f tok/s at batch %d, TTFT p50 %.1f ms p95 %.1f ms, "
             "peak %.3f GB, %.4f GB on disk", perf.backend, perf.device, perf.tokens_per_s,
             perf.tokens_per_s_large_batch, probe.large_batch, perf.ttft_p50_ms, perf.ttft_p95_ms,
             perf.peak_memory_gb, perf.size_on_disk_gb)
    return perf
