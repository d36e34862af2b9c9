"""Rewards for RIFT: a verifier says correct or not, then r = r_pos if correct else r_neg.

Reward kinds (:class:`RewardSpec`):

- ``"math"``: symbolic answer checking with math-verify 0.9.0 (see :func:`math_is_correct`);
- ``"exact"``: normalised string equality of the final answer (see :func:`exact_match_is_correct`);
- ``"function"``: a user function named by a dotted path ``"my_pkg.rewards:score"`` with the
  signature ``score(prompt: str, response: str, answer: str) -> bool | float``. A ``bool`` is mapped
  like the built-in kinds (``r_pos`` / ``r_neg``); any other real number is used as the reward
  as is and counts as correct when it is > 0. A non-finite number, a value of another type or an
  exception scores ``r_neg`` with the problem recorded in :attr:`RewardResult.error`.

Model text is untrusted. Verification runs in worker processes with a per-sample wall-clock limit
(:class:`~rift_megatron.rollout.verifier_pool.VerifierPool`); :func:`score_sample` here is the
in-process, unlimited version (tests, trusted input). Nothing in this module passes model text to
``eval``/``exec``/``sympify``/``parse_expr``: math-verify's ``ExprExtractionConfig`` parses plain-text
expressions with ``sympy.parse_expr`` (which is ``eval`` based), so it is never used; only
``LatexExtractionConfig`` (an ANTLR LaTeX grammar building SymPy objects directly) is, and plain
numbers such as "The answer is 12" are found by our own regex and handed to the LaTeX parser.
latex2sympy's number tokens would go through ``sympy.Number(str)`` (``sympify``, hence ``eval``);
those two call sites are redirected to an eval-free constructor when math-verify is first loaded
(:func:`_install_number_parsing_without_eval`).

Defaults r_pos = +1.0, r_neg = -0.2 come from docs/objective.md ("Rewards").
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger(__name__)

REWARD_KINDS = ("math", "exact", "function")


# ----------------------------------------------------------------------------------------------
# Configuration and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardSpec:
    """How samples are scored.

    ``kind``: one of :data:`REWARD_KINDS`; ``function``: dotted path ``"pkg.module:callable"``
    (only with ``kind="function"``); ``r_pos`` / ``r_neg``: rewards of a correct / incorrect sample;
    ``timeout_s``: wall-clock limit per sample in the verifier pool; ``workers``: pool processes;
    ``memory_limit_mb``: address-space cap (RLIMIT_AS) of each worker, ``None`` for no cap.
    """

    kind: str = "math"
    function: str | None = None
    r_pos: float = 1.0
    r_neg: float = -0.2
    timeout_s: float = 5.0
    workers: int = 2
    memory_limit_mb: int | None = 4096

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            valid = ", ".join(repr(k) for k in REWARD_KINDS)
            hint = " (a dotted path goes in `function` with kind='function')" if ":" in str(self.kind) else ""
            raise ValueError(f"unknown reward kind {self.kind!r}; valid kinds: {valid}{hint}")
        if self.kind == "function":
            if not self.function:
                raise ValueError("reward kind 'function' needs `function`, a dotted path like 'my_pkg.rewards:score'")
            load_reward_function(self.function)  # fail early, naming the path
        elif self.function is not None:
            raise ValueError(f"reward `function` {self.function!r} is only used with kind='function' (kind is {self.kind!r})")
        for name in ("r_pos", "r_neg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"reward {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, numbers.Real) or not (
            math.isfinite(self.timeout_s) and self.timeout_s > 0
        ):
            raise ValueError(f"reward timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"reward workers must be an integer >= 1, got {self.workers!r}")
        if self.memory_limit_mb is not None and (
            isinstance(self.memory_limit_mb, bool) or not isinstance(self.memory_limit_mb, int) or self.memory_limit_mb < 256
        ):
            raise ValueError(f"reward memory_limit_mb must be an integer >= 256 or None, got {self.memory_limit_mb!r}")


@dataclass(frozen=True)
class RewardResult:
    """The score of one sample. ``timed_out``: verification exceeded the limit (then incorrect);
    ``error``: why a sample was scored ``r_neg`` other than a plain wrong answer, else ``None``."""

    reward: float
    correct: bool
    timed_out: bool = False
    error: str | None = None


def load_reward_function(path: str) -> Callable[..., object]:
    """Import ``"pkg.module:attr"`` (``attr`` may be dotted) and return it; ValueError naming it."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"reward function {path!r}: expected a dotted path 'package.module:function'")
    module_name, attr_path = path.split(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward function {path!r}: expected a dotted path 'package.module:function'")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"reward function {path!r}: {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise ValueError(f"reward function {path!r} is not callable (it is a {type(obj).__name__})")
    return obj


# ----------------------------------------------------------------------------------------------
# Answer extraction (pure regex / linear scans: safe on untrusted text)
# ----------------------------------------------------------------------------------------------

_BRACE_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")


def last_boxed_content(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` / ``\\fbox{...}`` (the one whose closing brace
    comes last), stripped; ``None`` if there is none. Escaped ``\\{ \\}`` do not count. Linear time."""
    stack: list[tuple[bool, int]] = []
    best: tuple[int, int] | None = None
    for m in _BRACE_TOKEN.finditer(text):
        token = m.group()
        if token == "}":
            if stack:
                is_boxed, start = stack.pop()
                if is_boxed:
                    best = (start, m.start())
        elif token != "\\{" and token != "\\}":
            stack.append((token != "{", m.end()))
    return None if best is None else text[best[0] : best[1]].strip()


_ANSWER_PREFIX = re.compile(
    r"^(?:#{2,}\s*|\**\s*(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*\**\s*[:=]?\s*\**\s*)", re.IGNORECASE
)


def extract_final_answer(response: str) -> str:
    """The final answer as text: the last ``\\boxed{}`` content if any; else the last non-empty line
    without a leading ``####`` / "The (final) answer is" / "Answer:" and without surrounding ``$``,
    ``**`` or a trailing period. Used by the exact-match reward and as a majority-vote key."""
    boxed = last_boxed_content(response)
    if boxed is not None:
        return boxed
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    if not lines:
        return ""
    last = _ANSWER_PREFIX.sub("", lines[-1], count=1).strip()
    last = last.rstrip(".").strip().strip("*").strip()
    if len(last) >= 2 and last.startswith("$") and last.endswith("$"):
        last = last.strip("$").strip()
    return last


def _normalize_exact(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_match_is_correct(response: str, answer: str) -> bool:
    """``extract_final_answer(response) == answer`` after collapsing whitespace runs to one space,
    stripping both ends and case-folding both sides. No other normalisation (``1/2`` != ``0.5``)."""
    try:
        return _normalize_exact(extract_final_answer(response)) == _normalize_exact(answer) != ""
    except Exception:
        return False


# A number: 1,234,567.5 / 12 / 3.75 / .5 ; an expression: numbers joined by + - * / ^ ** x ÷, then %.
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_PLAIN_EXPR = re.compile(rf"-?(?:{_NUM})(?:[ \t]*(?:\*\*|[-+*/^×÷])[ \t]*-?(?:{_NUM}))*(?:[ \t]*%)?")
_PLAIN_ANCHOR = re.compile(r"(?:^|\n)[ \t]*#{2,}[ \t]*([^\n]*)|(?i:answer)(?:[ \t]+is)?[ \t]*\**[ \t]*[:=]?([^\n]*)")


def _plain_expr_to_latex(expr: str) -> str:
    expr = re.sub(r"(?<=\d),(?=\d{3})", "", expr).replace("**", "^")
    expr = re.sub(r"\^[ \t]*(-?[\d.]+)", r"^{\1}", expr)
    return expr.replace("×", r"\times ").replace("÷", r"\div ").replace("%", r"\%")


def _anchored_plain_answer(response: str) -> str | None:
    """First plain number/expression after the last "answer (is):" or ``####`` anchor."""
    last = None
    for last in _PLAIN_ANCHOR.finditer(response):
        pass
    if last is None:
        return None
    m = _PLAIN_EXPR.search(last.group(1) if last.group(1) is not None else last.group(2))
    return None if m is None else m.group()


def _last_plain_expr(response: str) -> str | None:
    last = None
    for last in _PLAIN_EXPR.finditer(response):
        pass
    return None if last is None else last.group()


# ----------------------------------------------------------------------------------------------
# math-verify
# ----------------------------------------------------------------------------------------------


_INT_LITERAL = re.compile(r"[+-]?\d+")
_FLOAT_LITERAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _number_without_eval(value):
    """``sympy.Number`` for a numeric literal without going through ``sympify``/``parse_expr``
    (``eval``): ``Integer(int(s))`` or ``Float(s)`` (mpmath's ``from_str``); same values and precision."""
    import sympy

    if not isinstance(value, str):
        return sympy.Number(value)
    text = value.strip()
    if _INT_LITERAL.fullmatch(text):
        return sympy.Integer(int(text))
    if _FLOAT_LITERAL.fullmatch(text):
        return sympy.Float(text)
    raise ValueError(f"not a numeric literal: {text[:40]!a}")


def _install_number_parsing_without_eval() -> None:
    """latex2sympy2_extended 1.11 turns every NUMBER token into ``sympy.Number(token_text)``, and
    ``Number(str)`` calls ``sympify`` -> ``parse_expr`` -> ``eval``. The token text is only digits,
    so names and calls can't get through, but we don't let any model-derived text reach ``eval`` at all:
    the two call sites (``_Latex2Sympy.parse_number`` and the module-level ``Number`` used by
    ``convert_number``, plus math-verify's ``Number`` of the unused plain-expression path) are routed
    to :func:`_number_without_eval`. Checked by ``test_no_eval_based_parser_on_any_path``."""
    import latex2sympy2_extended.latex2sympy2 as l2s
    import math_verify.parser as mv_parser

    if getattr(l2s, "_rift_no_eval_numbers", False):
        return
    if not hasattr(l2s._Latex2Sympy, "parse_number") or not hasattr(l2s, "Number"):
        raise RuntimeError("latex2sympy2_extended changed: update _install_number_parsing_without_eval")

    def parse_number(self, text):  # same as 1.11's, minus the eval
        text = text.replace(",", "")
        if text.isdigit():
            text = text.lstrip("0") or "0"
        return _number_without_eval(text)

    l2s._Latex2Sympy.parse_number = parse_number
    l2s.Number = _number_without_eval
    mv_parser.Number = _number_without_eval
    l2s._rift_no_eval_numbers = True


@lru_cache(maxsize=1)
def _math_verify():
    """(parse, verify, boxed-or-anchored config, anchored-only config, anywhere config)."""
    from math_verify import LatexExtractionConfig, parse, verify

    _install_number_parsing_without_eval()
    return (
        parse,
        verify,
        LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0),
        LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=-1),
        LatexExtractionConfig(try_extract_without_anchor=True, boxed_match_priority=-1),
    )


def _parse(text: str, config) -> list:
    # parsing_timeout=None: math-verify's own limit is signal.alarm (main thread only); the
    # verifier pool enforces the limit by killing the worker process instead.
    return _math_verify()[0](text, [config], parsing_timeout=None)


def _has_math(parsed: list) -> bool:
    return any(not isinstance(item, str) for item in parsed)


def _parse_span(span: str) -> list:
    """Parse a bare answer (``3/4``, ``\\frac{1}{2}``, ``[1,3)``) as if it were boxed."""
    boxed_config = _math_verify()[2]
    return _parse("\\boxed{" + span.replace("\n", " ") + "}", boxed_config)


def _parse_gold(answer: str) -> list:
    boxed = last_boxed_content(answer)
    span = boxed if boxed is not None else answer.strip().strip("$").strip()
    parsed = _parse_span(span) if span else []
    if not _has_math(parsed):
        anywhere = _parse(answer, _math_verify()[4])
        if _has_math(anywhere):
            return anywhere
        plain = _last_plain_expr(answer)
        if plain is not None:
            anywhere = _parse_span(_plain_expr_to_latex(plain))
            if _has_math(anywhere):
                return anywhere
    return parsed


def _parse_prediction(response: str) -> list:
    """The model's answer, by preference: the last ``\\boxed{}`` (whatever it holds); LaTeX after an
    "answer" anchor ("The final answer is $x$"); a plain number/expression after an anchor ("The
    answer is 12", ``#### 12``); the last LaTeX math anywhere; the last plain number anywhere."""
    boxed = last_boxed_content(response)
    if boxed is not None:
        return _parse_span(boxed)
    _, _, _, anchored_config, anywhere_config = _math_verify()
    parsed = _parse(response, anchored_config)
    if _has_math(parsed):
        return parsed
    plain = _anchored_plain_answer(response)
    if plain is not None:
        parsed = _parse_span(_plain_expr_to_latex(plain))
        if _has_math(parsed):
            return parsed
    parsed = _parse(response, anywhere_config)
    if _has_math(parsed):
        return parsed
    plain = _last_plain_expr(response)
    return [] if plain is None else _parse_span(_plain_expr_to_latex(plain))


def _math_verdict(response: str, answer: str) -> tuple[bool, str | None]:
    """(correct, note); note says when the gold answer itself could not be parsed."""
    gold = _parse_gold(answer)
    if not gold:
        return False, f"gold answer could not be parsed: {answer[:200]!a}"
    pred = _parse_prediction(response)
    if not pred:
        return False, None
    return bool(_math_verify()[1](gold, pred, timeout_seconds=None)), None


def math_is_correct(response: str, answer: str) -> bool:
    """Whether the response's final answer equals the gold ``answer`` mathematically (math-verify:
    ``\\frac{1}{2}`` = ``0.5``, ``2\\sqrt{2}`` = ``\\sqrt{8}``, sets ignore order, intervals keep their
    brackets, ``x=3`` matches ``3``, units in ``\\text{}`` are dropped, ``50\\%`` matches both ``50`` and
    ``0.5``). The last ``\\boxed{}`` wins when there are several (math-verify alone would join nearby
    boxes into a set). Any error counts as incorrect. No time limit here: run untrusted text in
    :class:`~rift_megatron.rollout.verifier_pool.VerifierPool`."""
    try:
        return _math_verdict(response, answer)[0]
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# Scoring one sample (in the calling process)
# ----------------------------------------------------------------------------------------------

_FUNCTION_CACHE: dict[str, Callable[..., object]] = {}


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]!a}"


def _user_reward(spec: RewardSpec, value: object) -> RewardResult:
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_ is no bool subclass
        return RewardResult(spec.r_pos if value else spec.r_neg, bool(value))
    if isinstance(value, numbers.Real):
        reward = float(value)
        if math.isfinite(reward):
            return RewardResult(reward, reward > 0.0)
        return RewardResult(spec.r_neg, False, error=f"reward function {spec.function} returned {reward}")
    return RewardResult(
        spec.r_neg, False, error=f"reward function {spec.function} returned a {type(value).__name__}, not a bool or number"
    )


def score_sample(spec: RewardSpec, prompt: str, response: str, answer: str) -> RewardResult:
    """Score one sample in this process, without a time limit. Never raises."""
    try:
        if not isinstance(response, str) or not isinstance(answer, str):
            raise TypeError(f"response and answer must be str, got {type(response).__name__} and {type(answer).__name__}")
        if spec.kind == "function":
            fn = _FUNCTION_CACHE.get(spec.function)
            if fn is None:
                fn = _FUNCTION_CACHE[spec.function] = load_reward_function(spec.function)
            return _user_reward(spec, fn(prompt, response, answer))
        if spec.kind == "exact":
            correct, note = exact_match_is_correct(response, answer), None
        else:
            correct, note = _math_verdict(response, answer)
        return RewardResult(spec.r_pos if correct else spec.r_neg, correct, error=note)
    except Exception as exc:
        return RewardResult(spec.r_neg, False, error=_error_text(exc))


# ----------------------------------------------------------------------------------------------
# Evaluation helpers
# ----------------------------------------------------------------------------------------------


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n
    samples drawn without replacement include a correct one. Exact integer binomials."""
    n, c = num_samples, num_correct
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError("pass_at_k takes integers")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(keys: Iterable[Hashable | None]) -> Hashable | None:
    """The most frequent non-``None`` key (ties: the one seen first); ``None`` if there is none.
    For majority@k, key each response by e.g. :func:`extract_final_answer` and check the winner."""
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return None
    return max(counts, key=counts.__getitem__)  # max keeps the first of equal counts (insertion order)
