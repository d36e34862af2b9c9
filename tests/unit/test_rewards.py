"""Rewards: math-verify answer checking, exact match, r_pos/r_neg mapping, user functions, and the
time-limited verifier pool on pathological model output (real math-verify, real processes)."""

from __future__ import annotations

import itertools
import math
import os
import time
import tempfile
from pathlib import Path
import uuid

import pytest

from rift_megatron.rollout.rewards import (
    RewardResult,
    RewardSpec,
    exact_match_is_correct,
    extract_final_answer,
    last_boxed_content,
    majority_vote,
    math_is_correct,
    pass_at_k,
    score_sample,
)
from rift_megatron.rollout.verifier_pool import VerifierPool

LIMIT_S = 2.0  # per-sample limit used by the pools here
# Bounded time is asserted through the pool's own counters (a sample over the limit is timed out,
# its worker killed and replaced: `timeouts` / `restarts`), never through elapsed wall-clock time,
# which depends on the machine and its load. A pool that failed to enforce the limit would hang
# the test until pytest's --timeout.

# ------------------------------------------------------------------------------------------------
# User reward functions, referenced by dotted path "tests.unit.test_rewards:<name>"
# ------------------------------------------------------------------------------------------------

NOT_CALLABLE = 42
BEHAVIOURS = {"true", "false", "float", "int", "nan", "inf", "str", "none", "raise", "exit", "sleep"}


def my_score(prompt: str, response: str, answer: str) -> bool:
    """Correct when the response ends with the answer."""
    return response.strip().endswith(answer)


def my_float_score(prompt: str, response: str, answer: str) -> float:
    return 0.25 * len(response.split())


def behaviour_score(prompt: str, response: str, answer: str):
    """Does what the prompt says (to test every kind of return / failure in one pool)."""
    if prompt not in BEHAVIOURS:
        os._exit(7)  # the pool must never call the function on anything but our samples
    if prompt == "true":
        return True
    if prompt == "false":
        return False
    if prompt == "float":
        return float(answer)
    if prompt == "int":
        return 3
    if prompt == "nan":
        return float("nan")
    if prompt == "inf":
        return float("inf")
    if prompt == "str":
        return "yes"
    if prompt == "raise":
        raise RuntimeError("user reward blew up")
    if prompt == "exit":
        os._exit(3)
    if prompt == "sleep":
        time.sleep(60)
    return None


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_pool():
    with VerifierPool(RewardSpec(kind="math", timeout_s=LIMIT_S, workers=2)) as pool:
        pool.wait_ready()
        yield pool


@pytest.fixture(scope="module")
def function_pool():
    spec = RewardSpec(kind="function", function="tests.unit.test_rewards:behaviour_score", timeout_s=LIMIT_S, workers=2)
    with VerifierPool(spec) as pool:
        pool.wait_ready()
        yield pool


# ------------------------------------------------------------------------------------------------
# Math answers: a table of real formats
# ------------------------------------------------------------------------------------------------

