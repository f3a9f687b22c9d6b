"""The Hugging Face hub, when a config names a model or dataset by hub id: is it reachable, is it cached.

Without network, huggingface_hub retries every request for about a minute, each warning printed twice, before
transformers gives up. One quick probe decides instead: reachable -> let the libraries download; unreachable
but cached -> offline mode (``HF_HUB_OFFLINE``, which actors inherit); neither -> one line, in seconds.
"""

from __future__ import annotations

import functools
import os

from sdft_ray.errors import ModelError

PROBE_TIMEOUT_S = 3.0


def offline_set() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no")


@functools.cache
def reachable() -> bool:
    """One HEAD request to the hub (``HF_ENDPOINT`` if set), answered or refused within a few seconds."""
    import httpx

    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(url, timeout=PROBE_TIMEOUT_S)
        return True
    except httpx.HTTPError:
        return False


def model_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def check_hub_model(repo: str, what: str = "model.path") -> None:
    """A hub model id that cannot load here ends in one line now; a cached one offline switches to offline mode."""
    if offline_set() or reachable():
        return  # offline mode fails fast by itself (or reads the cache); online, the hub decides
    if model_cached(repo):
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    raise ModelError(
        f"{what}={repo} is a hub name, it is not in the local Hugging Face cache, and the hub cannot be reached "
        f"from this machine ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}): download it where there "
        "is network (`huggingface-cli download ...`) and set model.path to the folder"
    )
