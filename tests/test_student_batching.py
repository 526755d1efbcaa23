"""The student's batches: texts tokenised once, padded per batch exactly as the tokenizer pads, and on CUDA
the faster of fp32 and bf16 kept by measurement. All on CPU; bench/gpu_student.py times it on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tasks.classify import inference  # noqa: E402
from tasks.classify.inference import StudentPredictor, choose_precision, pad_batch, tokenize  # noqa: E402
from tasks.classify.train import _Collator, resolve_student_path  # noqa: E402

TEXTS = [
    "fine",
    "a long, slow and thoroughly dull film that never finds its feet " * 6,  # past max_length: truncated
    "loved it",
    "the acting is superb",
    "",
    "meh",
    "not what I hoped for, but the score is lovely",
]


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("student")
    base = resolve_student_path("auto")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    (out / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
    return str(out)


def test_batches_give_what_the_tokenizers_own_padding_gives(student: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked tokenising, length sorting and per-batch padding change no probability (fp32)."""
    monkeypatch.setattr(inference, "TOKENIZE_CHUNK", 3)  # several chunks, one of them short
    pred = StudentPredictor(student, precision="fp32", max_length=24)
    got = pred.predict_proba(TEXTS, batch_size=2)
    enc = pred.tok(TEXTS, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.inference_mode():
        want = torch.softmax(pred.model(**enc).logits, dim=-1).numpy()
    assert got.shape == (len(TEXTS), 3)
    assert abs(got - want).max() < 1e-5
    assert pred.predict_proba([], batch_size=2).shape == (0, 3)


def test_collator_pads_pre_tokenised_rows_like_the_tokenizer(student: str) -> None:
    pred = StudentPredictor(student, precision="fp32")
    ids = tokenize(pred.tok, TEXTS, 24)
    assert max(len(x) for x in ids) == 24  # the long text was cut
    rows = [{"input_ids": x, "label": 1, "weight": 0.5, "soft": [0.2, 0.3, 0.5]} for x in ids]
    batch = _Collator(pred.pad_id)(rows)
    enc = pred.tok(TEXTS, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert torch.equal(batch["input_ids"], enc["input_ids"])
    assert torch.equal(batch["attention_mask"], enc["attention_mask"])
    assert batch["labels"].tolist() == [1] * len(TEXTS) and batch["soft"].shape == (len(TEXTS), 3)
    ids_t, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids_t.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_auto_on_cuda_keeps_whichever_precision_measures_faster(
    student: str, monkeypatch: pytest.MonkeyPatch, faster: str
) -> None:
    """'auto' on CUDA is not "bf16 because the GPU has it": both are timed and the faster stays.

    Run on CPU with the timer replaced, so each outcome is forced and checked; on a GPU
    bench/gpu_student.py records which one won and by how much.
    """
    assert choose_precision("auto", "cuda") == "auto-measure"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    pred = StudentPredictor(student, precision="fp32")
    pred.precision = "auto-measure"
    seen: list[object] = []

    def fake_best_time(fn, *, sync, repeats=5):  # type: ignore[no-untyped-def]
        fn()  # the candidate really runs
        dtype = next(pred.model.parameters()).dtype
        seen.append(dtype)
        return 1.0 if (dtype == torch.bfloat16) == (faster == "bf16") else 2.0

    monkeypatch.setattr(inference, "best_time", fake_best_time)
    pred._measure_cuda_precision(TEXTS, 2)
    assert seen == [torch.float32, torch.bfloat16]
    assert pred.precision == faster
    assert next(pred.model.parameters()).dtype == (torch.bfloat16 if faster == "bf16" else torch.float32)
    assert "fp32" in pred.precision_reason and "bf16" in pred.precision_reason
    assert pred.predict_proba(TEXTS, batch_size=2).shape == (len(TEXTS), 3)


def test_group_by_length_is_on_with_cuda_only_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The sampler choice reaches the Trainer: None follows the device, True/False force it."""
    import transformers

    from distill.config import StudentConfig
    from tasks.classify import train

    seen: list[str] = []

    class Stop(Exception):
        pass

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        seen.append(k["train_sampling_strategy"])
        raise Stop

    monkeypatch.setattr(transformers, "TrainingArguments", spy)
    import pandas as pd

    voted = tmp_path / "v.parquet"
    pd.DataFrame(
        {"text": TEXTS, "votes": [["a"]] * 7, "label": ["a", "b", "a", "b", "a", "b", "a"], "confidence": [1.0] * 7}
    ).to_parquet(voted)
    for setting, device, want in [
        (None, "cpu", "random"),
        (None, "cuda", "group_by_length"),
        (True, "cpu", "group_by_length"),
    ]:
        monkeypatch.setattr(
            train,
            "pick_device",
            lambda d=device: {"device": d, "bf16": False, "fp16": False, "use_cpu": True, "n_gpu": 0},
        )
        with pytest.raises(Stop):
            train.train_student(
                [str(voted)],
                labels=["a", "b"],
                out_dir=str(tmp_path / "o"),
                student=StudentConfig(group_by_length=setting),
                min_agreement=0.0,
            )
        assert seen[-1] == want
