"""Training rows to token ids, with the loss on responses only.

Two row formats, one JSON object per line:

* **alpaca**: ``{"instruction", "input"?, "output"}``. Rendered with the one prompt format of training
  and evaluation (:mod:`gauntlet.prompting`); the output and an EOS token are the response.
* **chat**: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI style) or ShareGPT's
  ``{"conversations": [{"from", "value"}, ...]}``. Rendered with the tokenizer's chat template;
  every assistant turn (with whatever the template closes it with) is a response.

Prompt tokens get the label ``IGNORE_INDEX`` so only responses are learned. ``pack`` concatenates
examples into rows of at most ``max_len`` tokens with position ids restarting at each example:
transformers then keeps attention within each example (flash-attention varlen, or a block-diagonal
mask for sdpa/eager) when no attention mask is passed.

No torch import at module level: the training task checks files with this module before launching.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

IGNORE_INDEX = -100
MAX_REPORTED_PROBLEMS = 10
Format = Literal["alpaca", "chat"]

# ShareGPT speakers -> chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool"}
CHAT_ROLES = {"system", "user", "assistant", "tool"}


class DataFormatError(ValueError):
    """Training rows that cannot be trained on; the message names the file, line and fix."""


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def detect_format(row: dict) -> Format:
    if "messages" in row or "conversations" in row:
        return "chat"
    return "alpaca"


def resolve_format(configured: str, rows: list[dict]) -> Format:
    """The configured format, or (``auto``) the first row's."""
    if configured != "auto":
        return configured  # type: ignore[return-value]
    return detect_format(rows[0]) if rows else "alpaca"


def to_messages(row: dict) -> list[dict]:
    """A chat row as [{"role", "content"}], whichever of the two chat layouts it uses."""
    if "messages" in row:
        return [{"role": m.get("role"), "content": m.get("content")} for m in row["messages"]]
    return [{"role": SHAREGPT_ROLES.get(str(t.get("from", "")).lower(), t.get("from")), "content": t.get("value")}
            for t in row.get("conversations", [])]


