"""An OpenAI-compatible endpoint as the model under evaluation: lm-eval's API backends as Gauntlet runs them, the
token meter behind the cost column, the streamed speed probe and the check that the endpoint answers.

The tasks run through lm-eval's ``local-completions`` / ``local-chat-completions`` (their retries with backoff,
``num_concurrent`` requests in flight), with three additions (:func:`api_model`): the key from the config's variable or
block, each response's ``usage`` counted (or, where a response has none, the tokens estimated with ``endpoint.tokenizer``),
and generations cut at their stop sequences as lm-eval's hf backend cuts them (OpenAI's API never returns a stop
sequence; some servers, ``transformers serve`` among them, return the token that holds it). The check that it answers
and the speed probe (gauntlet/eval/endpoint_probe.py) retry with backoff too (:func:`with_retries`); a request that
fails names its HTTP status or its transport error. No Prefect.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from gauntlet.config.endpoint import EndpointEvalSpec, EndpointSpec
from gauntlet.eval.taskconfig import EvalError
from gauntlet.refs import TokenUsage

log = logging.getLogger(__name__)
RETRIED_STATUS = (408, 409, 429, 500, 502, 503, 504)


class EndpointError(EvalError):
    """The endpoint did not answer as an OpenAI-compatible API: its row fails, naming the status or error."""


# ---------------------------------------------------------------------------------------------
# lm-eval's API backends
# ---------------------------------------------------------------------------------------------


def endpoint_model_args(ep: EndpointSpec) -> dict[str, Any]:
    """lm-eval's model_args for the endpoint (the key is not among them). Requests go as text; with logprobs as token
    ids (exact context lengths: lm-eval splits context from continuation with the tokenizer)."""
    return {"base_url": ep.url, "model": ep.model, "tokenizer": ep.tokenizer,
            "tokenizer_backend": "huggingface" if ep.tokenizer else None, "tokenized_requests": ep.logprobs,
            "num_concurrent": ep.num_concurrent, "max_retries": ep.max_retries, "timeout": ep.timeout_s,
            "batch_size": 1}


class Meter:
    """Tokens of every request and response an API model handled: as the responses reported them, and as the
    tokenizer counts them (where there is one)."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self.counts = {"requests": 0, "reported": 0, "input": 0, "output": 0, "est_input": 0, "est_output": 0}

    def _tokens(self, text: Any) -> int:
        if isinstance(text, list) and text and isinstance(text[0], int):
            return len(text)
        if isinstance(text, list):   # chat messages: their text (the template's own tokens not counted)
            text = "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in text)
        return len(self.tokenizer(str(text), add_special_tokens=False).input_ids) if self.tokenizer else 0

    def sent(self, prompt: Any) -> None:
        batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], (int, dict)) else [prompt]
        self.counts["est_input"] += sum(self._tokens(p) for p in batch)

    def received(self, outputs: Any, texts: list[str] | None) -> None:
        for out in outputs if isinstance(outputs, list) else [outputs]:
            usage = out.get("usage") if isinstance(out, dict) else None
            self.counts["requests"] += 1
            if usage:
                self.counts["reported"] += 1
                self.counts["input"] += int(usage.get("prompt_tokens") or 0)
                self.counts["output"] += int(usage.get("completion_tokens") or 0)
        self.counts["est_output"] += sum(self._tokens(t) for t in texts) if texts is not None else 1

    def mark(self) -> dict[str, int]:
        return dict(self.counts)

    def since(self, mark: dict[str, int], name: str | None) -> TokenUsage | None:
        """The tokens since ``mark``: as reported when every response reported them, else estimated with the
        tokenizer (``how`` says so), else None (nothing to count with)."""
        d = {k: v - mark.get(k, 0) for k, v in self.counts.items()}
        if d["requests"] and d["reported"] == d["requests"]:
            return TokenUsage(input_tokens=d["input"], output_tokens=d["output"], requests=d["requests"])
        if self.tokenizer is None:
            return None
        return TokenUsage(input_tokens=d["est_input"], output_tokens=d["est_output"], requests=d["requests"],
                          how=f"estimated with the tokenizer {name} (the endpoint reported usage for "
                              f"{d['reported']} of {d['requests']} responses)")


