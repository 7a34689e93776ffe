"""The training program's parts (gauntlet/programs/trainer.py holds the recipe that uses them): its arguments
file, validated; the loss a chunk of tokens at a time; the norm of the gradients the optimizer steps with;
resumable checkpoints; the step log and the metrics sent to MLflow while training; the loss curve and the model
card. No Prefect here, and nothing of Gauntlet but its data helpers and the ``train:`` section's model.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from pydantic import Field, ValidationError
from torch.utils.checkpoint import checkpoint

from gauntlet.config.base import Strict
from gauntlet.config.train import TrainSpec
from gauntlet.data.sft import IGNORE_INDEX
from gauntlet.files import write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------
# the arguments file: written by gauntlet/training.py, validated here before anything loads
# ---------------------------------------------------------------------------------------------


class MlflowTarget(Strict):
    """The MLflow run the trainer logs its metrics into while it trains."""

    tracking_uri: str   # without credentials: they come from the environment
    run_id: str


class CardFacts(Strict):
    """Where the model came from, for its model card."""

    name: str
    base_model: str
    base_revision: str | None = None
    base_sha: str
    data_md5: str
    train_file: str
    validation_file: str


class TrainerArgs(Strict):
    """ARGS.json: what the training program is asked to do. The ``train`` section is the run config's own
    :class:`TrainSpec`, validated again here, so a hand-written or damaged file fails naming the field."""

    base_model: str = Field(..., description="folder of the base model (save_pretrained layout)")
    train_path: str
    validation_path: str
    output_dir: str
    cpu: bool = Field(False, description="accelerate's cpu switch (False under DeepSpeed, which it would turn off)")
    train: TrainSpec
    mlflow: MlflowTarget | None = None
    loss_chunk_tokens: int | None = Field(None, gt=0, description="the loss this many tokens at a time; "
                                                                  "None: from the full logits")
    card: CardFacts | None = None
    reference_model: str | None = Field(None, description="folder of the preference objective's reference model "
                                                          "when it is not the base (train.preference.reference)")


def read_args(path: Path) -> TrainerArgs:
    """The arguments file, validated; a bad one stops the program with pydantic's message naming each field."""
    try:
        return TrainerArgs.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except ValidationError as e:
        raise SystemExit(f"[trainer] invalid arguments file {path}: {e}") from None


def shards_weights(accelerator: Accelerator) -> bool:
    """FSDP and ZeRO-3 split every weight across processes."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


# ---------------------------------------------------------------------------------------------
# the loss, a chunk of tokens at a time: the full logits (tokens x vocabulary, in bf16 and fp32, and
# their gradients) are the largest tensors of a training step with a 128k vocabulary
# ---------------------------------------------------------------------------------------------


class HiddenStates(torch.nn.Module):
    """Stands in for the output head during training: keeps the head (its weight stays trained, saved in
    checkpoints and restored) and returns the final hidden states."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class ChunkedLoss:
    """Causal-LM loss without the full logits. The model's output head is swapped for an identity, so its
    forward returns the final hidden states; the head and the cross-entropy then run over the labelled tokens
    ``chunk`` at a time, each chunk recomputed in the backward pass. Same value as the model's own loss (mean
    over labelled tokens), a few GiB instead of ~12 bytes x tokens x vocabulary. Not for ZeRO-3/FSDP, which
    shard the head's weight outside the forward: there the model's own loss is used."""

    def __init__(self, model, chunk: int | None, accelerator: Accelerator):
        self.accelerator, self.chunk = accelerator, chunk
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        self.base, self.head = base, head
        usable = chunk and head is not None and getattr(head, "bias", None) is None and not shards_weights(accelerator)
        self.weight = head.weight if usable else None
        if self.weight is not None:
            base.set_output_embeddings(HiddenStates(head))

    @property
    def chunked(self) -> bool:
        return self.weight is not None

    def restore(self) -> None:
        """Put the output head back (before the model is saved)."""
        if self.weight is not None:
            self.base.set_output_embeddings(self.head)

    def _nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            logits = F.linear(hidden, self.weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def __call__(self, model, batch: dict) -> torch.Tensor:
        if self.weight is None:
            return model(**batch, use_cache=False).loss
        assert self.chunk is not None   # the head is kept (self.weight) only with a chunk size
        labels = batch["labels"]
        hidden = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])   # position t predicts token t + 1
        targets = labels[:, 1:].reshape(-1)
        keep = targets != IGNORE_INDEX                          # prompts and padding cost no head compute
        hidden, targets = hidden[keep], targets[keep]
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, targets.numel(), self.chunk):
            total = total + checkpoint(self._nll, hidden[i:i + self.chunk], targets[i:i + self.chunk],
                                       use_reentrant=False)
        return total / max(targets.numel(), 1)


# ---------------------------------------------------------------------------------------------
# gradient clipping, and the norm the optimizer's step really sees
# ---------------------------------------------------------------------------------------------


def clip_gradients(accelerator: Accelerator, model, max_norm: float | None) -> float | None:
    """Clip the gradients' total norm to ``max_norm`` (``train.max_grad_norm``; None: leave them) and return
    their norm before clipping. Under DeepSpeed the engine clips inside its step, at the value
    ``trainer.make_accelerator`` gave it; this returns the norm it measured."""
    norm = accelerator.clip_grad_norm_(model.parameters(), math.inf if max_norm is None else max_norm)
    return None if norm is None else float(norm)