MATH_TABLE = [
    # (response, gold, expected)
    (r"So the probability is $\boxed{\frac{1}{2}}$.", "0.5", True),
    (r"The answer is \boxed{3}.", "3", True),
    (r"\boxed{\dfrac{3}{4}}", "3/4", True),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", True),
    (r"\boxed{0.75}", r"\frac34", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{x^2+2x+2}", "(x+1)^2", False),
    (r"\boxed{12\text{ cm}}", "12", True),  # units in \text{} are dropped
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{\$5}", "5", True),
    # Percent (math-verify's rule, kept): 50\% equals both 50 and 0.5.
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{50\%}", "0.5", True),
    (r"\boxed{[1,3)}", "[1,3)", True),
    (r"\boxed{(1,3]}", "[1,3)", False),  # intervals keep their brackets
    (r"\boxed{-7}", "-7", True),
    (r"\boxed{7}", "-7", False),
    (r"\boxed{2,1}", "1,2", True),  # sets ignore order
    (r"\boxed{\{1, 2\}}", "1,2", True),
    (r"\boxed{1,2,3}", "1,2", False),
    (r"\boxed{1{,}234}", "1234", True),
    (r"\boxed{x=3}", "3", True),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    (r"\boxed{\text{(B)}}", "B", True),
    (r"\boxed{4}", "3", False),
    (r"First I thought \boxed{3}, but then \boxed{4}.", "4", True),  # the last box wins
    (r"First I thought \boxed{3}, but then \boxed{4}.", "3", False),
    (r"\boxed{\frac{1}{\boxed{2}}} is wrong; \boxed{5}", "5", True),
    ("I am not sure how to solve this.", "3", False),  # no answer at all
    ("", "3", False),
    (r"\boxed{}", "3", False),
    ("The answer is 42", "42", True),
    ("The answer is 42.", "41", False),
    ("We get $2+2=4$ apples per box, so the answer is 42 apples.", "42", True),
    ("Natalia sold 48 clips in April.\n#### 1,234", "1234", True),
    ("Answer: 3/4", r"\frac{3}{4}", True),
    ("The answer is 2^10", "1024", True),
    ("The final answer is $\\frac{\\pi}{2}$. I hope it is correct.", r"\pi/2", True),
    ("so $x = \\frac{1}{2}$", "1/2", True),
    ("The answer is 0.5", r"\boxed{\frac{1}{2}}", True),  # a boxed gold is unwrapped
]


@pytest.mark.parametrize(("response", "gold", "expected"), MATH_TABLE)
def test_math_answer_table(response, gold, expected):
    assert math_is_correct(response, gold) is expected


def test_math_table_through_the_pool_matches(math_pool):
    results = math_pool.score_all([("", response, gold) for response, gold, _ in MATH_TABLE])
    assert [r.correct for r in results] == [expected for _, _, expected in MATH_TABLE]
    assert [r.reward for r in results] == [1.0 if expected else -0.2 for _, _, expected in MATH_TABLE]
    assert not any(r.timed_out for r in results)


def test_last_boxed_content():
    assert last_boxed_content(r"\boxed{1} and \boxed{\frac{a}{b}}") == r"\frac{a}{b}"
    assert last_boxed_content(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces do not count
    assert last_boxed_content(r"\boxed {7} then \boxed{8") == "7"  # unclosed box ignored
    assert last_boxed_content(r"\fbox{9}") == "9"
    assert last_boxed_content("no box {here}") is None


# ------------------------------------------------------------------------------------------------
# Exact match
# ------------------------------------------------------------------------------------------------

EXACT_TABLE = [
    (r"\boxed{Paris}", "Paris", True),
    (r"The capital is \boxed{ paris }.", "PARIS", True),
    ("Let me think.\nThe answer is Paris.", "Paris", True),
    ("Reasoning...\n**Final Answer:** New   York", "new york", True),
    ("work\n#### 72", "72", True),
    ("Answer: $42$", "42", True),
    ("The answer is 42", "42.0", False),  # no numeric normalisation
    (r"\boxed{1/2}", "0.5", False),
    ("Paris is nice.\nBut I'd say London", "Paris", False),  # only the last line counts
    (r"\boxed{Rome} ... \boxed{Paris}", "Paris", True),
    ("", "", False),  # an empty gold never matches
    ("", "Paris", False),
]


@pytest.mark.parametrize(("response", "gold", "expected"), EXACT_TABLE)
def test_exact_match_table(response, gold, expected):
    assert exact_match_is_correct(response, gold) is expected


def test_extract_final_answer():
    assert extract_final_answer("blah\nThe final answer is 12.") == "12"
    assert extract_final_answer(r"x \boxed{a+b} y") == "a+b"
    assert extract_final_answer("\n\n") == ""


# ------------------------------------------------------------------------------------------------
# Reward mapping and user functions
# ------------------------------------------------------------------------------------------------


def test_reward_mapping_defaults_and_custom():
    default = RewardSpec()
    assert (default.r_pos, default.r_neg) == (1.0, -0.2)
    assert score_sample(default, "", r"\boxed{3}", "3") == RewardResult(1.0, True)
    assert score_sample(default, "", r"\boxed{4}", "3") == RewardResult(-0.2, False)
    custom = RewardSpec(kind="exact", r_pos=2.5, r_neg=-1.0)
    assert score_sample(custom, "", r"\boxed{x}", "X") == RewardResult(2.5, True)
    assert score_sample(custom, "", r"\boxed{y}", "X") == RewardResult(-1.0, False)
    assert score_sample(RewardSpec(r_neg=0.0), "", "nothing", "3") == RewardResult(0.0, False)


def test_unparseable_gold_is_recorded():
    result = score_sample(RewardSpec(), "", r"\boxed{3}", "")
    assert result.reward == -0.2 and not result.correct and "gold answer" in result.error


def test_user_function_in_process():
    spec = RewardSpec(kind="function", function="tests.unit.test_rewards:my_score", r_pos=1.5, r_neg=-0.5)
    assert score_sample(spec, "p", "so it is 7", "7") == RewardResult(1.5, True)
    assert score_sample(spec, "p", "so it is 8", "7") == RewardResult(-0.5, False)
    spec = RewardSpec(kind="function", function="tests.unit.test_rewards:my_float_score")
    assert score_sample(spec, "p", "a b c", "x") == RewardResult(0.75, True)  # floats used as is
    assert score_sample(spec, "p", "", "x") == RewardResult(0.0, False)


@pytest.mark.parametrize(
    ("prompt", "answer", "reward", "correct", "error"),
    [
        ("true", "0", 1.0, True, None),
        ("false", "0", -0.2, False, None),
        ("float", "-0.7", -0.7, False, None),
        ("float", "3.5", 3.5, True, None),
        ("int", "0", 3.0, True, None),
        ("nan", "0", -0.2, False, "returned nan"),
        ("inf", "0", -0.2, False, "returned inf"),
        ("str", "0", -0.2, False, "returned a str"),
        ("none", "0", -0.2, False, "returned a NoneType"),
        ("raise", "0", -0.2, False, "user reward blew up"),
    ],
)
def test_user_function_returns_in_pool(function_pool, prompt, answer, reward, correct, error):
    (result,) = function_pool.score_all([(prompt, "response", answer)])
    assert result.reward == pytest.approx(reward) and result.correct is correct and not result.timed_out
    if error is None:
        assert result.error is None
    else:
        assert error in result.error


def test_pool_empty_batch_and_closed(function_pool):
    assert function_pool.score_all([]) == []
    pool = VerifierPool(RewardSpec(kind="exact", workers=1))
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score_all([("", "a", "a")])


def test_user_function_crash_and_hang_cost_one_sample(function_pool):
    items = [("true", "r", "0"), ("exit", "r", "0"), ("sleep", "r", "0"), ("float", "r", "2.0"), ("true", "r", "0")]
    function_pool.wait_ready()
    timeouts, restarts = function_pool.timeouts, function_pool.restarts
    results = function_pool.score_all(items)
    assert results[0] == RewardResult(1.0, True)
    assert not results[1].correct and results[1].reward == -0.2 and "worker died" in results[1].error
    assert results[2].timed_out and results[2].reward == -0.2 and not results[2].correct
    assert results[3] == RewardResult(2.0, True) and results[4] == RewardResult(1.0, True)
    # the hang was cut at the limit (one timeout) and both lost workers were replaced
    assert function_pool.timeouts == timeouts + 1 and function_pool.restarts == restarts + 2


# ------------------------------------------------------------------------------------------------
# RewardSpec validation
# ------------------------------------------------------------------------------------------------


def test_spec_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown reward kind 'maths'.*'math', 'exact', 'function'"):
        RewardSpec(kind="maths")
    with pytest.raises(ValueError, match="dotted path goes in `function`"):
        RewardSpec(kind="my_pkg.rewards:score")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_pkg_xyz.rewards:score", r"'no_such_pkg_xyz.rewards:score': cannot import module 'no_such_pkg_xyz.rewards'"),
        ("tests.unit.test_rewards:missing_fn", r"'tests.unit.test_rewards:missing_fn': .* has no attribute 'missing_fn'"),
        ("tests.unit.test_rewards:NOT_CALLABLE", r"'tests.unit.test_rewards:NOT_CALLABLE' is not callable"),
        ("tests.unit.test_rewards.my_score", "expected a dotted path 'package.module:function'"),
    ],
)
def test_spec_bad_function_path(path, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec(kind="function", function=path)


def test_spec_other_validation():
    with pytest.raises(ValueError, match="needs `function`"):
        RewardSpec(kind="function")
    with pytest.raises(ValueError, match="only used with kind='function'"):
        RewardSpec(kind="math", function="tests.unit.test_rewards:my_score")
    for field in ("r_pos", "r_neg"):
        for bad in (float("nan"), float("inf"), "1.0", True):
            with pytest.raises(ValueError, match=f"reward {field} must be a finite number"):
                RewardSpec(**{field: bad})
    with pytest.raises(ValueError, match="timeout_s"):
        RewardSpec(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        RewardSpec(workers=0)
    assert RewardSpec(r_pos=2, r_neg=-1).r_pos == 2.0


# ------------------------------------------------------------------------------------------------
# Pathological model output: each costs at most the limit and scores incorrect
# ------------------------------------------------------------------------------------------------

DEPTH = 500
PATHOLOGICAL = {
    "power_tower_python": r"\boxed{9**9**9**9}",
    "power_tower_plain_text": "The answer is 9**9**9**9",
    "power_tower_latex": r"\boxed{10^{10^{10^{10}}}}",  # burns math-verify's full default 5 s
    "unclosed_boxed_100k": "\\boxed{" + "1" * 100_000,
    "closed_boxed_100k_sum": "\\boxed{" + "1+" * 50_000 + "1}",
    "closed_boxed_100k_digits": "\\boxed{" + "7" * 100_000 + "}",
    "many_unclosed_boxed": "\\boxed{" * 15_000,
    "nested_frac_500": "\\boxed{" + "\\frac{" * DEPTH + "1" + "}{2}" * DEPTH + "}",
    "nested_braces_500": "\\boxed{" + "{" * DEPTH + "3" + "}" * DEPTH + "}",
    "nested_parens_500": "$" + "(" * DEPTH + "3" + ")" * DEPTH + "$",
    "lone_surrogates_and_controls": "The answer is \ud800\udfff\x00\x01\x1b[31m \\boxed{\ud800 3\udc00}\x7f",
    "dollars_100k": "$" * 100_000,
    "plain_sum_120k": "1 + " * 30_000,
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_answer_bounded_and_incorrect(math_pool, name):
    timeouts, restarts = math_pool.timeouts, math_pool.restarts
    (result,) = math_pool.score_all([("", PATHOLOGICAL[name], "3")])
    assert result.reward == -0.2 and result.correct is False
    # either verified within the limit, or cut at it (counted) and its worker replaced
    cut = int(result.timed_out)
    assert math_pool.timeouts == timeouts + cut and math_pool.restarts >= restarts + cut, (name, result)
    # The pool still works right after (a timed-out worker has been replaced).
    (normal,) = math_pool.score_all([("", r"The answer is \boxed{\frac{6}{2}}.", "3")])
    assert normal == RewardResult(1.0, True)


def test_pathological_batch_is_not_stalled(math_pool):
    """Two hanging samples among normal ones: every normal one is scored, total time bounded."""
    hang = PATHOLOGICAL["power_tower_latex"]
    items = [("", hang, "3"), ("", hang, "3")] + [("", rf"\boxed{{{i}}}", str(i)) for i in range(10)]
    math_pool.wait_ready()
    timeouts, restarts = math_pool.timeouts, math_pool.restarts
    results = math_pool.score_all(items)
    assert [r.timed_out for r in results[:2]] == [True, True]
    assert all(r == RewardResult(1.0, True) for r in results[2:])
    # 2 workers: both hang, are cut at the limit and replaced; then the easy ones are scored
    assert math_pool.timeouts == timeouts + 2 and math_pool.restarts >= restarts + 2


# ------------------------------------------------------------------------------------------------
# No eval of model output
# ------------------------------------------------------------------------------------------------


def _payloads(marker: str) -> list[str]:
    cmd = f"touch {marker}"
    return [
        rf"\boxed{{__import__('os').system('{cmd}')}}",
        f"Let me compute.\nThe answer is __import__(\"os\").system(\"{cmd}\")",
        f'__import__("os").system("{cmd}")',
        f"$__import__('os').system('{cmd}')$",
        f"The answer is (lambda: __import__('os').system('{cmd}'))()",
    ]


@pytest.mark.parametrize("kind", ["math", "exact"])
def test_no_eval_of_model_output_in_pool(kind, math_pool):
    # The gold answer is what os.system returns (0), so an evaluated payload would score correct.
    # The marker path must contain no digit, or the plain-number fallback could read a "0" out of
    # the path itself and score the payload correct without any evaluation.
    letters = uuid.uuid4().hex.translate(str.maketrans("0123456789", "ghijklmnop"))
    marker = Path(tempfile.gettempdir()) / f"rift-no-eval-{letters}"
    assert not any(ch.isdigit() for ch in str(marker))
    items = [("", payload, "0") for payload in _payloads(str(marker))]
    if kind == "math":
        results = math_pool.score_all(items)
    else:
        with VerifierPool(RewardSpec(kind="exact", timeout_s=LIMIT_S, workers=1)) as pool:
            results = pool.score_all(items)
    assert not marker.exists()
    assert not any(r.correct for r in results)


def test_no_eval_based_parser_on_any_path(monkeypatch, tmp_path):
    """SymPy's ``eval_expr`` (the ``eval`` behind ``sympify``/``parse_expr`` of strings) and the
    ``parse_expr`` names math-verify / latex2sympy hold are trapped while scoring: never called."""
    import latex2sympy2_extended.latex2sympy2 as l2s
    import math_verify.parser as mv_parser
    import sympy
    import sympy.parsing.sympy_parser as sympy_parser

    # Warm up every lazily imported part first (units, sets, intervals): SymPy's own import-time
    # sympify calls on its constants ("yotta", ...) are not model text and not ours.
    for warm_up in (r"\boxed{1}", r"\boxed{12\text{ cm}}", r"\boxed{50\%}", r"\boxed{[1, 2)}", r"\boxed{1,2}"):
        math_is_correct(warm_up, "1")
    calls = []

    def trap(*args, **kwargs):
        calls.append(args[0] if args else kwargs)
        raise AssertionError("eval-based parser called")

    monkeypatch.setattr(sympy_parser, "eval_expr", trap)
    monkeypatch.setattr(mv_parser, "parse_expr", trap)
    monkeypatch.setattr(l2s, "parse_expr", trap)
    with pytest.raises(AssertionError, match="eval-based parser called"):  # the trap is live
        sympy.sympify("1+1")
    calls.clear()

    marker = tmp_path / "pwned"
    texts = [text for row in MATH_TABLE for text in row[:2]] + [response for response, _, _ in EXACT_TABLE]
    texts += _payloads(str(marker)) + ["2**10 = 1024", "1/2 + 1/3", "1.5e3", "#### 0.75", r"\boxed{007}"]
    for text in texts:
        math_is_correct(text, "3")
        math_is_correct("3", text)  # gold strings take the same path
        exact_match_is_correct(text, "3")
    assert calls == [] and not marker.exists()
    # The numbers still parse (through the eval-free constructor).
    assert math_is_correct("The answer is 0.75", r"\frac{3}{4}") and math_is_correct(r"\boxed{1{,}234}", "1234")
    assert calls == []


# ------------------------------------------------------------------------------------------------
# pass@k and majority vote
# ------------------------------------------------------------------------------------------------


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in draw) for draw in draws) / len(draws)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(100, 1, 1) == pytest.approx(0.01)
    assert 0.0 < pass_at_k(10_000, 3, 50) < 1.0 and math.isfinite(pass_at_k(10_000, 3, 50))
    for bad in [(0, 0, 1), (4, 5, 1), (4, 1, 5), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote():
    assert majority_vote(["3", "4", "4", None, "3", "4"]) == "4"
    assert majority_vote(["a", "b", "b", "a"]) == "a"  # tie: first seen wins
    assert majority_vote([None, None]) is None
    responses = [r"\boxed{7}", "The answer is 7", r"\boxed{8}"]
    assert majority_vote(extract_final_answer(r) for r in responses) == "7"
