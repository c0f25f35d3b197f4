"""Rewards: format, language consistency, overlong and length shaping, the weighted sum."""

import pytest

from sputnik.rewards import (REWARDS, Reward, chain_of_thought, combine, format_reward, language_reward,
                             length_reward, overlong_reward, parse_weights, words_by_script)
from sputnik.tasks import Problem, get_task

ARITH = get_task("arithmetic")
P85 = Problem(id="x", prompt="What is 47 + 38?", answer="85", meta={"a": 47, "b": 38, "op": "+"})


# ----- format -----

@pytest.mark.parametrize("completion", [
    "<think>47 + 38 = 85</think> <answer>85</answer>",
    "<think>\n47 + 38 = 85\n</think>\n\nThe sum is \\boxed{85}.",
    "  <think>reasoning</think>85",
    "<think>r</think> so: <answer>85</answer> done",
])
def test_format_good(completion):
    assert format_reward(P85, completion, ARITH) == 1.0


@pytest.mark.parametrize("completion", [
    "85",  # no reasoning
    "<answer>85</answer>",
    "<think>reasoning</think>",  # nothing after the reasoning
    "<think>  </think> <answer>85</answer>",  # empty reasoning
    "<think>a</think><think>b</think> 85",  # two think blocks
    "<think>a <think> b</think> 85",
    "<think>unclosed reasoning <answer>85</answer>",
    "reasoning</think> 85",  # no <think> (and the prompt did not open one)
    "<think>r</think> <answer>85</answer><answer>86</answer>",
    "<think>r</think> <answer> </answer>",
    "<think>r</think> <answer>85",
])
def test_format_bad(completion):
    assert format_reward(P85, completion, ARITH) == 0.0


def test_format_think_opened_and_answer_tag():
    # The prompt ended with "<think>\n" (R1 chat template): the completion starts inside the reasoning.
    assert format_reward(P85, "47 + 38 = 85\n</think>\n\n\\boxed{85}", ARITH, think_opened=True) == 1.0
    assert format_reward(P85, "<think>x</think> 85", ARITH, think_opened=True) == 0.0
    assert format_reward(P85, "no close tag, 85", ARITH, think_opened=True) == 0.0
    strict = dict(require_answer_tag=True)
    assert format_reward(P85, "<think>r</think> <answer>85</answer>", ARITH, **strict) == 1.0
    assert format_reward(P85, "<think>r</think> \\boxed{85}", ARITH, **strict) == 0.0
    assert format_reward(P85, "<think>r</think> so <answer>85</answer>", ARITH, **strict) == 0.0


# ----- language consistency -----

MIXED = "<think>먼저 Python으로 47개와 38개를 더하면 85입니다. So the answer is 85.</think> <answer>85</answer>"


def test_language_share_hand_computed():
    # Words are same-script letter runs; digits and symbols are no words:
    #   Hangul: 먼저, 으로, 개와, 개를, 더하면, 입니다      -> 6
    #   Latin:  Python, So, the, answer, is            -> 5
    # ("answer" in the <answer> tag is outside the chain of thought.)
    assert words_by_script(chain_of_thought(MIXED)) == {"hangul": 6, "latin": 5, "other": 0}
    assert language_reward(P85, MIXED, ARITH, language="ko") == pytest.approx(6 / 11)
    assert language_reward(P85, MIXED, ARITH, language="en") == pytest.approx(5 / 11)


def test_language_edge_cases():
    assert language_reward(None, "<think>모두 한국어로 생각합니다</think> 85", language="ko") == 1.0
    assert language_reward(None, "<think>all English</think> 85", language="ko") == 0.0
    # Other scripts count against the target: 2 Latin runs, 1 Han run.
    assert language_reward(None, "<think>so 所以 yes</think>", language="en") == pytest.approx(2 / 3)
    assert language_reward(None, "<think>47 + 38 = 85</think> 85", language="en") == 1.0  # no words at all
    assert language_reward(None, "plain text without tags 한국어", language="ko") == pytest.approx(1 / 5)
    opened = "생각 중 think</think> answer"  # the prompt opened <think>
    assert language_reward(None, opened, language="ko", think_opened=True) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="language"):
        language_reward(None, "x", language="fr")


# ----- overlong and length -----

def test_overlong_three_regions():
    cfg = dict(max_length=100, overlong_cache=20)  # penalty window: 80 < length <= 100
    assert overlong_reward(None, "", length=50, **cfg) == 0.0
    assert overlong_reward(None, "", length=80, **cfg) == 0.0
    assert overlong_reward(None, "", length=85, **cfg) == pytest.approx(-0.25)
    assert overlong_reward(None, "", length=90, **cfg) == pytest.approx(-0.5)
    assert overlong_reward(None, "", length=100, **cfg) == pytest.approx(-1.0)
    assert overlong_reward(None, "", length=101, **cfg) == -1.0
    with pytest.raises(ValueError, match="length="):
        overlong_reward(None, "", **cfg)


def test_length_reward():
    right, wrong = "<answer>85</answer>", "<answer>84</answer>"
    assert length_reward(P85, right, ARITH, length=100, max_length=1000) == pytest.approx(0.4)
    assert length_reward(P85, right, ARITH, length=800, max_length=1000) == pytest.approx(-0.3)
    assert length_reward(P85, right, ARITH, length=5000, max_length=1000) == pytest.approx(-0.5)
    assert length_reward(P85, wrong, ARITH, length=100, max_length=1000) == 0.0  # short and wrong: no bonus
    assert length_reward(P85, wrong, ARITH, length=800, max_length=1000) == pytest.approx(-0.3)
    assert length_reward(P85, wrong, ARITH, length=100, max_length=1000, accuracy=1.0) == pytest.approx(0.4)