class AppliedGradNorm:
    """The total norm of the gradients the optimizer steps with, measured in a hook that runs at the start of
    the optimizer's own ``step``: what clipping really left. Measured where each process holds whole gradients
    (one process, DDP); None under DeepSpeed and FSDP, whose optimizers step on shards."""

    def __init__(self, optimizer: torch.optim.Optimizer, accelerator: Accelerator):
        self.value: float | None = None
        whole = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if whole:
            optimizer.register_step_pre_hook(self._measure)

    def _measure(self, optimizer, _args, _kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.value = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


# ---------------------------------------------------------------------------------------------
# checkpoints: durable, resumable, written atomically (a directory is complete once renamed)
# ---------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists()
                  and not p.name.endswith(".partial"))
    return done[-1] if done else None


class Checkpointer:
    def __init__(self, accelerator: Accelerator, model, output_dir: Path, keep: int, adapters_only: bool):
        self.accelerator = accelerator
        self.root = output_dir / CHECKPOINTS
        self.keep = keep
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        # only what training changes goes into a checkpoint: the frozen base is reloaded from the model
        self.save_kwargs = {"exclude_frozen_parameters": True} if deepspeed and adapters_only else {}
        self.load_kwargs = {"load_module_strict": False} if deepspeed else {"strict": not adapters_only}
        if adapters_only and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}

            def keep_trainable(_models, weights, _output_dir):
                for i, state in enumerate(weights):
                    weights[i] = {k: v for k, v in state.items() if k in trainable}

            accelerator.register_save_state_pre_hook(keep_trainable)

    def save(self, state: dict) -> Path:
        acc = self.accelerator
        final = self.root / f"step-{state['step']:08d}"
        partial = final.with_name(final.name + ".partial")
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial), **self.save_kwargs)
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json(partial / STATE_FILE, state, indent=None)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            for old in sorted(p for p in self.root.glob("step-*") if not p.name.endswith(".partial"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        self.accelerator.load_state(str(path), **self.load_kwargs)
        return json.loads((path / STATE_FILE).read_text())


# ---------------------------------------------------------------------------------------------
# metrics: MLflow while training (main process only), a step log, progress lines on stdout
# ---------------------------------------------------------------------------------------------


class MetricsSink:
    def __init__(self, target: MlflowTarget | None, enabled: bool):
        self.client = None
        self.run_id = None
        if enabled and target:
            from mlflow.tracking import MlflowClient

            from gauntlet.secrets import with_credentials

            # the arguments file (an MLflow artifact) names the store without credentials: they come from the environment
            self.client = MlflowClient(tracking_uri=with_credentials(target.tracking_uri))
            self.run_id = target.run_id
        self.history: list[dict] = []

    def log(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, **metrics})
        if self.client:
            ts = int(time.time() * 1000)
            from mlflow.entities import Metric

            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


class StepLog:
    """``steps.jsonl``: every optimizer step, appended and flushed as it happens (main process)."""

    def __init__(self, path: Path, enabled: bool, resumed_from: int):
        self.file = open(path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 (open for the whole run)
        self.resumed_from = resumed_from

    def write(self, step: int, loss: float, lr: float, grad_norm: float | None,
              applied_grad_norm: float | None) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                        "applied_grad_norm": applied_grad_norm, "pid": os.getpid(),
                                        "resumed_from": self.resumed_from, "time": time.time()}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


@torch.no_grad()
def validation_loss(model, loader, accelerator: Accelerator, loss_of: ChunkedLoss) -> float:
    model.eval()
    losses = []
    for batch in loader:
        batch.pop("n_tokens")
        losses.append(accelerator.gather(loss_of(model, batch).detach().reshape(1)).mean().item())
    model.train()
    return float(sum(losses) / max(len(losses), 1))


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "train_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["train_loss"] for h in history if "train_loss" in h], label="train loss")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_card(args: TrainerArgs, result: dict, kind: str) -> str:
    """README.md saved with the adapter and the merged model: what it is and where it came from."""
    import yaml

    spec = args.train
    card = args.card or CardFacts(name=Path(args.output_dir).name, base_model=args.base_model, base_sha="unknown",
                                  data_md5="unknown", train_file=args.train_path,
                                  validation_file=args.validation_path)
    metrics = result["metrics"]
    base = card.base_model
    lines = [
        "---",
        yaml.safe_dump({"base_model": base, "library_name": "peft" if kind == "adapter" else "transformers",
                        "tags": ["gauntlet", spec.method, spec.objective]}, sort_keys=False).strip(),
        "---",
        "",
        f"# {card.name} ({'LoRA adapter' if kind == 'adapter' else 'merged model'})",
        "",
        f"Fine-tuned by Gauntlet with **{spec.method}**, objective **{spec.objective}**, on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        "## Base model",
        "",
        f"- source: `{base}`",
        f"- revision: `{card.base_revision or 'unpinned'}`",
        f"- content sha256: `{card.base_sha}`",
        "",
        "## Data",
        "",
        f"- data version (DVC md5): `{card.data_md5}`",
        f"- train: `{card.train_file}`, validation: `{card.validation_file}`",
        (f"- format: {result['data_format']}; TRL's {spec.objective} loss, reference: "
         f"{spec.preference_settings().reference}" if spec.is_preference else
         f"- format: {result['data_format']}; loss on responses only" + ("; packed sequences" if spec.packing else "")),
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))],
        f"| steps | {result['steps']} |",
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).strip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
    ]
    if kind == "adapter":
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained(PATH_TO_THIS_FOLDER)"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH_TO_THIS_FOLDER)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH_TO_THIS_FOLDER)"]
    return "\n".join(lines + ["```", ""])
