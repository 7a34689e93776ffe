"""A registered version as an MLflow Model: the transformers flavor around the model's own files.

The version's artifact keeps the Hugging Face folder as it is at its root (``from_pretrained`` on the
download works, and the model card is ``README.md``), and adds what MLflow needs to treat it as a model:
``MLmodel`` (the transformers flavor, task ``llm/v1/chat``, the chat signature), ``requirements.txt`` /
``python_env.yaml`` (pip requirements) and the tokenizer under ``components/``. MLflow writes all of that
itself (:func:`mlflow.transformers.save_model`); the flavor's ``model_binary`` then points at the root,
so the weights are stored once. ``mlflow.transformers.load_model("models:/NAME@champion")``,
``mlflow models serve`` and the registry UI's schema read it; ``transformers serve`` and vLLM serve the
root folder, answering ``/v1/chat/completions`` through the chat template.

A model without a chat template of its own gets Gauntlet's: the alpaca prompt it was trained and evaluated
with (:data:`gauntlet.prompting.PROMPT`), so a served chat turn is the prompt the gate scored.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from gauntlet.prompting import PROMPT

CHAT_TASK = "llm/v1/chat"
ROOT_BINARY = "."                 # the flavor's model_binary: the weights are the root folder's own files
# MLflow's side files; the root's README.md is the model card, so MLflow's own card file is not kept
KEPT = ("MLmodel", "requirements.txt", "python_env.yaml", "conda.yaml", "components")
PIP_REQUIREMENTS_EXTRA = ["accelerate", "safetensors"]


def chat_template() -> str:
    """The training prompt as a Jinja chat template: each user turn an instruction, each assistant turn its
    response; a trailing user turn ends with the response header (the generation prompt)."""
    user = PROMPT.replace("{instruction}", "{{ message['content'] }}")
    return ("{% for message in messages %}{% if message['role'] == 'user' %}" + user
            + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n\n"
            + "{% endif %}{% endfor %}")


def write_mlflow_model(model_dir: Path, out: Path) -> Path:
    """The MLflow side of ``model_dir`` (MLmodel, requirements, tokenizer component, chat template) written
    into ``out``; log ``model_dir`` and ``out`` to the same artifact path."""
    import mlflow.transformers
    import transformers
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template()
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    # MLflow's builder needs the model object; it is loaded once, on the CPU, in its own dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
        saved = Path(tmp) / "m"
        mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, str(saved), task=CHAT_TASK,
                                       pip_requirements=[f"transformers=={transformers.__version__}",
                                                         f"mlflow=={mlflow.__version__}", "torch",
                                                         *PIP_REQUIREMENTS_EXTRA])
        mlmodel = Model.load(str(saved / "MLmodel"))
        mlmodel.flavors["transformers"]["model_binary"] = ROOT_BINARY
        mlmodel.flavors["transformers"]["source_model_name"] = model_dir.name
        mlmodel.save(str(saved / "MLmodel"))
        for name in KEPT:
            if (saved / name).exists():
                shutil.move(str(saved / name), str(out / name))
    return out


def is_transformers_checkpoint(model_dir: Path) -> bool:
    """A folder transformers can load as a model with its tokenizer (config.json naming an architecture)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("architectures")) and any((Path(model_dir) / f).is_file() for f in (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def log_model_version(c, run_id: str, model_dir: Path, card: str, artifact_path: str = "model") -> str:
    """Upload ``model_dir`` as run ``run_id``'s MLflow Model at ``artifact_path`` with ``card`` as its README;
    returns the artifact URI to register. A folder that is no transformers checkpoint (the registry
    protocol's test folders) is uploaded as files only, with a warning."""
    import logging

    c.log_artifacts(run_id, str(model_dir), artifact_path)
    with tempfile.TemporaryDirectory(prefix="mlflow-meta-") as tmp:
        meta = Path(tmp)
        if is_transformers_checkpoint(model_dir):
            write_mlflow_model(Path(model_dir), meta)
        else:
            logging.getLogger(__name__).warning(f"{model_dir} is not a transformers checkpoint (config.json with "
                                                "architectures, a tokenizer): registered as files, no MLmodel")
        (meta / "README.md").write_text(card)
        c.log_artifacts(run_id, str(meta), artifact_path)
    return f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
