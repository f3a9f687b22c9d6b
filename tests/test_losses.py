"""Every loss against a brute-force float64 reference written with explicit loops, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sdft_ray import losses

torch.manual_seed(0)
B, T, V = 2, 6, 7


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _kl(p: list, q: list):
    return sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q, strict=True))


def _ref_divergence(p: list, q: list, kind: str, alpha: float):
    """p = student probs, q = teacher probs (lists of float64 scalar tensors)."""
    if kind == "forward_kl":
        return _kl(q, p)
    if kind == "reverse_kl":
        return _kl(p, q)
    m = [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q, strict=True)]
    return alpha * _kl(q, m) + (1 - alpha) * _kl(p, m)


def _probs(logits_row):
    z = torch.stack(list(logits_row))
    e = torch.exp(z - z.max())
    return list(e / e.sum())


def _ref_sdft(
    s_logits,
    t_logits,
    ids,
    mask,
    rollout_lp,
    kind,
    alpha,
    skip,
    clip,
    estimator="full",
    k=3,
    tail=False,
    support="teacher",
):
    """Loop-by-loop reference of the full objective."""
    total = 0
    for b in range(B):
        counted = [t for t in range(T) if mask[b, t] and sum(int(mask[b, u]) for u in range(t + 1)) > skip]
        seq = 0
        ratios = []
        for t in counted:
            p = _probs(s_logits[b, t])
            q = _probs(t_logits[b, t])
            if estimator == "full":
                d = _ref_divergence(p, q, kind, alpha)
            elif estimator == "topk":
                src = s_logits if support == "student" else t_logits
                top = sorted(range(V), key=lambda v: -float(src[b, t, v].detach()))[:k]
                ps, qs = [p[v] for v in top], [q[v] for v in top]
                if tail:
                    ps, qs = ps + [1 - sum(ps)], qs + [1 - sum(qs)]
                else:
                    ps, qs = [x / sum(ps) for x in ps], [x / sum(qs) for x in qs]
                d = _ref_divergence(ps, qs, kind, alpha)
            else:  # sampled-token reverse KL surrogate
                lps, lpt = torch.log(p[ids[b, t]]), torch.log(q[ids[b, t]])
                d = (lps - lpt).detach() * lps
            seq = seq + d
            ratios.append(min(math.exp(float(torch.log(p[ids[b, t]]).detach()) - float(rollout_lp[b, t])), clip))
        n = max(1, len(counted))
        w = sum(ratios) / n if (clip > 0 and ratios) else 1.0
        total = total + w * seq / n
    return total / B


def _inputs():
    s = torch.randn(B, T, V, dtype=torch.float64)
    t = torch.randn(B, T, V, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # second row is shorter
    rollout_lp = torch.log_softmax(s + 0.3 * torch.randn_like(s), -1).gather(-1, ids[..., None])[..., 0]
    return s, t, ids, mask, rollout_lp


CASES = [
    dict(kind="forward_kl", estimator="full"),
    dict(kind="reverse_kl", estimator="full"),
    dict(kind="jsd", alpha=0.3, estimator="full"),
    dict(kind="forward_kl", estimator="topk", k=3, tail=False),
    dict(kind="forward_kl", estimator="topk", k=3, tail=True),
    dict(kind="reverse_kl", estimator="topk", k=4, tail=True, support="student"),
    dict(kind="jsd", alpha=0.7, estimator="topk", k=3, tail=True),
    dict(kind="reverse_kl", estimator="sampled"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("skip,clip", [(0, 0.0), (2, 2.0)])
def test_sdft_loss_matches_bruteforce(case: dict, skip: int, clip: float) -> None:
    s, t, ids, mask, rlp = _inputs()
    s1 = s.clone().requires_grad_(True)
    out = losses.sdft_loss(
        s1,
        ids,
        mask,
        divergence_kind=case["kind"],
        alpha=case.get("alpha", 0.5),
        estimator=case["estimator"],
        teacher_logits=t,
        top_k=case.get("k", 3),
        topk_tail=case.get("tail", True),
        topk_support=case.get("support", "teacher"),
        rollout_logp=rlp,
        skip_first=skip,
        importance_clip=clip,
    )
    out.loss.backward()
    s2 = s.clone().requires_grad_(True)
    ref = _ref_sdft(
        s2,
        t,
        ids,
        mask,
        rlp,
        case["kind"],
        case.get("alpha", 0.5),
        skip,
        clip,
        case["estimator"],
        case.get("k", 3),
        case.get("tail", False),
        case.get("support", "teacher"),
    )
    ref.backward()
    # the implementation computes in float32 on purpose (bf16 logits in practice); tolerance reflects that
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)
    assert s1.grad.abs().sum() > 0


def test_importance_weight_is_clamped_mean_without_grad() -> None:
    tr = torch.tensor([[0.0, 0.0, 5.0]], requires_grad=True)
    ro = torch.tensor([[0.0, -0.5, 0.0]])
    w = losses.importance_weights(tr, ro, torch.ones(1, 3), clip=2.0)
    assert w.item() == pytest.approx((1.0 + math.exp(0.5) + 2.0) / 3)
    assert not w.requires_grad


def test_jsd_endpoints_bracket_forward_and_reverse() -> None:
    s, t = torch.randn(5, V), torch.randn(5, V)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    fwd = losses.divergence(ls, lt, "forward_kl")
    rev = losses.divergence(ls, lt, "reverse_kl")
    # generalized JSD / alpha -> KL(T||S) as alpha -> 0 and / (1 - alpha) -> KL(S||T) as alpha -> 1
    torch.testing.assert_close(losses.divergence(ls, lt, "jsd", 1e-4) / 1e-4, fwd, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(losses.divergence(ls, lt, "jsd", 1 - 1e-4) / 1e-4, rev, rtol=2e-2, atol=1e-3)


def test_skip_first_tokens_mask() -> None:
    m = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    assert losses.loss_mask(m, 3).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]


def test_losses_survive_minus_inf_logits() -> None:
    s = torch.randn(1, 2, V, requires_grad=True)
    t = torch.randn(1, 2, V)
    t[..., -2:] = float("-inf")  # e.g. padded vocab rows
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        out = losses.sdft_loss(
            s,
            torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1, 2),
            divergence_kind=kind,
            teacher_logits=t,
            skip_first=0,
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()
        s.grad = None


def test_sft_loss_is_token_cross_entropy() -> None:
    logits = torch.randn(2, 3, V, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 3))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = losses.sft_loss(logits, ids, mask)
    ref = (
        sum(
            sum(-math.log(_softmax(logits[b, t].tolist())[ids[b, t]]) for t in range(3) if mask[b, t]) / mask[b].sum()
            for b in range(2)
        )
        / 2
    )
    assert out.loss.item() == pytest.approx(float(ref), rel=1e-6)


FAMILIES = [
    ("LlamaConfig", {}),
    ("Qwen2Config", {}),
    ("Gemma2Config", {"final_logit_softcapping": 1.0, "head_dim": 16}),
    ("GraniteConfig", {"logits_scaling": 8.0}),
    ("CohereConfig", {"logit_scale": 0.0625}),
]


def _family_model(name: str, extra: dict) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, name)(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
def test_completion_logits_are_the_models_own(family: tuple) -> None:
    """F7: our hidden-state path must give ``model(...).logits`` for families that post-process the logits."""
    from sdft_ray.modeling import completion_logits

    model = _family_model(*family).eval()
    prompts, comps = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14]]
    with torch.no_grad():
        ours = completion_logits(model, prompts, comps, pad=0)
        for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
            full = model(input_ids=torch.tensor([p + c])).logits[0]
            ref = full[len(p) - 1 : len(p) - 1 + len(c)]
            assert torch.allclose(ours[i, : len(c)], ref, atol=1e-5), (family[0], (ours[i, : len(c)] - ref).abs().max())


def test_shared_prefix_len_leaves_every_prompt_a_token_of_its_own() -> None:
    from sdft_ray.modeling import shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9, 9]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert shared_prefix_len([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[0])
def test_shared_prefix_gives_the_models_own_logits_and_the_same_gradients(family: tuple) -> None:
    """A prefix common to the batch runs once; logits equal ``model(...).logits`` and gradients the plain path's."""
    from sdft_ray.modeling import MIN_SHARED_PREFIX, completion_logits

    model = _family_model(*family).train()
    system = list(range(20, 20 + MIN_SHARED_PREFIX + 3))  # a "system prompt" every row starts with
    prompts = [system + [5, 6, 7], system + [9], system + [8, 8, 8, 8]]
    comps = [[11, 12, 13], [14], [15, 16]]
    grads, calls = [], []
    model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    for share in (False, True):
        model.zero_grad()
        calls.clear()
        logits = completion_logits(model, prompts, comps, pad=0, share_prefix=share)
        assert len(calls) == (2 if share else 1)  # the prefix pass, then the rows; not a silent fallback
        (logits.float().square().mean(-1) * _mask(comps)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
                model.eval()
                full = model(input_ids=torch.tensor([p + c])).logits[0]
                model.train()
                ref = full[len(p) - 1 : len(p) - 1 + len(c)]
                assert torch.allclose(logits[i, : len(c)], ref, atol=1e-5), (family[0], share)
    for plain, shared in zip(*grads, strict=True):
        torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-6)


