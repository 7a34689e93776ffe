"""GPU proof: the heavy stages measured on a lent H100/H200, each beside its goal.

    python -m benchmarks.gpu_proof SECTION --work DIR --out DIR [--small]

Sections (``benchmarks/gpu_proof.sh`` runs them in this order, each in its own process and time budget, so
one that fails or runs out of time keeps the others' results in ``--out/<section>.json``):

  env     the card, the library versions, the copy bandwidth and the bf16 matrix rate
  models  random-init models of real shapes (Llama-3.2-1B, Llama-3-8B; bf16 safetensors) with the demo
          tokenizer: speed and memory do not depend on the weights' values, and nothing is downloaded
  train   the training stage's own code (gauntlet.training.train_model: preflight, `accelerate launch`, the
          trainer) QLoRA on the 8B under the single_gpu profile, sequence 2048, the micro-batch `gauntlet
          plan` proposes: tokens/s and peak memory against the planner's estimate
  trl     TRL's SFTTrainer with the same settings on the same rows: tokens/s
  decode  batch-1 decode of the 1B and the 8B in bf16: the speed probe's own generate (eager transformers)
          and a CUDA-graph decode over a static cache, against the memory-bandwidth bound; TTFT p50/p95
  compiled  the 8B's decode through torch.compile (reduce-overhead) and a static cache, when time is left
  quant   GPTQ W4A16 (then AWQ, if time is left) of the 1B through gauntlet.quantization.quantize_model (the
          quantize stage's code, llm-compressor in its own environment): minutes, and the variant's decode
  report  the markdown table for benchmarks/RESULTS.md, from the sections' JSON

``--small``: the same code on tiny shapes, on whatever device there is (a dry run on a CPU machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path

SHAPES = {   # Llama-3.2-1B and Llama-3-8B (vocabulary, widths, heads, layers); random weights
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
               rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
               rope_theta=500000.0),
}
SMALL = {"1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True),
         "8b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)}
DATASHEET_TBS = {"H100": 3.35, "H200": 4.8}   # HBM bandwidth by the vendors' datasheets (SXM parts)
TORCHTUNE_4090_TOKS = 2413                    # torchtune's published Llama-3.1-8B QLoRA tokens/s on an RTX 4090
GOALS = {"memory_within": 0.10, "decode_fraction": 0.70}


def say(message: str) -> None:
    print(f"[gpu-proof] {message}", flush=True)


def write(out: Path, section: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{section}.json").write_text(json.dumps(result, indent=2, default=str))
    say(f"{section}: {json.dumps(result, default=str)[:1500]}")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# env: the card and its two ceilings
# ---------------------------------------------------------------------------------------------


def section_env(args) -> dict:
    import torch

    from gauntlet.eval.engine import pkg_version

    info: dict = {"python": platform.python_version(), "device": device(),
                  "versions": {p: pkg_version(p) for p in ("torch", "transformers", "peft", "accelerate",
                                                           "bitsandbytes", "trl", "datasets", "llmcompressor",
                                                           "compressed-tensors", "vllm", "lm_eval")}}
    if device() == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count)
        n = int(4e9 / 2)   # a 4 GB copy: bytes read + bytes written per second
        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        dst.copy_(src)
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync()
        info["copy_tb_s"] = 2 * src.numel() * 2 * 10 / (time.perf_counter() - t0) / 1e12
        del src, dst
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            a @ b
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        info["bf16_tflops"] = 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12
    return info


# ---------------------------------------------------------------------------------------------
# models: random-init, real shapes, saved like any model folder
# ---------------------------------------------------------------------------------------------


def model_dir(work: Path, name: str) -> Path:
    return work / "models" / name


def section_models(args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gauntlet.demo.model import build_demo_model

    tokenizer = AutoTokenizer.from_pretrained(build_demo_model("tiny-llama", out=args.work / "tokenizer-source"))
    shapes = SMALL if args.small else SHAPES
    out = {}
    for name, shape in shapes.items():
        target = model_dir(args.work, name)
        if (target / "config.json").exists():
            out[name] = {"path": str(target), "reused": True}
            continue
        t0 = time.perf_counter()
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16", **shape)
        torch.manual_seed(0)
        with torch.device(device()):
            torch.set_default_dtype(torch.bfloat16)
            model = LlamaForCausalLM(config)
            torch.set_default_dtype(torch.float32)
        params = sum(p.numel() for p in model.parameters())
        built = time.perf_counter() - t0
        model.save_pretrained(target, max_shard_size="5GB")
        tokenizer.save_pretrained(target)
        out[name] = {"path": str(target), "params": params, "build_s": built,
                     "save_s": time.perf_counter() - t0 - built,
                     "bytes": sum(p.stat().st_size for p in target.glob("*.safetensors"))}
        del model
        if device() == "cuda":
            torch.cuda.empty_cache()
    return out


def training_rows(work: Path, n: int, words: int, seed: int = 0) -> tuple[Path, Path]:
    """Alpaca rows whose responses run past 2048 tokens: every row is a full-length sequence."""
    from gauntlet.demo import data as demo_data

    rng = random.Random(seed)
    vocab = [a + b for a in demo_data.SYLLABLES for b in demo_data.SYLLABLES] + demo_data.COLOURS
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)

    def rows(count: int) -> str:
        return "".join(json.dumps({"instruction": "Continue the list of invented names.", "input": "",
                                   "output": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n"
                       for _ in range(count))

    (folder / "train.jsonl").write_text(rows(n))
    (folder / "validation.jsonl").write_text(rows(2))
    return folder / "train.jsonl", folder / "validation.jsonl"


# ---------------------------------------------------------------------------------------------
# train: the training stage's own code, and the planner's estimate beside it
# ---------------------------------------------------------------------------------------------


def train_spec(args, batch: int, steps: int):
    from gauntlet.config.train import TrainSpec

    return TrainSpec(method="qlora", learning_rate=2e-4, max_steps=steps, batch_size=batch,
                     max_seq_len=256 if args.small else 2048, logging_steps=1, checkpoint_steps=None,
                     gradient_checkpointing=True, lora={"r": 16, "alpha": 32, "dropout": 0.05},
                     accelerate={"profile": "single_gpu"} if device() == "cuda" else {})


def planned(args, spec) -> dict:
    from gauntlet.plan.memory import GIB, visible_devices
    from gauntlet.plan.report import make_plan
    from gauntlet.plan.shape import model_shape

    shape = model_shape(model_dir(args.work, "8b"), "llama-3-8b shape")
    plan = make_plan(shape, spec, visible_devices() if device() == "cuda" else None)
    return {"proposed_batch": plan.largest_batch, "estimate_gib": plan.configured.total / GIB,
            "terms_gib": {k: v / GIB for k, v in plan.configured.terms.items()}}


class DeviceMemory:
    """The card's used memory (nvidia-smi: every process, CUDA context and allocator cache included), polled
    while a section trains: what must fit on the card, which the planner estimates."""

    def __init__(self):
        import shutil
        import threading

        self.peak_mib, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True) if shutil.which("nvidia-smi") else None

    def poll(self) -> None:
        import subprocess

        while not self.stop.wait(0.5):
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split()
                self.peak_mib = max(self.peak_mib, float(used[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> DeviceMemory:
        if self.thread:
            self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()

    @property
    def peak_gib(self) -> float | None:
        return self.peak_mib / 1024 if self.peak_mib else None


class StopAfterLastStep(Exception):
    """Raised from the trainer's output once its last step is logged: merging the adapter into a full copy
    of the base (CPU-bound, minutes for an 8B) is not what is measured here."""


def section_train(args) -> dict:
    from gauntlet.refs import DatasetRef, ModelRef
    from gauntlet.training import TrainingError, train_model

    steps = args.steps
    probe = planned(args, train_spec(args, 1, steps))
    batch = args.batch or probe["proposed_batch"] or 1
    spec = train_spec(args, batch, steps)
    plan = planned(args, spec)
    train_path, val_path = training_rows(args.work, batch * steps + 2, 150 if args.small else 1500)
    path = model_dir(args.work, "8b")
    model = ModelRef(name="llama-3-8b-shape", path=str(path), source=str(path), sha="random-init")
    data = DatasetRef(repo=str(args.work), train_path=str(train_path), validation_path=str(val_path), md5="synthetic",
                      file_md5={}, rows={"train": batch * steps + 2, "validation": 2})
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if line.startswith(f"[trainer] step {steps}/{steps}"):
            raise StopAfterLastStep

    t0 = time.perf_counter()
    stopped, refused = False, []
    while True:
        out = args.work / f"train-b{batch}"
        with DeviceMemory() as card:   # this attempt's peak only
            try:
                train_model(spec, model, data, out, echo=echo)
            except StopAfterLastStep:
                stopped = True
            except TrainingError as e:   # out of memory: the estimate was short; say so, try half the batch
                if "out of memory" not in str(e).lower() or batch == 1:
                    raise
                refused.append({"batch": batch, "device_gib": card.peak_gib, "error": str(e)[-600:]})
                batch //= 2
                spec = train_spec(args, batch, steps)
                plan = planned(args, spec)
                lines.clear()
                continue
        break
    wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()] \
        if (out / "steps.jsonl").exists() else []
    metrics = [dict(kv.split("=", 1) for kv in line.split()[3:]) for line in lines
               if line.startswith("[trainer] step ")]
    tps = [float(m["tokens_per_s"]) for m in metrics][1:]   # the first step warms up (kernels, allocator)
    peak = max((float(m["peak_memory_gb"]) for m in metrics), default=None)
    peak_gib = peak * 1e9 / 2**30 if peak is not None else None
    device_gib = card.peak_gib
    return {"batch": batch, "seq": spec.max_seq_len, "steps": steps, "planner": plan, "wall_s": wall,
            "out_of_memory_at": refused,
            "stopped_before_merge": stopped, "tokens_per_s_steps": tps,
            "tokens_per_s": statistics.median(tps) if tps else None, "peak_allocated_gib": peak_gib,
            "peak_device_gib": device_gib,
            "device_vs_estimate": (device_gib / plan["estimate_gib"] - 1) if device_gib else None,
            "allocated_vs_estimate": (peak_gib / plan["estimate_gib"] - 1) if peak_gib else None,
            "step_times": [h["time"] for h in history]}


# ---------------------------------------------------------------------------------------------
# trl: SFTTrainer with the same settings
# ---------------------------------------------------------------------------------------------


def trl_version() -> str:
    from gauntlet.eval.engine import pkg_version

    return pkg_version("trl")


def section_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from gauntlet.prompting import format_prompt

    ours = json.loads((args.out / "train.json").read_text()) if (args.out / "train.json").exists() else {}
    batch = args.batch or ours.get("batch") or 1
    steps, seq = args.steps, 256 if args.small else 2048
    path = model_dir(args.work, "8b")
    train_path = args.work / "data" / "train.jsonl"
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": format_prompt(r["instruction"], r["input"]), "completion": r["output"]}
                                 for r in rows])
    cuda = device() == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map={"": 0} if cuda else "cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = time.perf_counter() - t0
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            sync()
            times.append(time.perf_counter())

    config = SFTConfig(output_dir=str(args.work / "trl"), max_length=seq, per_device_train_batch_size=batch,
                       gradient_accumulation_steps=1, learning_rate=2e-4, max_steps=steps, logging_steps=1,
                       gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                       bf16=cuda, use_cpu=not cuda, report_to=[], save_strategy="no", packing=False,
                       optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0, seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, peft_config=lora,
                         processing_class=tokenizer, callbacks=[StepTimes()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with DeviceMemory() as card:
        trainer.train()
    per_step = [b - a for a, b in pairwise(times)]   # from the end of step 1: step 1 warms up
    tokens = batch * seq
    return {"batch": batch, "seq": seq, "steps": steps, "load_s": loaded, "step_s": per_step, "trl": trl_version(),
            "tokens_per_s": tokens / statistics.median(per_step) if per_step else None,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_device_gib": card.peak_gib}


# ---------------------------------------------------------------------------------------------
# decode: the probe's generate, a CUDA-graph decode, and the bandwidth bound
# ---------------------------------------------------------------------------------------------


def decode_bytes(model) -> int:
    """Bytes one batch-1 decode step must read: every weight, except that the embedding table gives one
    row (its tied output head reads it whole, counted once)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - (emb.numel() * emb.element_size() if head.data_ptr() != emb.data_ptr() else 0)


