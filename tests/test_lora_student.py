"""The generative LoRA student: base conversion, features, training, reload, generation, precision, 4-bit on CPU.

Kept small for CI: the base is converted once into the repo's git-ignored
``.distill/models`` (about 30 s the first time on a fresh clone, a second afterwards),
one plain-LoRA run on 4 short pairs is shared by the training tests, and the 4-bit run
takes 2 steps. Torch runs on one thread in this module: CI shares 2 cores with other
jobs, and there 2 threads made each step 3-5x slower than 1 (measured: 5-10 s vs 1.7 s).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.generate import inference as gi
from tasks.generate import train as gt

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".distill" / "models"

PAIRS = [
    ("Summarise: The council approved a new bridge over the river.", "Council backs river bridge."),
    ("Summarise: Heavy snow closed every school in the county on Monday.", "Snow shuts county schools."),
    ("Summarise: The local team won the cup after a penalty shoot-out.", "Team wins cup on penalties."),
    ("Summarise: Train fares will rise by five percent next year.", "Train fares to rise 5%."),
]
INS = [a for a, _ in PAIRS]
TGT = [b for _, b in PAIRS]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return gi.base_model_dir(CACHE)


@pytest.fixture(scope="module")
def base(base_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(base_dir)).eval(), AutoTokenizer.from_pretrained(str(base_dir))


@pytest.fixture(scope="module")
def trained(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> gt.LoraTrainResult:
    """One plain-LoRA run, overfitting 4 pairs: 8 steps at lr 3e-3, no dropout, merged copy written too."""
    out = tmp_path_factory.mktemp("lora")
    params = gt.LoraParams(
        base_model=str(base_dir),
        learning_rate=3e-3,
        max_steps=8,
        batch_size=4,
        eval_fraction=0.0,
        dropout=0.0,
        quantize="none",
        merge=True,
    )
    return gt.train_lora(INS, TGT, out, params, progress=False)


# --------------------------------------------------------------------------- base model


def test_base_model_converted_once_and_reused(
    base_dir: Path, base: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gi.is_complete_model_dir(base_dir)
    weights = base_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def must_not_convert(*a: Any, **k: Any) -> None:
        raise AssertionError("reconverted although a complete folder exists")

    monkeypatch.setattr(gi, "_convert_gguf", must_not_convert)
    assert gi.base_model_dir(CACHE) == base_dir
    assert gi.resolve_base_model(gt.SMOLLM2, CACHE) == base_dir
    assert weights.stat().st_mtime_ns == mtime
    assert json.loads((base_dir / "distill_base.json").read_text())["model"] == gt.SMOLLM2
    assert "quantization_config" not in json.loads((base_dir / "config.json").read_text())

    model, tok = base
    assert model.config.model_type == "llama" and model.dtype.is_floating_point
    out = gi.generate(model, tok, ["What is the capital of France?"], max_new_tokens=8)
    assert out[0].text and out[0].finish_reason in {"stop", "length"} and 1 <= out[0].new_tokens <= 8
    one = gi.generate(model, tok, ["Write a long story about a dragon."], max_new_tokens=1)
    assert one[0].finish_reason == "length" and one[0].new_tokens == 1


def test_base_model_dir_is_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that dies leaves no folder at the final path; leftovers are cleared on the next call."""
    calls = []

    def fake_convert(gguf: Path, dest: Path) -> None:
        calls.append(dest)
        for name in ("config.json", "tokenizer_config.json"):
            (dest / name).write_text("{}")
        (dest / "model.safetensors").write_bytes(b"x")
        if len(calls) == 1:
            raise KeyboardInterrupt("killed mid-conversion")

    monkeypatch.setattr(gi, "_convert_gguf", fake_convert)
    with pytest.raises(KeyboardInterrupt):
        gi.base_model_dir(tmp_path)
    final = tmp_path / gt.SMOLLM2
    assert not final.exists() and not list(tmp_path.glob(".tmp-*"))

    # a SIGKILL leaves a temp folder; a copy by other means can leave a final folder without the marker
    (tmp_path / f".tmp-{gt.SMOLLM2}-999-dead").mkdir()
    final.mkdir()
    (final / "config.json").write_text("{}")
    assert not gi.is_complete_model_dir(final)
    assert gi.base_model_dir(tmp_path) == final
    assert gi.is_complete_model_dir(final) and len(calls) == 2
    assert not list(tmp_path.glob(".tmp-*"))
    assert gi.base_model_dir(tmp_path) == final and len(calls) == 2  # reused, not reconverted


