"""A teacher behind an OpenAI-compatible server (``vllm serve``): the HTTP client and its up-front checks.

The teacher's verdict on a sample is vLLM's ``prompt_logprobs`` of the teacher prompt + the completion, top-k per
position, with ``return_tokens_as_token_ids`` so tokens come back as ids in the shared vocabulary instead of
strings to re-tokenize. Before any actor starts, ``check`` proves the server is up, serves the model asked for,
and tokenizes as the student does: a teacher with another vocabulary would return log-probs of other tokens,
and the loss would be silently wrong.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from sdft_ray.config import Config
from sdft_ray.errors import ActorFailure

# Every kind of text a chat sample holds: words, digits, punctuation, a tool call, non-ASCII, an emoji.
PROBE = 'Action: get_weather\nAction Input: {"city": "São Paulo", "days": 3} -> 21.5°C ✓ 🙂'


class TeacherServerError(ActorFailure):
    """The external teacher cannot be used: down, another model, another tokenizer, or it stopped answering."""


class TeacherServer:
    def __init__(self, cfg: Config) -> None:
        te = cfg.teacher
        self.url = te.external_url.rstrip("/")
        self.model = te.external_model or cfg.model.path
        self.top_k = te.external_top_k
        self.retries = te.external_retries
        headers = {}
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(base_url=self.url, timeout=te.external_timeout_s, headers=headers)
        self.pool = ThreadPoolExecutor(max(1, te.external_concurrency), thread_name_prefix="teacher-http")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One call with bounded retries: a refused connection, a timeout or a 5xx is retried after 1, 2, 4 s;
        a 4xx (a request the server will never accept) is not."""
        err = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(2 ** (attempt - 1))
            try:
                resp = self.client.request(method, path, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out
                err = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if resp.status_code >= 500:
                err = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise TeacherServerError(
                    f"teacher server {self.url}{path} refused the request: HTTP {resp.status_code}: {resp.text[:300]}"
                )
            return resp.json()
        raise TeacherServerError(
            f"teacher server {self.url} did not answer {path} after {self.retries + 1} tries ({err}); "
            "is it running (teacher.external_url)? teacher.external_timeout_s / external_retries bound the wait"
        )

    def check(self, tokenizer: Any) -> None:
        """Up, serving ``self.model``, and tokenizing like the student (one clear line otherwise)."""
        served = [m.get("id") for m in self._request("GET", "/v1/models").get("data", [])]
        if self.model not in served:
            raise TeacherServerError(
                f"teacher server {self.url} serves {served}, not {self.model!r}: set teacher.external_model"
            )
        theirs = self._request(
            "POST", "/tokenize", {"model": self.model, "prompt": PROBE, "add_special_tokens": False}
        ).get("tokens")
        ours = tokenizer.encode(PROBE, add_special_tokens=False)
        if theirs != ours:
            raise TeacherServerError(
                f"teacher server {self.url} ({self.model}) tokenizes differently from the student's tokenizer "
                f"(a probe string: {len(theirs or [])} vs {len(ours)} tokens): its log-probs would be of other tokens"
            )

    def top_k_logprobs(self, prompt: list[int], completion: list[int]) -> tuple[list[list[int]], list[list[float]]]:
        """Per completion token: the teacher's top-k token ids and log-probs (next-token, raw distribution)."""
        body = {
            "model": self.model,
            "prompt": prompt + completion,
            "max_tokens": 1,
            "prompt_logprobs": self.top_k,
            "return_tokens_as_token_ids": True,
        }
        rows = self._request("POST", "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        rows = rows[len(prompt) : len(prompt) + len(completion)]
        if len(rows) != len(completion):
            raise TeacherServerError(
                f"teacher server {self.url} returned {len(rows)} prompt log-prob rows for {len(completion)} tokens"
            )
        ids, vals = [], []
        for row in rows:
            # the server adds the prompt's own token to the top-k when it is not among them: keep the best k
            entries = sorted((row or {}).items(), key=lambda kv: -kv[1]["logprob"])[: self.top_k]
            ids.append([int(str(tok).removeprefix("token_id:")) for tok, _ in entries])
            vals.append([float(info["logprob"]) for _, info in entries])
        return ids, vals

    def score_many(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[list[list[int]], list[list[float]]]]:
        """``top_k_logprobs`` for many samples, ``teacher.external_concurrency`` requests at a time."""
        return list(self.pool.map(lambda pc: self.top_k_logprobs(*pc), pairs))

    def complete(self, prompt: list[int], max_tokens: int, temperature: float, seed: int) -> str:
        """A completion of ``prompt`` (token ids), sampled by the server: a demonstration for generate-demos."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        return self._request("POST", "/v1/completions", body)["choices"][0]["text"].strip()

    def complete_many(self, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int) -> list[str]:
        return list(
            self.pool.map(lambda ip: self.complete(ip[1], max_tokens, temperature, seed + ip[0]), enumerate(prompts))
        )
