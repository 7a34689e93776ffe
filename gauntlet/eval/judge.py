"""The pairwise LLM judge: a candidate's answers against an opponent's (the champion, or the base model) on an
instruction set, judged in both orders; the candidate's win rate with its 95% interval.

- **Answers**: each model answers every instruction greedily (through its chat template when its tokenizer
  has one, else the alpaca prompt of training), ``max_new_tokens`` at most.
- **Both orders**: every pair is judged with the candidate as answer A, then as answer B. An item's score is
  the mean of the candidate's two outcomes (win 1, tie 0.5, loss 0), so a judge that always prefers one
  position scores every item 0.5: position bias cannot make a winner. **Order-swap consistency** is the share
  of items whose two verdicts name the same winner (or both a tie); the share of judgments that preferred
  the first answer is reported as ``first_position_rate``.
- **Judges**: a model run with transformers (:class:`ModelJudge`) is asked for the verdict directly: the prompt
  ends in ``Verdict:`` and ``A`` and ``B`` are scored by log-likelihood. Its margin ``log P(A) − log P(B)``
  carries the judge's position prior; the pair's two orders give it exactly (the mean of the two margins: the
  answers' own merits cancel in it) and it is removed before the verdict, so the counted verdicts of the two
  orders always agree and a margin within ``tie_margin`` is a tie. Consistency and the first-position rate
  are measured on the judge's own verdicts (the larger probability). An OpenAI-compatible endpoint
  (:class:`EndpointJudge`) writes its reasons and a ``Verdict:`` line, read as it stands.
- The prompt is a versioned file (``evals/judge/pairwise.md``); its sha256, the set's md5, the judge and the
  decoding are the protocol (:func:`judge_protocol`).

No Prefect here: the stage (tasks/judge.py) reads secrets and writes the artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

from gauntlet.config.judge import JudgeSpec
from gauntlet.eval.stats import interval
from gauntlet.files import write_text
from gauntlet.prompting import format_prompt
from gauntlet.refs import EvalReport, Ref, TaskResult, TaskScore

JUDGE_TASK = "judge_win_rate"       # the task name of the win rate in reports, gate rules and the leaderboard
WIN_RATE = "win_rate"
EMPTY = "(empty answer)"            # what the judge sees for an empty answer
VERDICT = re.compile(r"verdict\s*[:：]\s*\**\s*(A|B|tie)\b", re.IGNORECASE)
COMMENT = re.compile(r"<!--.*?-->\s*", re.DOTALL)

Outcome = Literal["candidate", "opponent", "tie"]


class JudgeError(RuntimeError):
    """The judge could not judge (an endpoint that does not answer, a reply without a verdict, a bad set)."""


class Judgment(Ref):
    order: Literal["candidate_first", "opponent_first"]
    winner: Outcome                  # the verdict counted (a model judge's with the pair's position prior removed)
    stated_winner: Outcome           # the judge's own verdict in this order (model judge: the larger probability)
    first_preferred: bool | None     # the judge's own verdict preferred answer A (None: a tie)
    margin: float | None = None      # model judge: log P(A) − log P(B), position prior not yet removed
    reason: str


class JudgedItem(Ref):
    id: str
    instruction: str
    candidate_answer: str
    opponent_answer: str
    judgments: list[Judgment]
    score: float                     # the candidate's mean outcome over both orders: 0, 0.25, …, 1
    consistent: bool                 # the judge's own verdicts in both orders named the same winner (or a tie)


class JudgeReport(Ref):
    candidate: str
    candidate_sha: str
    opponent: str
    opponent_sha: str
    opponent_role: str               # champion vN | base
    win_rate: float
    ci_low: float
    ci_high: float
    n: int
    wins: int                        # items the candidate won in both orders
    losses: int
    consistency: float               # share of items whose two verdicts agree
    first_position_rate: float       # share of decided judgments that preferred answer A
    position_prior: float | None     # model judge: the mean position prior removed (nats)
    protocol: dict
    items_path: str
    mlflow_run_id: str | None = None

    def text(self) -> str:
        return (f"win rate {self.win_rate:.1%} (95% CI {self.ci_low:.1%}…{self.ci_high:.1%}, n={self.n}) against "
                f"{self.opponent_role}; {self.wins} won / {self.losses} lost in both orders; order-swap "
                f"consistency {self.consistency:.0%}, first answer preferred in {self.first_position_rate:.0%}")


# ---------------------------------------------------------------------------------------------
# the set, the prompt, the protocol
# ---------------------------------------------------------------------------------------------


def file_md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def load_instructions(path: Path, limit: int | None = None) -> list[dict]:
    """Rows ``{"id", "instruction"}`` of a JSONL set (``id`` defaults to the line number)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise JudgeError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"]:
            raise JudgeError(f"{path}:{n}: each row needs a non-empty string field 'instruction'")
        rows.append({"id": str(row.get("id", n)), "instruction": row["instruction"]})
    if not rows:
        raise JudgeError(f"{path}: no instructions")
    return rows[:limit] if limit else rows


