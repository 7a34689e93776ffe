"""Size-matched placement: the GPU class a job needs from the planner's estimate, and `gauntlet run --pool` refusing,
before anything queues, a training that fits no class of the pool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gauntlet.config.train import TrainSpec
from gauntlet.plan.placement import PlacementError, class_for_inference, class_for_training, classes_of_worker
from gauntlet.plan.shape import model_shape
from tests.helpers import REPO, project_workdir

# Llama-3.1-shaped configs: 8B and 405B (no weights: the planner reads config.json only)
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
         "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu"}
SIZES = {"8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8},
         "405b": {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                  "num_attention_heads": 128, "num_key_value_heads": 8}}


def config_dir(root: Path, size: str) -> Path:
    folder = root / f"llama-{size}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA, **SIZES[size]}))
    return folder


def test_the_smallest_class_that_holds_the_job(tmp_path) -> None:
    eight = model_shape(config_dir(tmp_path, "8b"))
    assert class_for_training(eight, TrainSpec(method="qlora", batch_size=1, max_seq_len=512)).name == "gpu-24g"
    assert class_for_training(eight, TrainSpec(method="full", batch_size=1, max_seq_len=512)).name != "gpu-24g"
    huge = model_shape(config_dir(tmp_path, "405b"))
    with pytest.raises(PlacementError, match="no GPU class of the pool holds this training"):
        class_for_training(huge, TrainSpec(method="full", batch_size=8, max_seq_len=4096))
    assert class_for_inference(0.135).name == "gpu-24g" and class_for_inference(30).name == "gpu-80g"
    assert class_for_inference(200).name == "gpu-8x80g"
    with pytest.raises(PlacementError, match="more than the largest class"):
        class_for_inference(2000)
    assert [c.name for c in classes_of_worker(1, 80)] == ["gpu-24g", "gpu-80g"]
    assert [c.name for c in classes_of_worker(8, 80)] == ["gpu-24g", "gpu-80g", "gpu-8x80g"]


def test_run_on_the_pool_refuses_a_training_no_class_holds_before_it_queues() -> None:
    """The Prefect address names nothing that answers: a refusal must come before any call to it."""
    work = project_workdir("placement")
    try:
        model = config_dir(work, "405b")
        config = work / "huge.yaml"
        config.write_text((REPO / "configs" / "demo.yaml").read_text())
        env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
        done = subprocess.run([sys.executable, "-m", "gauntlet", "run", str(config), "--pool",
                               "--set", f"model.source={model}", "--set", "train.method=full",
                               "--set", "train.batch_size=8", "--set", "train.max_seq_len=4096"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "run --pool: not queued: no GPU class of the pool holds this training" in done.stderr, done.stderr
        assert "Fix: use train.method qlora" in done.stderr
    finally:
        shutil.rmtree(work)


def test_a_serving_worker_refuses_a_queue_it_would_ignore(capsys) -> None:
    """`gauntlet worker --serving` listens on the serving pool's one queue: a --queue beside it is refused (exit 2)
    before anything is checked or started, not ignored."""
    from gauntlet.cli import main as gauntlet

    assert gauntlet(["worker", "--serving", "--queue", "gpu-24g"]) == 2
    assert "--queue does not apply with --serving" in capsys.readouterr().err
