"""Train the generator student: a small causal LM fine-tuned with LoRA (QLoRA with CUDA) on the teacher's medoids.

Why these choices: the teacher writes one-sentence summaries; the student learns to write
them from the instruction alone (tasks/generate/inference.py: a zero-shot chat prompt).
The loss is taken on the answer tokens only (prompt tokens carry label -100), so the
student spends its capacity on what to write, not on re-predicting the document. LoRA
(Hu et al., 2021) trains ~1% of the weights and saves a few-MB adapter per run instead of
a full copy of the base. With CUDA the base is loaded in 4-bit NF4 with double
quantisation (QLoRA, Dettmers et al., 2023), which cuts the base's memory about 4x; on
CPU plain LoRA in float32 is the default (bitsandbytes' 4-bit runs on CPU too, and can be
forced, but de-quantising every matmul makes it slower there, and a 135M base fits in RAM).

Training is a plain torch loop (AdamW, linear decay, dynamic padding per batch, a tqdm
bar): on 2 CPU cores it is easier to control and cheaper than the Trainer, and it records
the per-step loss curve (``loss.json``). A held-out share (``eval_fraction``) gives an eval
loss before and after training and early stopping at epoch ends; the best epoch's adapter
is the one saved.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from distill.config import GeneratorStudentConfig
from tasks.generate.aggregate import frames
from tasks.generate.inference import ADAPTER_META, SMOLLM2, end_of_turn_id, prompt_ids, resolve_base_model
from tasks.results.generate import GeneratorTraining
from tasks.templates.generation import GenerationTemplate

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PrecisionChoice:
    device: str  # "cuda" | "cpu"
    quantize_4bit: bool
    dtype: str  # "float32" | "bfloat16" | "float16": the base weights' dtype, or the 4-bit compute dtype
    reason: str


GIB = 1024**3


def bf16_fits(base_params: int, free_bytes: int) -> bool:
    """Whether LoRA on an unquantised bf16 base fits in ``free_bytes`` of GPU memory with room to train.

    The rule: the bf16 weights (2 bytes a parameter), as much again for activations, the
    adapters' gradients and optimizer state at the batch sizes LoRA uses, and 2 GiB for the
    CUDA context and the allocator's slack. A 135M base needs about 2.5 GiB; a 7B one 28 GiB
    (an 80 GB card trains it in bf16); a 70B one 263 GiB (QLoRA on any single card).
    """
    return free_bytes >= bf16_need_bytes(base_params)


def bf16_need_bytes(base_params: int) -> int:
    """GPU memory ``bf16_fits`` asks for: 4 bytes a parameter and 2 GiB."""
    return 4 * base_params + 2 * GIB


def count_params(base_dir: Path) -> Optional[int]:
    """Parameters of the base model, read from its safetensors headers (no weights loaded); None without any."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total


