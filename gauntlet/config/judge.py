"""``eval.judge``: the pairwise LLM judge (gauntlet/eval/judge.py): who judges, with which prompt, on which set.

The judge is a model (``model``: a local folder, ``models:/NAME@alias``, ``hf://…``; run with transformers) or
an OpenAI-compatible endpoint (``base_url``: a deployed champion, vLLM's server, a hosted API). An endpoint's
key comes from an environment variable (``api_key_env``) or a Prefect Secret block (``api_key_secret``),
both by name: the key itself never appears in a config, a log or a cache key.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gauntlet.config.base import Strict, resolve
from gauntlet.config.model import check_source_scheme


def check_base_url(v: str, key_field: str) -> str:
    """An OpenAI-compatible endpoint's base URL (http or https, no credentials in it), without its trailing slash;
    ValueError with the fix otherwise. ``key_field``: where the key goes instead (named in the fix)."""
    url = urlparse(v)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{v!r} is not an http(s) URL. Fix: e.g. http://127.0.0.1:8000/v1")
    if url.username or url.password:
        raise ValueError("credentials in base_url would be logged. Fix: put the key in an environment "
                         f"variable and name it in {key_field}")
    return v.rstrip("/")


class JudgeSpec(Strict):
    model: str | None = Field(None, description="the judge as a model source (folder, models:/NAME@alias, hf://…), "
                                                "run with transformers; or set base_url")
    base_url: str | None = Field(None, description="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                                   "(POST <base_url>/chat/completions)")
    endpoint_model: str | None = Field(None, description="the model name the endpoint serves (base_url only)")
    api_key_env: str | None = Field(None, description="environment variable holding the endpoint's API key")
    api_key_secret: str | None = Field(None, description="Prefect Secret block holding the endpoint's API key")
    opponent: Literal["champion", "base"] = Field(
        "champion", description="whom the candidate's answers are judged against: the registry's champion (the "
                                "base while there is none), or always the model this run trained from (base: for "
                                "preference tuning from an SFT model, that SFT model)")
    prompt: str = Field("evals/judge/pairwise.md", description="the judge prompt (its sha256 is in the protocol)")
    instructions: str = Field("evals/judge/instructions.jsonl",
                              description="the instruction set (JSONL rows with `instruction`; a DVC-tracked file of yours, or the shipped one)")
    limit: int | None = Field(None, gt=0, description="judge the first N instructions only")
    max_new_tokens: int = Field(64, gt=0, description="answer length of the candidate and its opponent (greedy)")
    judge_max_tokens: int = Field(96, gt=0, description="an endpoint judge's reply budget (reasons + verdict)")
    tie_margin: float = Field(0.05, ge=0, description="hf judge: a log-likelihood margin (after removing the "
                                                      "position prior) below this is a tie")
    timeout_s: float = Field(60.0, gt=0, description="an endpoint call that takes longer has not answered")
    batch_size: int = Field(8, gt=0)

    @field_validator("model")
    @classmethod
    def _model_source(cls, v: str | None) -> str | None:
        if v is not None:
            check_source_scheme(v)
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_base_url(v, "eval.judge.api_key_env")

    @field_validator("prompt", "instructions")
    @classmethod
    def _file_exists(cls, v: str, info: ValidationInfo) -> str:
        path = resolve(v, info)
        if info.field_name == "prompt" and not path.is_file():
            raise ValueError(f"judge prompt {str(path)!r} does not exist. Fix: point eval.judge.prompt at a file "
                             "such as evals/judge/pairwise.md")
        return v

    @model_validator(mode="after")
    def _one_judge(self) -> JudgeSpec:
        if (self.model is None) == (self.base_url is None):
            raise ValueError("set exactly one of eval.judge.model (a model source run with transformers) or "
                             "eval.judge.base_url (an OpenAI-compatible endpoint)")
        if self.base_url is None and (self.api_key_env or self.api_key_secret or self.endpoint_model):
            raise ValueError("api_key_env, api_key_secret and endpoint_model belong to an endpoint judge: set "
                             "eval.judge.base_url, or remove them")
        if self.api_key_env and self.api_key_secret:
            raise ValueError("set at most one of eval.judge.api_key_env or eval.judge.api_key_secret")
        return self

    def judge_identity(self) -> dict:
        """What names the judge in the protocol and cache key (a model judge adds its content hash)."""
        if self.base_url is not None:
            return {"base_url": self.base_url, "endpoint_model": self.endpoint_model}
        return {"model": self.model}
