"""The ``notify:`` and ``tracking:`` sections: webhooks, and the MLflow experiment of the run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gauntlet.config.base import Strict, check_store_location

NotifyEvent = Literal["promoted", "gate_failed", "run_failed", "rolled_back"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("promoted", "gate_failed", "run_failed", "rolled_back")


class WebhookSpec(Strict):
    """One webhook. Its URL is a secret: it comes from an environment variable or a Prefect Secret
    block, never from the config, and is never logged."""

    url_env: str | None = Field(None, description="name of the environment variable holding the URL")
    secret_block: str | None = Field(None, description="name of a Prefect Secret block holding the URL")
    format: Literal["slack", "dingtalk", "feishu"] = "slack"
    events: list[NotifyEvent] = list(NOTIFY_EVENTS)

    @model_validator(mode="after")
    def _one_source(self) -> WebhookSpec:
        if (self.url_env is None) == (self.secret_block is None):
            raise ValueError("set exactly one of url_env (an environment variable name) or secret_block "
                             "(a Prefect Secret block name); webhook URLs never go in the config")
        return self


class NotifySpec(Strict):
    webhooks: list[WebhookSpec] = []
    timeout_s: float = Field(10.0, gt=0)
    mlflow_ui_url: str | None = Field(None, description="MLflow UI base URL for links "
                                                        "(default: the tracking URI when it is http(s))")
    prefect_ui_url: str | None = Field(None, description="Prefect UI base URL for links (default: PREFECT_UI_URL)")


class TrackingSpec(Strict):
    experiment: str = "gauntlet"
    tracking_uri: str | None = Field(None, description="an MLflow server (http(s)://), a database URL "
                                                       "(postgresql://…) or a store inside the project "
                                                       "(sqlite:///rel.db, a folder); default: $MLFLOW_TRACKING_URI "
                                                       "or sqlite in $GAUNTLET_HOME")

    @field_validator("tracking_uri")
    @classmethod
    def _store_inside(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else check_store_location(v, info)