def choose_precision(
    quantize: str = "auto",
    cuda_available: Optional[bool] = None,
    bf16_supported: Optional[bool] = None,
    *,
    base_params: Optional[int] = None,
    free_bytes: Optional[int] = None,
) -> PrecisionChoice:
    """Pick device, 4-bit or not, and dtype; the reason says why, for the run log.

    ``auto``: CUDA -> plain LoRA on a bf16 base (fp16 GPUs: float32) when it fits in the
    GPU's free memory with room to train (``bf16_fits``), else QLoRA (NF4, double
    quantisation, bf16/fp16 compute): 4-bit trades speed for memory (measured on an H200
    with a 135M base: 13.0 examples/s and 2.7 GB in 4-bit against 33.6 and 5.4 GB in
    bf16), so it is chosen only where the memory is needed. CPU -> plain LoRA in float32
    (4-bit on CPU de-quantises in every matmul). ``4bit`` forces QLoRA (it runs on CPU with
    bitsandbytes >= 0.49, computing in float32 there); ``none`` forces unquantised LoRA.
    ``cuda_available`` / ``bf16_supported`` / ``free_bytes`` are probed when None (the tests
    pass them); ``base_params`` None (size unknown) counts as fitting.
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
    if not cuda_available:
        if quantize == "4bit":
            return PrecisionChoice(
                "cpu",
                True,
                "float32",
                "quantize=4bit forced on CPU: QLoRA via bitsandbytes' CPU 4-bit path (NF4, double "
                "quantisation, float32 compute); slower than plain LoRA here",
            )
        why = "quantize=none" if quantize == "none" else "no CUDA"
        return PrecisionChoice(
            "cpu",
            False,
            "float32",
            f"{why}: plain LoRA in float32 on CPU (4-bit would save memory the small base does "
            "not need and slow every step by de-quantising)",
        )
    qlora = f"QLoRA, base in 4-bit NF4 with double quantisation and {gpu_dtype} compute; adapters train in float32"
    if quantize == "4bit":
        return PrecisionChoice("cuda", True, gpu_dtype, f"quantize=4bit: {qlora}")
    dt = "bfloat16" if bf16_supported else "float32"
    plain = f"plain LoRA on CUDA, base in {dt}" + (
        "" if bf16_supported else " (no bf16 on this GPU; fp16 weights train unstably)"
    )
    if quantize == "none":
        return PrecisionChoice("cuda", False, dt, f"quantize=none: {plain}")
    if base_params is None:
        return PrecisionChoice("cuda", False, dt, f"base size unknown: {plain}")
    if free_bytes is None:
        import torch

        free_bytes = int(torch.cuda.mem_get_info()[0])
    need = bf16_need_bytes(base_params)
    sizes = f"{base_params / 1e6:,.0f}M parameters need about {need / GIB:.1f} GiB, {free_bytes / GIB:.1f} GiB free"
    if bf16_fits(base_params, free_bytes):
        return PrecisionChoice("cuda", False, dt, f"{plain}: {sizes} (4-bit would be slower for no need)")
    return PrecisionChoice("cuda", True, gpu_dtype, f"{qlora}: {sizes}")


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


def build_features(
    tokenizer: Any, instructions: list[str], targets: list[str], max_source_tokens: int, max_target_tokens: int
) -> list[dict]:
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
        rows.append(
            {
                "input_ids": src + ans,
                "labels": [IGNORE_INDEX] * len(src) + ans,
                "attention_mask": [1] * (len(src) + len(ans)),
            }
        )
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad one batch to its own longest row (dynamic padding); padded labels are -100."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: xs + [v] * (n - len(xs))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in rows]),
        "attention_mask": torch.tensor([pad(r["attention_mask"], 0) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows]),
    }


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
            batch = {k: v.to(device) for k, v in collate(features[b : b + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            lab = batch["labels"][:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    lab.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            count += int((lab != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(1, count)


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
        out = {
            "lora_steps": float(self.steps),
            "lora_train_examples": float(self.train_examples),
            "lora_eval_examples": float(self.eval_examples),
            "lora_first_loss": self.first_loss,
            "lora_last_loss": self.last_loss,
            "lora_seconds": self.seconds,
            "lora_trainable_params": float(self.trainable_params),
            "lora_total_params": float(self.total_params),
            "lora_quantize_4bit": float(self.precision.quantize_4bit),
        }
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

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_torch_dtype(precision.dtype),
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), quantization_config=bnb, device_map={"": precision.device}, dtype=torch.float32
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=precision.device == "cuda")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=_torch_dtype(precision.dtype))
    return model.to(precision.device)  # type: ignore[arg-type]  (transformers' stub: .to takes a str)


def train_lora(
    instructions: list[str],
    targets: list[str],
    out_dir: str | Path,
    params: LoraParams,
    *,
    progress: bool = True,
    cache_root: str | Path = ".distill/models",
) -> LoraTrainResult:
    """Fine-tune a LoRA adapter on instruction -> teacher text; writes ``out_dir/adapter`` (+ ``merged``,
    ``loss.json``).

    Steps: ``max_steps`` if set, else ``epochs`` x batches per epoch; the learning rate
    decays linearly to zero after a 5% warm-up, gradients are clipped at 1.0. With eval
    rows, the eval loss is measured before training and at each epoch end; training
    stops after ``early_stopping_patience`` epochs without improvement and the best
    epoch's adapter weights are the ones saved.
    """
    from transformers import AutoTokenizer

    t0 = time.time()
    set_seed(params.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_base_model(params.base_model, cache_root)
    precision = choose_precision(params.quantize, base_params=count_params(base_dir))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    features = build_features(tok, instructions, targets, params.max_source_tokens, params.max_target_tokens)
    if not features:
        raise ValueError("no training rows")
    tr_idx, ev_idx = split_train_eval(len(features), params.eval_fraction, params.seed)
    train_f, eval_f = [features[i] for i in tr_idx], [features[i] for i in ev_idx]
    model, trainable, total = _lora_model(base_dir, precision, params)
    pad_id: int = tok.pad_token_id  # type: ignore[assignment]  (set just above when the tokenizer had none)
    run = _train(model, train_f, eval_f, pad_id=pad_id, params=params, precision=precision, progress=progress)
    adapter_dir, merged_dir = _save(model, tok, out, base_dir=base_dir, params=params, precision=precision)
    (out / "loss.json").write_text(
        json.dumps(
            {
                "step_loss": run.step_losses,
                "eval": run.eval_log,
                "epochs": run.epochs,
                "stopped_early": run.stopped_early,
            },
            indent=1,
        )
    )
    return LoraTrainResult(
        adapter_dir=str(adapter_dir),
        base_model_dir=str(base_dir),
        merged_dir=merged_dir,
        precision=precision,
        steps=run.steps,
        train_examples=len(train_f),
        eval_examples=len(eval_f),
        first_loss=run.step_losses[0],
        last_loss=run.step_losses[-1],
        eval_loss_before=run.eval_before,
        eval_loss_after=run.eval_after,
        seconds=time.time() - t0,
        trainable_params=int(trainable),
        total_params=int(total),
    )


def _lora_model(base_dir: Path, precision: PrecisionChoice, params: LoraParams) -> tuple[Any, int, int]:
    """The base wrapped with fresh LoRA adapters on ``params.target_modules``, and its trainable/total counts."""
    from peft import LoraConfig, get_peft_model

    model = load_base_for_training(base_dir, precision)
    lcfg = LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=list(params.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lcfg)
    trainable, total = model.get_nb_trainable_parameters()
    model.config.use_cache = False
    return model, trainable, total


@dataclass
class _Run:
    """What the training loop did: the per-step losses, the eval losses and how it ended."""

    step_losses: list[float]
    eval_log: list[dict[str, Any]]
    eval_before: Optional[float]
    eval_after: Optional[float]
    steps: int
    epochs: int
    stopped_early: bool


class _Optimizer:
    """AdamW over the adapters, a linear schedule with 5% warm-up, gradient clipping, bf16/fp16 autocast on CUDA."""

    def __init__(self, model: Any, params: LoraParams, precision: PrecisionChoice, total_steps: int) -> None:
        import torch
        from transformers import get_linear_schedule_with_warmup

        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=params.learning_rate, weight_decay=0.0)
        self.sched = get_linear_schedule_with_warmup(self.opt, int(0.05 * total_steps), total_steps)
        self.use_amp = precision.device == "cuda" and precision.dtype in ("bfloat16", "float16")
        self.amp_dtype = _torch_dtype(precision.dtype) if self.use_amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and precision.dtype == "float16" else None

    def step(self, model: Any, batch: dict[str, Any]) -> float:
        """One optimisation step on ``batch``; returns its loss."""
        import torch

        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.use_amp):
            loss = model(**batch).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def _train(
    model: Any,
    train_f: list[dict],
    eval_f: list[dict],
    *,
    pad_id: int,
    params: LoraParams,
    precision: PrecisionChoice,
    progress: bool,
) -> _Run:
    """Epochs of shuffled batches until the step budget or early stopping; the best epoch's adapter is kept."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    per_epoch = math.ceil(len(train_f) / params.batch_size)
    total_steps = int(params.max_steps) if params.max_steps else per_epoch * params.epochs
    if total_steps < 1:
        raise ValueError("no training steps: check epochs / max_steps")
    opt = _Optimizer(model, params, precision, total_steps)
    eval_before = answer_loss(model, eval_f, pad_id, params.batch_size) if eval_f else None
    best_eval, best_state, bad_epochs = eval_before, None, 0
    run = _Run([], [{"step": 0, "eval_loss": eval_before}] if eval_f else [], eval_before, None, 0, 0, False)
    gen = torch.Generator().manual_seed(params.seed)
    bar = tqdm(total=total_steps, desc="lora", disable=not progress)
    model.train()
    while run.steps < total_steps and not run.stopped_early:
        order = torch.randperm(len(train_f), generator=gen).tolist()
        for b in range(0, len(order), params.batch_size):
            batch = {
                k: v.to(precision.device)
                for k, v in collate([train_f[i] for i in order[b : b + params.batch_size]], pad_id).items()
            }
            run.step_losses.append(opt.step(model, batch))
            run.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{run.step_losses[-1]:.3f}")
            if run.steps >= total_steps:
                break
        run.epochs += 1
        if eval_f:
            ev = answer_loss(model, eval_f, pad_id, params.batch_size)
            run.eval_log.append({"step": run.steps, "epoch": run.epochs, "eval_loss": ev})
            if best_eval is None or ev < best_eval:
                best_eval, bad_epochs = ev, 0
                best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            else:
                bad_epochs += 1
                run.stopped_early = bad_epochs >= params.early_stopping_patience
    bar.close()
    if eval_f and best_state is not None:
        set_peft_model_state_dict(model, best_state)
    run.eval_after = best_eval if eval_f else None
    if eval_f and best_state is None:  # never improved on the untrained adapter: keep training's end, say so
        run.eval_after = run.eval_log[-1]["eval_loss"]
    return run


