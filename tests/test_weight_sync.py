"""Bucketing, checksums and the GPU transports' pure-tensor parts (plan, pack/unpack), on CPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from actors.trainer import StudentTrainer
from sdft_ray.weight_sync import (
    WeightSyncError,
    bucket_checksum,
    dtype_name,
    iter_param_buckets,
    load_bucket_into,
    model_checksum,
    pack,
    plan_nbytes,
    unpack,
)


def _model(tied: bool = True) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("bucket_bytes", [1, 2048, 10**9])
def test_buckets_cover_every_parameter_once_within_size(bucket_bytes: int) -> None:
    m = _model()
    buckets = list(iter_param_buckets(m, bucket_bytes))
    names = [n for b in buckets for n in b.names]
    assert names == [n for n, _ in m.named_parameters()]  # tied lm_head appears once
    assert all(b.nbytes <= bucket_bytes or len(b.names) == 1 for b in buckets)
    if bucket_bytes == 10**9:
        assert len(buckets) == 1


def test_transfer_makes_receiver_identical_and_checks_corruption() -> None:
    src, dst = _model(), _model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    assert model_checksum(src.named_parameters()) != model_checksum(dst.named_parameters())
    for b in iter_param_buckets(src, 4096):
        b.checksum = bucket_checksum(b.names, b.tensors)
        load_bucket_into(dst, b, verify=True)
    assert model_checksum(src.named_parameters()) == model_checksum(dst.named_parameters())
    bad = next(iter_param_buckets(src, 4096))
    bad.checksum = bucket_checksum(bad.names, bad.tensors)
    bad.tensors[0] = bad.tensors[0] + 1e-3
    with pytest.raises(WeightSyncError, match="checksum mismatch"):
        load_bucket_into(dst, bad, verify=True)
    wrong = next(iter_param_buckets(_model(tied=False), 10**9))
    wrong.tensors[0] = torch.zeros(3, 3)
    with pytest.raises(WeightSyncError, match="shape"):
        load_bucket_into(dst, wrong)


def test_pack_unpack_roundtrip_mixed_dtypes() -> None:
    ts = [torch.randn(3, 4), torch.randn(5).to(torch.bfloat16), torch.arange(7, dtype=torch.int64), torch.randn(())]
    meta = [(f"t{i}", dtype_name(t.dtype), tuple(t.shape)) for i, t in enumerate(ts)]
    # plain strings and ints (a torch.dtype would not survive msgpack into a vLLM engine-core process)
    assert json.loads(json.dumps(meta)) == [[n, d, list(sh)] for n, d, sh in meta]
    flat = pack(ts)
    assert flat.dtype == torch.uint8 and flat.numel() == plan_nbytes(meta)
    for (_name, t), orig in zip(unpack(flat, meta), ts, strict=True):
        assert torch.equal(t, orig) and t.dtype == orig.dtype


@pytest.mark.parametrize("bucket_mb", [1e-3, 0.01, 64])
def test_nccl_plan_matches_actual_buckets(bucket_mb: float) -> None:
    """Engines allocate receive buffers from the plan before the send: it must equal what is sent."""
    m = _model()
    fake = SimpleNamespace(
        _source=lambda which: (list(m.named_parameters()), 0, None), _bucket_bytes=lambda: int(bucket_mb * 2**20)
    )
    plan = StudentTrainer.sync_plan(fake)
    sent = [
        [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in zip(b.names, b.tensors, strict=True)]
        for b in iter_param_buckets(m, int(bucket_mb * 2**20))
    ]
    assert plan == sent
    assert [plan_nbytes(p) for p in plan] == [
        pack(b.tensors).numel() for b in iter_param_buckets(m, int(bucket_mb * 2**20))
    ]
