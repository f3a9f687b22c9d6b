"""BFCL (Berkeley Function Calling Leaderboard v4): function calling judged by BFCL's own AST checker.

Data, ground truth and checker come from the ``bfcl-eval`` 2026.3.23 wheel, downloaded with ``pip download
--no-deps`` and read in place (files from the zip, the checker by zipimport); none of its dependencies is
installed. The checker module imports ``bfcl_eval.constants.model_config`` only for ``MODEL_CONFIG_MAPPING``,
and that module imports every model handler BFCL has (tree_sitter, openai, anthropic, ...). The checker reads
the mapping in one place, ``convert_func_name``, and only for a function name with a dot in it: whether that
model's API forced dots into underscores. Our models write names as given, so a stand-in module whose mapping
answers "no" for every model is put in its place; every other line of the checker is BFCL's.

How a reply becomes calls (one rule, the same for every method and model): JSON inside ``<tool_call>`` tags;
if there are none, JSON inside code fences; if none, every top-level JSON value in the text. A value is a call
``{"name": ..., "arguments": {...}}`` (``arguments`` may be a JSON string, ``parameters`` is read too) or a list
of them; anything else is ignored. Irrelevance records are right when no call is decoded.
"""

from __future__ import annotations

import json
import re
import sys
import types
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

REQUIREMENT = "bfcl-eval==2026.3.23"
EVAL_CATEGORIES = ("simple_python", "multiple", "parallel", "irrelevance")  # no training record comes from these
TRAIN_CATEGORIES = ("live_simple", "live_multiple")
MODEL_NAME = "sdft-ray"  # what the checker is told the model is called; only the stand-in mapping reads it

_TAGS = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def wheel(path: str | Path | None = None) -> Path:
    if path:
        return Path(path)
    from sdft_ray.tools.pretrained import download_wheel

    return download_wheel(REQUIREMENT, "the BFCL wheel")


def _json_lines(z: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in z.read(member).decode().splitlines() if line.strip()]


@lru_cache(maxsize=16)
def load(category: str, wheel_path: str | None = None) -> list[dict[str, Any]]:
    """The category's records, each with its ``ground_truth`` (none for irrelevance): BFCL's ids and fields."""
    with zipfile.ZipFile(wheel(wheel_path)) as z:
        records = _json_lines(z, f"bfcl_eval/data/BFCL_v4_{category}.json")
        if "irrelevance" in category:
            return records
        truth = {
            r["id"]: r["ground_truth"]
            for r in _json_lines(z, f"bfcl_eval/data/possible_answer/BFCL_v4_{category}.json")
        }
    return [{**r, "ground_truth": truth[r["id"]]} for r in records]


class _NamesAsGiven:
    underscore_to_dot = False


class _AnyModel(dict):
    def __missing__(self, key: str) -> _NamesAsGiven:
        return _NamesAsGiven()


@lru_cache(maxsize=2)
def checker(wheel_path: str | None = None) -> types.ModuleType:
    """BFCL's ``ast_checker`` module, imported from the wheel with the stand-in ``model_config`` (module doc)."""
    path = str(wheel(wheel_path))
    if path not in sys.path:
        sys.path.append(path)
    stand_in = types.ModuleType("bfcl_eval.constants.model_config")
    stand_in.MODEL_CONFIG_MAPPING = _AnyModel()
    sys.modules.setdefault("bfcl_eval.constants.model_config", stand_in)
    from bfcl_eval.eval_checker.ast_eval import ast_checker

    return ast_checker


def _json_values(text: str) -> list[Any]:
    """Every top-level JSON value in ``text``, left to right."""
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        start = min((j for j in (text.find("{", i), text.find("[", i)) if j >= 0), default=-1)
        if start < 0:
            break
        try:
            value, end = dec.raw_decode(text, start)
        except json.JSONDecodeError:
            i = start + 1
            continue
        out.append(value)
        i = end
    return out


def _as_call(value: Any) -> dict[str, dict[str, Any]] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {value["name"]: args} if isinstance(args, dict) else None


def decode_calls(reply: str) -> list[dict[str, dict[str, Any]]]:
    """The calls in a reply, as BFCL's checker takes them: ``[{name: {param: value}}]`` (module doc's rule)."""
    spans = _TAGS.findall(reply) or _FENCE.findall(reply) or [reply]
    calls = []
    for span in spans:
        for value in _json_values(span):
            for item in value if isinstance(value, list) else [value]:
                call = _as_call(item)
                if call is not None:
                    calls.append(call)
    return calls