def _save(
    model: Any, tok: Any, out: Path, *, base_dir: Path, params: LoraParams, precision: PrecisionChoice
) -> tuple[Path, Optional[str]]:
    """Write the adapter (with what it was trained on) and, with ``merge`` on a float base, the merged model."""
    model.eval()
    adapter_dir = out / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir))
    tok.save_pretrained(str(adapter_dir))
    (adapter_dir / ADAPTER_META).write_text(
        json.dumps(
            {
                "base_model": params.base_model,
                "base_model_dir": str(base_dir),
                "precision": asdict(precision),
                "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()},
            },
            indent=2,
        )
    )
    if not params.merge:
        return adapter_dir, None
    if precision.quantize_4bit:
        warnings.warn(
            "merge=True ignored: the base was trained in 4-bit; load the adapter on a float base "
            "(load_generator) instead",
            stacklevel=2,
        )
        return adapter_dir, None
    mdir = out / "merged"
    if mdir.exists():
        shutil.rmtree(mdir)
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(mdir))
    tok.save_pretrained(str(mdir))
    return adapter_dir, str(mdir)


# --------------------------------------------------------------------------- the task type's training


def training_pairs(voted_pool: list[str], template: GenerationTemplate) -> tuple[list[str], list[str], int]:
    """(zero-shot instruction, medoid) for every item that did not abstain, and how many abstained."""
    df = frames(voted_pool)
    keep = df[df["label"].notna()] if not df.empty else df
    return (
        [template.student_instruction(t) for t in keep["text"]],
        [str(x) for x in keep["label"]],
        len(df) - len(keep),
    )