# ----- combining -----

def test_weighted_sum():
    reward = combine({"accuracy": 1.0, "format": 0.5, "language": 0.2, "overlong": 1.0},
                     language="ko", max_length=100, overlong_cache=20)
    total, parts = reward(P85, MIXED, ARITH, length=90)
    assert parts == {"accuracy": 1.0, "format": 1.0, "language": pytest.approx(6 / 11), "overlong": -0.5}
    assert total == pytest.approx(1.0 + 0.5 + 0.2 * 6 / 11 - 0.5)
    total, parts = reward(P85, "<think>r</think> <answer>84</answer>", ARITH, length=10)
    assert total == pytest.approx(0.0 + 0.5 + 0.2 * 0.0 + 0.0) and parts["accuracy"] == 0.0


def test_r1_zero_default_and_skip():
    reward = combine({"accuracy": 1.0, "format": 1.0})  # accuracy + format, equal weights
    assert reward(P85, "<think>47 + 38 = 85</think> <answer>85</answer>", ARITH)[0] == 2.0
    assert reward(P85, "<answer>85</answer>", ARITH)[0] == 1.0
    assert reward(P85, "<think>hm</think> <answer>86</answer>", ARITH)[0] == 1.0
    # A gold answer that does not parse: the sample is skipped, never rewarded.
    broken = Problem(id="b", prompt="?", answer="}{")
    total, parts = reward(broken, "<think>x</think> <answer>}{</answer>", get_task("math"))
    assert total is None and parts["accuracy"] is None


def test_combine_specs():
    assert parse_weights("accuracy=1, format=0.5,language") == {"accuracy": 1.0, "format": 0.5, "language": 1.0}
    reward = combine("accuracy=2,length=1", max_length=1000)
    total, parts = reward(P85, "<answer>85</answer>", ARITH, length=100)
    assert parts == {"accuracy": 1.0, "length": pytest.approx(0.4)} and total == pytest.approx(2.4)
    weights, options = {"format": 1.0}, {"think_opened": True}
    assert combine(weights, **options)(P85, "r</think> 85", ARITH)[0] == 1.0
    assert combine(weights, **options)(P85, "r</think> 85", ARITH, think_opened=False)[0] == 0.0
    assert isinstance(combine({"accuracy": 1}), Reward)
    assert set(REWARDS) == {"accuracy", "format", "language", "overlong", "length"}
    with pytest.raises(ValueError, match="unknown rewards"):
        combine({"accuracy": 1, "style": 1})


# ----- R1's grading rule: the answer part only -----

@pytest.mark.parametrize("completion, think_opened, strict, lenient", [
    # A number inside the thinking is never the answer.
    ("<think>47 + 38 = 85</think> The answer is 84.", False, 0.0, 0.0),
    ("<think>maybe \\boxed{84}</think> <answer>85</answer>", False, 1.0, 1.0),
    ("<think>so 47 + 38 = 84?</think>\n\n\\boxed{85}", False, 1.0, 1.0),
    # A thought that never closes gives no answer: 0, however right the number inside it.
    ("<think>47 + 38: 7 + 8 = 15, carry 1, so 85. The answer is", False, 0.0, 1.0),
    ("47 + 38: 7 + 8 = 15, carry 1, so 85. The answer is", True, 0.0, 1.0),
    # Closed but nothing after it.
    ("<think>47 + 38 = 85</think>", False, 0.0, 0.0),
    ("47 + 38 = 85\n</think>\n\n", True, 0.0, 0.0),
    # A completion that does not think (its prompt did not open <think>) is its own answer.
    ("The answer is \\boxed{85}.", False, 1.0, 1.0),
    ("47 + 38 = 85", False, 1.0, 1.0),
])
def test_accuracy_grades_the_answer_after_the_thinking(completion, think_opened, strict, lenient):
    assert combine({"accuracy": 1})(P85, completion, ARITH, think_opened=think_opened)[0] == strict
    assert combine({"accuracy": 1}, grading="lenient")(P85, completion, ARITH, think_opened=think_opened)[0] == lenient
    assert ARITH.correct(P85, completion, think_opened) is (strict == 1.0)


def test_an_unknown_grading_is_refused():
    with pytest.raises(ValueError, match="grading must be one of"):
        ARITH.verify(P85, "85", grading="loose")


def test_strict_grading_gives_the_cut_off_answer_a_negative_advantage():
    """The nano-r1 failure: a GRPO group where one rollout closes its thinking and answers, another stops inside
    its thinking after the right number. Lenient grading rewards both alike (no signal to keep the format); strict
    grading pushes the cut-off one down and the formatted one up."""
    import torch

    from sputnik.train.grpo_math import group_advantages

    group = ["47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8. So 85.\n</think>\n\n\\boxed{85}",
             "47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8. So 85.\nThe answer is",
             "47 + 38 = 75\n</think>\n\n\\boxed{75}",
             "47 + 38: 7 + 8 = 15, carry 1. So 85.\nThe answer is"]
    for grading, want in (("strict", [1.0, 0.0, 0.0, 0.0]), ("lenient", [1.0, 1.0, 0.0, 1.0])):
        reward = combine({"accuracy": 1}, grading=grading)
        rewards = torch.tensor([reward(P85, c, ARITH, think_opened=True)[0] for c in group])
        assert rewards.tolist() == want
        adv = group_advantages(rewards, G=4)
        if grading == "strict":
            assert adv[0] > 0 and adv[1] < 0 and adv[3] < 0  # the cut-off answers are pushed down
        else:
            assert adv[1] > 0 and adv[3] > 0  # the cut-off answers are pushed up as much as the formatted one