def test_shared_prefix_stays_off_for_zero3_partitioned_parameters() -> None:
    """ZeRO-3 needs one decoder call per forward; its parameters carry DeepSpeed's ``ds_id`` tag."""
    from sdft_ray.modeling import MIN_SHARED_PREFIX, completion_logits

    model = _family_model("LlamaConfig", {}).eval()
    calls: list[int] = []
    model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    prompts = [list(range(20, 21 + MIN_SHARED_PREFIX)) + [5], list(range(20, 21 + MIN_SHARED_PREFIX)) + [6]]
    with torch.no_grad():
        completion_logits(model, prompts, [[7], [8]], pad=0, share_prefix=True)
        assert len(calls) == 2
        for i, param in enumerate(model.parameters()):
            param.ds_id = i
        calls.clear()
        completion_logits(model, prompts, [[7], [8]], pad=0, share_prefix=True)
        assert len(calls) == 1


def _mask(comps: list[list[int]]) -> torch.Tensor:
    m = torch.zeros(len(comps), max(map(len, comps)))
    for i, c in enumerate(comps):
        m[i, : len(c)] = 1
    return m


@pytest.mark.parametrize("kind,alpha", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("skip,clip", [(0, 0.0), (2, 2.0)])
def test_chunked_loss_equals_materialized_and_reference(kind: str, alpha: float, chunk: int, skip: int, clip: float):
    """From hidden states and LM heads, chunk by chunk: same value and same gradients (hidden and head weight)."""
    H = 5
    gen = torch.Generator().manual_seed(1)
    hs = torch.randn(B, T, H, dtype=torch.float64, generator=gen)
    ht = torch.randn(B, T, H, dtype=torch.float64, generator=gen)
    ws = torch.randn(V, H, dtype=torch.float64, generator=gen)
    wt = torch.randn(V, H, dtype=torch.float64, generator=gen)
    _, _, ids, mask, _ = _inputs()
    rlp = torch.log_softmax(hs @ ws.T + 0.3, -1).gather(-1, ids[..., None])[..., 0]

    def run(fn):  # noqa: ANN001, ANN202
        h = hs.float().clone().requires_grad_(True)
        w = ws.float().clone().requires_grad_(True)
        out = fn(h, w)
        out.loss.backward()
        return out, h.grad, w.grad

    common = dict(divergence_kind=kind, alpha=alpha, rollout_logp=rlp.float(), skip_first=skip, importance_clip=clip)
    chunked, gh, gw = run(
        lambda h, w: losses.chunked_sdft_loss(
            h, ht.float(), lambda x: x @ w.T, lambda x: x @ wt.float().T, ids, mask, chunk_tokens=chunk, **common
        )
    )
    full, fh, fw = run(
        lambda h, w: losses.sdft_loss(h @ w.T, ids, mask, teacher_logits=ht.float() @ wt.float().T, **common)
    )
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(chunked.weights, full.weights)
    torch.testing.assert_close(gh, fh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, fw, rtol=1e-5, atol=1e-7)
    assert chunked.tokens == full.tokens and gw.abs().sum() > 0
    # and the float64 loop reference, for the value and both gradients
    h64, w64 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = _ref_sdft(h64 @ w64.T, ht @ wt.T, ids, mask, rlp, kind, alpha, skip, clip)
    ref.backward()
    assert chunked.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(gh.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_missing_rollout_logprobs_are_an_error_not_zeros() -> None:
    from actors.student_loss import rollout_logprobs
    from sdft_ray.records import Sample

    ok = [Sample(uid="a", index=0, prompt_ids=[3], completion_ids=[1, 2], rollout_logprobs=[-0.1, -0.2])]
    assert rollout_logprobs(ok, 3).tolist() == [[pytest.approx(-0.1), pytest.approx(-0.2), 0.0]]
    short = [Sample(uid="b", index=0, prompt_ids=[3], completion_ids=[1, 2, 3], rollout_logprobs=[-0.1])]
    with pytest.raises(ValueError, match="rollout b: 1 log-probs for 3 tokens"):
        rollout_logprobs(short, 3)