def row_problem(row: object, fmt: Format) -> str | None:
    """Why ``row`` cannot be trained on, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if fmt == "alpaca":
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            return "no 'instruction'"
        if not isinstance(row.get("output"), str) or not row["output"].strip():
            return "no response: 'output' is missing or empty"
        return None
    turns = row.get("messages", row.get("conversations"))
    if not isinstance(turns, list) or not turns:
        return "no 'messages' (or ShareGPT 'conversations') list"
    messages = to_messages(row)
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            return f"turn {i}: unknown role {m['role']!r} (known: {sorted(CHAT_ROLES)}; ShareGPT: {sorted(SHAREGPT_ROLES)})"
        if not isinstance(m["content"], str):
            return f"turn {i}: content is not a string"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no response: no assistant turn with content"
    return None


def check_file(path: str | Path, configured_format: str) -> tuple[Format, int]:
    """Check every row of a training file; return (format, rows). Raises DataFormatError listing problems."""
    problems: list[str] = []
    rows = 0
    fmt: Format | None = None if configured_format == "auto" else configured_format  # type: ignore[assignment]
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: not JSON ({e.msg})")
                continue
            rows += 1
            if fmt is None and isinstance(row, dict):
                fmt = detect_format(row)
            problem = row_problem(row, fmt or "alpaca")
            if problem:
                problems.append(f"{path}:{number}: {problem}")
    if rows == 0:
        problems.append(f"{path}: no rows")
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise DataFormatError(
            f"{len(problems)} training row(s) cannot be used:\n  " + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
            + "\nFix: give every row a response (alpaca 'output', or an assistant turn in chat rows); "
              "set train.data_format if the format was guessed wrong.")
    return fmt or "alpaca", rows


def prompt_and_response(row: dict) -> tuple[str, str]:
    """A row's prompt and response text, whatever its format (for length statistics).

    alpaca: the rendered prompt and the output; chat: the other turns' and the assistant turns' contents."""
    if detect_format(row) == "alpaca":
        from gauntlet.prompting import format_prompt

        return format_prompt(row["instruction"], row.get("input", "")), row["output"]
    messages = to_messages(row)
    return ("\n".join(m["content"] for m in messages if m["role"] != "assistant"),
            "\n".join(m["content"] for m in messages if m["role"] == "assistant"))


def question(row: dict) -> str:
    """What a row asks (for contamination checks): alpaca instruction + input; chat: the first user turn."""
    if detect_format(row) == "alpaca":
        return row["instruction"] + " " + row.get("input", "")
    return next((m["content"] for m in to_messages(row) if m["role"] == "user"), "")


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def tokenize_alpaca(row: dict, tokenizer, max_len: int) -> Example:
    from gauntlet.prompting import format_prompt

    prompt_ids = tokenizer(format_prompt(row["instruction"], row.get("input", "")),
                           add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(input_ids=(prompt_ids + answer_ids)[:max_len],
                   labels=([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_len])


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span is what rendering the conversation up to and including that turn adds to rendering
    it up to the turn's generation prompt: the response and the template's end-of-turn marker.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataFormatError(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier turns), "
                "so the assistant turns cannot be located for response-only loss. Fix: set train.chat_template "
                "to a template that renders each turn independently.")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_chat(messages: list[dict], tokenizer, max_len: int) -> Example:
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = any(s <= start < e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return Example(input_ids=list(enc["input_ids"])[:max_len], labels=labels[:max_len])


def check_tokenizer(tokenizer, fmt: Format) -> None:
    if fmt != "chat":
        return
    if not getattr(tokenizer, "chat_template", None):
        raise DataFormatError("chat rows need a chat template, and this model's tokenizer has none. Fix: set "
                              "train.chat_template to a Jinja template (or use a chat model's tokenizer).")
    if not getattr(tokenizer, "is_fast", False):
        raise DataFormatError("chat rows need a fast tokenizer (tokenizer.json) to locate the assistant turns; "
                              "this model only has a slow one. Fix: convert it, or use alpaca rows.")


def tokenize_rows(rows: Iterable[dict], fmt: Format, tokenizer, max_len: int) -> tuple[list[Example], int]:
    """Tokenize rows; drop those whose response was cut off entirely by ``max_len``. Returns (examples, dropped)."""
    check_tokenizer(tokenizer, fmt)
    examples, dropped = [], 0
    for row in rows:
        ex = (tokenize_alpaca(row, tokenizer, max_len) if fmt == "alpaca"
              else tokenize_chat(to_messages(row), tokenizer, max_len))
        if ex.trained_tokens == 0:
            dropped += 1
            continue
        examples.append(ex)
    return examples, dropped


# ---------------------------------------------------------------------------------------------
# packing and batching
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]     # restart at 0 at each example: the attention boundary


def pack(examples: list[Example], max_len: int) -> list[PackedRow]:
    """Greedy first-fit packing of whole examples into rows of at most ``max_len`` tokens, in order."""
    rows: list[PackedRow] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_len:
            rows.append(PackedRow(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids = ids + ex.input_ids
        labels = labels + ex.labels
        positions = positions + list(range(len(ex.input_ids)))
    if ids:
        rows.append(PackedRow(ids, labels, positions))
    return rows


def collate(batch: list, pad_id: int) -> dict:
    """Pad a batch to its longest row. Packed rows get position ids (and no attention mask, so that
    transformers derives the per-example attention from them); ``n_tokens`` counts real tokens."""
    import torch

    width = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    out: dict = {"input_ids": ids, "labels": labels}
    packed = isinstance(batch[0], PackedRow)
    if packed:
        # the padding tail is a sequence of its own (positions from 0) that nothing attends to
        positions = torch.arange(width).repeat(len(batch), 1)
    else:
        mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b.input_ids)
        ids[i, :n] = torch.tensor(b.input_ids)
        labels[i, :n] = torch.tensor(b.labels)
        if packed:
            positions[i, :n] = torch.tensor(b.position_ids)
            positions[i, n:] = torch.arange(width - n)
        else:
            mask[i, :n] = 1
    if packed:
        out["position_ids"] = positions
    else:
        out["attention_mask"] = mask
    out["n_tokens"] = torch.tensor(sum(len(b.input_ids) for b in batch))
    return out
