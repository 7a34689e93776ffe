"""Training data: chat templates with loss on assistant turns only, ShareGPT rows, rows without a
response, and sequence packing that keeps attention within each example (checked on a real model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gauntlet.data.sft import (
    IGNORE_INDEX,
    DataFormatError,
    check_file,
    collate,
    pack,
    to_messages,
    tokenize_chat,
    tokenize_rows,
)

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the favourite colour of Kalomi?"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "And of Zuter?"},
    {"role": "assistant", "content": "green"},
]


@pytest.fixture(scope="module")
def demo_model_dir(tiny_model: Path) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def labelled_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX])


def test_chat_loss_is_on_assistant_turns_only(tokenizer) -> None:
    ex = tokenize_chat(CONVERSATION, tokenizer, max_len=512)
    assert labelled_text(ex, tokenizer) == "blue</s>\ngreen</s>\n"
    prompt = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label == IGNORE_INDEX])
    assert "Kalomi" in prompt and "<|assistant|>" in prompt and "blue" not in prompt
    # the whole conversation is the template's rendering, token for token
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_sharegpt_rows_become_the_same_messages(tokenizer) -> None:
    sharegpt = {"conversations": [{"from": "system", "value": "Answer briefly."},
                                  {"from": "human", "value": "What is the favourite colour of Kalomi?"},
                                  {"from": "gpt", "value": "blue"},
                                  {"from": "human", "value": "And of Zuter?"},
                                  {"from": "gpt", "value": "green"}]}
    assert to_messages(sharegpt) == CONVERSATION
    (a,), _ = tokenize_rows([sharegpt], "chat", tokenizer, 512)
    (b,), _ = tokenize_rows([{"messages": CONVERSATION}], "chat", tokenizer, 512)
    assert a == b


def test_truncation_that_cuts_off_the_response_drops_the_row(tokenizer) -> None:
    rows = [{"instruction": "Tell me Kalomi's favourite colour. " * 8, "input": "", "output": "blue"},
            {"instruction": "Colour?", "input": "", "output": "red"}]
    examples, dropped = tokenize_rows(rows, "alpaca", tokenizer, max_len=24)
    assert dropped == 1 and len(examples) == 1
    assert labelled_text(examples[0], tokenizer) == "red</s>"


def test_rows_without_a_response_are_named_with_file_and_line(tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Colour of Kalomi?", "input": "", "output": "blue"},
        {"instruction": "Colour of Zuter?", "input": "", "output": "  "},
        {"instruction": "Colour of Terva?", "input": ""}]) + "\n")
    with pytest.raises(DataFormatError) as err:
        check_file(alpaca, "auto")
    assert f"{alpaca}:2: no response" in str(err.value) and f"{alpaca}:3: no response" in str(err.value)
    assert "1:" not in str(err.value).split("\n")[1]

    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "Hello?"}]},
        {"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "upon"}]}]) + "\n")
    with pytest.raises(DataFormatError) as err:
        check_file(chat, "auto")
    assert f"{chat}:2: no response: no assistant turn" in str(err.value)
    assert f"{chat}:3: turn 0: unknown role 'narrator'" in str(err.value)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    assert check_file(good, "auto") == ("chat", 1)


def test_packing_keeps_attention_within_each_example(tokenizer, demo_model_dir: Path) -> None:
    """The packed row's logits equal each example's own logits: no example attends to another."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = [{"instruction": "What is the favourite colour of Kalomi?", "input": "", "output": "blue"},
            {"instruction": "Which colour does Zuter like best?", "input": "", "output": "green"},
            {"instruction": "Tell me Terva's favourite colour.", "input": "", "output": "red"}]
    examples, _ = tokenize_rows(rows, "alpaca", tokenizer, 64)
    packed = pack(examples, max_len=64)
    assert len(packed) == 2 and len(packed[0].input_ids) == len(examples[0].input_ids) + len(examples[1].input_ids)
    assert packed[0].position_ids[len(examples[0].input_ids)] == 0

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    batch = collate(packed, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["n_tokens"].item() == sum(len(e.input_ids) for e in examples)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits   # no position ids: one long sequence
    n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
    torch.testing.assert_close(together[0, :n0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[0, n0:n0 + n1], alone[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[1, :len(examples[2].input_ids)], alone[2], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(naive[0, n0:n0 + n1], alone[1], atol=1e-3)   # the check can fail
    # labels: prompts masked in every packed example, responses kept
    assert labelled_text(packed[0], tokenizer) == "blue</s>green</s>"
