"""Stage ``perplexity``: a model's byte perplexity on the run's held-out rows (``eval.perplexity``).

Key: the model's content hash, the engine protocol (backend, device, dtype), the perplexity settings and
the md5 of the file it reads (``data.validation`` by default): a new data version scores again, a renamed
model does not.
"""

from __future__ import annotations

from gauntlet.config.eval import EvalSpec
from gauntlet.eval.engine import EvalError, engine_for
from gauntlet.eval.perplexity import heldout_texts, measure_perplexity
from gauntlet.eval.protocol import engine_protocol
from gauntlet.refs import DatasetRef, ModelRef, PerplexityResult
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tracking import flatten_params


def heldout_file(spec: EvalSpec, data: DatasetRef | None) -> tuple[str, str | None]:
    """(path, md5) of the run's file that ``eval.perplexity`` reads; EvalError, naming the fix, without one."""
    split = spec.perplexity.split
    path, md5 = ((data.validation_path, data.validation_md5) if split == "validation" else
                 (data.eval_path, data.eval_md5)) if data is not None else (None, None)
    if path is None:
        raise EvalError(f"eval.perplexity reads the run's data.{split} file and this evaluation has none: "
                        f"evaluate within a run (gauntlet run), or remove eval.perplexity")
    return path, md5


@stage("perplexity", key=lambda spec, model, data, variant: [model.sha, engine_protocol(spec), spec.perplexity,
                                                             heldout_file(spec, data)[1]],
       params=lambda spec, model, data, variant: {**flatten_params("perplexity", spec.perplexity.model_dump()),
                                                  "perplexity.data_md5": heldout_file(spec, data)[1],
                                                  "model.sha": model.sha},
       run_name="perplexity-{variant}")
def perplexity(spec: EvalSpec, model: ModelRef, data: DatasetRef | None, variant: str,
               stage: StageRun) -> PerplexityResult:
    path, md5 = heldout_file(spec, data)
    texts = heldout_texts(path, spec.perplexity.limit)
    with engine_for(spec, model) as engine:
        result = measure_perplexity(engine.lm, texts, spec.perplexity.split, md5, spec.perplexity.text)
    stage.metrics({"byte_perplexity": result.byte_perplexity, "byte_perplexity_ci_low": result.ci_low,
                   "byte_perplexity_ci_high": result.ci_high, "bits_per_byte": result.bits_per_byte,
                   "rows": result.n}, prefix="perplexity.")
    stage.log.info(f"{variant}: byte perplexity {result.byte_perplexity:.4f} (95% CI {result.ci_low:.4f}…"
                   f"{result.ci_high:.4f}) of the {result.text} on {result.n} {result.split} rows")
    return result
