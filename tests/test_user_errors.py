"""What a new user trips on gets one clear line, not a traceback: bad data, bad model folders, impossible
resource requests, non-finite settings, and stopping a run with Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, start_train, tiny_overrides

from sdft_ray import checkpoint as ckpt
from sdft_ray.cli import main
from sdft_ray.errors import ModelError
from sdft_ray.modeling import check_model


def _one_line_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith(prefix), err
    return err


def test_data_error_is_one_line_naming_file_record_and_field(tiny, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "golden_response": "a"}\n{"prompt": "q2", "golden_response": 5}\n')
    over = tiny_overrides(tiny, tmp_path / "run", data__train=str(bad))
    t0 = time.perf_counter()
    assert main(["train", *over]) == 2
    err = _one_line_error(capsys, "data error: ")
    assert f"{bad}: record 1" in err and "golden_response" in err
    assert time.perf_counter() - t0 < 30  # before any actor starts
    assert main(["train", *tiny_overrides(tiny, tmp_path / "run", data__train="data/nothing/here.jsonl")]) == 2
    assert "data/nothing/here.jsonl: no such file or folder" in _one_line_error(capsys, "data error: ")


@pytest.mark.parametrize("path", ["/no/such/model", "models/no-such-model", "./nope"])
def test_missing_model_folder_is_named_before_any_actor(tiny, tmp_path: Path, capsys, monkeypatch, path: str) -> None:
    (tmp_path / "models").mkdir()  # "models/x" is a local path where a models/ folder exists, as in a repo
    monkeypatch.chdir(tmp_path)
    assert main(["train", *tiny_overrides(tiny, tmp_path / "run", model__path=path)]) == 2
    err = _one_line_error(capsys, "model error: ")
    assert f"no model at {path}" in err


def test_damaged_pickle_only_and_remote_code_model_folders(tiny, tmp_path: Path, monkeypatch) -> None:
    good = Path(tiny["model"])
    check_model(str(good))
    weights = tmp_path / "corrupt"
    shutil.copytree(good, weights)
    f = weights / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"corrupt/model.safetensors is damaged \(.*\); restore or re-save"):
        check_model(str(weights))
    pickle_only = tmp_path / "pickle"
    shutil.copytree(good, pickle_only)
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\); sdft-ray loads safetensors"):
        check_model(str(pickle_only))
    remote = tmp_path / "remote"
    shutil.copytree(good, remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    with pytest.raises(ModelError, match="auto_map.*model.trust_remote_code=true"):
        check_model(str(remote))
    check_model(str(remote), trust_remote_code=True)
    # a hub id: in offline mode left to transformers (which reads the cache or fails at once); with the hub
    # unreachable and the model not cached, one line now
    from sdft_ray import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.reachable.cache_clear()
    try:
        with pytest.raises(ModelError, match="is a hub name, it is not in the local Hugging Face cache"):
            check_model("nobody/no-such-model")
    finally:
        hub.reachable.cache_clear()


def test_impossible_resource_request_fails_fast_with_the_real_cause(tiny, ray_cluster, tmp_path: Path, capsys) -> None:
    """Before: a wait until call_timeout_s, then AttributeError from shutdown() hid the cause."""
    t0 = time.perf_counter()
    assert main(["train", *tiny_overrides(tiny, tmp_path / "run", train__num_cpus=64)]) == 1
    err = _one_line_error(capsys, "error: ")
    assert "needs 64.5 CPUs (train: 1 x 64.0, rollout: 1 x 0.5) but the Ray cluster has 2" in err
    assert time.perf_counter() - t0 < 30


def _child_pids(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _assert_gone(pids: list[int]) -> None:
    time.sleep(10)  # Ray's own processes exit shortly after the driver
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline()[:3] for p in alive]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_keeping_the_last_checkpoint(tiny, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    over = tiny_overrides(tiny, out, train__steps=400, train__save_every=2, pipeline__max_staleness=0)
    proc = start_train(over, until=lambda: bool(ckpt.complete_checkpoints(str(out))))
    children = _child_pids(proc.pid)
    assert children  # Ray's processes, started by this run
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C (SIGINT)"
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"sdft-ray: stopped by {name}; the last complete checkpoint is kept" in err
    last = ckpt.complete_checkpoints(str(out))[-1]
    assert (last / "student" / "model.safetensors").is_file()
    _assert_gone(children)


def test_second_signal_exits_at_once(tiny, tmp_path: Path) -> None:
    """Ctrl-C twice: the first starts the clean stop, the second (during it) exits at once; the checkpoint
    written before is whole, and Ray's processes go with the driver."""
    out = tmp_path / "run"
    over = tiny_overrides(tiny, out, train__steps=400, train__save_every=2, pipeline__max_staleness=0)
    proc = start_train(over, until=lambda: bool(ckpt.complete_checkpoints(str(out))))
    children = _child_pids(proc.pid)
    proc.send_signal(signal.SIGINT)
    seen = []
    for line in proc.stderr:  # the first signal was handled: the clean stop (seconds of it) has begun
        seen.append(line)
        if "sdft-ray: stopping cleanly" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "sdft-ray: second signal: exiting now, without cleanup" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = ckpt.complete_checkpoints(str(out))[-1]
    assert (last / "student" / "model.safetensors").is_file()
    _assert_gone(children)


@contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``: a disk that really fills (the test is skipped where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resumes(tiny, tmp_path: Path) -> None:
    """ENOSPC while writing a checkpoint: one clear line, the previous checkpoint intact, then resume=auto works."""
    with _small_disk(tmp_path / "small", "5m") as small:
        out = small / "run"
        over = tiny_overrides(tiny, out, train__steps=6, train__save_every=2, train__keep_checkpoints=1)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd = [sys.executable, "-m", "sdft_ray.cli", "train", *over, "pipeline.max_staleness=0"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        assert "checkpoint error: no space left on device" in res.stderr
        assert "while writing checkpoint step 4" in res.stderr
        assert "step-000002 is intact" in res.stderr
        kept = ckpt.complete_checkpoints(str(out))
        assert [p.name for p in kept] == ["step-000002"] and not list((out / "checkpoints").glob(".tmp-*"))
        ckpt.verify_checkpoint(kept[0])
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        res = subprocess.run([*cmd, "train.resume=auto"], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert ckpt.complete_checkpoints(str(out))[-1].name == "step-000006"


def test_disk_full_while_writing_the_run_log_is_one_line_and_resumable(tiny, tmp_path: Path) -> None:
    """ENOSPC on a metrics.jsonl write (a resume onto a full disk, the red team's ~300-traceback case): one line,
    the checkpoint and every logged line intact; once space is freed, resume=auto finishes the run."""
    with _small_disk(tmp_path / "small", "8m") as small:
        out = small / "run"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        over = tiny_overrides(tiny, out, train__steps=4, train__save_every=2, train__keep_checkpoints=1)
        cmd = [sys.executable, "-m", "sdft_ray.cli", "train", *over, "pipeline.max_staleness=0"]
        first = subprocess.run([*cmd, "train.steps=2"], env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        log = out / "metrics.jsonl"
        # end the log on a page boundary, so that its next line needs a new page (tmpfs allocates by page)
        size = log.stat().st_size
        pad = -(size + len('{"event": "pad", "x": ""}\n')) % 4096
        with open(log, "a") as f:
            f.write(json.dumps({"event": "pad", "x": "x" * pad}) + "\n")
        assert log.stat().st_size % 4096 == 0
        before = log.read_text()
        with open(small / "filler", "wb") as f:  # the disk is now full
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        # the first run stopped at 2 of 4 steps; extending it is a schedule change the user must ask for
        cmd.append("train.allow_config_change=true")
        res = subprocess.run([*cmd, "train.resume=auto"], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 1, res.stderr[-3000:]  # a run failure, not a settings error (2)
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        err = res.stderr
        assert "error: no space left on device (writing the run log)" in err and "train.resume=auto" in err, err[-3000:]
        assert log.read_text() == before  # nothing already logged lost, no half line
        ckpt.verify_checkpoint(ckpt.complete_checkpoints(str(out))[-1])
        (small / "filler").unlink()
        res = subprocess.run([*cmd, "train.resume=auto"], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        steps = [json.loads(x).get("step") for x in log.read_text().splitlines() if "loss" in x]
        assert steps == [1, 2, 3, 4]


# What Ray 2.60 raised when its memory monitor killed our 0.5B trainer on this 24 GB machine (trimmed: the
# object-store statistics and advice between these lines are as long again).
RAY_OOM = """1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 127.0.0.1, ID: 327c)
was 22.62GB used / 23.54GB limit (0.961080)
OOM kill reason: Memory usage 24186744832B exceeded threshold of 24012189696B (95.0% of 25275990016B limit)
Ray killed 1 worker(s) based on the killing policy
Considered workers: [
Selected to kill: (Actor(40c1): job ID=01000000, lease ID=0100, task name=StudentTrainer.__init__, required
resources={bundle_group_a466: 0.001}, pid=7379, actual memory used=13.87GB, worker ID=b401)
(Actor(2bfc): job ID=01000000, task name=RolloutWorker.__init__, pid=7378, actual memory used=5.68GB)
]
Top 10 memory users: PID	MEM(GB)	COMMAND"""


def test_a_memory_kill_is_one_line_naming_the_role(capsys) -> None:
    import ray

    from sdft_ray.errors import ActorFailure, memory_kill

    line = memory_kill(ray.exceptions.OutOfMemoryError(RAY_OOM))
    assert line.startswith(
        "out of memory: Ray's memory monitor killed the trainer (StudentTrainer.__init__, "
        "holding 13.87GB); the node had 22.62GB of 23.54GB in use"
    )
    assert "sdft-ray memory" in line and "train.micro_batch_size" in line and "\n" not in line
    assert memory_kill(RuntimeError("some other failure")) is None
    # the driver's own error for a dead trainer carries the memory kill as its cause: the CLI prints the kill
    err = ActorFailure("trainer rank(s) [0] died at step 2 (OutOfMemoryError)")
    err.__cause__ = ray.exceptions.OutOfMemoryError(RAY_OOM)
    from sdft_ray.errors import exit_status

    assert exit_status(err) == (1, "error: " + line)


def test_dry_run_checks_everything_and_touches_nothing(tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--dry-run", *tiny_overrides(tiny, out, train__steps=5)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps"] == 5 and plan["samples_per_step"] == 4 and plan["data"]["records"] > 0
    assert plan["rollout"] == "hf x 1" and plan["resume_from"] is None
    import torch

    assert plan["environment"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert plan["memory_gb"]["trainer"] > 0 and plan["memory_gb"]["rollout engine"] > 0  # sdft-ray memory's roles
    assert not out.exists()  # no folder made, no Ray started
    # bad input fails the dry run exactly as it would fail the run
    assert main(["train", "--dry-run", *tiny_overrides(tiny, out, data__train=str(tmp_path / "none.jsonl"))]) == 2
    # a folder that holds a run: the dry run says what overwrite would delete, and deletes nothing
    tmp = ckpt.temp_dir(str(out), 2)
    ckpt.finalize(tmp, 2, {"step": 2, "version": 2}, keep=2)
    capsys.readouterr()
    assert main(["train", "--dry-run", *tiny_overrides(tiny, out, train__overwrite="true")]) == 0
    assert "would_delete" in json.loads(capsys.readouterr().out)
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").exists()


def test_generate_demos_writes_a_training_file_and_resumes(tiny, tmp_path: Path) -> None:
    """`sdft-ray generate-demos` on the project's own engine: a file SDFT/SFT can train on; a rerun with more
    prompts writes only the new ones; a line cut short by a kill is redone; a bad record is one line."""
    prompts = tmp_path / "prompts.jsonl"
    out = tmp_path / "demos.jsonl"
    qs = [{"prompt": f"ab{i}c", "answer": str(i)} for i in range(6)]
    prompts.write_text("".join(json.dumps(q) + "\n" for q in qs[:4]))
    over = [f"model.path={tiny['model']}", "rollout.backend=hf", "rollout.max_new_tokens=6", "rollout.num_cpus=0.5"]
    cmd = [sys.executable, "-m", "sdft_ray.cli", "generate-demos", "--prompts", str(prompts), "--out", str(out), *over]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["written"] == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [q["prompt"] for q in qs[:4]] and all("golden_response" in r for r in rows)
    assert [r["answer"] for r in rows] == ["0", "1", "2", "3"]  # the prompt's other fields are kept
    out.write_text(out.read_text() + '{"prompt": "ab3c", "gold')  # a kill mid-line
    prompts.write_text("".join(json.dumps(q) + "\n" for q in qs))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout) | {"out": ""} == {"prompts": 6, "already_done": 4, "written": 2, "out": ""}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and len({r["prompt"] for r in rows}) == 6
    from sdft_ray.config import DataConfig
    from sdft_ray.data import load_examples

    assert len(load_examples(DataConfig(train=str(out)))) == 6  # a training file in the golden_response format
    prompts.write_text(json.dumps({"question": "x"}) + "\n")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [f"data error: {prompts}: record 0: field 'prompt' is missing"]


def test_offline_hub_names_are_one_line_and_memory_works_offline(tiny, tmp_path: Path) -> None:
    """No hub (HF_ENDPOINT on a closed port): a hub model or dataset name ends in one line, without
    huggingface_hub's retry warnings; `sdft-ray memory` prints the H200 budget from the shipped shape."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "golden_response": "b"}) + "\n")
    cli = [sys.executable, "-m", "sdft_ray.cli"]
    runs = {
        "model": [
            *cli,
            "train",
            "--config",
            "configs/single_h200.yaml",
            f"data.train={data}",
            f"train.output_dir={tmp_path / 'run'}",
        ],
        "dataset": [*cli, "train", *tiny_overrides(tiny, tmp_path / "run2", data__train="nobody/no-such-dataset")],
    }
    for what, cmd in runs.items():
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        lines = [x for x in run.stderr.splitlines() if x.strip()]
        assert run.returncode == 2 and len(lines) == 1, (what, run.stderr[-3000:])
        assert "hub" in lines[0] and ("unreachable" in lines[0] or "cannot be reached" in lines[0]), lines[0]
    mem = subprocess.run(
        [*cli, "memory", "--config", "configs/single_h200.yaml"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert mem.returncode == 0, mem.stderr[-2000:]
    assert "117 of 141 GB" in mem.stdout and "Retrying" not in mem.stderr


def test_a_missing_optional_library_is_one_line_and_other_runtime_errors_keep_their_traceback(tiny, capsys) -> None:
    if __import__("importlib").util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval-harness is installed here")
    over = tiny_overrides(tiny, Path("unused"))
    assert main(["eval", "--lm-eval", "hellaswag", *over]) == 2
    assert "lm-eval-harness is not installed: pip install 'sdft-ray[eval]'" in _one_line_error(capsys, "error: ")
    from sdft_ray.errors import MissingDependency, exit_status

    assert exit_status(MissingDependency("x needs y: pip install y")) == (2, "error: x needs y: pip install y")
    # the type decides, not the words: a bug whose message happens to say "not installed" is not hidden
    assert exit_status(RuntimeError("a handler was not installed")) is None


def test_help_lists_every_subcommand(capsys) -> None:
    from sdft_ray.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"    {name} " in out or f"    {name}\n" in out for name in COMMANDS)
