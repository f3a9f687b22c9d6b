"""Rollouts sample exactly the configured distribution (F6): nothing from the checkpoint's generation_config
except its extra EOS ids, on both backends."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import ray
from conftest import BACKENDS, tiny_overrides

from actors.rollout import RolloutWorker
from sdft_ray.config import load_config
from sdft_ray.data import load_examples, tokenize_examples
from sdft_ray.modeling import load_tokenizer
from sdft_ray.records import Prompt


def _generate(cfg_over: list[str], items: list[Prompt]) -> list[list[int]]:
    cfg = load_config(None, cfg_over)
    actor = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(cfg.to_dict(), 0)
    try:
        return [o.completion_ids for o in ray.get(actor.generate.remote(items, seed=5))]
    finally:
        ray.kill(actor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_generation_config_changes_nothing_but_the_stops(tiny, ray_cluster, tmp_path: Path, backend) -> None:
    over = tiny_overrides(tiny, tmp_path / "run", rollout__backend=backend, rollout__max_new_tokens=24)
    cfg = load_config(None, over)
    tok = load_tokenizer(cfg.model)
    data = tokenize_examples(load_examples(cfg.data)[:8], tok, cfg.data)
    items = [Prompt(uid=str(d.index), index=d.index, prompt_ids=d.prompt_ids) for d in data]
    clean = _generate(over, items)
    # the commonest generated token becomes a second EOS id in the copy's generation_config
    counts = Counter(t for c in clean for t in c[:-1] if t != tok.eos_token_id)
    extra_eos = counts.most_common(1)[0][0]
    assert sum(extra_eos in c[:-1] for c in clean) >= 2  # so the extra stop matters in this test
    odd = tmp_path / "odd-model"
    shutil.copytree(tiny["model"], odd)
    gen_cfg = json.loads((odd / "generation_config.json").read_text())
    gen_cfg.update(
        eos_token_id=[tok.eos_token_id, extra_eos],
        repetition_penalty=3.0,
        min_p=0.3,
        top_k=2,
        no_repeat_ngram_size=2,
        do_sample=True,
        temperature=0.3,
    )
    (odd / "generation_config.json").write_text(json.dumps(gen_cfg))
    got = _generate([*over, f"model.path={odd}"], items)
    for c, g in zip(clean, got, strict=True):
        cut = next((j for j, t in enumerate(c) if t in (tok.eos_token_id, extra_eos)), len(c) - 1)
        # same samples (no penalty, min_p, top_k or temperature from the checkpoint), stopped at either EOS
        assert g == c[: cut + 1], (g, c)


def test_both_backends_implement_the_declared_interface() -> None:
    """The worker calls its backend only through ``RolloutBackend``; a backend whose method drifts (renamed,
    a parameter more or less) fails here instead of at the first weight sync of a run on the other backend."""
    import inspect

    from actors.rollout import HFGenerator, RolloutBackend
    from actors.vllm_engine import VLLMGenerator

    members = [n for n, v in vars(RolloutBackend).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert {"generate", "load_bucket", "finish_update", "checksum", "sleep", "wake"} <= set(members)
    for cls in (HFGenerator, VLLMGenerator):
        for name in members:
            want = list(inspect.signature(getattr(RolloutBackend, name)).parameters)
            got = list(inspect.signature(getattr(cls, name)).parameters)
            assert got == want, f"{cls.__name__}.{name}{got} != RolloutBackend.{name}{want}"
