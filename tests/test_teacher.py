"""The EMA teacher (docs/algorithm.md step 5): its update is the spec's formula, and in bf16 it still moves (F8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from actors.teacher import TeacherScorer
from sdft_ray.config import load_config


def _teacher(tiny, tmp_path: Path, dtype: str, master: str) -> TeacherScorer:
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, model__dtype=dtype, teacher__ema_master=master))
    return TeacherScorer(cfg, torch.device("cpu"))


def _simulate(teacher: TeacherScorer, steps: int = 200, lr: float = 2e-5, rate: float = 0.01) -> dict:
    """Adam-like student steps of size ~lr (the paper's lr); returns the float64 reference EMA."""
    gen = torch.Generator().manual_seed(0)
    student = {n: p.detach().double().clone() for n, p in teacher.model.named_parameters()}
    ref = {n: t.clone() for n, t in student.items()}
    dtype = next(teacher.model.parameters()).dtype
    for _ in range(steps):
        sent = {}
        for n in student:
            student[n] += lr * torch.randn(student[n].shape, generator=gen, dtype=torch.float64).sign()
            sent[n] = student[n].to(dtype)  # what the trainer hands over: the student in its own dtype
            ref[n] = (1 - rate) * ref[n] + rate * sent[n].double()
        teacher.ema_update(list(sent.items()), rate)
    return ref


def test_ema_update_is_the_spec_formula_in_fp32(tiny, tmp_path: Path) -> None:
    t = _teacher(tiny, tmp_path, "float32", "auto")
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    student = [(n, p + 1.0) for n, p in before.items()]
    t.ema_update(student, 0.25)
    for n, p in t.model.named_parameters():
        assert torch.allclose(p, 0.75 * before[n] + 0.25 * (before[n] + 1.0), atol=1e-6)
    assert t.master is None  # fp32 needs no second copy


@pytest.mark.parametrize("master", ["auto", "cpu"])
def test_bf16_teacher_follows_the_fp32_ema(tiny, tmp_path: Path, master: str) -> None:
    t = _teacher(tiny, tmp_path, "bfloat16", master)
    base = {n: p.detach().double().clone() for n, p in t.model.named_parameters()}
    ref = _simulate(t)
    moved = total = 0
    for n, p in t.model.named_parameters():
        # the master is the EMA to fp32 accuracy, and the teacher is it rounded once to bf16
        assert torch.allclose(t.master[n].double(), ref[n], rtol=0, atol=1e-6), n
        assert torch.equal(p, t.master[n].to(torch.bfloat16)), n
        should_move = ref[n].float().to(torch.bfloat16).double() != base[n]
        moved += int((p.double() != base[n])[should_move].sum())
        total += int(should_move.sum())
    assert total > 0 and moved / total > 0.99, moved / total
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in t.master.values())


def test_bf16_ema_without_master_barely_moves(tiny, tmp_path: Path) -> None:
    """The official code's behaviour (teacher.ema_master=off), kept for exact replication; this is the problem."""
    t = _teacher(tiny, tmp_path, "bfloat16", "off")
    base = {n: p.detach().double().clone() for n, p in t.model.named_parameters()}
    ref = _simulate(t)
    stuck = total = 0
    for n, p in t.model.named_parameters():
        should_move = ref[n].float().to(torch.bfloat16).double() != base[n]
        stuck += int((p.double() == base[n])[should_move].sum())
        total += int(should_move.sum())
    assert t.master is None and stuck / total > 0.5, stuck / total


def test_checkpoint_keeps_the_fp32_master(tiny, tmp_path: Path) -> None:
    t = _teacher(tiny, tmp_path, "bfloat16", "auto")
    _simulate(t, steps=20)
    state = t.ema_state()
    assert all(v.dtype == torch.float32 for v in state.values())
    resumed = _teacher(tiny, tmp_path, "bfloat16", "auto")
    missing, unexpected = resumed.load_ema_state(state)
    assert not unexpected
    for n, m in t.master.items():
        assert torch.equal(resumed.master[n], m)
        assert torch.equal(dict(resumed.model.named_parameters())[n], dict(t.model.named_parameters())[n])
