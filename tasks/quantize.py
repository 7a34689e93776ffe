"""Stage ``quantize``: one GPTQ, AWQ or bitsandbytes variant of a model, reloaded and smoke-tested.

Key: the model's content hash and the variant (method, bits, group size, name); for the calibrated
methods (GPTQ, AWQ) also the calibration settings, the training file's DVC md5 (the calibration rows) and
the quantize environment's pinned requirements. The code version covers the quantizer program (imported).
Not retried when the input is wrong or the quantizer itself failed.
"""

from __future__ import annotations

from pathlib import Path

from gauntlet.config.quantize import CalibrationSpec, QuantizeVariant
from gauntlet.envs import QUANTIZE_ENV
from gauntlet.hashing import sha256_files
from gauntlet.quantization import QuantizeError, QuantizeInputError, quantize_model, train_file_md5
from gauntlet.refs import DatasetRef, ModelRef, QuantizedModel
from gauntlet.tasks._stage import StageRun, stage


def _key(variant: QuantizeVariant, calibration: CalibrationSpec, model: ModelRef, data: DatasetRef | None) -> list:
    calibrated = None
    if variant.calibrated:  # calibration-free variants depend neither on the data nor on the quantize environment
        calibrated = [calibration, train_file_md5(data), sha256_files([QUANTIZE_ENV.requirements])]
    return [model.sha, variant, calibrated]


def _params(variant: QuantizeVariant, calibration: CalibrationSpec, model: ModelRef,
            data: DatasetRef | None) -> dict:
    logged = {"variant": variant.name, "method": variant.method, "bits": variant.bits,
              "group_size": variant.group_size, "source_model.sha": model.sha}
    if variant.calibrated:
        logged.update({f"calibration.{k}": v for k, v in calibration.model_dump().items()})
        logged["calibration.source_md5"] = train_file_md5(data)
    return logged


@stage("quantize", key=_key, outputs=lambda q, st: [q.path, st.out / "result.json"], params=_params,
       run_name="quantize-{variant.name}", retries=1, permanent=(QuantizeInputError, QuantizeError))
def quantize(variant: QuantizeVariant, calibration: CalibrationSpec, model: ModelRef, data: DatasetRef | None,
             stage: StageRun) -> QuantizedModel:
    out = stage.out
    ref = quantize_model(variant, calibration, model, data, out, echo=stage.log.info)
    stage.client.log_param(stage.run_id, "calibration.md5", str(ref.calibration_md5))
    stage.metrics({"size_on_disk_mb": ref.size_bytes / 1e6, "base_size_on_disk_mb": ref.base_size_bytes / 1e6,
                   "size_ratio": ref.size_ratio, "duration_s": ref.duration_s})
    stage.artifacts(*(out / name for name in ("result.json", "quantization_config.json", "quantize_args.json",
                                              "quantizer.log")), Path(ref.path) / "recipe.yaml")
    stage.tag("gauntlet.variant_path", ref.path)
    stage.log.info(f"{variant.name}: {ref.size_bytes / 1e6:.2f} MB ({ref.size_ratio:.2f}x of "
                   f"{ref.base_size_bytes / 1e6:.2f} MB) in {ref.duration_s:.1f}s at {ref.path}")
    return ref
