"""BFCL v4 from its wheel, judged by BFCL's own AST checker: every accepted answer is right, every perturbation
wrong, irrelevance means no call, and calls are decoded by one rule (tags, then fences, then bare JSON)."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from sdft_ray.evals import bfcl

CALL_CATEGORIES = ("simple_python", "multiple", "parallel")


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    return {c: bfcl.load(c) for c in (*CALL_CATEGORIES, "irrelevance")}  # downloads the 1.9 MB wheel once


def _reply(calls: list[dict]) -> str:
    return "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


def test_the_sets_are_bfcls(records) -> None:
    assert {c: len(r) for c, r in records.items()} == {
        "simple_python": 400,
        "multiple": 200,
        "parallel": 200,
        "irrelevance": 240,
    }
    # the checker came from the wheel without BFCL's model handlers (the stand-in module doc explains)
    bfcl.checker()
    assert not [m for m in sys.modules if m.split(".")[0] in ("openai", "anthropic", "tree_sitter")]


@pytest.mark.parametrize("category", CALL_CATEGORIES)
def test_every_accepted_answer_is_right(records, category: str) -> None:
    checked = 0
    for r in records[category]:
        calls = bfcl.canonical_calls(r)
        assert bfcl.judge(r, category, _reply(calls))["valid"], r["id"]
        # each other accepted value of each parameter, one at a time
        for i, truth in enumerate(r["ground_truth"]):
            ((name, params),) = truth.items()
            required = next(f for f in r["function"] if f["name"] == name)["parameters"].get("required", [])
            for p, opts in params.items():
                for alt in opts[1:] if isinstance(opts, list) else []:
                    if alt == "" and p in required:
                        continue  # "" (may be left out) on a required parameter: the checker requires it first
                    other = copy.deepcopy(calls)
                    if alt == "":
                        other[i]["arguments"].pop(p, None)
                    else:
                        other[i]["arguments"][p] = bfcl._value(alt)
                    assert bfcl.judge(r, category, _reply(other))["valid"], (r["id"], p, alt)
                    checked += 1
    assert checked > 100  # alternatives exist (units, optional defaults, equivalent spellings)


def _changed(value, accepted: list):
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, (int, float)):
        new = value + 1000 + (0.5 if isinstance(value, float) else 0)
    elif isinstance(value, str):
        new = f"zz_{value}_zz"
    else:
        return None
    return None if new in accepted else new


@pytest.mark.parametrize("category", CALL_CATEGORIES)
def test_every_perturbation_is_wrong(records, category: str) -> None:
    wrong_value = missing = renamed = 0
    for r in records[category]:
        calls = bfcl.canonical_calls(r)
        ((name, params),) = r["ground_truth"][0].items()
        desc = next(f for f in r["function"] if f["name"] == name)
        # a wrong value: the first parameter whose value can be changed to one no accepted list holds
        for p, v in calls[0]["arguments"].items():
            new = _changed(v, params[p])
            if new is not None:
                bad = copy.deepcopy(calls)
                bad[0]["arguments"][p] = new
                assert not bfcl.judge(r, category, _reply(bad))["valid"], (r["id"], p, new)
                wrong_value += 1
                break
        # a required argument left out
        required = [p for p in desc["parameters"].get("required", []) if p in calls[0]["arguments"]]
        if required:
            bad = copy.deepcopy(calls)
            del bad[0]["arguments"][required[0]]
            assert not bfcl.judge(r, category, _reply(bad))["valid"], (r["id"], required[0])
            missing += 1
        # the wrong function
        bad = copy.deepcopy(calls)
        bad[0]["name"] = f"{name}_v2"
        assert not bfcl.judge(r, category, _reply(bad))["valid"], r["id"]
        renamed += 1
    n = len(records[category])
    assert renamed == n and wrong_value > 0.9 * n and missing > 0.9 * n, (wrong_value, missing, n)


def test_irrelevance_is_right_only_without_a_call(records) -> None:
    r = records["irrelevance"][0]
    assert bfcl.judge(r, "irrelevance", "None of the functions I have can answer that.")["valid"]
    call = {"name": r["function"][0]["name"], "arguments": {}}
    assert not bfcl.judge(r, "irrelevance", _reply([call]))["valid"]


def test_calls_are_decoded_by_one_rule() -> None:
    call = {"name": "f", "arguments": {"x": 1}}
    want = [{"f": {"x": 1}}]
    assert bfcl.decode_calls(f"<tool_call>\n{json.dumps(call)}\n</tool_call>") == want
    assert bfcl.decode_calls(f"Sure:\n```json\n{json.dumps(call)}\n```") == want
    assert bfcl.decode_calls(f"The call is {json.dumps(call)}.") == want
    as_string = {"name": "f", "arguments": json.dumps({"x": 1})}
    assert bfcl.decode_calls(json.dumps(as_string)) == want
    two = [call, {"name": "g", "parameters": {"y": "a"}}]
    assert bfcl.decode_calls(f"```json\n{json.dumps(two)}\n```") == [*want, {"g": {"y": "a"}}]
    # tags win over fences and bare JSON elsewhere in the reply; prose and non-calls decode to nothing
    mixed = f'{{"name": "h", "arguments": {{}}}}\n<tool_call>{json.dumps(call)}</tool_call>'
    assert bfcl.decode_calls(mixed) == want
    assert bfcl.decode_calls("I would call f with x = 1.") == []
    assert bfcl.decode_calls('{"answer": 3}') == []


def test_the_task_files_train_on_live_and_evaluate_on_the_rest(tmp_path, tiny) -> None:
    from sdft_ray.config import DataConfig, ModelConfig
    from sdft_ray.data import encode_prompt, load_examples
    from sdft_ray.evaluate import score_all
    from sdft_ray.modeling import load_tokenizer

    written = bfcl.write_tasks(tmp_path, limit=4)
    train = written["bfcl_train"]
    # every live record whose canonical answer BFCL's checker accepts: 258 + 1053 less the 5 it rejects
    assert train["records"] == 1306 and len(train["left_out"]) == 5
    ex = load_examples(DataConfig(train=train["path"]))
    assert all(e.tools and e.demonstration.startswith("<tool_call>") for e in ex)
    assert {json.loads(e.answer)["bfcl"] for e in ex} == set(bfcl.TRAIN_CATEGORIES)  # nothing from the eval sets
    # the demonstrations are right by the judge that scores the evals; so are the eval files' references
    assert all(score_all("bfcl", [e.demonstration for e in ex[:50]], [e.answer for e in ex[:50]]))
    for cat in bfcl.EVAL_CATEGORIES:
        ev = load_examples(DataConfig(train=written[f"bfcl_{cat}"]["path"]))
        assert len(ev) == 4 and all(score_all("bfcl", [e.demonstration for e in ev], [e.answer for e in ev]))
        assert not any(score_all("bfcl", ["I am not sure."] * 4, [e.answer for e in ev])) or cat == "irrelevance"
    # the tools reach the prompt through the chat template (here a minimal one that lists the tool names)
    tok = load_tokenizer(ModelConfig(path=tiny["model"]))
    tok.chat_template = (
        "{% for t in tools %}{{ t.function.name }};{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    ids, _ = encode_prompt(tok, ex[0].prompt, 100_000, ex[0].tools)
    assert tok.decode(ids).startswith(ex[0].tools[0]["function"]["name"] + ";")
    assert ex[0].tools[0]["function"]["parameters"]["type"] == "object"  # BFCL's "dict", as JSON Schema


def test_a_bad_tools_field_names_file_record_and_field(tmp_path) -> None:
    from sdft_ray.config import DataConfig
    from sdft_ray.data import load_examples
    from sdft_ray.errors import DataError

    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "q", "golden_response": ["a"], "tools": "get_weather"}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl: record 0: field 'tools' must be a list of function schemas"):
        load_examples(DataConfig(train=str(f)))