def prompt_template(path: Path) -> str:
    """The judge prompt without its leading comment; it must hold {instruction}, {answer_a} and {answer_b}."""
    text = COMMENT.sub("", Path(path).read_text(), count=1)
    missing = [f for f in ("{instruction}", "{answer_a}", "{answer_b}") if f not in text]
    if missing:
        raise JudgeError(f"judge prompt {path} lacks {missing}")
    return text


def judge_protocol(spec: JudgeSpec, prompt_path: Path, set_path: Path, judge_sha: str | None) -> dict:
    """What a win rate depends on: the judge (and its content hash), the prompt file's sha256, the set's md5,
    the answers' decoding. Two win rates are comparable only under the same protocol."""
    return {**spec.judge_identity(), "judge_sha": judge_sha,
            "prompt": spec.prompt, "prompt_sha256": hashlib.sha256(Path(prompt_path).read_bytes()).hexdigest(),
            "instructions": spec.instructions, "instructions_md5": file_md5(set_path), "limit": spec.limit,
            "decoding": "greedy", "max_new_tokens": spec.max_new_tokens, "tie_margin": spec.tie_margin,
            "orders": ["candidate_first", "opponent_first"]}


# ---------------------------------------------------------------------------------------------
# answers (transformers generate)
# ---------------------------------------------------------------------------------------------


def _load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.eval()
    return tokenizer, model