@functools.cache
def _api_class(chat: bool) -> type:
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI
    from lm_eval.models.utils import postprocess_generated_text

    base: type = LocalChatCompletion if chat else LocalCompletionsAPI

    class Metered(base):
        gauntlet_key: str | None = None

        @property
        def api_key(self) -> str:
            return self.gauntlet_key or ""

        @property
        def meter(self) -> Meter:
            if "_meter" not in vars(self):
                self._meter = Meter(self.tokenizer if self.tokenizer_backend == "huggingface" else None)
            return self._meter

        def _create_payload(self, messages: Any, *args: Any, **kwargs: Any) -> dict:
            self.meter.sent(messages)
            return super()._create_payload(messages, *args, **kwargs)

        def parse_generations(self, outputs: Any, **kwargs: Any) -> list[str]:
            texts = super().parse_generations(outputs, **kwargs)
            self.meter.received(outputs, [t or "" for t in texts])
            return texts

        def parse_logprobs(self, outputs: Any, tokens: Any = None, ctxlens: Any = None, **kwargs: Any) -> list:
            self.meter.received(outputs, None)
            return super().parse_logprobs(outputs=outputs, tokens=tokens, ctxlens=ctxlens, **kwargs)

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            out = super().generate_until(requests, disable_tqdm)
            return [postprocess_generated_text(text, req.args[1].get("until"), None)
                    for text, req in zip(out, requests, strict=True)]

    Metered.__name__ = Metered.__qualname__ = f"Gauntlet{base.__name__}"
    return Metered


def api_model(spec: EndpointEvalSpec) -> Any:
    """lm-eval's API model for the endpoint, with Gauntlet's key, meter and stop sequences (see the module)."""
    lm = _api_class(spec.endpoint.chat)(**endpoint_model_args(spec.endpoint))
    lm.gauntlet_key = spec.api_key
    return lm


def usage_mark(lm: Any) -> dict[str, int] | None:
    meter = getattr(lm, "meter", None)
    return meter.mark() if isinstance(meter, Meter) else None


def usage_since(lm: Any, mark: dict[str, int] | None, spec: Any) -> TokenUsage | None:
    """What an endpoint's task cost in tokens since ``mark`` (None for local weights)."""
    if mark is None or not isinstance(spec, EndpointEvalSpec):
        return None
    return lm.meter.since(mark, spec.endpoint.tokenizer)


# ---------------------------------------------------------------------------------------------
# requests with retries: the reachability check (and the speed probe, gauntlet/eval/endpoint_probe.py)
# ---------------------------------------------------------------------------------------------


def headers(key: str | None) -> dict[str, str]:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def with_retries(ep: EndpointSpec, what: str, call: Any) -> Any:
    """``call()`` (an httpx request) up to ``ep.max_retries`` times, backing off 0.5, 1, 2, … s (at most 10; a
    Retry-After header wins) after a transport error or a retried status; EndpointError naming the last status or
    error."""
    import httpx

    for attempt in range(1, ep.max_retries + 1):
        try:
            response = call()
            if response.status_code not in RETRIED_STATUS or attempt == ep.max_retries:
                if response.is_error:
                    raise EndpointError(f"endpoint {what}: HTTP {response.status_code} {response.reason_phrase}: "
                                        f"{' '.join(response.text.split())[:200]}")
                return response
            after = response.headers.get("retry-after", "")
            wait = float(after) if after.replace(".", "", 1).isdigit() else min(10.0, 0.5 * 2 ** (attempt - 1))
        except httpx.TransportError as e:
            if attempt == ep.max_retries:
                raise EndpointError(f"endpoint {what}: {type(e).__name__}: {e or 'no answer'} (after "
                                    f"{ep.max_retries} attempts)") from None
            wait = min(10.0, 0.5 * 2 ** (attempt - 1))
        log.info("endpoint %s: attempt %d failed; retrying in %.1fs", what, attempt, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


def check_endpoint(ep: EndpointSpec, key: str | None) -> str:
    """That the endpoint answers and serves ``ep.model`` (GET <base_url>/models; an API without that route is taken
    at its word). Returns what it found; EndpointError with the status or error otherwise."""
    import httpx

    with httpx.Client(timeout=min(ep.timeout_s, 30), headers=headers(key)) as client:
        try:
            response = with_retries(ep, f"{ep.base_url}/models", lambda: client.get(f"{ep.base_url}/models"))
        except EndpointError as e:
            if "HTTP 404" in str(e) or "HTTP 405" in str(e):
                return f"{ep.base_url}: no /models route; {ep.model} taken as served"
            raise
    try:
        served = [m.get("id") for m in response.json().get("data", [])]
    except (ValueError, AttributeError):
        served = []
    if served and ep.model not in served:
        raise EndpointError(f"endpoint {ep.base_url} serves {served[:10]}, not {ep.model!r}. Fix: endpoint.model")
    return f"{ep.base_url} serves {ep.model}"