def graph_decode(model, tokenizer, prompt: str, new_tokens: int) -> tuple[float, bool]:
    """(tokens/s, same tokens as eager greedy decoding) of a decode with a static KV cache whose one step is
    captured as a CUDA graph (the step writes its own next token and position: replays need no host work)."""
    import torch
    from transformers import StaticCache

    ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
    check = 11
    eager = model.generate(ids, do_sample=False, max_new_tokens=check, min_new_tokens=check,
                           pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + check + new_tokens + 8)
    with torch.inference_mode():
        logits = model(input_ids=ids, cache_position=torch.arange(ids.shape[1], device="cuda"),
                       past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.tensor([ids.shape[1]], device="cuda")
        seen = [token.item()]

        def step():
            out = model(input_ids=token, cache_position=position, position_ids=position.unsqueeze(0),
                        past_key_values=cache, use_cache=True).logits
            token.copy_(out[:, -1:].argmax(-1))
            position.add_(1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):   # warm-up on a side stream, as CUDA graph capture asks
                step()
                seen.append(token.item())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(check - len(seen)):   # correct first: the replays continue the eager sequence
            graph.replay()
            seen.append(token.item())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(new_tokens):
            graph.replay()
        end.record()
        end.synchronize()
    return new_tokens / (start.elapsed_time(end) / 1000), seen == eager


def section_compiled(args) -> dict:
    """The 8B's batch-1 decode through transformers' own fast path: a static cache and the forward compiled
    by torch.compile (mode reduce-overhead: fused kernels and CUDA graphs). Compile time reported apart."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gauntlet.eval.speed import probe_prompts

    path = model_dir(args.work, "1b" if args.small else "8b")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    enc = tokenizer(probe_prompts(1)[0], return_tensors="pt").to("cuda")
    new = 128

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        model.generate(**enc, do_sample=False, max_new_tokens=new, min_new_tokens=new, cache_implementation="static",
                       pad_token_id=tokenizer.pad_token_id)
        sync()
        return time.perf_counter() - t0

    first = run()      # compiles the prefill and the decode step
    second = run()     # may still capture graphs
    timed = [run() for _ in range(3)]
    env = json.loads((args.out / "env.json").read_text()) if (args.out / "env.json").exists() else {}
    bound = next((v for k, v in DATASHEET_TBS.items() if k in env.get("card", "")), None)
    tps = new / statistics.median(timed)
    return {"model": path.name, "compile_and_first_s": first, "second_s": second, "tokens_per_s": tps,
            "fraction_of_datasheet_bound": tps / (bound * 1e12 / decode_bytes(model)) if bound else None}


def section_decode(args, names=("1b", "8b"), which: str = "bf16") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gauntlet.eval.speed import _hf_generate, percentile, probe_prompts

    env = json.loads((args.out / "env.json").read_text()) if (args.out / "env.json").exists() else {}
    card = env.get("card", "")
    datasheet = next((v for k, v in DATASHEET_TBS.items() if k in card), None)
    results = {}
    for name in names:
        path = model_dir(args.work, name) if which == "bf16" else Path(name)
        label = name if which == "bf16" else Path(name).name
        cuda = device() == "cuda"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                     device_map="cuda" if cuda else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(path)
        generate = _hf_generate(model, tokenizer, device())
        prompts = probe_prompts(8)
        new = 16 if args.small else 128
        generate(prompts[:1], 4)                                   # warm-up
        ttft = [generate([p], 1)[1] for p in prompts]              # prompt + first token, as the probe does
        eager = [generate([p], new) for p in prompts[:3]]
        row = {"eager_tokens_per_s": sum(n for n, _ in eager) / sum(t for _, t in eager),
               "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p95_ms": 1000 * percentile(ttft, 95)}
        if which == "bf16":
            weight_bytes = decode_bytes(model)
            row.update(decode_gb=weight_bytes / 1e9,
                       bound_measured=env.get("copy_tb_s", 0) * 1e12 / weight_bytes if env.get("copy_tb_s") else None,
                       bound_datasheet=datasheet * 1e12 / weight_bytes if datasheet else None)
        if cuda:
            try:
                row["graph_tokens_per_s"], row["graph_matches_eager"] = graph_decode(model, tokenizer, prompts[0], 256)
            except Exception as e:  # report why, keep the eager figure
                row["graph_error"] = f"{type(e).__name__}: {e}"[:400]
        best = max(row.get("graph_tokens_per_s") or 0, row["eager_tokens_per_s"])
        if row.get("bound_datasheet"):
            row["fraction_of_datasheet_bound"] = best / row["bound_datasheet"]
        if row.get("bound_measured"):
            row["fraction_of_measured_bound"] = best / row["bound_measured"]
        results[label] = row
        del model
        if cuda:
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------------
# quant: the quantize stage's code, llm-compressor in its own environment
# ---------------------------------------------------------------------------------------------


def section_quant(args) -> dict:
    from gauntlet.config.quantize import CalibrationSpec, QuantizeVariant
    from gauntlet.hashing import sha256_dir
    from gauntlet.quantization import quantize_model
    from gauntlet.refs import DatasetRef, ModelRef

    path = model_dir(args.work, "1b")
    model = ModelRef(name="llama-3.2-1b-shape", path=str(path), source=str(path), sha=sha256_dir(path))
    train_path, val_path = training_rows(args.work / "calibration", 160, 400)
    data = DatasetRef(repo=str(args.work), train_path=str(train_path), validation_path=str(val_path), md5="synthetic",
                      file_md5={}, rows={"train": 160})
    calibration = CalibrationSpec(samples=32 if args.small else 128, max_seq_len=512)
    out: dict = {}
    deadline = time.monotonic() + args.budget
    for method in ("gptq", "awq"):
        if time.monotonic() > deadline - 60:
            out[method] = {"skipped": "time budget"}
            break
        variant = QuantizeVariant(method=method, bits=4, group_size=128 if not args.small else 32)
        t0 = time.perf_counter()
        try:
            ref = quantize_model(variant, calibration, model, data, args.work / f"quant-{method}", echo=say)
        except Exception as e:
            out[method] = {"error": f"{type(e).__name__}: {e}"[:600]}
            continue
        result = json.loads((Path(ref.output_dir) / "result.json").read_text())
        out[method] = {"variant": ref.variant, "wall_s": time.perf_counter() - t0, "oneshot_s": result["duration_s"],
                       "size_ratio": ref.size_ratio, "size_gb": ref.size_bytes / 1e9, "path": ref.path,
                       "device": result.get("device"), "versions": result.get("versions")}
        try:
            out[method]["decode"] = section_decode(args, names=(ref.path,), which="variant")
        except Exception as e:
            out[method]["decode_error"] = f"{type(e).__name__}: {e}"[:400]
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def section_report(args) -> dict:
    r = {s: json.loads((args.out / f"{s}.json").read_text())
         for s in ("env", "train", "train-same", "trl", "decode", "quant", "compiled")
         if (args.out / f"{s}.json").exists()}
    env, train, same, trl, decode, quant, compiled = (r.get(k, {}) for k in ("env", "train", "train-same", "trl",
                                                                             "decode", "quant", "compiled"))
    lines = [f"card: {env.get('card')} ({fmt(env.get('memory_gib'))} GiB); copy {fmt(env.get('copy_tb_s'), '.2f')} "
             f"TB/s; bf16 matmul {fmt(env.get('bf16_tflops'), '.0f')} TFLOP/s; torch {env.get('versions', {}).get('torch')}",
             "", "| measurement | value | goal | met |", "|---|---|---|---|"]
    if train.get("planner"):
        est, peak = train["planner"]["estimate_gib"], train.get("peak_device_gib")
        within = None if peak is None else abs(peak / est - 1) <= GOALS["memory_within"]
        lines.append(f"| QLoRA 8B-shape, batch {train['batch']} x {train['seq']}: peak memory on the card "
                     f"(allocated by torch) | {fmt(peak)} GiB ({fmt(train.get('peak_allocated_gib'))}); planner "
                     f"{fmt(est)} GiB, {fmt(train.get('device_vs_estimate') and 100 * train['device_vs_estimate'], '+.1f')}% "
                     f"| within 10% | {within} |")
        lines.append(f"| QLoRA 8B-shape tokens/s at that batch | {fmt(train.get('tokens_per_s'), '.0f')} | — | — |")
        ours, theirs = (same or train).get("tokens_per_s"), trl.get("tokens_per_s")
        lines.append(f"| QLoRA 8B-shape tokens/s, batch {trl.get('batch')}: Gauntlet's trainer vs TRL SFTTrainer "
                     f"{trl.get('trl')} | {fmt(ours, '.0f')} vs "
                     f"{fmt(theirs, '.0f')} ({fmt(ours / theirs if ours and theirs else None, '.2f')}x) | >= 1.0x | "
                     f"{None if not (ours and theirs) else ours >= theirs} |")
        lines.append(f"| reference: torchtune Llama-3.1-8B QLoRA on an RTX 4090 | {TORCHTUNE_4090_TOKS} tokens/s | — | — |")
    for name, row in decode.items():
        if not isinstance(row, dict) or "eager_tokens_per_s" not in row:
            continue
        best = max(row.get("graph_tokens_per_s") or 0, row["eager_tokens_per_s"])
        frac = row.get("fraction_of_datasheet_bound")
        lines.append(f"| batch-1 decode {name} bf16: eager / CUDA graph | {fmt(row['eager_tokens_per_s'])} / "
                     f"{fmt(row.get('graph_tokens_per_s'))} tok/s; bound {fmt(row.get('bound_datasheet'))} (datasheet), "
                     f"{fmt(row.get('bound_measured'))} (measured copy); TTFT p50/p95 {fmt(row['ttft_p50_ms'])}/"
                     f"{fmt(row['ttft_p95_ms'])} ms | >= 70% of bound | "
                     f"{None if frac is None else frac >= GOALS['decode_fraction']} ({fmt(frac and 100 * frac)}%; best {fmt(best)}) |")
    if compiled.get("tokens_per_s"):
        frac = compiled.get("fraction_of_datasheet_bound")
        lines.append(f"| batch-1 decode {compiled['model']} bf16, torch.compile (reduce-overhead) + static cache | "
                     f"{fmt(compiled['tokens_per_s'])} tok/s (compile + first run {fmt(compiled['compile_and_first_s'])} s) "
                     f"| >= 70% of bound | {None if frac is None else frac >= GOALS['decode_fraction']} "
                     f"({fmt(frac and 100 * frac)}%) |")
    for method, row in quant.items():
        if not isinstance(row, dict):
            continue
        if "wall_s" in row:
            dec = next(iter((row.get("decode") or {}).values()), {})
            lines.append(f"| {row['variant']} of the 1B-shape | {row['wall_s'] / 60:.1f} min ({fmt(row['oneshot_s'])} s "
                         f"oneshot), {fmt(row['size_ratio'], '.2f')}x size; decode {fmt(dec.get('eager_tokens_per_s'))} "
                         f"tok/s eager, {fmt(dec.get('graph_tokens_per_s'))} graph | minutes | — |")
        else:
            lines.append(f"| {method} of the 1B-shape | {row} | — | — |")
    table = "\n".join(lines)
    print(table)
    (args.out / "report.md").write_text(table + "\n")
    return {"table": table}


SECTIONS = {"env": section_env, "models": section_models, "train": section_train, "trl": section_trl,
            "decode": section_decode, "quant": section_quant, "compiled": section_compiled, "report": section_report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-proof"), help="models, data and outputs")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-proof/out"), help="one JSON per section")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a dry run anywhere")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: what `gauntlet plan` proposes)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the training runs")
    parser.add_argument("--budget", type=float, default=300, help="seconds the section may take (quant)")
    parser.add_argument("--tag", default="", help="suffix of the section's JSON (two runs of one section)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        result = SECTIONS[args.section](args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:2000]}
    if args.section == "models":    # printed only: eight files come back from the device, at most
        say(f"models: {json.dumps(result, default=str)}")
    elif args.section != "report":
        result = {"seconds": time.perf_counter() - started, **result} if isinstance(result, dict) else result
        write(args.out, args.section + (f"-{args.tag}" if args.tag else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
