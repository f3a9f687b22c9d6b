"""Demonstration datasets: load, normalize the formats seen in the wild, build student and teacher prompts.

Formats (docs/algorithm.md): ``prompt`` + ``golden_response`` (str or list), ``messages`` + ``output_text``,
``prompt`` + ``teacher_prompt``, ``prompt`` + ``privileged_context``. ``prompt`` may be a string or a list
of chat messages. An optional ``answer`` field is the gold answer for evaluation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdft_ray.config import DataConfig
from sdft_ray.errors import DataError, first_line

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class Example:
    """One demonstration, normalized. ``teacher`` is the teacher's chat (it contains the demonstration)."""

    index: int
    prompt: Messages
    teacher: Messages
    demonstration: str | None
    answer: str | None = None
    tools: list[dict[str, Any]] | None = None  # function schemas the chat template renders (tool calling)


@dataclass
class TokenizedExample:
    index: int
    prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    demonstration_ids: list[int]  # for SFT; empty when the record has no demonstration
    answer: str | None = None
    demonstration: str | None = None


@dataclass
class LoadReport:
    records: int = 0
    skipped: int = 0
    truncated_prompts: int = 0
    skip_reasons: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading


def _read_json_records(path: Path) -> list[Any]:
    # JSON/JSONL are read with the stdlib rather than `datasets`' arrow reader: arrow schema inference turns
    # one bad row into an error about column types with no row number, and we promise file + row + field.
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading BOM is what many Windows editors write: accept it
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 at byte {e.start} (line {line}): {e.reason}") from None
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        return _parse_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and e.msg == "Extra data":  # JSON Lines saved as .json
            return _parse_lines(path, text)
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):
        # {"train": [...]} or {"data": [...]} wrappers are common in released datasets.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of records (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _parse_lines(path: Path, text: str) -> list[Any]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: record at line {lineno}: invalid JSON: {e.msg}") from None
    return out


def read_records(source: str, split: str = "train") -> tuple[str, list[Any]]:
    """Return (display name, raw records) from a file, a `save_to_disk` folder or a hub dataset name."""
    path = Path(source)
    if path.is_file():
        if path.suffix in (".json", ".jsonl"):
            return str(path), _read_json_records(path)
        if path.suffix == ".parquet":
            import datasets

            try:
                return str(path), list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise DataError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .json, .jsonl or .parquet)")
    import datasets

    if path.is_dir():
        markers = ("dataset_dict.json", "state.json")
        if not any((path / m).is_file() for m in markers):
            what = "is empty" if not any(path.iterdir()) else f"has no {' or '.join(markers)}"
            raise DataError(
                f"{path}: a folder, but not one written by datasets' save_to_disk ({what}); "
                "give a .json/.jsonl/.parquet file or a save_to_disk folder"
            )
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"{path}: damaged save_to_disk folder ({_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; has {', '.join(ds)}")
            ds = ds[split]
        return str(path), list(ds)
    # "org/name" may be a hub dataset; anything else that looks like a path is a missing file
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or path.suffix:
        raise DataError(f"{source}: no such file or folder")
    from sdft_ray import hub

    if not hub.offline_set() and not hub.reachable():  # else a minute of retries before the same failure
        raise DataError(f"{source}: no such local file or folder, and the hub (for a dataset name) is unreachable")
    try:
        return source, list(datasets.load_dataset(source, split=split))
    except Exception as e:  # offline, unknown name, no such split: datasets raises many types
        raise DataError(
            f"{source}: no such local file or folder, and loading it as a hub dataset failed ({_first_line(e)})"
        ) from None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


# ---------------------------------------------------------------- normalizing


