"""Loading models/tokenizers and computing logits at completion positions (shared by every role)."""

from __future__ import annotations

from typing import Any

import torch

from sdft_ray.config import ModelConfig


def device_for(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 on CPU is slow and loses the precision that tiny-model tests compare against.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, device: torch.device, path: str | None = None) -> torch.nn.Module:
    """A causal LM from a hub name or local folder; safetensors only, remote code only when asked."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        dtype=resolve_dtype(cfg.dtype, device),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
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


def completion_logits(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad: int
) -> torch.Tensor:
    """Logits [B, Tc, V] predicting each completion token, for prompt+completion run through ``model``.

    Sequences are right-padded so positions are plain 0..L-1 for every row. The LM head is applied only to
    the completion positions: on a 150k vocabulary the full [B, L, V] logits would dominate memory.
    """
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
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        logits = model(input_ids=ids, attention_mask=attn).logits
        return logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state
    hidden = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return head(hidden)


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
