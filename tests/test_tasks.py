"""Tasks: extraction, verifiers on right/wrong/malformed/adversarial answers, seeded and disjoint splits, specs."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from sputnik.tasks import (R1_ZERO_TEMPLATE, TASKS, Problem, TaskDataError, extract_answer, get_task, last_answer_tag,
                           last_boxed, last_number, math_equal, parse_integer, parse_spec, split_of)
from sputnik.tasks.countdown import InvalidExpression, check, evaluate
from sputnik.tasks.jsonl import parse_number


def wrap(answer: str) -> str:
    return f"<think>working it out</think> <answer>{answer}</answer>"


# ----- extraction -----

def test_extract_last_answer_tag():
    text = "<answer>1</answer> no wait <answer> 2 </answer> final <answer>3</answer> trailing"
    assert last_answer_tag(text) == "3"
    assert last_answer_tag("<answer>1<answer>2</answer>") == "2"  # the open tag nearest the last close
    assert last_answer_tag("<answer>unclosed") is None
    assert last_answer_tag("</answer> only") is None


@pytest.mark.timeout(60)
def test_extract_boxed_balanced():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{5} and a truncated \boxed{\frac{1}{") == "5"  # unbalanced last one passed over
    assert last_boxed(r"so \boxed 7 it is") == "7"
    assert last_boxed("no box") is None
    # degenerate text stays linear: 500k unclosed boxes is ~4 MB; a quadratic scan would not end within the hang
    # guard (a generous bound on a hang, not a speed check: speed is the benchmarks' business)
    assert last_boxed("\\boxed{1}" + "\\boxed{" * 500_000) == "1"


def test_extract_number_and_order():
    assert last_number("it is 1,234 or maybe 5,678.5 apples.") == "5678.5"
    assert last_number("-3 then -12") == "-12"
    assert last_number("none") is None
    text = r"<think>the answer is \boxed{9}</think> so 7, i.e. \boxed{8} <answer>6</answer>"
    assert extract_answer(text) == "6"
    assert extract_answer(text, order=("boxed", "answer")) == "8"
    assert extract_answer(text, order=("number",)) == "6"
    # Inside the reasoning does not count once </think> is there; without </think> the whole text is searched.
    assert extract_answer("<think><answer>5</answer></think> no answer here", order=("answer",)) is None
    assert extract_answer("<think>still thinking <answer>5</answer>", order=("answer",)) == "5"
    assert extract_answer(r"<answer>\boxed{42}</answer>") == "42"


# ----- arithmetic -----

@pytest.mark.parametrize("text, value", [
    ("85", 85), (" 85. ", 85), ("= 85", 85), ("47 + 38 = 85", 85), ("1,234", 1234), ("1 234", 1234),
    ("$85$", 85), ("85.0", 85), ("-12", -12), ("85개", 85), ("모두 85개입니다.", 85), ("85 apples", 85),
])
def test_parse_integer_tolerant(text, value):
    assert parse_integer(text) == value


@pytest.mark.parametrize("text", [None, "", "85 or 86", "85.5", "eighty-five", "1,2", "9" * 5000, "47 + 38"])
def test_parse_integer_rejects(text):
    assert parse_integer(text) is None


def test_arithmetic_verify():
    task = get_task("arithmetic")
    problem = Problem(id="x", prompt="What is 47 + 38?", answer="85", meta={"a": 47, "b": 38, "op": "+"})
    assert task.verify(problem, wrap("85")) == 1.0
    assert task.verify(problem, wrap("1,0,0")) == 0.0
    assert task.verify(problem, wrap("84")) == 0.0
    assert task.verify(problem, r"So 47 + 38 = \boxed{85}.") == 1.0
    assert task.verify(problem, "I think it is 85") == 1.0  # last-number fallback
    assert task.verify(problem, "<think>85</think> I don't know") == 0.0
    assert task.verify(problem, wrap("8" * 10_000)) == 0.0  # a 10^4-digit "number" is cheap to reject


def test_arithmetic_problems_are_correct():
    for spec in ("arithmetic:digits=3,ops=+-*", "korean-arithmetic:ops=+-*"):
        for p in get_task(spec).problems("train", 200, seed=1):
            a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
            assert 100 <= a <= 999 or spec.startswith("korean")
            assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0
            assert str(a) in p.prompt and str(b) in p.prompt


def test_korean_prompts():
    problems = get_task("korean-arithmetic:ops=+-*").problems("train", 50)
    assert all("입니까?" in p.prompt for p in problems)
    assert len({p.prompt.split()[-1] for p in problems}) > 3  # several templates in use


def test_small_problem_space_fails_clearly():
    with pytest.raises(ValueError, match="only"):
        get_task("arithmetic:digits=1").problems("test", 100)


# ----- countdown -----

COUNTDOWN = Problem(id="c", prompt="", answer="", meta={"numbers": [3, 7, 25, 50], "target": 100})


@pytest.mark.parametrize("answer", ["(50 - 25) * (7 - 3)", "(7-3)*(50-25)", r"(50 - 25) \times (7 - 3)",
                                    "(50 − 25) × (7 − 3)", "(50 - 25) * (7 - 3) = 100", "(((50 - 25))) * (7 - 3)",
                                    r"\left(50 - 25\right) \cdot (7 - 3)"])
def test_countdown_correct(answer):
    assert get_task("countdown").verify(COUNTDOWN, wrap(answer)) == 1.0


def test_countdown_fraction_intermediates():
    problem = Problem(id="c", prompt="", answer="", meta={"numbers": [1, 3, 4, 6], "target": 24})
    assert get_task("countdown").verify(problem, wrap("6 / (1 - 3 / 4)")) == 1.0  # 3/4 is not an integer: fine
    assert get_task("countdown").verify(problem, r"\boxed{6 \div (1 - 3 \div 4)}") == 1.0


@pytest.mark.parametrize("answer", [
    "50 + 50",  # reuses 50, misses others
    "(50 - 25) * 4",  # 4 is not given
    "25 * (7 - 3)",  # misses 50
    "3 + 7 + 25 + 50",  # all numbers, wrong value
    "-3 + 7 + 25 + 50 + 21",  # unary minus and extra number
    "__import__('os').system('true')",
    "9**9**9",
    "2**100",
    "1" + "0" * 400,
    "50 / (7 - 7) + 3 + 25",
    "(50 - 25) * (7 - 3",
    "(50 - 25)) * (7 - 3)",
    "50 - 25 * 7 - 3 = 99",
    "3.0 + 7 + 25 + 50",
    "",
    "(" * 5000 + "3" + ")" * 5000,  # too long
    "(" * 40 + "3 + 7 + 25 + 50" + ")" * 40 + " + 15",  # short but nested too deep
])
@pytest.mark.timeout(60)  # 9**9**9 evaluated, or deep nesting recursed, would hang: a hang guard, not a speed check
def test_countdown_wrong_and_adversarial(answer):
    assert get_task("countdown").verify(COUNTDOWN, wrap(answer)) == pytest.approx(0.1)


def test_countdown_no_answer_and_format_score():
    task = get_task("countdown")
    assert task.correct(COUNTDOWN, wrap("1 + 1")) is False  # 0.1 is a format score, not a solve
    assert task.correct(COUNTDOWN, wrap("(50 - 25) * (7 - 3)")) is True
    assert task.verify(COUNTDOWN, "<think>no idea</think>") == 0.0
    assert task.verify(COUNTDOWN, "(50 - 25) * (7 - 3)") == 0.0  # no tags: no answer (TinyZero)
    assert get_task("countdown:format_score=0").verify(COUNTDOWN, wrap("1 + 1")) == 0.0


def test_countdown_parser_limits():
    assert evaluate("1 / 3 + 1 / 6")[0] * 2 == 1  # exact fractions
    for text in ["999999 * 999999 * 999999", "2 ** 3", "abs(3)", "3 +", "()", "3 3", "1e3"]:
        with pytest.raises(InvalidExpression):
            evaluate(text)
    assert check("(((50 - 25))) * (7 - 3)", [3, 7, 25, 50], 100)
    assert not check("(50 - 25) * (7 - 3)", [3, 7, 25, 50], 99)


def test_countdown_problems_are_solvable():
    for p in get_task("countdown").problems("train", 300, seed=3):
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert 3 <= len(numbers) <= 4 and all(1 <= x <= 99 for x in numbers)
        assert isinstance(target, int) and 1 <= target <= 100
        assert check(p.answer, numbers, target), p
        assert str(target) in p.prompt and str(numbers) in p.prompt


# ----- math (math-verify) -----

def test_math_equivalences():
    for gold in ["0.5", "1/2", r"\frac{1}{2}", r"\dfrac12"]:
        for pred in ["0.5", "1/2", r"\frac{1}{2}", r"$\frac{1}{2}$"]:
            assert math_equal(gold, pred) == 1.0, (gold, pred)
    assert math_equal(r"5\sqrt{2}", r"\sqrt{50}") == 1.0
    assert math_equal("14\\pi", "14 \\pi") == 1.0
    assert math_equal("1000", "1,000") == 1.0
    assert math_equal(r"\frac{1}{2}", "0.6") == 0.0
    assert math_equal("7", None) == 0.0
    assert math_equal("7", "x" * 5000) == 0.0


@pytest.mark.parametrize("gold", ["}{", r"\frac{1}{2", "", "   "])
def test_math_unparseable_gold_is_none(gold):
    assert math_equal(gold, gold) is None
    assert math_equal(gold, "1") is None


def test_math_verify_works_off_the_main_thread():
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda pair: math_equal(*pair), [("0.5", r"\frac{1}{2}"), ("3", "4")]))
    assert results == [1.0, 0.0]


def test_math_sample_golds_all_parse():
    task = get_task("math")
    problems = task.problems("train") + task.problems("test")
    assert len(problems) >= 30
    for p in problems:
        assert task.verify(p, rf"<think>done</think> The answer is $\boxed{{{p.answer}}}$.") == 1.0, p
        assert task.verify(p, r"<think>done</think> \boxed{123456789}") == 0.0, p


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_math_reads_gsm8k_and_math_rows(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"question": "How many?", "answer": "Some steps <<2*3=6>>.\n#### 1,006"},
        {"problem": "Half?", "solution": r"It is $\boxed{\frac{1}{2}}$."},
        {"prompt": "Broken gold", "answer": "}{"},
    ])
    task = get_task(f"math:{path},test_frac=0")
    problems = {p.prompt: p for p in task.problems("train")}
    assert problems["How many?"].answer == "1006"
    assert task.verify(problems["How many?"], r"\boxed{1006}") == 1.0
    assert task.verify(problems["Half?"], "<answer>0.5</answer>") == 1.0
    assert task.verify(problems["Broken gold"], "<answer>}{</answer>") is None


def test_file_errors_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b", '])
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:3: invalid JSON"):
        get_task(f"jsonl:{bad}").problems("train")
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(TaskDataError, match=r"missing\.jsonl:2: missing field 'answer'"):
        get_task(f"jsonl:{missing}").problems("train")
    nosol = write_jsonl(tmp_path / "nosol.jsonl", [{"problem": "a", "solution": "no box"}])
    with pytest.raises(TaskDataError, match=r"nosol\.jsonl:1: .*boxed"):
        get_task(f"math:{nosol}").problems("train")
    with pytest.raises(TaskDataError, match="no such file"):
        get_task(f"jsonl:{tmp_path / 'nope.jsonl'}").problems("train")


# ----- jsonl -----

def test_jsonl_verifiers(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"prompt": "Capital of France?", "answer": "Paris"},
        {"prompt": "Half of 3?", "answer": "1.5", "verifier": "number"},
        {"prompt": "Half of 1?", "answer": "\\frac{1}{2}", "verifier": "math"},
        {"prompt": "Bad number gold", "answer": "lots", "verifier": "number"},
    ])
    task = get_task(f"jsonl:{path},test_frac=0")
    p = {p.prompt: p for p in task.problems("train")}
    assert task.verify(p["Capital of France?"], wrap(" Paris ")) == 1.0
    assert task.verify(p["Capital of France?"], wrap("paris")) == 0.0
    assert task.verify(p["Capital of France?"], "Paris") == 0.0  # exact answers need tags or a box
    assert task.verify(p["Half of 3?"], wrap("3/2")) == 1.0
    assert task.verify(p["Half of 3?"], "so it is 1.50") == 1.0
    assert task.verify(p["Half of 3?"], wrap("1.5 or 2")) == 0.0
    assert task.verify(p["Half of 1?"], wrap("0.5")) == 1.0
    assert task.verify(p["Bad number gold"], wrap("lots")) is None
    assert parse_number("x = -1,250.5") == parse_number("-2501/2")
    bad = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "a", "answer": "1", "verifier": "regex"}])
    with pytest.raises(TaskDataError, match=r"v\.jsonl:1: verifier"):
        get_task(f"jsonl:{bad}").problems("train")


def test_file_splits_disjoint_and_seeded(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(200)]
    rows += [{"prompt": "q0", "answer": "0", "split": "test"}]  # also in train: dropped from test
    task = get_task(f"jsonl:{write_jsonl(tmp_path / 'many.jsonl', rows)},test_frac=0.2")  # a held-out fifth
    train, test = task.problems("train"), task.problems("test")
    assert {p.prompt for p in train}.isdisjoint(p.prompt for p in test)
    assert 10 < len(test) < 80 and len(train) + len(test) >= 199
    assert [p.id for p in task.problems("train", 20, seed=1)] == [p.id for p in task.problems("train", 20, seed=1)]
    assert [p.id for p in task.problems("train", 20, seed=1)] != [p.id for p in task.problems("train", 20, seed=2)]
    explicit = get_task(f"math:train={write_jsonl(tmp_path / 'a.jsonl', rows[:5])},"
                        f"test={write_jsonl(tmp_path / 'b.jsonl', rows[3:8])}")
    assert len(explicit.problems("train")) == 5 and len(explicit.problems("test")) == 3



def test_a_jsonl_file_is_evaluated_whole_by_default(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(100)]
    rows += [{"prompt": "only-train", "answer": "1", "split": "train"}]  # a row's own split still holds
    task = get_task(f"jsonl:{write_jsonl(tmp_path / 'eval.jsonl', rows)}")
    test = task.problems("test")
    assert len(test) == 100 and {p.prompt for p in test} == {f"q{i}" for i in range(100)}
    assert len(task.problems("train")) == 101


# ----- reasoning-gym -----

def test_gym_task():
    pytest.importorskip("reasoning_gym")
    task = get_task("gym:leg_counting")
    train = task.problems("train", 40, seed=0)
    assert [p.id for p in train] == [p.id for p in task.problems("train", 40, seed=0)]
    assert [p.id for p in train] != [p.id for p in task.problems("train", 40, seed=1)]
    p = train[0]
    assert task.verify(p, wrap(p.answer)) == 1.0
    assert task.verify(p, wrap(str(int(p.answer) + 1))) == 0.0
    assert task.verify(p, "no answer") == 0.0
    configured = get_task("gym:basic_arithmetic,min_terms=2,max_terms=2,min_digits=1,max_digits=1")
    assert configured.kwargs == {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    assert len(configured.problems("test", 5)) == 5
    with pytest.raises(ValueError, match="unknown dataset"):
        get_task("gym:no_such_dataset")
    with pytest.raises(ValueError, match="bad options"):
        get_task("gym:leg_counting,no_such_option=3")


# ----- splits and seeds, every built-in task -----

SPLIT_CASES = {
    "arithmetic": ("arithmetic", 1500, 300),
    "arithmetic-3": ("arithmetic:digits=3,ops=+-*", 1000, 300),
    "korean-arithmetic": ("korean-arithmetic:ops=+-*", 1000, 300),
    "countdown": ("countdown", 1000, 300),
    "math": ("math", None, None),
    "gym": ("gym:leg_counting", 200, 100),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_train_test_disjoint_and_seeded(case):
    spec, n_train, n_test = SPLIT_CASES[case]
    if spec.startswith("gym:"):
        pytest.importorskip("reasoning_gym")
    task = get_task(spec)
    train, test = task.problems("train", n_train, seed=0), task.problems("test", n_test, seed=0)
    key = task.key if hasattr(task, "key") else (lambda p: p.prompt)
    assert len({key(p) for p in train}) == len(train)  # no duplicates within a split
    assert {key(p) for p in train}.isdisjoint(key(p) for p in test)
    assert {p.prompt for p in train}.isdisjoint(p.prompt for p in test)
    # Other seeds give other problems, still on their side of the partition.
    other = task.problems("train", n_train, seed=1)
    assert {key(p) for p in other}.isdisjoint(key(p) for p in test)
    if n_train is not None:
        assert [p.id for p in other] != [p.id for p in train]
    assert [p.id for p in task.problems("test", n_test, seed=0)] == [p.id for p in test]


def test_shared_partition_across_arithmetic_tasks():
    train = get_task("arithmetic:ops=+-*").problems("train", 1000)
    test = get_task("korean-arithmetic:ops=+-*").problems("test", 200)
    assert {p.meta["key"] for p in train}.isdisjoint(p.meta["key"] for p in test)
    assert split_of("47+38", 0.0) == "train" and split_of("47+38", 1.0) == "test"


# ----- templates and specs -----

def test_render_templates():
    task = get_task("arithmetic")
    p = Problem(id="x", prompt="What is 47 + 38?", answer="85")
    assert task.render(p, "plain") == "What is 47 + 38?"
    text = task.render(p, "r1-zero")
    assert text == R1_ZERO_TEMPLATE.format(prompt="What is 47 + 38?")
    assert text.startswith("A conversation between User and Assistant.") and text.endswith(
        "User: What is 47 + 38?. Assistant:")
    assert task.render(Problem("y", "Add 1 and 2.", "3"), "r1-zero").endswith("User: Add 1 and 2. Assistant:")
    assert task.render(p, "r1-zero", system="Be brief.").startswith("Be brief. User: What is 47 + 38?")
    messages = task.render(p, "chat")
    assert messages == [{"role": "user", "content": "What is 47 + 38?" + task.chat_suffix}]
    assert task.render(p, "chat", system="S", suffix="!") == [{"role": "system", "content": "S"},
                                                              {"role": "user", "content": "What is 47 + 38?!"}]

    class FakeTokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "|".join(m["content"] for m in messages) + "<gen>"

    assert task.render(p, "chat", tokenizer=FakeTokenizer(), suffix="") == "What is 47 + 38?<gen>"
    with pytest.raises(ValueError, match="template"):
        task.render(p, "nope")


def test_specs():
    assert set(TASKS) == {"arithmetic", "countdown", "math", "gym", "jsonl", "korean-arithmetic",
                          "korean-countdown"}
    assert parse_spec("math:data/x.jsonl,test_frac=0.5") == ("math", "data/x.jsonl", {"test_frac": "0.5"})
    task = get_task("arithmetic:digits=3,ops=+-*")
    assert (task.digits, task.ops) == (3, "+-*")
    assert get_task("countdown:max_numbers=5,format_score=0.2").format_score == 0.2
    for bad, message in [("nope", "unknown task"), ("arithmetic:digits=x", "digits"), ("arithmetic:foo=1", "foo"),
                         ("arithmetic:ops=/", "ops"), ("gym", "dataset name"), ("arithmetic:3", "key=value")]:
        with pytest.raises(ValueError, match=message):
            get_task(bad)
    with pytest.raises(ValueError, match="split"):
        get_task("arithmetic").problems("validation", 3)


@pytest.mark.parametrize("name", ["arithmetic", "korean-arithmetic"])
def test_held_out_problems_can_be_harder_than_training(name):
    task = get_task(f"{name}:digits=3,test_digits=5,ops=+-*")
    train, test = task.problems("train", 60, seed=0), task.problems("test", 60, seed=0)
    assert all(len(str(p.meta[k])) == 3 for p in train for k in "ab")
    assert all(len(str(p.meta[k])) == 5 for p in test for k in "ab")
    assert {p.meta["key"] for p in train}.isdisjoint(p.meta["key"] for p in test)
    for p in test:  # the verifier is the same: the gold answer, boxed, is right
        assert task.correct(p, f"\\boxed{{{p.answer}}}") and not task.correct(p, f"\\boxed{{{int(p.answer) + 1}}}")
    assert [p.id for p in test] == [p.id for p in task.problems("test", 60, seed=0)]
    with pytest.raises(ValueError, match="test_digits"):
        get_task(f"{name}:test_digits=0")
