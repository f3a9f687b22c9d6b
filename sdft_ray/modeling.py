"""Loading models/tokenizers and computing logits at completion positions (shared by every role)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdft_ray.config import ModelConfig
from sdft_ray.ds_config import zero3_partitioned
from sdft_ray.errors import ModelError, first_line
from sdft_ray.precision import resolve_dtype


def device_for(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _looks_local(path: str) -> bool:
    # hub ids are "name" or "org/name"; anything else (absolute, ./, ~, deeper paths) can only be a folder, and
    # so is "dir/name" when "dir" is a folder here (models/my-run)
    p = Path(path)
    return (
        p.exists()
        or path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or "\\" in path
        or (len(p.parts) > 1 and Path(p.parts[0]).is_dir())
    )


def check_model(path: str, trust_remote_code: bool = False, weights: bool = True) -> None:
    """Fail in the driver, before any actor starts, on a model folder that every actor would fail to load.

    Hub ids must be reachable or cached (``hub.check_hub_model``: one line in seconds offline); local folders
    must hold a config and safetensors weights whose headers parse.
    """
    if not _looks_local(path):
        from sdft_ray.hub import check_hub_model

        check_hub_model(path)
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"no model at {path}: the folder does not exist (model.path)")
    if not folder.is_dir():
        raise ModelError(f"model.path {path} is a file; give the folder written by save_pretrained")
    if not weights:  # a tokenizer-only folder has no config.json or weights
        return
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"no model at {path}: {config} is missing (model.path must be a save_pretrained folder)")
    try:
        meta = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{config} is not valid JSON ({e})") from None
    if meta.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{config} asks for the model's own Python code (auto_map); it runs only with "
            "model.trust_remote_code=true, which executes that code: set it only for a model you trust"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickles:
            raise ModelError(
                f"{folder} has only pickle weights ({', '.join(pickles[:3])}); sdft-ray loads safetensors only "
                '(unpickling runs code). Convert once with: python -c "from transformers import '
                f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}')\""
            )
        raise ModelError(f"no model weights in {folder}: expected *.safetensors files")
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for every kind of damage
            raise ModelError(f"{w} is damaged ({e}); restore or re-save the model") from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    check_model(cfg.tokenizer or cfg.path, cfg.trust_remote_code, weights=not cfg.tokenizer)
    name = cfg.tokenizer or cfg.path
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:  # a hub id that is neither cached nor reachable: transformers' message is a page long
        raise ModelError(
            f"no model at {name}: not a local folder, and not loadable from the hub ({first_line(e)})"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def stop_token_ids(tokenizer: Any, model_path: str) -> list[int]:
    """Where a completion ends: the tokenizer's EOS plus every EOS id in the checkpoint's generation_config.

    Chat models often list several (Llama 3: <|end_of_text|>, <|eot_id|>); TRL and vLLM stop on all of them,
    so both rollout backends do too, explicitly.
    """
    from transformers import GenerationConfig

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        extra = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        extra = None
    for i in [extra] if isinstance(extra, int) else extra or []:
        if i not in ids:
            ids.append(int(i))
    return ids


def check_teacher_model(cfg: ModelConfig, teacher_path: str, student_tokenizer: Any) -> None:
    """A teacher model other than the student must read and write the same tokens: the loss compares the two
    distributions position by position, so another vocabulary (or one padded to another size) would compare
    probabilities of different tokens."""
    from dataclasses import replace

    from transformers import AutoConfig

    teacher_tok = load_tokenizer(replace(cfg, path=teacher_path, tokenizer=""))
    if teacher_tok.get_vocab() != student_tokenizer.get_vocab():
        raise ModelError(
            f"teacher.model_path={teacher_path}: its tokenizer differs from the student's "
            f"({cfg.tokenizer or cfg.path}; {len(teacher_tok)} vs {len(student_tokenizer)} tokens): a teacher must "
            "share the student's vocabulary"
        )
    sizes = [
        AutoConfig.from_pretrained(p, trust_remote_code=cfg.trust_remote_code).vocab_size
        for p in (teacher_path, cfg.path)
    ]
    if sizes[0] != sizes[1]:
        raise ModelError(
            f"teacher.model_path={teacher_path}: its output layer has {sizes[0]} rows, the student's {sizes[1]}: "
            "the two distributions would not line up"
        )


def attention_for(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> str:
    """``model.attn_implementation``, or where it is unset: ``eager`` for bf16 on a CPU, transformers' default
    (sdpa) elsewhere. Measured on an Intel Xeon with AMX (docs/precision.md): torch's fused CPU attention kernel in
    bf16 moves the loss 1.4% from fp32 and turns one layer-norm gradient of SmolLM2 to cosine 0.94; eager attention
    (softmax in fp32) keeps 0.15% and 0.993, as on GPU, for ~6% of the step."""
    if cfg.attn_implementation:
        return cfg.attn_implementation
    return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else ""


def load_model(cfg: ModelConfig, device: torch.device, path: str | None = None) -> torch.nn.Module:
    """A causal LM from a hub name or local folder; safetensors only, remote code only when asked."""
    from transformers import AutoModelForCausalLM

    check_model(path or cfg.path, cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    attention = attention_for(cfg, device, dtype)
    if attention:
        kwargs["attn_implementation"] = attention
    model = AutoModelForCausalLM.from_pretrained(path or cfg.path, **kwargs)
    return model.to(device)


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask [B, L]."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# Below this many shared tokens a second decoder call costs more than it saves.
MIN_SHARED_PREFIX = 16


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (it predicts the first completion
    token, so its hidden state must come from the per-sequence pass)."""
    n = 0
    for column in zip(*prompts, strict=False):
        if any(t != column[0] for t in column):
            break
        n += 1
    return min(n, min(len(p) for p in prompts) - 1)


