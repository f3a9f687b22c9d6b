from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdft_ray.config import DataConfig, ModelConfig
from sdft_ray.data import DataError, PromptSampler, load_examples, normalize_record, tokenize_examples
from sdft_ray.modeling import load_tokenizer

CFG = DataConfig()


def test_all_spec_formats(tmp_path: Path) -> None:
    recs = [
        {"prompt": "Q1", "golden_response": ["step a", "step b"]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}], "output_text": "A2"},
        {"prompt": "Q3", "teacher_prompt": "T3 with context"},
        {"prompt": [{"role": "user", "content": "Q4"}], "privileged_context": "C4"},
    ]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    ex = load_examples(DataConfig(train=str(f)))
    assert ex[0].demonstration == "step a\nstep b"
    assert ex[0].teacher[0]["content"] == CFG.teacher_template.format(question="Q1", demonstration="step a\nstep b")
    assert "This is an example for a response to the question:" in ex[0].teacher[0]["content"]
    assert ex[1].prompt[0]["role"] == "system" and ex[1].teacher[0] == {"role": "system", "content": "S"}
    assert ex[2].teacher == [{"role": "user", "content": "T3 with context"}] and ex[2].demonstration is None
    assert "C4" in ex[3].teacher[-1]["content"]


def test_jsonl_parquet_and_disk(tmp_path: Path) -> None:
    import datasets

    recs = [{"prompt": f"q{i}", "golden_response": [f"a{i}"]} for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = datasets.Dataset.from_list(recs)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "disk"))
    for src in ("d.jsonl", "d.parquet", "disk"):
        ex = load_examples(DataConfig(train=str(tmp_path / src)))
        assert [e.demonstration for e in ex] == ["a0", "a1", "a2"]


@pytest.mark.parametrize(
    "rec,needle",
    [
        ({"prompt": "q"}, "no demonstration field"),
        ({"golden_response": ["a"]}, "field 'prompt' (or 'messages') is missing"),
        ({"prompt": "q", "golden_response": []}, "field 'golden_response'"),
        ({"prompt": "q", "golden_response": "  "}, "field 'golden_response' is empty"),
        ({"prompt": 3, "golden_response": "a"}, "field 'prompt' must be a string"),
        ({"messages": [{"role": "user"}], "output_text": "a"}, "field 'messages[0]'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "field 'output_text' is missing"),
        ([1, 2], "expected an object"),
    ],
)
def test_bad_record_names_file_record_and_field(tmp_path: Path, rec: object, needle: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "golden_response": "fine"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError) as e:
        load_examples(DataConfig(train=str(f)))
    assert str(f) in str(e.value) and "record 1" in str(e.value) and needle in str(e.value)


def test_skip_mode_counts_and_empty_dataset(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "q", "golden_response": "a"}\n{"prompt": "q"}\n')
    from sdft_ray.data import LoadReport

    rep = LoadReport()
    ex = load_examples(DataConfig(train=str(f), on_bad_record="skip"), report=rep)
    assert len(ex) == 1 and rep.skipped == 1 and "record 1" in rep.skip_reasons[0]
    f.write_text('{"prompt": "q"}\n')
    with pytest.raises(DataError, match="dataset is empty"):
        load_examples(DataConfig(train=str(f), on_bad_record="skip"))
    f.write_text("")
    with pytest.raises(DataError, match="dataset is empty"):
        load_examples(DataConfig(train=str(f)))


def test_non_utf8_and_invalid_json(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"prompt": "q", "golden_response": "a"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"not UTF-8 at byte \d+ \(line 2\)"):
        load_examples(DataConfig(train=str(f)))
    f.write_text('{"prompt": "q", "golden_response": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="record at line 2: invalid JSON"):
        load_examples(DataConfig(train=str(f)))


def test_prompts_left_truncated(tiny: dict[str, str]) -> None:
    tok = load_tokenizer(ModelConfig(path=tiny["model"]))
    cfg = DataConfig(max_prompt_length=20)
    ex = normalize_record({"prompt": "x" * 100, "golden_response": "y"}, 0, "mem", cfg)
    (t,) = tokenize_examples([ex], tok, cfg)
    assert len(t.prompt_ids) == 20 and len(t.teacher_prompt_ids) == 20
    # left truncation keeps the end of the prompt: the generation prompt
    assert tok.decode(t.prompt_ids).endswith("<|assistant|>")


def test_sampler_is_deterministic_and_covers_epoch() -> None:
    s = PromptSampler(10, 4, seed=1)
    first = [i for p in range(5) for i in s.batch(p)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert PromptSampler(10, 4, seed=1).batch(3) == s.batch(3)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_field_names = st.sampled_from(
    ["prompt", "golden_response", "messages", "output_text", "teacher_prompt", "privileged_context", "answer", "x"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        _field_names,
        _json
        | st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": st.text(max_size=5)}), max_size=2),
        max_size=4,
    )
    | _json
)
def test_fuzz_records_either_normalize_or_raise_dataerror(rec: object) -> None:
    """Garbage never escapes as anything but a DataError naming the record; accepted records are usable."""
    try:
        ex = normalize_record(rec, 7, "fuzz.jsonl", CFG)
    except DataError as e:
        assert "fuzz.jsonl: record 7" in str(e)
        return
    assert ex.prompt and all(isinstance(m["content"], str) for m in ex.prompt)
    assert ex.teacher and all(isinstance(m["content"], str) for m in ex.teacher)
    assert ex.demonstration is None or ex.demonstration.strip()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_raw_bytes_files(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    f = tmp_path_factory.mktemp("fz") / "d.jsonl"
    f.write_bytes(blob)
    try:
        load_examples(DataConfig(train=str(f)))
    except DataError as e:
        assert str(f) in str(e)


def test_json_lines_saved_as_json(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text('{"prompt": "a", "golden_response": "x"}\n{"prompt": "b", "golden_response": "y"}\n')
    assert [e.demonstration for e in load_examples(DataConfig(train=str(f)))] == ["x", "y"]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    for name in ("d.jsonl", "d.json"):
        f = tmp_path / name
        body = (
            '{"prompt": "q", "golden_response": "a"}\n'
            if name.endswith("l")
            else '[{"prompt": "q", "golden_response": "a"}]'
        )
        f.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert [e.demonstration for e in load_examples(DataConfig(train=str(f)))] == ["a"]


def test_folders_and_paths_that_are_not_datasets(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: a folder, but not one written by datasets' save_to_disk \(is empty\)"):
        load_examples(DataConfig(train=str(empty)))
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "q", "golden_response": "a"}]).save_to_disk(str(saved))
    (saved / "dataset_info.json").unlink()
    with pytest.raises(DataError, match=r"saved: damaged save_to_disk folder \(FileNotFoundError"):
        load_examples(DataConfig(train=str(saved)))
    (saved / "state.json").unlink()
    with pytest.raises(
        DataError, match=r"saved: a folder, but not one written by .*has no dataset_dict.json or state.json"
    ):
        load_examples(DataConfig(train=str(saved)))
    for missing in ("data/nope/train.jsonl", "nope.jsonl", "./nope", "~/nope"):
        with pytest.raises(DataError, match=f"{missing}: no such file or folder"):
            load_examples(DataConfig(train=missing))
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="d.parquet: not a readable parquet file"):
        load_examples(DataConfig(train=str(bad)))


def test_hub_name_that_cannot_be_loaded_is_a_data_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        DataError, match="nobody/no-such-dataset: no such local file or folder, and loading it as a hub"
    ):
        load_examples(DataConfig(train="nobody/no-such-dataset"))
