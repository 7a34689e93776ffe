"""The evaluation engine: a model loaded by lm-evaluation-harness, once, for every task and probe of a stage.

:class:`Engine` holds one model loaded by lm-eval's ``hf`` or ``vllm`` backend, loaded on first use and
shared by every task of an evaluation (and by the speed probe): a fully cached evaluation never
loads the model at all. The backend's arguments, the checks that it can run here and the device (one
function, :func:`device_kind`) are here too; :func:`gauntlet.eval.scoring.run_task` runs one task on it. No
Prefect here.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from gauntlet.config.endpoint import EndpointEvalSpec
from gauntlet.config.eval import EvalSpec
from gauntlet.eval.taskconfig import EvalError
from gauntlet.hashing import sha256_json
from gauntlet.refs import ModelRef

log = logging.getLogger(__name__)

# Stderr of mean-aggregated metrics (acc, exact_match) is closed-form; other aggregations bootstrap.
BOOTSTRAP_ITERS = 1000
GPU_EXTRA_HINT = "install the GPU extra (pip install 'llm-gauntlet[gpu]') or set eval.backend: hf"
__all__ = ["EvalError", "Engine", "engine_for"]   # EvalError: where callers have always found it


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(device: str) -> str:
    return "float32" if device == "cpu" else "auto"


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """No hub traffic while it holds (models are local; fixture and local task data too).

    The hub libraries read these variables once, when imported: they are imported first, so that
    an offline section never leaves a later section (real datasets) offline for the whole process.
    """
    import datasets  # noqa: F401
    import huggingface_hub  # noqa: F401

    keys = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} if enabled else {}
    keys.update({"HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"})
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


def engine_model_args(spec: EvalSpec, model_path: str, device: str) -> tuple[str, dict[str, Any]]:
    """(lm-eval model type, its model_args) for the configured backend: what the engine is handed. An endpoint
    (:class:`EndpointEvalSpec`): lm-eval's API backend for it (gauntlet/eval/endpoint.py)."""
    if isinstance(spec, EndpointEvalSpec):
        from gauntlet.eval.endpoint import endpoint_model_args

        return spec.endpoint.api, endpoint_model_args(spec.endpoint)
    if spec.backend == "vllm":
        args: dict[str, Any] = {
            "pretrained": model_path,
            "dtype": "auto",
            "tensor_parallel_size": spec.tensor_parallel_size,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "seed": spec.fewshot_seed,
            "batch_size": spec.batch_size,
        }
        if spec.max_model_len is not None:
            args["max_model_len"] = spec.max_model_len
        return "vllm", args
    return "hf", {"pretrained": model_path, "dtype": dtype_for(device)}


def engine_modules(spec: EvalSpec) -> tuple[str, ...]:
    """The modules evaluating with this config imports (a command imports them while its Prefect API starts).
    The vllm backend's own module is left to the stage, which says clearly when vllm is missing."""
    common = ("torch", "transformers", "lm_eval.evaluator", "lm_eval.api.registry", "lm_eval.tasks")
    return common if spec.backend == "vllm" else (*common, "lm_eval.models.huggingface")


def check_backend(spec: EvalSpec, device: str) -> None:
    """A clear error, before anything loads, when the backend cannot run here."""
    if spec.backend != "vllm" or isinstance(spec, EndpointEvalSpec):
        return
    if find_spec("vllm") is None:
        raise EvalError(f"eval.backend is 'vllm' but the vllm package is not installed; {GPU_EXTRA_HINT}")
    if device != "cuda":
        raise EvalError(f"eval.backend is 'vllm', which needs a CUDA GPU, and none is visible here; {GPU_EXTRA_HINT}")
    import torch

    if spec.tensor_parallel_size > torch.cuda.device_count():
        raise EvalError(f"eval.tensor_parallel_size is {spec.tensor_parallel_size} but only "
                        f"{torch.cuda.device_count()} GPU(s) are visible; lower it to at most that")


class Engine:
    """One model on one backend, loaded on first use (``lm``) and shared until :meth:`close`."""

    def __init__(self, spec: EvalSpec, model: ModelRef, device: str | None = None):
        self.spec, self.model = spec, model
        self.device = device or device_kind()
        self.backend, self.model_args = engine_model_args(spec, model.path, self.device)
        self._lm = None
        self.loads = 0

    @property
    def served(self) -> bool:
        """The model is an endpoint's: requests, not weights loaded here."""
        return isinstance(self.spec, EndpointEvalSpec)

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    @property
    def lm(self):
        if self._lm is None:
            check_backend(self.spec, self.device)
            if isinstance(self.spec, EndpointEvalSpec):
                from gauntlet.eval.endpoint import api_model

                self._lm = api_model(self.spec)
                self.loads += 1
                return self._lm
            if not Path(self.model.path).exists():
                raise EvalError(f"model {self.model.name}: path {self.model.path} does not exist")
            from lm_eval.api.registry import get_model

            log.info("loading %s (%s) with lm-eval's %s backend on %s: %s", self.model.name, self.model.path,
                     self.backend, self.device, self.model_args)
            t0 = time.perf_counter()
            try:
                with offline(False):  # the model is a local folder by now
                    self._lm = get_model(self.backend).create_from_arg_obj(
                        dict(self.model_args),
                        {"batch_size": self.spec.batch_size, "max_batch_size": None, "device": self.device})
            except Exception as e:
                raise EvalError(f"model {self.model.name} ({self.model.path}) failed to load with the "
                                f"{self.backend} backend: {type(e).__name__}: {e}") from e
            self.loads += 1
            log.info("model loaded in %.1fs", time.perf_counter() - t0)
        return self._lm

    def close(self) -> None:
        if self._lm is None:
            return
        self._lm = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


_ACTIVE: dict[str, Engine] = {}
_ACTIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def engine_for(spec: EvalSpec, model: ModelRef) -> Iterator[Engine]:
    """The engine for this model and backend: the one an enclosing ``engine_for`` opened, else a new one
    (closed on exit). The evaluate stage opens one around all its tasks and the speed probe."""
    device = device_kind()
    key = sha256_json([model.path, model.sha, engine_model_args(spec, model.path, device), spec.batch_size])
    with _ACTIVE_LOCK:
        shared = _ACTIVE.get(key)
        if shared is None:
            shared = _ACTIVE[key] = Engine(spec, model, device)
            owner = True
        else:
            owner = False
    try:
        yield shared
    finally:
        if owner:
            with _ACTIVE_LOCK:
                _ACTIVE.pop(key, None)
            shared.close()
