"""Memory planning: hand-computed estimates, `gauntlet plan` on 7B/70B configs, the launch profiles,
and the training task refusing what cannot fit or cannot train. No weights are downloaded or loaded:
the 7B/70B models are their config.json files only (tests/fixtures/model-configs)."""

from __future__ import annotations

import json
import shutil
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
from tests.helpers import REPO, project_workdir

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


# Preference objectives, as TRL 1.16's trainers run them (the small Llama: hidden 64, MLP 128, KV 32, 2 layers,
# vocab 100; one layer keeps 6h + 2kv + 4i = 960 values per token; 86,848 parameters).
PER_TOKEN = 960
PAIRED_TOKENS = 2 * 2 * 16   # batch 2 x 16 tokens, chosen and rejected


def preference_train(objective: str, method: str = "qlora", checkpointing: bool = True, **preference) -> TrainSpec:
    return TrainSpec(objective=objective, method=method, batch_size=2, max_seq_len=16,
                     gradient_checkpointing=checkpointing, preference=preference or None,
                     lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})


def test_dpo_holds_chosen_and_rejected_and_runs_its_reference_through_the_adapterless_base(small: ModelShape) -> None:
    """DPO's one concatenated pass holds 2 x batch_size sequences; its reference under QLoRA is the base with the
    adapter disabled (no weights added); TRL scores the log-probs through its fused LM head, tile by tile."""
    single = profile_named("single_gpu")
    for checkpointing in (True, False):
        sft = estimate(small, preference_train("sft", checkpointing=checkpointing), single, 1, "cuda")
        dpo = estimate(small, preference_train("dpo", checkpointing=checkpointing), single, 1, "cuda")
        assert dpo.activations_checkpointed == 2 * sft.activations_checkpointed == 2 * 64 * 64 * 4 + 64 * 960 * 4
        # without checkpointing the reference's no_grad pass adds one layer's values on top of the kept ones
        assert dpo.activations_full == 2 * sft.activations_full + PAIRED_TOKENS * PER_TOKEN * 4
        assert dpo.terms["activations"] == pytest.approx(
            2 * sft.terms["activations"] + (0 if checkpointing else PAIRED_TOKENS * PER_TOKEN * 4))
        assert "reference model" not in dpo.terms and dpo.terms["weights"] == sft.terms["weights"]
        # TRL's tile buffer, [min(tokens, 4096) x 32768] at bf16 whatever the vocabulary; the bf16 copy of QLoRA's
        # fp32 head, a slice at a time; the final hidden states (fp32 under QLoRA), the kernel's copy, and (the
        # larger) the reference's two or their fp32 gradient
        assert dpo.terms["logits"] == 64 * 32768 * 2 + 100 * 64 * 2 + 64 * 64 * (4 + 4 + 8)
    ipo = estimate(small, preference_train("ipo"), single, 1, "cuda")
    assert ipo.terms == estimate(small, preference_train("dpo"), single, 1, "cuda").terms
    # the CPU: no Triton, so torch folds each tile with fp32 temporaries of its size
    cpu = estimate(small, preference_train("dpo"), single, 1, "cpu")
    assert cpu.terms["logits"] == 64 * 32768 * 4 + 8 * 64 * 100 * 4 + 64 * 64 * (4 + 4 + 8)


def test_simpo_and_orpo_are_reference_free_and_hold_the_full_logits(small: ModelShape) -> None:
    single = profile_named("single_gpu")
    sft = estimate(small, preference_train("sft", method="full"), single, 1, "cuda")
    for objective in ("simpo", "orpo"):
        for method in ("qlora", "full"):   # not even under full: no reference at all
            est = estimate(small, preference_train(objective, method=method), single, 1, "cuda")
            assert "reference model" not in est.terms
            a = 4 if method == "qlora" else 2
            assert est.activations_checkpointed == 2 * 64 * 64 * a + 64 * 960 * a
            assert est.activations_full == 2 * 64 * 960 * a     # no no_grad pass after the policy's
            # every logit of both sequences, 3 (simpo) or 3.5 (orpo) times over at the loss's peak, in bf16, + the
            # final hidden states the head reads
            assert est.terms["logits"] == 64 * 100 * {"simpo": 3, "orpo": 3.5}[objective] * 2 + 64 * 64 * a
        assert est.terms["weights"] == sft.terms["weights"]


def test_a_reference_of_its_own_adds_its_weights(small: ModelShape) -> None:
    """train.preference.reference naming another model loads a second one at the base's precision (the planner
    assumes the base's shape); under full the reference 'base' is TRL's frozen copy: the same again."""
    single = profile_named("single_gpu")
    other = "models:/sft-bot@champion"
    lora = estimate(small, preference_train("dpo", method="lora", reference=other), single, 1, "cuda")
    assert lora.terms["reference model"] == small.total_params * 2 == 86848 * 2
    assert list(lora.terms)[:2] == ["weights", "reference model"]
    cpu = estimate(small, preference_train("dpo", method="lora", reference=other), single, 1, "cpu")
    assert cpu.terms["reference model"] == small.total_params * 4
    qlora = estimate(small, preference_train("dpo", reference=other), single, 1, "cuda")
    assert qlora.terms["reference model"] == qlora.terms["weights"] == 73728 * 0.515869140625 + 13120 * 4
    copy = estimate(small, preference_train("dpo", method="full"), single, 1, "cuda")
    assert copy.terms["reference model"] == small.total_params * 2
    # sharded like the policy: FSDP and ZeRO-3 shard TRL's prepared reference too, ZeRO-3's offload moves it
    fsdp = estimate(small, preference_train("dpo", method="lora", reference=other), profile_named("fsdp"), 4, "cuda")
    assert fsdp.terms["reference model"] == small.total_params * 2 / 4
    z3 = profile_named("deepspeed_zero3_offload")
    with_ref = estimate(small, preference_train("dpo", method="lora", reference=other), z3, 4, "cuda")
    without = estimate(small, preference_train("dpo", method="lora"), z3, 4, "cuda")
    assert with_ref.host_offload == pytest.approx(without.host_offload + small.total_params * 2 / 4)
    assert "reference model" not in without.terms