def lora_params(student: GeneratorStudentConfig) -> LoraParams:
    """The config's student section as :func:`train_lora`'s parameters."""
    return LoraParams(
        base_model=student.base_model,
        r=student.lora_r,
        alpha=student.lora_alpha,
        dropout=student.lora_dropout,
        target_modules=tuple(student.target_modules),
        learning_rate=student.learning_rate,
        epochs=student.epochs,
        max_steps=student.max_steps,
        batch_size=student.batch_size,
        max_source_tokens=student.max_source_tokens,
        max_target_tokens=student.max_target_tokens,
        max_new_tokens=student.max_new_tokens,
        seed=student.seed,
        quantize=student.quantize,
        merge=student.merge,
    )


def train_generator(
    voted_pool: list[str],
    *,
    template: GenerationTemplate,
    out_dir: str,
    student: GeneratorStudentConfig,
    show_progress: bool = True,
) -> GeneratorTraining:
    """LoRA-tune the student on the teacher's medoids."""
    instructions, targets, abstained = training_pairs(voted_pool, template)
    if len(targets) < 4:
        raise ValueError(
            f"only {len(targets)} items with a teacher text ({abstained} abstained): too few to train a student"
        )
    res = train_lora(instructions, targets, out_dir, lora_params(student), progress=show_progress)
    return GeneratorTraining(
        model_dir=res.adapter_dir,
        base_model_dir=res.base_model_dir,
        merged_dir=res.merged_dir,
        train_items=res.train_examples,
        val_items=res.eval_examples,
        excluded_abstained=abstained,
        device=res.precision.device,
        quantize_4bit=res.precision.quantize_4bit,
        student_dtype=res.precision.dtype,
        precision_reason=res.precision.reason,
        global_steps=res.steps,
        train_loss_first=res.first_loss,
        train_loss=res.last_loss,
        val_loss_before=res.eval_loss_before,
        val_loss=res.eval_loss_after,
        train_seconds=res.seconds,
        trainable_params=res.trainable_params,
        total_params=res.total_params,
        lora_r=student.lora_r,
        base_model=student.base_model,
    )