def test_resolve_base_model_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither"):
        gi.resolve_base_model(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- features


def test_labels_mask_the_prompt_and_keep_the_answer(base: tuple[Any, Any]) -> None:
    _, tok = base
    feats = gt.build_features(tok, INS, TGT, max_source_tokens=384, max_target_tokens=64)
    eot = gi.end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    for inst, tgt, f in zip(INS, TGT, feats):
        prompt = tok(gi.format_prompt(tok, inst), add_special_tokens=False).input_ids
        answer = tok(tgt, add_special_tokens=False).input_ids + [eot]
        assert f["input_ids"] == prompt + answer
        assert f["labels"][: len(prompt)] == [-100] * len(prompt)
        assert f["labels"][len(prompt) :] == answer
        assert len(f["attention_mask"]) == len(f["input_ids"])
    assert gi.format_prompt(tok, "hi").endswith("<|im_start|>assistant\n")


def test_long_instruction_is_cut_inside_the_template(base: tuple[Any, Any]) -> None:
    _, tok = base
    long_doc = "Summarise: " + " ".join(f"word{i}" for i in range(600))
    feats = gt.build_features(tok, [long_doc], ["Short."], max_source_tokens=80, max_target_tokens=3)
    ids, labels = feats[0]["input_ids"], feats[0]["labels"]
    n_prompt = labels.index(next(x for x in labels if x != -100))
    assert n_prompt <= 80
    text = tok.decode(ids[:n_prompt])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "word0 " in text and "word599" not in text


def test_empty_target_names_its_row(base: tuple[Any, Any]) -> None:
    _, tok = base
    with pytest.raises(ValueError, match="row 2"):
        gt.build_features(tok, ["a", "b", "c"], ["x", "y", "  "], 384, 64)


# --------------------------------------------------------------------------- training and generation


def test_lora_training_lowers_the_loss(trained: gt.LoraTrainResult, base: tuple[Any, Any]) -> None:
    model, tok = base
    feats = gt.build_features(tok, INS, TGT, 384, 64)
    before = gt.answer_loss(model, feats, tok.pad_token_id)
    tuned, tok2 = gi.load_generator(trained.adapter_dir)
    after = gt.answer_loss(tuned, feats, tok2.pad_token_id)
    print(f"answer loss before {before:.3f} after {after:.3f}; train {trained.seconds:.1f} s")
    assert after < 0.5 * before and after < 1.0
    assert trained.steps == 8 and trained.train_examples == 4 and trained.eval_examples == 0
    assert trained.last_loss < trained.first_loss
    assert not trained.precision.quantize_4bit and trained.precision.device == "cpu"
    assert 0 < trained.trainable_params < 0.02 * trained.total_params
    curve = json.loads((Path(trained.adapter_dir).parent / "loss.json").read_text())["step_loss"]
    assert len(curve) == 8 and curve[0] == pytest.approx(trained.first_loss)
    m = trained.metrics()
    assert all(isinstance(v, float) for v in m.values()) and "lora_eval_loss_before" not in m
    # the merged copy is the same model
    merged, _ = gi.load_generator(trained.adapter_dir, merged=True)
    assert gt.answer_loss(merged, feats, tok2.pad_token_id) == pytest.approx(after, rel=1e-3)


def test_adapter_reloads_and_reproduces_its_targets(trained: gt.LoraTrainResult) -> None:
    model, tok = gi.load_generator(trained.adapter_dir)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    out = gi.generate(model, tok, INS, max_new_tokens=16, batch_size=4)
    assert len(out) == len(INS)
    assert all(o.finish_reason in {"stop", "length"} for o in out)
    assert any(o.text for o in out)
    hits = [o.text.startswith(t.rstrip(".")) for o, t in zip(out, TGT)]
    assert sum(hits) >= 2, [o.text for o in out]
    assert all(o.finish_reason == "stop" for o, h in zip(out, hits) if h)


# --------------------------------------------------------------------------- precision


def test_choose_precision() -> None:
    gib = gt.GIB
    # a 135M base on a card with room: plain bf16 LoRA, not 4-bit (4-bit was 2.6x slower on an H200 for nothing)
    small = gt.choose_precision("auto", True, True, base_params=135_000_000, free_bytes=140 * gib)
    assert (small.device, small.quantize_4bit, small.dtype) == ("cuda", False, "bfloat16"), small
    assert "135M" in small.reason and "GiB free" in small.reason
    # a 70B base on the same card: its bf16 weights alone (140 GB) do not fit, so QLoRA
    big = gt.choose_precision("auto", True, True, base_params=70_000_000_000, free_bytes=140 * gib)
    assert big.quantize_4bit and big.dtype == "bfloat16" and "QLoRA" in big.reason
    # the boundary: 4 bytes a parameter + 2 GiB
    assert gt.bf16_fits(1_000_000_000, 4_000_000_000 + 2 * gib)
    assert not gt.bf16_fits(1_000_000_000, 4_000_000_000 + 2 * gib - 1)
    assert gt.choose_precision("auto", True, False, base_params=70_000_000_000, free_bytes=gib).dtype == "float16"
    assert gt.choose_precision("auto", True, False, base_params=1000, free_bytes=40 * gib).dtype == "float32"
    c = gt.choose_precision("auto", cuda_available=False)
    assert (c.device, c.quantize_4bit, c.dtype) == ("cpu", False, "float32") and "LoRA" in c.reason
    f = gt.choose_precision("4bit", cuda_available=False)
    assert f.quantize_4bit and f.device == "cpu"
    forced = gt.choose_precision("4bit", True, True, base_params=1000, free_bytes=140 * gib)
    assert forced.quantize_4bit and forced.device == "cuda"
    n = gt.choose_precision("none", True, True, base_params=70_000_000_000, free_bytes=gib)
    assert not n.quantize_4bit and n.device == "cuda"
    with pytest.raises(ValueError):
        gt.choose_precision("8bit", cuda_available=False)


def test_count_params_reads_safetensors_headers(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(tmp_path / "model-2.safetensors"))
    assert gt.count_params(tmp_path) == 12 + 5 + 8
    assert gt.count_params(tmp_path / "nothing") is None


def test_4bit_qlora_runs_on_cpu(base_dir: Path, tmp_path: Path) -> None:
    """bitsandbytes 0.50 quantises to NF4 and trains LoRA on CPU; also exercises the eval split."""
    import bitsandbytes as bnb

    prec = gt.choose_precision("4bit", cuda_available=False)
    model = gt.load_base_for_training(base_dir, prec)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    del model

    ins = [f"Summarise: item {i} is here." for i in range(10)]
    tgt = [f"Item {i}." for i in range(10)]
    params = gt.LoraParams(
        base_model=str(base_dir), quantize="4bit", max_steps=2, batch_size=3, eval_fraction=0.1, merge=True
    )
    with pytest.warns(UserWarning, match="merge=True ignored"):
        res = gt.train_lora(ins, tgt, tmp_path, params, progress=False)
    assert res.precision.quantize_4bit and res.steps == 2 and res.merged_dir is None
    assert (res.train_examples, res.eval_examples) == (9, 1)
    assert res.eval_loss_before is not None and res.eval_loss_after is not None
    assert (Path(res.adapter_dir) / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "loss.json").read_text())["eval"][0]["step"] == 0
    # an adapter trained on the 4-bit base loads on the float32 base for generation
    model, tok = gi.load_generator(res.adapter_dir)
    assert gi.generate(model, tok, ins[:1], max_new_tokens=4)[0].finish_reason in {"stop", "length"}
