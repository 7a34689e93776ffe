"""The one prompt format of training and evaluation (alpaca style).

The evaluation task YAMLs in ``evals/`` spell the same template in Jinja; a test checks they agree.
"""

from __future__ import annotations

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def format_prompt(instruction: str, input: str = "") -> str:
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)
