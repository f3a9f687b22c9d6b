"""``sdft-ray generate-demos``: a training file of demonstrations for a file of prompts.

Each prompt record (``prompt``: text or chat messages; every other field is kept) gets a ``golden_response``
sampled from a model: ``model.path`` on the project's own rollout engine, or a model behind an
OpenAI-compatible server (``--server``, e.g. ``vllm serve`` of a larger teacher). The output appends: a
rerun skips the prompts already written, so a stopped job continues where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sdft_ray.config import Config
from sdft_ray.data import chat_messages, encode_prompt, read_records
from sdft_ray.errors import DataError


def _key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _done(out: Path) -> set[str]:
    """The prompts ``out`` already holds; a last line cut short by a kill is dropped (its prompt is redone)."""
    if not out.is_file():
        return set()
    text = out.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        out.write_text(text)
    done = set()
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            done.add(_key(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"{out}: record {i}: not a demonstration this command wrote; choose another --out"
            ) from None
    return done


def generate_demos(
    cfg: Config,
    prompts: str,
    out: str,
    server: str = "",
    server_model: str = "",
    batch: int = 16,
    greedy: bool = False,
) -> dict[str, Any]:
    """Write one ``{..., "prompt", "golden_response"}`` line per prompt not yet in ``out``; returns counts.
    Sampled at ``rollout.temperature`` up to ``rollout.max_new_tokens`` tokens, or greedy."""
    from tqdm import tqdm

    from sdft_ray.modeling import load_tokenizer

    name, records = read_records(prompts)
    out_path = Path(out)
    done = _done(out_path)
    todo, chats = [], []
    for i, rec in enumerate(records):
        where = f"{name}: record {i}"
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise DataError(f"{where}: field 'prompt' is missing")
        chat = chat_messages(rec["prompt"], where, "prompt")  # the training loader's own check, every record
        if _key(rec["prompt"]) not in done:
            todo.append(rec)
            chats.append(chat)
    tok = load_tokenizer(cfg.model)
    ids = [encode_prompt(tok, chat, cfg.data.max_prompt_length)[0] for chat in chats]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="demos", unit="prompt", disable=not todo)
    with _Sampler(cfg, tok, server, server_model, greedy) as sample, open(out_path, "a") as f:
        for k in range(0, len(todo), batch):
            texts = sample(ids[k : k + batch], k)
            for rec, text in zip(todo[k : k + batch], texts, strict=True):
                f.write(json.dumps({**rec, "golden_response": text}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a kill loses at most the batch in flight
            bar.update(len(texts))
    bar.close()
    return {"prompts": len(records), "already_done": len(records) - len(todo), "written": len(todo), "out": out}


class _Sampler:
    """``sample(prompt_ids_batch, offset) -> texts`` for the duration of a ``with`` block."""

    def __init__(self, cfg: Config, tokenizer: Any, server: str, server_model: str, greedy: bool) -> None:
        self.cfg, self.tok, self.server, self.server_model = cfg, tokenizer, server, server_model
        self.greedy = greedy

    def __enter__(self) -> Any:
        r, seed = self.cfg.rollout, self.cfg.train.seed
        temperature = 0.0 if self.greedy else r.temperature
        if self.server:
            import copy

            from sdft_ray.teacher_server import TeacherServer

            c = copy.deepcopy(self.cfg)
            c.teacher.external_url, c.teacher.external_model = self.server, self.server_model
            self.client = TeacherServer(c)
            return lambda batch, offset: self.client.complete_many(batch, r.max_new_tokens, temperature, seed + offset)
        import ray

        from sdft_ray.evaluate import rollout_engines
        from sdft_ray.records import Prompt

        self.engines = rollout_engines(self.cfg)
        engines = self.engines.__enter__()

        def sample(batch: list[list[int]], offset: int) -> list[str]:
            prompts = [Prompt(uid=str(offset + i), index=offset + i, prompt_ids=p) for i, p in enumerate(batch)]
            n = len(engines)
            greedy = self.greedy
            refs = [e.generate.remote(prompts[i::n], seed + offset * 131 + i, greedy) for i, e in enumerate(engines)]
            shards = ray.get(refs, timeout=self.cfg.pipeline.call_timeout_s)
            by_uid = {o.uid: o for shard in shards for o in shard}
            return [self.tok.decode(by_uid[p.uid].completion_ids, skip_special_tokens=True).strip() for p in prompts]

        return sample

    def __exit__(self, *exc: Any) -> None:
        if self.server:
            self.client.close()
        else:
            self.engines.__exit__(*exc)