def test_kto_keeps_one_sequence_per_row_and_runs_its_kl_batch_without_gradients(small: ModelShape) -> None:
    """TRL's KTOTrainer: the rows' pass keeps batch_size sequences; with loss kto the mismatched KL batch goes
    through the policy before it (no_grad) and through the reference after it, with the rows' reference pass."""
    from gauntlet.plan.memory import passes

    single = profile_named("single_gpu")
    for checkpointing in (True, False):
        sft = estimate(small, preference_train("sft", method="lora", checkpointing=checkpointing), single, 1, "cuda")
        kto = estimate(small, preference_train("kto", method="lora", checkpointing=checkpointing), single, 1, "cuda")
        assert kto.activations_checkpointed == sft.activations_checkpointed
        assert kto.activations_full == sft.activations_full + 32 * PER_TOKEN * 2
        assert "reference model" not in kto.terms
        # bf16 hidden states under LoRA: their fp32 gradient is cast back (4 + 2 bytes)
        assert kto.terms["logits"] == 32 * 32768 * 2 + 32 * 64 * (2 + 2 + 4 + 2)
    run = passes(preference_train("kto", method="lora"))
    assert (run.sequences, run.kl_pass, run.reference, run.loss) == (1, True, "adapter", "fused")
    assert not passes(preference_train("kto", method="lora", loss_type="apo_zero_unpaired")).kl_pass
    full = estimate(small, preference_train("kto", method="full"), single, 1, "cuda")
    assert full.terms["reference model"] == small.total_params * 2
    assert passes(preference_train("sft")) == passes(TrainSpec())


def test_plan_says_the_objective_its_sequences_and_its_reference(capsys) -> None:
    config = str(REPO / "configs" / "llama-7b-qlora.yaml")
    # rows that fit each objective: validation reads a data file's rows when the file is here (the demo's, once
    # `dvc repro` made them in this checkout, are SFT rows)
    work = project_workdir("plan-objectives")
    rows = {"sft": {"instruction": "q", "input": "", "output": "a"}, "dpo": {"prompt": "q", "chosen": "a",
            "rejected": "b"}, "kto": {"prompt": "q", "completion": "a", "label": True}}
    for objective, row in rows.items():
        (work / f"{objective}.jsonl").write_text(json.dumps(row) + "\n")

    def data_for(objective: str) -> list[str]:
        rel = (work / f"{objective}.jsonl").relative_to(REPO)
        return ["--set", f"data.train={rel}", "--set", f"data.validation={rel}", "--set", f"train.objective={objective}"]

    args = ["plan", config, "--set", f"model.source={FIXTURES / 'llama-2-7b'}", "--set", "train.packing=false",
            "--gpus", "8", "--gpu-memory", "80"]
    try:
        check_the_objective_lines(args, data_for, capsys)
    finally:
        shutil.rmtree(work)


def check_the_objective_lines(args: list[str], data_for, capsys) -> None:
    assert cli([*args, *data_for("dpo")]) == 0
    text = capsys.readouterr().out
    assert ("objective dpo: 2 sequences per pair (chosen+rejected in one pass), reference = base with the adapter "
            "disabled (no_grad pass, no second copy)") in text
    assert cli([*args, *data_for("dpo"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["objective"] == "dpo" and plan["passes"]["sequences_per_row"] == 2
    assert plan["passes"]["reference"] == "adapter" and "reference model" not in plan["configured"]["terms_gib"]

    assert cli([*args, *data_for("dpo"), "--set", "train.method=lora", "--set",
                "train.preference.reference=models:/sft-bot@champion"]) in (0, 1)
    text = capsys.readouterr().out
    assert "reference = models:/sft-bot@champion, a second model (its weights counted" in text
    header = next(line for line in text.splitlines() if line.startswith("GiB per GPU"))
    assert header.split()[3:] == ["procs", "weights", "ref", *TERMS[1:], "fits"]
    for profile in PROFILES:
        row = next(line for line in text.splitlines() if line.startswith(profile + " "))
        assert len(row.split()) == 1 + 1 + len(TERMS) + 1 + 1, row

    assert cli([*args, *data_for("kto")]) == 0
    assert ("objective kto: 1 sequence per row, plus a mismatched KL batch (no_grad, through the policy and the "
            "reference)") in capsys.readouterr().out
    assert cli([*args, *data_for("sft")]) == 0
    assert "objective sft: 1 sequence per row, no reference" in capsys.readouterr().out


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