def completion_hidden(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad: int,
    share_prefix: bool = False,
) -> torch.Tensor | None:
    """Final hidden states [B, Tc, H] that predict each completion token, or None for a model we cannot split
    into decoder + LM head (then use ``completion_logits``).

    Sequences are right-padded so positions are plain 0..L-1 for every row. With ``share_prefix`` a prompt
    prefix common to the whole batch (a system prompt, a tool list) runs once and its keys/values are repeated
    for every row: the same values and gradients (the repeat's backward sums them), without recomputing it B times.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or model.get_output_embeddings() is None:
        return None
    shared = shared_prefix_len(prompts) if share_prefix and len(prompts) > 1 else 0
    # Both need one decoder call per forward: gradient checkpointing drops the cache in training (transformers
    # turns use_cache off), and ZeRO-3 prefetches parameters in a recorded module order, which a prefix call in
    # some micro-batches but not others would break.
    checkpointing = getattr(model, "is_gradient_checkpointing", False) and model.training
    if shared >= MIN_SHARED_PREFIX and not checkpointing and not zero3_partitioned(model):
        hidden = _shared_prefix_hidden(model, decoder, prompts, completions, pad, shared)
        if hidden is not None:
            return hidden
    ids, attn, pos = _completion_positions(model, prompts, completions, pad)
    hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state
    return hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _shared_prefix_hidden(
    model: torch.nn.Module,
    decoder: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad: int,
    shared: int,
) -> torch.Tensor | None:
    device = next(model.parameters()).device
    cache = decoder(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True).past_key_values
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None  # a model without a repeatable KV cache: the caller runs the plain path
    cache.batch_repeat_interleave(len(prompts))
    rest = [p[shared:] for p in prompts]
    ids, attn, pos = _completion_positions(model, rest, completions, pad)
    mask = torch.cat([torch.ones((len(prompts), shared), dtype=attn.dtype, device=device), attn], dim=1)
    positions = torch.arange(shared, shared + ids.shape[1], device=device).expand(len(prompts), -1)
    hidden = decoder(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state
    return hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def lm_head(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, exactly as the model's own forward computes them."""
    return finish_logits(model, model.get_output_embeddings()(hidden))


def _completion_positions(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    full = [p + c for p, c in zip(prompts, completions, strict=True)]
    ids, attn = pad_right(full, pad)
    tc = max(1, max(len(c) for c in completions))
    # index of the hidden state that predicts completion token t: len(prompt) - 1 + t
    pos = torch.zeros((len(full), tc), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(c)
        pos[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        pos[i, n:] = len(p) - 1  # padding rows point at a valid position; masked out later
    return ids.to(device), attn.to(device), pos.to(device)


def completion_logits(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad: int,
    share_prefix: bool = False,
) -> torch.Tensor:
    """Logits [B, Tc, V] predicting each completion token, for prompt+completion run through ``model``.

    The LM head is applied only to the completion positions: on a 150k vocabulary the full [B, L, V] logits
    would dominate memory. (The chunked loss goes further and never holds [B, Tc, V]: ``completion_hidden``.)
    """
    hidden = completion_hidden(model, prompts, completions, pad, share_prefix)
    if hidden is not None:
        return lm_head(model, hidden)
    ids, attn, pos = _completion_positions(model, prompts, completions, pad)
    logits = model(input_ids=ids, attention_mask=attn).logits
    return logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def finish_logits(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What ``*ForCausalLM.forward`` does after the LM head, which the hidden-state path above skips.

    Gemma 2/3 soft-cap the final logits, Granite divides by ``logits_scaling``, Cohere multiplies by
    ``logit_scale``; without this the student, teacher and importance log-probs would not be the model's.
    """
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    scale = getattr(model, "logit_scale", None) or getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if getattr(cfg, "output_multiplier", None) not in (None, 1, 1.0):
        raise NotImplementedError(f"{type(model).__name__}: output_multiplier on the logits is not supported yet")
    return logits


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), in MB."""
    import resource

    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def pad_floats(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), max(1, width)), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out
