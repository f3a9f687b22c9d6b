"""`sdft-ray loss-memory`: peak memory of one SDFT loss step (forward + backward), materialized vs chunked logits.

Synthetic weights at real shapes: SmolLM2-135M (vocab 49152, hidden 576) and Qwen2.5-7B (vocab 152064, hidden
3584). Each case runs in a fresh process; on CPU the number is the growth of peak RSS over the inputs and LM
heads already allocated, on a GPU the peak CUDA allocation over the same baseline.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
from pathlib import Path
from typing import Any

SHAPES = {"SmolLM2-135M (V=49k)": (49152, 576), "Qwen2.5-7B (V=152k)": (152064, 3584)}


def _case(vocab: int, hidden: int, tokens: int, chunk: int, device: str, out: Any) -> None:
    import torch

    from sdft_ray import losses

    torch.manual_seed(0)
    dev = torch.device(device)
    hs = (0.02 * torch.randn(1, tokens, hidden, device=dev)).requires_grad_(True)
    ht = 0.02 * torch.randn(1, tokens, hidden, device=dev)
    ws = (0.02 * torch.randn(vocab, hidden, device=dev)).requires_grad_(True)
    wt = 0.02 * torch.randn(vocab, hidden, device=dev)
    ws.grad = torch.zeros_like(ws)  # the gradient buffer exists in training too: not the loss's cost
    hs.grad = torch.zeros_like(hs)
    ids = torch.randint(0, vocab, (1, tokens), device=dev)
    mask = torch.ones(1, tokens, dtype=torch.long, device=dev)
    rlp = torch.full((1, tokens), -3.0, device=dev)

    def peak() -> float:
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak()
    if chunk:
        res = losses.chunked_sdft_loss(
            hs, ht, lambda h: h @ ws.T, lambda h: h @ wt.T, ids, mask, rollout_logp=rlp, chunk_tokens=chunk
        )
    else:
        res = losses.sdft_loss(hs @ ws.T, ids, mask, teacher_logits=ht @ wt.T, rollout_logp=rlp)
    res.loss.backward()
    out.put({"loss": res.loss.item(), "peak_mb": peak() - base})


def measure(tokens: int = 2048, chunk: int = 256, device: str = "cpu") -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    rows = []
    for name, (vocab, hidden) in SHAPES.items():
        row: dict[str, Any] = {"model": name, "vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk": chunk}
        for label, c in (("materialized", 0), ("chunked", chunk)):
            q = ctx.Queue()
            p = ctx.Process(target=_case, args=(vocab, hidden, tokens, c, device, q))
            p.start()
            got = q.get()
            p.join()
            row[f"{label}_mb"], row[f"{label}_loss"] = got["peak_mb"], got["loss"]
        row["ratio"] = row["materialized_mb"] / max(1.0, row["chunked_mb"])
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]], out: str, device: str) -> str:
    lines = [
        f"| shape | tokens | materialized (MB) | chunked, {rows[0]['chunk']} tokens (MB) | ratio | same loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = abs(r["materialized_loss"] - r["chunked_loss"]) <= 1e-5 * max(1.0, abs(r["materialized_loss"]))
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['materialized_mb']:.0f} | {r['chunked_mb']:.0f} | "
            f"{r['ratio']:.1f}x | {'yes' if same else 'NO'} |"
        )
    unit = "peak CUDA allocation" if device == "cuda" else "peak RSS growth"
    md = "\n".join(lines) + f"\n\nOne loss step (forward + backward) on {device}; {unit} over the inputs and heads.\n"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "loss_memory.json").write_text(json.dumps(rows, indent=1))
    (Path(out) / "loss_memory.md").write_text(md)
    return md
