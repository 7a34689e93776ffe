"""Memory planning: hand-computed estimates, `gauntlet plan` on 7B/70B configs, the launch profiles,
and the training task refusing what cannot fit or cannot train. No weights are downloaded or loaded:
the 7B/70B models are their config.json files only (tests/fixtures/model-configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

# Prefect is imported now (with the stages), not inside a CLI call below: its log handlers bind the stream of
# the moment, and the CLI calls run under capsys, whose stream closes after each test.
import gauntlet.tasks.models  # noqa: F401
from gauntlet.cli import main as cli
from gauntlet.config.train import TrainSpec
from gauntlet.plan.memory import GIB, estimate, profile_named
from gauntlet.plan.shape import ModelShape, check_model_fit, lora_modules, model_shape
from tests.helpers import REPO

FIXTURES = REPO / "tests" / "fixtures" / "model-configs"
PROFILES = ["single_gpu", "multi_gpu", "deepspeed_zero2", "fsdp", "deepspeed_zero3_offload"]
TERMS = ["weights", "LoRA", "grads", "optim", "activ", "logits", "runtime", "slack", "total", "host"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> ModelShape:
    """A Llama with hidden 64, MLP 128, 2 layers, 4 heads / 2 KV heads (head dim 16), vocab 100."""
    folder = tmp_path_factory.mktemp("small-llama")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "max_position_embeddings": 128, "tie_word_embeddings": False}))
    return model_shape(folder, "small")


def test_parameter_counts_match_hand_computed(small: ModelShape) -> None:
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64 = 36864
    assert small.linear_params == 2 * 36864
    # embeddings 100x64, head 64x100, 2 norms per layer + a final one (64 each)
    assert small.other_params == 6400 + 6400 + 2 * 2 * 64 + 64 == 13120
    assert (small.num_layers, small.hidden_size, small.intermediate_size, small.kv_size, small.vocab_size) == \
        (2, 64, 128, 32, 100)


def test_estimate_matches_hand_computed_numbers(small: ModelShape) -> None:
    train = TrainSpec(method="qlora", batch_size=2, max_seq_len=16, gradient_checkpointing=True,
                      lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    est = estimate(small, train, profile_named("single_gpu"), 1, "cuda")
    # LoRA r=4 per layer: q 4(64+64) + k 4(64+32) + v 4(64+32) + o 4(64+64) + gate/up/down 3 x 4(64+128) = 4096
    assert est.trainable_params == 2 * 4096
    expected = {
        "weights": 73728 * 0.515869140625 + 13120 * 4,   # NF4 + double quant; the rest upcast to fp32
        "LoRA adapters": 8192 * 4,                        # fp32 adapters
        "gradients": 8192 * 4,
        "optimizer state": 8192 * 8,                      # AdamW: two fp32 moments
        # checkpointed layer inputs + one layer recomputed; fp32: QLoRA's upcast norms make the residual stream fp32
        "activations": 2 * 32 * 64 * 4 + 32 * 960 * 4,
        "logits": 32 * 100 * 12 + 32 * 64 * 4,            # the loss in chunks (<= 4096 tokens) + final hidden
        "runtime overhead": 1 * GIB,
    }
    expected["allocator slack (10%)"] = 0.1 * sum(expected.values())
    assert est.terms == pytest.approx(expected)
    assert est.total == pytest.approx(1181564192.6)
    assert est.activations_full == 2 * 32 * 960 * 4

    # ZeRO-2 over 4 processes: bf16 adapters, gradients and fp32 master+moments partitioned
    z2 = estimate(small, train, profile_named("deepspeed_zero2"), 4, "cuda")
    assert (z2.terms["weights"], z2.terms["LoRA adapters"], z2.terms["gradients"], z2.terms["optimizer state"]) == \
        pytest.approx((90514.0, 8192 * 2, 8192 * 2 / 4, 8192 * 12 / 4))
    # FSDP over 4: everything sharded; QLoRA storage in bf16, so the non-quantized weights stay bf16
    fsdp = estimate(small, train, profile_named("fsdp"), 4, "cuda")
    assert (fsdp.terms["weights"], fsdp.terms["LoRA adapters"], fsdp.terms["gradients"],
            fsdp.terms["optimizer state"]) == pytest.approx(((38034 + 13120 * 2) / 4, 8192, 8192, 16384))
    assert fsdp.terms["logits"] == 32 * 100 * 12      # sharded: the trainer cannot chunk the loss, all logits at once
    # ZeRO-3 with offload: optimizer state lives in host memory
    z3 = estimate(small, train, profile_named("deepspeed_zero3_offload"), 4, "cuda")
    assert z3.terms["optimizer state"] == 0 and z3.host_offload > 8192 * 12 / 4


def test_plan_proposes_the_largest_micro_batch_that_fits(small: ModelShape) -> None:
    """The proposal is the largest of the batch choices whose estimate fits; the next one does not."""
    from gauntlet.plan.memory import (
        BATCH_CHOICES,
        declared_devices,
        largest_batch,
        verdict,
    )

    train = TrainSpec(method="qlora", batch_size=1, max_seq_len=128, gradient_checkpointing=True,
                      accelerate={"profile": "single_gpu"})
    one = estimate(small, train, profile_named("single_gpu"), 1, "cuda").total
    devices = declared_devices(1, (one + 0.5 * (estimate(small, train.model_copy(update={"batch_size": 64}),
                                                         profile_named("single_gpu"), 1, "cuda").total - one)) / GIB)
    proposed = largest_batch(small, train, devices)
    assert proposed in BATCH_CHOICES and 1 < proposed < 64
    fits = [verdict(estimate(small, train.model_copy(update={"batch_size": b}), profile_named("single_gpu"), 1,
                             "cuda"), devices)[0] for b in BATCH_CHOICES]
    assert fits == [b <= proposed for b in BATCH_CHOICES]
    assert largest_batch(small, train, declared_devices(1, one / GIB / 2)) is None      # not even 1 fits


def test_lora_targets_and_sequence_limit_are_checked(small: ModelShape) -> None:
    chosen, missing = lora_modules(small, ["q_proj", "v_proj", "qkv_proj"])
    assert missing == ["qkv_proj"] and {m.name.rsplit(".", 1)[-1] for m in chosen} == {"q_proj", "v_proj"}
    problems = check_model_fit(small, TrainSpec(max_seq_len=512, lora={"target_modules": ["q_proj", "qkv_proj"]}))
    assert len(problems) == 2
    assert "train.lora.target_modules" in problems[0] and "qkv_proj" in problems[0] and "'down_proj'" in problems[0]
    assert "train.max_seq_len" in problems[1] and "128" in problems[1]


@pytest.mark.parametrize("size", ["7b", "70b"])
def test_plan_prints_every_term_under_every_profile(size: str, capsys) -> None:
    config = str(REPO / "configs" / f"llama-{size}-qlora.yaml")
    source = f"model.source={FIXTURES / f'llama-2-{size}'}"
    code = cli(["plan", config, "--set", source, "--gpus", "8", "--gpu-memory", "80"])
    text = capsys.readouterr().out
    assert code == 0, text
    header = next(line for line in text.splitlines() if line.startswith("GiB per GPU"))
    assert header.split()[3:] == ["procs", *TERMS, "fits"]
    for profile in PROFILES:
        row = next(line for line in text.splitlines() if line.startswith(profile + " "))
        assert len(row.split()) == 1 + 1 + len(TERMS) + 1, row
    assert "with gradient checkpointing" in text and "recommended:" in text

    assert cli(["plan", config, "--set", source, "--gpus", "8", "--gpu-memory", "80", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    single = plan["profiles"]["single_gpu"]["terms_gib"]
    if size == "7b":   # 32 layers x (4 x 4096^2 + 3 x 4096 x 11008) linear weights; 262,410,240 others
        assert plan["model"]["total_params"] == 6_738_415_616
        assert single["weights"] * GIB == pytest.approx(6_476_005_376 * 0.515869140625 + 262_410_240 * 4)
    else:              # GQA: 8 KV heads of 128
        assert plan["model"]["total_params"] == 68_976_648_192
        # sharding: 8 processes each hold an eighth of the weights
        fsdp = plan["profiles"]["fsdp"]["terms_gib"]["weights"]
        assert fsdp == pytest.approx((68_451_041_280 * 0.515869140625 + 525_606_912 * 2) / 8 / GIB)
    assert plan["configured"]["fits"]


def test_plan_exit_code_says_whether_the_configured_profile_fits(capsys) -> None:
    config = str(REPO / "configs" / "llama-70b-qlora.yaml")
    args = ["plan", config, "--set", f"model.source={FIXTURES / 'llama-2-70b'}", "--set",
            "train.accelerate.profile=single_gpu", "--set", "train.accelerate.num_processes=1"]
    assert cli([*args, "--gpus", "1", "--gpu-memory", "24"]) == 1
    text = capsys.readouterr().out
    assert "single_gpu: needs" in text and "has 24.0 GiB" in text
    assert cli([*args, "--gpus", "1", "--gpu-memory", "80"]) == 0


def test_hf_source_reads_only_its_config_json(module_home: Path, capsys) -> None:
    """hf:// plans go through huggingface_hub's hf_hub_download for config.json alone (here served from
    its cache at a pinned commit, as no hub is reachable)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = module_home / "models" / "hf" / "models--acme--llama-7b"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / revision / "config.json").write_text(
        (FIXTURES / "llama-2-7b" / "config.json").read_text())
    config = str(REPO / "configs" / "llama-7b-qlora.yaml")
    assert cli(["plan", config, "--set", f"model.source=hf://acme/llama-7b@{revision}", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["total_params"] == 6_738_415_616
    assert [p.name for p in (repo / "snapshots" / revision).iterdir()] == ["config.json"]


def test_registry_source_reads_only_its_config_json(module_home: Path, tmp_path: Path, capsys) -> None:
    """models:/NAME@alias plans download the registered version's config.json alone, not its weights."""
    import shutil

    from mlflow.tracking import MlflowClient

    from gauntlet.tracking import tracking_uri
    from tests.helpers import register_as_champion

    folder = tmp_path / "registered-7b"
    shutil.copytree(FIXTURES / "llama-2-7b", folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)  # stands for the weights: must stay remote
    version = register_as_champion(MlflowClient(tracking_uri()), "plan-tests", folder, "plan-7b", {"test": "plan"})
    config = str(REPO / "configs" / "llama-7b-qlora.yaml")
    assert cli(["plan", config, "--set", "model.source=models:/plan-7b@champion", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["total_params"] == 6_738_415_616
    downloaded = module_home / "models" / "configs" / "registry" / "plan-7b" / version
    assert [p.name for p in downloaded.iterdir()] == ["config.json"]
    assert not (module_home / "models" / "registry" / "plan-7b").exists()
    # an alias nobody set: invalid input (exit 2), named with the registry and the fix
    assert cli(["plan", config, "--set", "model.source=models:/plan-7b@nope"]) == 2
    assert "has no alias @nope" in capsys.readouterr().err


def test_accelerate_profiles_load_with_accelerates_own_loaders() -> None:
    """The YAMLs parse with accelerate's config loader and launch-argument validation, and produce
    the plugin settings they are meant to (the GPU-only profiles cannot run here)."""
    import os
    from unittest import mock

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.constants import (
        FSDP_AUTO_WRAP_POLICY,
        FSDP_SHARDING_STRATEGY,
        FSDP_STATE_DICT_TYPE,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    folder = REPO / "deployments" / "accelerate"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(PROFILES)
    seen = {}
    for path in sorted(folder.glob("*.yaml")):
        config = load_config_from_file(str(path))
        args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "x.py"])
        args, defaults, mp_from_config = _validate_launch_command(args)
        seen[path.stem] = (config.distributed_type.value, args.mixed_precision)
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(
                [*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])])
            _, env = prepare_deepspeed_cmd_env(args)
            with mock.patch.dict(os.environ, env):   # what the launched processes see
                plugin = DeepSpeedPlugin()
            zero = plugin.deepspeed_config["zero_optimization"]
            if path.stem == "deepspeed_zero2":
                assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "none"
            else:
                assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
                assert zero["offload_param"]["device"] == "cpu" and zero["stage3_gather_16bit_weights_on_model_save"]
            assert plugin.gradient_accumulation_steps == "auto"   # the trainer's value fills it
        elif args.use_fsdp:
            env = prepare_multi_gpu_env(args)
            assert env["FSDP_SHARDING_STRATEGY"] in FSDP_SHARDING_STRATEGY and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
            assert env["FSDP_AUTO_WRAP_POLICY"] in FSDP_AUTO_WRAP_POLICY
            assert env["FSDP_STATE_DICT_TYPE"] in FSDP_STATE_DICT_TYPE
            assert env["FSDP_USE_ORIG_PARAMS"] == "true"   # frozen and trainable weights in one wrapped layer
        assert profile_named(path.stem).name == path.stem
        assert yaml.safe_load(path.read_text())["distributed_type"] == config.distributed_type.value
    assert seen == {"single_gpu": ("NO", "bf16"), "multi_gpu": ("MULTI_GPU", "bf16"),
                    "deepspeed_zero2": ("DEEPSPEED", "bf16"), "deepspeed_zero3_offload": ("DEEPSPEED", "bf16"),
                    "fsdp": ("FSDP", "bf16")}


def test_launch_command_for_deepspeed_on_the_cpu(tmp_path: Path) -> None:
    from gauntlet.config.train import AccelerateSpec
    from gauntlet.training import launch_command

    cmd = launch_command(AccelerateSpec(profile="deepspeed_zero2", num_processes=2), tmp_path / "a.json", use_cpu=True)
    assert "--cpu" not in cmd                      # --cpu would turn DeepSpeed off
    assert cmd[cmd.index("--mixed_precision") + 1] == "no"
    assert cmd[cmd.index("--main_process_port") + 1] == "0"
    assert cmd[cmd.index("--config_file") + 1].endswith("deployments/accelerate/deepspeed_zero2.yaml")
    gpu = launch_command(AccelerateSpec(profile="fsdp", num_processes=8), tmp_path / "a.json", use_cpu=False)
    assert "--cpu" not in gpu and "--mixed_precision" not in gpu   # the profile's bf16 stands
