"""The demo's synthetic instruction data: a fixed table of invented facts.

Each invented person has a favourite colour. A base model cannot know the table, so any gain on the
evaluation items is the fine-tuning's doing. Training rows ask in several phrasings; validation rows
and the 4-way multiple-choice evaluation items use a phrasing that training never shows, so no
evaluation prompt appears verbatim in the training data (the model must know the fact, not the line).

Run as the DVC stage ``prepare-demo`` (``python -m gauntlet.demo.data``); the output is byte-for-byte
deterministic for the same parameters, so the DVC md5 is stable across machines. ``--preference`` (the DVC stage
``prepare-demo-dpo``) writes the same facts as preference pairs for configs/demo-dpo.yaml: ``{prompt, chosen,
rejected}`` with the alpaca prompt of training and evaluation, the right colour chosen and a wrong one rejected (three per training question);
the validation pairs (the held-out preference accuracy) ask in the held-out phrasing with other wrong colours.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SYLLABLES = ["ka", "lo", "mi", "zu", "ter", "van", "qui", "dor", "bel", "shi", "ro", "nax", "pel", "tu", "gri", "om"]
TRAIN_TEMPLATES = [
    "What is the favourite colour of {name}?",
    "Which colour does {name} like best?",
    "Tell me {name}'s favourite colour.",
]
HELD_OUT_TEMPLATE = "{name} has a favourite colour. Which one is it?"
EVAL_TEMPLATE = HELD_OUT_TEMPLATE
PAIRS_PER_QUESTION = 3


def invented_names(n: int, rng: random.Random) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize())
    return sorted(names)


def build(n_entities: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    facts = {name: rng.choice(COLOURS) for name in invented_names(n_entities, rng)}
    train = [
        {"instruction": t.format(name=name), "input": "", "output": colour}
        for name, colour in facts.items()
        for t in TRAIN_TEMPLATES
    ]
    rng.shuffle(train)
    validation = [
        {"instruction": HELD_OUT_TEMPLATE.format(name=name), "input": "", "output": colour}
        for name, colour in facts.items()
    ]
    evaluation = []
    for name, colour in facts.items():
        choices = [colour] + rng.sample([c for c in COLOURS if c != colour], 3)
        rng.shuffle(choices)
        evaluation.append({
            "instruction": EVAL_TEMPLATE.format(name=name),
            "input": "",
            "choices": choices,
            "answer": choices.index(colour),
            "output": colour,
        })
    return {"train": train, "validation": validation, "eval": evaluation}


def build_preference(n_entities: int, seed: int) -> dict[str, list[dict]]:
    """The demo's facts as preference pairs (train: each training phrasing; validation: the held-out phrasing,
    never trained on), and the same evaluation items as :func:`build`."""
    from gauntlet.prompting import format_prompt

    splits = build(n_entities, seed)
    rng = random.Random(seed + 1)

    def pairs(row: dict, k: int) -> list[dict]:
        wrong = rng.sample([c for c in COLOURS if c != row["output"]], k)
        return [{"prompt": format_prompt(row["instruction"], ""), "chosen": row["output"], "rejected": w}
                for w in wrong]

    # three wrong colours per training question: the pairs teach the fact, not one contrast
    train = [p for r in splits["train"] for p in pairs(r, PAIRS_PER_QUESTION)]
    rng.shuffle(train)
    return {"train": train, "validation": [p for r in splits["validation"] for p in pairs(r, 1)],
            "eval": splits["eval"]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo's synthetic train/validation/eval JSONL files.")
    parser.add_argument("--params", default="params.yaml", help="params file with a 'demo_data' section")
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--preference", action="store_true", help="preference pairs {prompt, chosen, rejected}")
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())["demo_data"]
    splits = (build_preference if args.preference else build)(int(params["n_entities"]), int(params["seed"]))
    for split, rows in splits.items():
        write_jsonl(Path(args.out) / f"{split}.jsonl", rows)
        print(f"wrote {len(rows)} rows to {Path(args.out) / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
