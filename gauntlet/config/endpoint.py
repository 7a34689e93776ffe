"""A leaderboard candidate served by an OpenAI-compatible endpoint (``candidates[].endpoint``), not loaded from weights.

The endpoint is evaluated through lm-evaluation-harness's API backends: ``local-chat-completions`` (``chat: true``,
POST ``<base_url>/chat/completions``, needs ``eval.apply_chat_template: true``: lm-eval builds messages only then) or
``local-completions`` (``chat: false``, POST ``<base_url>/completions``). Log-likelihood tasks (multiple choice,
perplexity) need the prompt's log-probabilities, which only a completions endpoint that echoes them returns
(``logprobs: true``); without them such a task is refused here, naming it. The key comes from an environment variable
(``api_key_env``) or a Prefect Secret block (``api_key_secret``), both by name, as ``eval.judge``'s does.
:class:`EndpointEvalSpec` is the eval section as run against one endpoint (the engine and the protocol read it).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PrivateAttr, field_validator, model_validator

from gauntlet.config.base import Strict
from gauntlet.config.eval import EvalSpec
from gauntlet.config.judge import check_base_url


class PriceSpec(Strict):
    input: float = Field(..., ge=0, description="price per million input (prompt) tokens")
    output: float = Field(..., ge=0, description="price per million output (completion) tokens")


class EndpointSpec(Strict):
    base_url: str = Field(..., description="the API's base, e.g. http://127.0.0.1:8000/v1 (the deployed router's "
                                           "address works: it is OpenAI-compatible)")
    model: str = Field(..., min_length=1, description="the model name the endpoint serves (the request's `model`)")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    api_key_secret: str | None = Field(None, description="Prefect Secret block holding the API key")
    chat: bool = Field(True, description="true: chat completions (messages; the server applies its chat template); "
                                         "false: plain completions (the prompt text as is)")
    logprobs: bool = Field(False, description="the completions endpoint returns the prompt's log-probabilities "
                                              "(echo + logprobs, as vLLM does): log-likelihood tasks may run")
    tokenizer: str | None = Field(None, description="a Hugging Face tokenizer (folder or hub id) matching the served "
                                                    "model: log-likelihood tasks split context from continuation with "
                                                    "it, and token counts are estimated with it where the endpoint "
                                                    "reports no usage")
    pinned: bool = Field(False, description="the name serves fixed weights (a dated model version): scores are kept "
                                            "from the night that measured them; false: evaluated again every night")
    num_concurrent: int = Field(1, gt=0, description="requests in flight at once (the rate limit)")
    max_retries: int = Field(3, gt=0, description="attempts per request, with exponential backoff between them")
    timeout_s: int = Field(300, gt=0, description="one request that takes longer has failed")
    price_per_million: PriceSpec | None = Field(None, description="USD per million input and output tokens: the "
                                                                  "board's cost column")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_base_url(v, "endpoint.api_key_env")

    @model_validator(mode="after")
    def _consistent(self) -> EndpointSpec:
        if self.api_key_env and self.api_key_secret:
            raise ValueError("set at most one of endpoint.api_key_env or endpoint.api_key_secret")
        if self.chat and self.logprobs:
            raise ValueError("chat completions return no prompt log-probabilities (lm-eval's local-chat-completions "
                             "has no loglikelihood). Fix: chat: false (a completions endpoint that echoes logprobs), "
                             "or logprobs: false")
        if self.logprobs and self.tokenizer is None:
            raise ValueError("logprobs: true needs endpoint.tokenizer: lm-eval splits each prompt's context from its "
                             "continuation with it. Fix: name the served model's tokenizer (a folder or hub id)")
        if self.tokenizer is not None and "://" in self.tokenizer:
            raise ValueError(f"tokenizer {self.tokenizer!r} is a URL. Fix: a local folder or a hub id (org/name)")
        return self

    @property
    def api(self) -> str:
        """lm-eval's backend for it."""
        return "local-chat-completions" if self.chat else "local-completions"

    @property
    def url(self) -> str:
        """What lm-eval posts to."""
        return f"{self.base_url}/{'chat/completions' if self.chat else 'completions'}"


LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


def endpoint_task_problems(endpoint: EndpointSpec, ev: EvalSpec, tasks_dir: Path, where: str) -> list[str]:
    """Why ``ev`` cannot run against ``endpoint`` (empty: it can): each log-likelihood task named, with why and the
    fix, when the endpoint returns no log-probabilities; chat without chat templates; what runs on weights only."""
    from gauntlet.eval.suites import SuiteError, plan_tasks
    from gauntlet.eval.task_types import output_types

    problems = []
    if endpoint.chat and not ev.apply_chat_template:
        problems.append(f"{where}.chat: chat completions send messages, which lm-eval builds only under "
                        "eval.apply_chat_template: true. Fix: set eval.apply_chat_template: true, or chat: false "
                        "(plain completions)")
    if not endpoint.logprobs:
        try:
            plans = plan_tasks(ev, tasks_dir)
        except SuiteError:
            plans = []   # the eval section's own error says why
        for plan in plans:
            needs = sorted(set(output_types(plan, tasks_dir)) & set(LOGLIKELIHOOD_TYPES))
            if needs:
                problems.append(f"task {plan.name} is {'/'.join(needs)}: it needs the prompt's log-probabilities, "
                                f"and {where} returns none (logprobs: false). Fix: chat: false and logprobs: true "
                                "on a completions endpoint that echoes them, or drop the task from eval.tasks")
        if ev.perplexity is not None:
            problems.append(f"eval.perplexity scores log-likelihoods, and {where} returns none (logprobs: false). "
                            "Fix: logprobs: true on a completions endpoint that echoes them, or remove eval.perplexity")
    if ev.safety is not None:
        problems.append(f"eval.safety generates the candidate's answers from its weights; {where} has none here. "
                        "Fix: remove eval.safety from this board, or list the served weights as a source: candidate")
    return problems


class EndpointEvalSpec(EvalSpec):
    """The eval section as run against one endpoint (built by the leaderboard, never read from a config). The key is
    held privately: no dump, hash, log or cache key sees it."""

    endpoint: EndpointSpec
    _api_key: str | None = PrivateAttr(None)

    @classmethod
    def of(cls, ev: EvalSpec, endpoint: EndpointSpec, api_key: str | None) -> EndpointEvalSpec:
        spec = cls.model_construct(**dict(ev), endpoint=endpoint)   # ev is validated already
        spec._api_key = api_key
        return spec

    @property
    def api_key(self) -> str | None:
        return self._api_key
