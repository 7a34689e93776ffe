"""Preference rows: what a preference objective (``train.objective`` dpo, ipo, simpo, orpo, kto) trains on.

Two layouts, one JSON object per line, in TRL's own formats (TRL's trainers read them as they are):

* **pairs** (dpo, ipo, simpo, orpo): ``{"prompt", "chosen", "rejected"}``. Plain text (three strings) or chat
  messages (``prompt`` a list of ``{role, content}`` turns, ``chosen`` and ``rejected`` lists of assistant turns),
  rendered by TRL with the tokenizer's chat template.
* **kto** (kto): ``{"prompt", "completion", "label"}``, ``label`` true for a desirable completion, false for an
  undesirable one; text or messages as above.

A pair whose ``chosen`` equals its ``rejected`` teaches nothing and says the data is broken: it is refused, naming
file and line. No torch, no TRL here: the data stage and the training stage's preflight check files with it.
"""

from __future__ import annotations

from typing import Literal

Layout = Literal["alpaca", "chat", "pairs", "kto"]
PAIR_FIELDS = ("prompt", "chosen", "rejected")
KTO_FIELDS = ("prompt", "completion", "label")
# the layout each objective trains on (sft: alpaca or chat)
OBJECTIVE_LAYOUT: dict[str, Layout] = {"dpo": "pairs", "ipo": "pairs", "simpo": "pairs", "orpo": "pairs", "kto": "kto"}


def detect_layout(row: dict) -> Layout:
    """A row's layout by its fields: preference pairs, KTO rows, or an SFT row (alpaca or chat)."""
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "completion" in row and "label" in row:
        return "kto"
    return "chat" if "messages" in row or "conversations" in row else "alpaca"


def layout_fields(layout: str) -> str:
    """What a row of ``layout`` holds, for messages."""
    return {"pairs": "{prompt, chosen, rejected}", "kto": "{prompt, completion, label}",
            "alpaca": "{instruction, input, output}", "chat": "{messages: [{role, content}]}"}[layout]


def text_of(value: object) -> str | None:
    """A text or a list of chat turns as plain text (turn contents joined); None when it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in value):
        return "\n".join(t["content"] for t in value)
    return None


def _field_problem(row: dict, name: str) -> str | None:
    if name not in row:
        return f"no {name!r}"
    value = row[name]
    if isinstance(value, list) and not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                           and isinstance(t.get("content"), str) for t in value):
        return f"{name!r} is a list but not of {{role, content}} chat turns with string contents"
    text = text_of(value)
    if text is None:
        return f"{name!r} is neither a string nor a list of chat turns"
    return None if text.strip() or name == "prompt" else f"{name!r} is empty"


def row_problem(row: object, layout: Layout) -> str | None:
    """Why ``row`` cannot be trained on under a preference ``layout``, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    fields = PAIR_FIELDS if layout == "pairs" else KTO_FIELDS
    for name in fields:
        if name == "label":
            if not isinstance(row.get("label"), bool):
                return "'label' must be true (desirable) or false (undesirable)"
            continue
        if problem := _field_problem(row, name):
            return problem
    if layout == "pairs":
        kinds = {type(row[k]) for k in PAIR_FIELDS}
        if len(kinds) > 1:
            return "prompt, chosen and rejected mix plain text and chat turns: use one of the two for all three"
        if text_of(row["chosen"]) == text_of(row["rejected"]):
            return "chosen == rejected: the pair prefers nothing (a broken pair)"
    return None


def prompt_and_responses(row: dict) -> tuple[str, list[str]]:
    """A preference row's prompt text and its completions' texts (chosen and rejected, or the KTO completion)."""
    prompt = text_of(row.get("prompt")) or ""
    names = ("chosen", "rejected") if detect_layout(row) == "pairs" else ("completion",)
    return prompt, [text_of(row.get(n)) or "" for n in names]


def question(row: dict) -> str:
    """What a preference row asks (for contamination checks): the prompt's last user turn, or its text, with the
    house's alpaca wrapper (:mod:`gauntlet.prompting`) taken off, so that it compares with an eval instruction."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        users = [t.get("content", "") for t in prompt if isinstance(t, dict) and t.get("role") == "user"]
        return users[-1] if users else ""
    if not isinstance(prompt, str):
        return ""
    head, _, rest = prompt.partition("### Instruction:\n")
    if head or not rest:
        return prompt
    body = rest.removesuffix("\n\n### Response:\n")
    instruction, _, given = body.partition("\n\n### Input:\n")
    return f"{instruction} {given}"


def layout_mismatch(objective: str, layout: Layout, where: str) -> str | None:
    """Why rows of ``layout`` cannot train ``objective`` (naming the fields each needs), or None."""
    wanted = OBJECTIVE_LAYOUT.get(objective)
    if wanted is None and layout in ("alpaca", "chat"):
        return None
    if wanted == layout:
        return None
    needs = layout_fields(wanted) if wanted else "{instruction, input, output} or {messages}"
    return (f"{where} has {layout} rows {layout_fields(layout)}, but train.objective {objective} trains on rows "
            f"{needs}. Fix: point data.train/data.validation at {objective} data, or set train.objective to "
            + ("sft" if layout in ("alpaca", "chat") else "kto" if layout == "kto" else "dpo (ipo, simpo, orpo)"))