def chat_messages(value: Any, where: str, fieldname: str) -> Messages:
    """A record's text or chat field as chat messages; one DataError naming the record and field otherwise."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{fieldname}' is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field '{fieldname}[{i}]' must be {{'role': str, 'content': str}}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in out):
            raise DataError(f"{where}: field '{fieldname}' has no non-empty message")
        return out
    raise DataError(f"{where}: field '{fieldname}' must be a string or a non-empty list of chat messages")


def _text(value: Any, where: str, fieldname: str) -> str:
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: field '{fieldname}' must be a string or a non-empty list of strings")
        value = "\n".join(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{fieldname}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{fieldname}' is empty")
    return value


def _question(prompt: Messages) -> str:
    """The text the teacher template calls <question>: the user turns of the student prompt."""
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return "\n".join(users) if users else prompt[-1]["content"]


def normalize_record(rec: Any, index: int, where: str, cfg: DataConfig) -> Example:
    """Map one raw record of any supported format to an Example; DataError names the bad field."""
    where = f"{where}: record {index}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}")
    answer = rec.get("answer")
    if answer is not None and not isinstance(answer, str):
        answer = json.dumps(answer) if isinstance(answer, (dict, list)) else str(answer)
    if "messages" in rec:
        prompt = chat_messages(rec["messages"], where, "messages")
        prompt = [m for m in prompt if m["role"] != "assistant"]
        if not prompt:
            raise DataError(f"{where}: field 'messages' has no system/user message")
        if "output_text" not in rec:
            raise DataError(f"{where}: field 'output_text' is missing (required with 'messages')")
        demo = _text(rec["output_text"], where, "output_text")
        teacher = None
    elif "prompt" in rec:
        prompt = chat_messages(rec["prompt"], where, "prompt")
        demo, teacher = None, None
        if "golden_response" in rec:
            demo = _text(rec["golden_response"], where, "golden_response")
        elif "privileged_context" in rec:
            demo = _text(rec["privileged_context"], where, "privileged_context")
        elif "teacher_prompt" in rec:
            teacher = chat_messages(rec["teacher_prompt"], where, "teacher_prompt")
            for key in ("completion", "response"):
                if key in rec:
                    demo = _text(rec[key], where, key)
        else:
            raise DataError(
                f"{where}: no demonstration field; expected one of 'golden_response', 'privileged_context', "
                f"'teacher_prompt' next to 'prompt' (fields present: {', '.join(sorted(rec)) or 'none'})"
            )
    else:
        raise DataError(
            f"{where}: field 'prompt' (or 'messages') is missing; fields present: {', '.join(sorted(rec)) or 'none'}"
        )
    tools = rec.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: field 'tools' must be a list of function schemas (objects)")
    if cfg.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    if teacher is None:
        body = cfg.teacher_template.format(question=_question(prompt), demonstration=demo)
        system = [m for m in prompt if m["role"] == "system"]
        teacher = [*system, {"role": "user", "content": body}]
    return Example(index=index, prompt=prompt, teacher=teacher, demonstration=demo, answer=answer, tools=tools)


def load_examples(cfg: DataConfig, source: str | None = None, report: LoadReport | None = None) -> list[Example]:
    """Read and normalize a dataset; bad records raise or are skipped per ``cfg.on_bad_record``."""
    report = report if report is not None else LoadReport()
    name, records = read_records(source or cfg.train, cfg.split)
    if cfg.max_records:
        records = records[: cfg.max_records]
    examples = []
    for i, rec in enumerate(records):
        try:
            examples.append(normalize_record(rec, i, name, cfg))
        except DataError as e:
            if cfg.on_bad_record == "error":
                raise
            report.skipped += 1
            if len(report.skip_reasons) < 20:
                report.skip_reasons.append(str(e))
            log.warning("skipping bad record: %s", e)
    report.records = len(examples)
    if not examples:
        why = f" ({report.skipped} bad records skipped, first: {report.skip_reasons[0]})" if report.skipped else ""
        raise DataError(f"{name}: dataset is empty{why}")
    return examples


# ---------------------------------------------------------------- tokenizing


def render_chat(tokenizer: Any, messages: Messages, tools: list[dict[str, Any]] | None = None) -> str:
    """The generation prompt for a chat, via the tokenizer's chat template (which renders ``tools`` its own way,
    as the model was trained to read them)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    # Base models without a template: plain text, so a user's base checkpoint still trains.
    listed = [json.dumps(t) for t in tools or []]
    return "\n\n".join([*listed, *(m["content"] for m in messages)]) + "\n\n"


def encode_prompt(
    tokenizer: Any, messages: Messages, max_len: int, tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], bool]:
    """Token ids of a rendered chat, left-truncated to ``max_len``; returns (ids, was_truncated)."""
    ids = tokenizer(render_chat(tokenizer, messages, tools), add_special_tokens=False)["input_ids"]
    if len(ids) > max_len:
        return ids[-max_len:], True
    return ids, False


def tokenize_examples(
    examples: list[Example], tokenizer: Any, cfg: DataConfig, report: LoadReport | None = None
) -> list[TokenizedExample]:
    out = []
    for ex in examples:
        p, t1 = encode_prompt(tokenizer, ex.prompt, cfg.max_prompt_length, ex.tools)
        t, t2 = encode_prompt(tokenizer, ex.teacher, cfg.max_prompt_length, ex.tools)
        demo_ids: list[int] = []
        if ex.demonstration is not None:
            demo_ids = tokenizer(ex.demonstration, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                demo_ids = demo_ids + [tokenizer.eos_token_id]
        if report is not None:
            report.truncated_prompts += int(t1 or t2)
        out.append(TokenizedExample(ex.index, p, t, demo_ids, ex.answer, ex.demonstration))
    return out


class PromptSampler:
    """Deterministic epoch-shuffled batches; its position is a plain int so checkpoints can restore it."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if n == 0:
            raise DataError("dataset is empty")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.position = 0  # number of batches handed out so far

    def _order(self, epoch: int) -> list[int]:
        import random

        idx = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    def batch(self, position: int) -> list[int]:
        """Indices of batch number ``position``; batches run across epoch boundaries."""
        start = position * self.batch_size
        orders: dict[int, list[int]] = {}
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.n)
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            out.append(orders[epoch][offset])
        return out

    def next(self) -> list[int]:
        b = self.batch(self.position)
        self.position += 1
        return b

    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.batch_size)