def chat_prompt(tokenizer, user: str) -> str:
    """``user`` as the model's own chat turn, or the alpaca prompt of training when it has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
    return format_prompt(user)


def generate_answers(model_path: str, instructions: Sequence[str], max_new_tokens: int, batch_size: int,
                     log: Callable[[str], None] = lambda _: None) -> list[str]:
    """Greedy answers of the model at ``model_path``, one per instruction."""
    import torch

    tokenizer, model = _load(model_path)
    answers: list[str] = []
    for i in range(0, len(instructions), batch_size):
        prompts = [chat_prompt(tokenizer, q) for q in instructions[i:i + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers += [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                    for row in out]
        log(f"answered {len(answers)}/{len(instructions)}")
    return answers


# ---------------------------------------------------------------------------------------------
# judges
# ---------------------------------------------------------------------------------------------


class Judge(Protocol):
    calibrated: bool   # True: judgments carry margins whose position prior is removed afterwards

    def judge(self, prompts: Sequence[str]) -> list[tuple[str | None, float | None, str]]:
        """(verdict "A" | "B" | "tie" | None when decided by margin, margin, reason) per prompt."""


class ModelJudge:
    """A local model asked for the verdict by log-likelihood: ``log P(" A") − log P(" B")`` after ``Verdict:``."""

    calibrated = True

    def __init__(self, model_path: str, batch_size: int = 8):
        self.model_path, self.batch_size = model_path, batch_size

    def judge(self, prompts: Sequence[str]) -> list[tuple[str | None, float | None, str]]:
        import torch

        tokenizer, model = _load(self.model_path)
        a, b = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" A", " B"))
        out: list[tuple[str | None, float | None, str]] = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [chat_prompt(tokenizer, p) + "Verdict:" for p in prompts[i:i + self.batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                last = model(**enc).logits[:, -1].float().log_softmax(-1)   # left-padded: -1 is the last token
            for row in last:
                margin = float(row[a] - row[b])
                out.append((None, margin, f"log P(A) - log P(B) = {margin:+.3f}"))
        return out


class EndpointJudge:
    """An OpenAI-compatible chat completions endpoint; the key is sent as a bearer token and never logged."""

    calibrated = False

    def __init__(self, base_url: str, model: str | None, api_key: str | None, max_tokens: int, timeout_s: float):
        self.base_url, self.model, self._key = base_url, model, api_key
        self.max_tokens, self.timeout_s = max_tokens, timeout_s

    def __repr__(self) -> str:   # never the key
        return f"EndpointJudge({self.base_url!r}, model={self.model!r})"

    def _ask(self, prompt: str) -> str:
        body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": self.max_tokens}
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
            return reply["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            raise JudgeError(f"judge endpoint {url} answered HTTP {e.code} {e.reason}. Fix: check "
                             "eval.judge.base_url, endpoint_model and the API key's variable or block") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            why = getattr(e, "reason", None) or e
            raise JudgeError(f"judge endpoint {url} did not answer ({type(why).__name__}: {why}) within "
                             f"{self.timeout_s:g}s. Fix: start it, or point eval.judge.base_url at one that "
                             "answers") from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"judge endpoint {url} sent no chat completion ({type(e).__name__}); is it "
                             "OpenAI-compatible?") from None

    def judge(self, prompts: Sequence[str]) -> list[tuple[str | None, float | None, str]]:
        out: list[tuple[str | None, float | None, str]] = []
        for prompt in prompts:
            reply = self._ask(prompt)
            found = VERDICT.findall(reply)
            verdict = found[-1].upper() if found else None
            out.append(("tie" if verdict in (None, "TIE") else verdict, None,
                        reply.strip() if found else f"no verdict line, counted a tie: {reply.strip()[:300]}"))
        return out


# ---------------------------------------------------------------------------------------------
# judging pairs in both orders
# ---------------------------------------------------------------------------------------------


def _winner(verdict: str, order: str) -> Outcome:
    if verdict == "tie":
        return "tie"
    candidate_is_a = order == "candidate_first"
    return "candidate" if (verdict == "A") == candidate_is_a else "opponent"


OUTCOME_SCORE = {"candidate": 1.0, "tie": 0.5, "opponent": 0.0}


def _margin(m: float | None) -> float:
    assert m is not None, "a judgment without a verdict has a margin (a calibrated judge gives every one a margin)"
    return m


def judge_pairs(judge: Judge, template: str, rows: Sequence[dict], candidate: Sequence[str],
                opponent: Sequence[str], tie_margin: float) -> tuple[list[JudgedItem], float | None]:
    """Every pair judged in both orders; (items, the position prior removed, for a calibrated judge)."""

    def show(s: str) -> str:
        return s if s.strip() else EMPTY

    orders = ("candidate_first", "opponent_first")
    prompts = []
    for row, mine, theirs in zip(rows, candidate, opponent, strict=True):
        for order in orders:
            a, b = (mine, theirs) if order == "candidate_first" else (theirs, mine)
            prompts.append(template.format(instruction=row["instruction"], answer_a=show(a), answer_b=show(b)))
    raw = judge.judge(prompts)
    stated = [v if v is not None else "tie" if margin == 0 else "A" if _margin(margin) > 0 else "B"
              for v, margin, _ in raw]
    counted = list(stated)
    reasons = [reason for _, _, reason in raw]
    priors = []
    if judge.calibrated:   # each pair's position prior (its two margins' mean) removed
        for i in range(0, len(raw), 2):
            prior = (_margin(raw[i][1]) + _margin(raw[i + 1][1])) / 2
            priors.append(prior)
            for k in (i, i + 1):
                centred = _margin(raw[k][1]) - prior
                counted[k] = "tie" if abs(centred) <= tie_margin else "A" if centred > 0 else "B"
                reasons[k] += (f"; the pair's position prior {prior:+.3f} removed: {centred:+.3f} "
                               f"(tie within ±{tie_margin:g}) → {counted[k]}")
    items = []
    for i, (row, mine, theirs) in enumerate(zip(rows, candidate, opponent, strict=True)):
        judgments = [Judgment(order=order, winner=_winner(counted[k], order), stated_winner=_winner(stated[k], order),
                              first_preferred=None if stated[k] == "tie" else stated[k] == "A",
                              margin=raw[k][1], reason=reasons[k])
                     for order, k in zip(orders, (2 * i, 2 * i + 1), strict=True)]
        score = sum(OUTCOME_SCORE[j.winner] for j in judgments) / 2
        items.append(JudgedItem(id=row["id"], instruction=row["instruction"], candidate_answer=mine,
                                opponent_answer=theirs, judgments=judgments, score=score,
                                consistent=judgments[0].stated_winner == judgments[1].stated_winner))
    mean_prior = math.fsum(priors) / len(priors) if priors else None
    return items, mean_prior


def summarize(items: Sequence[JudgedItem], prior: float | None, **fields) -> JudgeReport:
    """The win rate (mean item score) with its 95% interval, and the order-swap figures."""
    est = interval([it.score for it in items])
    decided = [j.first_preferred for it in items for j in it.judgments if j.first_preferred is not None]
    return JudgeReport(win_rate=est.value, ci_low=max(0.0, est.lo), ci_high=min(1.0, est.hi), n=est.n,
                       wins=sum(it.score == 1.0 for it in items), losses=sum(it.score == 0.0 for it in items),
                       consistency=sum(it.consistent for it in items) / len(items),
                       first_position_rate=sum(decided) / len(decided) if decided else 0.0,
                       position_prior=prior, **fields)


def write_items(items: Sequence[JudgedItem], path: Path) -> Path:
    """Per-item verdicts and the judge's reasons, one JSON line per item (the stage's artifact)."""
    write_text(path, "".join(it.model_dump_json() + "\n" for it in items))
    return path


# ---------------------------------------------------------------------------------------------
# the win rate in the evaluation report
# ---------------------------------------------------------------------------------------------


def as_task_result(judged: JudgeReport) -> TaskResult:
    """The win rate as one more task of the candidate's report (task ``judge_win_rate``, metric ``win_rate``,
    per-item scores keyed ``judge_win_rate/<id>``), so the gate, the registry's score tags, the summary and the
    leaderboard read it like any score."""
    items = [JudgedItem.model_validate_json(line) for line in Path(judged.items_path).read_text().splitlines()]
    score = TaskScore(task=JUDGE_TASK, metric=WIN_RATE, value=judged.win_rate, ci_low=judged.ci_low,
                      ci_high=judged.ci_high, n=judged.n)
    return TaskResult(task=JUDGE_TASK, engine_task="pairwise-judge", source="judge", metric=WIN_RATE,
                      value=judged.win_rate, random_baseline=0.5, random_baseline_source="a tie on every item",
                      scores=[score], versions={JUDGE_TASK: judged.protocol["prompt_sha256"][:12]}, num_fewshot=0,
                      n_samples={JUDGE_TASK: judged.n},
                      item_scores={WIN_RATE: {f"{JUDGE_TASK}/{it.id}": it.score for it in items}},
                      effective={JUDGE_TASK: {**judged.protocol, "opponent": judged.opponent_role,
                                              "consistency": judged.consistency}},
                      results_path=judged.items_path, samples_path=judged.items_path)


def with_results(report: EvalReport, results: Sequence[TaskResult]) -> EvalReport:
    """``report`` with ``results`` added (a task of the same name replaced)."""
    names = {r.task for r in results}
    return report.model_copy(update={
        "task_results": [r for r in report.task_results if r.task not in names] + list(results),
        "scores": [s for s in report.scores if s.task not in names] + [s for r in results for s in r.scores]})