def judge(record: dict[str, Any], category: str, reply: str, wheel_path: str | None = None) -> dict[str, Any]:
    """{"valid": bool, "error": [...], "calls": [...]}: BFCL's verdict on one reply (irrelevance: no call)."""
    calls = decode_calls(reply)
    if "irrelevance" in category:
        return {"valid": not calls, "error": [] if not calls else ["a call where none is right"], "calls": calls}
    if not calls:
        return {"valid": False, "error": ["no call decoded"], "calls": calls}
    m = checker(wheel_path)
    verdict = m.ast_checker(record["function"], calls, record["ground_truth"], m.Language.PYTHON, category, MODEL_NAME)
    return {"valid": bool(verdict["valid"]), "error": verdict.get("error", []), "calls": calls}


def _pick(options: Any) -> tuple[bool, Any]:
    """The first accepted value of a parameter ("" means: may be left out). Some nested ground truths give a bare
    value instead of a list of accepted ones (live_multiple): that value."""
    if not isinstance(options, list):
        return True, options
    for o in options:
        if o != "":
            return True, _value(o)
    return False, None


def _value(v: Any) -> Any:
    # inside an accepted dict each key again lists accepted values; inside an accepted list the items are values
    if isinstance(v, dict):
        return {k: val for k, opts in v.items() for ok, val in [_pick(opts)] if ok}
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def canonical_calls(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One right answer per record, built from the ground truth: every call, each parameter at its first
    accepted value, optional ones left out where leaving them out is accepted. In the OpenAI/Qwen call shape."""
    calls = []
    for truth in record["ground_truth"]:
        ((name, params),) = truth.items()
        args = {p: val for p, opts in params.items() for ok, val in [_pick(opts)] if ok}
        calls.append({"name": name, "arguments": args})
    return calls


_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def _schema(node: Any) -> Any:
    # BFCL writes Python type names ("dict", "float", "tuple", "any"); chat templates and models expect JSON
    # Schema's, as BFCL's own converter for function-calling APIs maps them
    if isinstance(node, dict):
        out = {k: _schema(v) for k, v in node.items()}
        if isinstance(out.get("type"), str):
            out["type"] = _TYPES.get(out["type"], out["type"])
        return out
    if isinstance(node, list):
        return [_schema(x) for x in node]
    return node


def to_tool(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function as the tool schema ``apply_chat_template(tools=...)`` renders."""
    return {"type": "function", "function": _schema(function)}


def demonstration(calls: list[dict[str, Any]]) -> str:
    """Calls written as Qwen2.5's chat template writes an assistant's tool calls (Hermes style)."""
    return "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls)


def _record(r: dict[str, Any], category: str, demo: str) -> dict[str, Any]:
    return {
        "prompt": r["question"][0],  # the first (here: only) turn's messages
        "tools": [to_tool(f) for f in r["function"]],
        "golden_response": [demo],
        "answer": json.dumps({"bfcl": category, "id": r["id"]}),
    }


NO_CALL = "None of the available functions can do this, so I will not call any."


def write_tasks(out: str | Path, limit: int = 0, wheel_path: str | None = None) -> dict[str, Any]:
    """``bfcl_train.jsonl`` (demonstrations from the live categories, one canonical call set per record) and one
    ``bfcl_<category>_eval.jsonl`` per evaluation category (the first ``limit`` records; 0: all). Live records
    whose canonical answer BFCL's checker itself rejects (their ground truth contradicts the schema) are left out
    and counted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    train, dropped = [], []
    for cat in TRAIN_CATEGORIES:
        for r in load(cat, wheel_path):
            demo = demonstration(canonical_calls(r))
            if judge(r, cat, demo, wheel_path)["valid"]:
                train.append(_record(r, cat, demo))
            else:
                dropped.append(r["id"])
    (out / "bfcl_train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train))
    written["bfcl_train"] = {"path": str(out / "bfcl_train.jsonl"), "records": len(train), "left_out": dropped}
    for cat in EVAL_CATEGORIES:
        rows = load(cat, wheel_path)[: limit or None]
        demos = [NO_CALL if "irrelevance" in cat else demonstration(canonical_calls(r)) for r in rows]
        path = out / f"bfcl_{cat}_eval.jsonl"
        path.write_text("".join(json.dumps(_record(r, cat, d)) + "\n" for r, d in zip(rows, demos, strict=True)))
        written[f"bfcl_{cat}"] = {"path": str(path), "records": len(rows)}
    return written


@lru_cache(maxsize=16)
def _by_id(category: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in load(category)}


def score(reply: str, gold: str) -> bool:
    """The ``bfcl`` scorer: ``gold`` is {"bfcl": category, "id": record id} as the task files write it."""
    ref = json.loads(gold)
    return judge(_by_id(ref["bfcl"])[ref["id"]], ref["bfcl"], reply)["valid"]
