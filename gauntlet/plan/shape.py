"""A model's shape from its ``config.json`` alone: parameter counts, layer sizes, the modules LoRA targets.

Only ``config.json`` is read (for ``hf://`` sources that one file is downloaded, never the weights). The
architecture is instantiated on PyTorch's ``meta`` device, which allocates nothing, to count parameters
exactly and to find the modules LoRA would target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gauntlet.config.model import ModelSpec
from gauntlet.config.train import TrainSpec
from gauntlet.project import in_project
from gauntlet.state import models_cache


class PlanError(ValueError):
    """A training config that cannot work with this model or on these devices; the message says why."""


# ---------------------------------------------------------------------------------------------
# the model, from its config.json alone
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str
    kind: Literal["linear", "embedding"]
    n_in: int
    n_out: int


@dataclass(frozen=True)
class ModelShape:
    source: str
    architecture: str
    total_params: int
    linear_params: int          # weights of the linear layers bitsandbytes quantizes (all but the output head)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    kv_size: int                # key/value width: kv heads x head dim
    vocab_size: int
    max_positions: int | None
    modules: tuple[Module, ...] = field(repr=False)   # linear layers (not the output head) and embeddings
    module_names: frozenset[str] = field(repr=False, default=frozenset())

    @property
    def other_params(self) -> int:
        return self.total_params - self.linear_params


def fetch_model_config(spec: ModelSpec) -> Path:
    """The folder holding the model's config.json; downloads that one file for remote sources."""
    from gauntlet.config.model import REGISTRY_SCHEME
    from gauntlet.models import ModelFetchError, demo_model_folder, registry_config, split_source
    from gauntlet.tracking import tracking_uri

    if spec.source.startswith(REGISTRY_SCHEME):
        try:
            return registry_config(spec.source, tracking_uri())
        except ModelFetchError as e:
            raise PlanError(f"model.source {e}") from None
    scheme, name, revision = split_source(spec.source, spec.revision)
    if scheme == "demo":   # local: building (or converting) it is the cheapest way to its config
        try:
            return demo_model_folder(name)
        except ModelFetchError as e:
            raise PlanError(f"model.source {e}") from None
    if scheme == "hf":
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id=name, filename="config.json", revision=revision,
                                        cache_dir=str(models_cache() / "hf"))).parent
        except Exception as e:  # network, auth, missing repo or revision
            raise PlanError(f"model.source {spec.source}: could not download its config.json ({type(e).__name__}: "
                            f"{e}). Check the repo id and revision, network access and HF_TOKEN.") from e
    if scheme == "modelscope":
        try:
            from modelscope.hub.file_download import model_file_download
        except ImportError as e:
            raise PlanError("modelscope:// sources need `pip install modelscope`") from e
        return Path(model_file_download(name, "config.json", revision=revision or "master",
                                        cache_dir=str(models_cache() / "ms"))).parent
    if scheme in ("s3", "gs"):
        import fsspec

        target = models_cache() / "configs" / spec.source.replace("://", "/").rstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        with fsspec.open(spec.source.rstrip("/") + "/config.json", "rb") as f:
            (target / "config.json").write_bytes(f.read())
        return target
    path = Path(name if scheme == "local" else spec.source.removeprefix("file://"))
    path = in_project(path)
    if not (path / "config.json").exists():
        raise PlanError(f"model.source {spec.source}: no config.json in {path}")
    return path


def model_shape(config_dir: Path, source: str = "", trust_remote_code: bool = False) -> ModelShape:
    """Count parameters by building the architecture on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    modules, linear_params = [], 0
    for name, m in model.named_modules():
        if m is head:
            continue
        if isinstance(m, torch.nn.Linear):
            modules.append(Module(name, "linear", m.in_features, m.out_features))
            linear_params += m.in_features * m.out_features
        elif type(m).__name__ == "Conv1D":   # GPT-2 style linear layers
            n_in, n_out = m.weight.shape
            modules.append(Module(name, "linear", n_in, n_out))
            linear_params += n_in * n_out
        elif isinstance(m, torch.nn.Embedding):
            modules.append(Module(name, "embedding", m.num_embeddings, m.embedding_dim))
    text = config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    max_positions = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length",
                                                      "seq_length") if getattr(text, k, None)), None)
    return ModelShape(
        source=source, architecture=type(model).__name__,
        total_params=sum(p.numel() for p in model.parameters()), linear_params=linear_params,
        num_layers=text.num_hidden_layers, hidden_size=hidden,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * hidden,
        kv_size=kv_heads * head_dim, vocab_size=text.vocab_size, max_positions=max_positions,
        modules=tuple(modules), module_names=frozenset(n for n, _ in model.named_modules() if n),
    )


def lora_modules(shape: ModelShape, target_modules: list[str] | str) -> tuple[list[Module], list[str]]:
    """The modules LoRA adapts (PEFT's matching: the full name or its last dotted parts) and the
    targets that match nothing."""
    if target_modules == "all-linear":
        return [m for m in shape.modules if m.kind == "linear"], []
    chosen, missing = [], []
    for target in target_modules:
        hits = [m for m in shape.modules if m.name == target or m.name.endswith("." + target)]
        if not hits and not any(n == target or n.endswith("." + target) for n in shape.module_names):
            missing.append(target)
        chosen += [m for m in hits if m not in chosen]
    return chosen, missing


def lora_param_count(shape: ModelShape, train: TrainSpec) -> int:
    modules, _ = lora_modules(shape, train.lora.target_modules)
    return sum(train.lora.r * (m.n_in + m.n_out) for m in modules)


def check_model_fit(shape: ModelShape, train: TrainSpec) -> list[str]:
    """Config problems that the model's shape reveals: LoRA targets it lacks, sequences too long."""
    problems = []
    if train.method != "full":
        _, missing = lora_modules(shape, train.lora.target_modules)
        if missing:
            linear = sorted({m.name.rsplit(".", 1)[-1] for m in shape.modules if m.kind == "linear"})
            problems.append(f"train.lora.target_modules: {missing} match no module of {shape.architecture} "
                            f"({shape.source}); its linear layers are {linear} (or use 'all-linear')")
    if shape.max_positions and train.max_seq_len > shape.max_positions:
        problems.append(f"train.max_seq_len: {train.max_seq_len} is over the model's limit of {shape.max_positions} "
                        f"positions (max_position_embeddings of {shape.source}); set it to at most "
                        f"{shape.max_positions}")
    return problems
