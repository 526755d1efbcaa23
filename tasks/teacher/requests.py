"""What a shard asks the teacher: one request per distinct prompt, with its cache keys and estimates.

Why apart from sending: the plan (tasks/teacher/plan.py) counts and prices exactly the
requests annotation will send, without sending them; both build them here. Requests go
out sample-major (all items' sample 0, then sample 1, ...) so consecutive prompts share
their few-shot prefix, which a llama.cpp server reuses from its KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distill.config import Constrain, SampleVariation, TeacherConfig, TeacherMode, Transport
from tasks.teacher.cache import KeyMaker
from tasks.teacher.client import TeacherRequest
from tasks.teacher.local_server import default_gguf
from tasks.teacher.ratelimit import estimate_tokens
from tasks.templates.base import prompt_hash
from tasks.templates.load import Template


@dataclass
class PlannedSample:
    item_index: int
    sample_index: int
    key: str
    prompt_hash: str


@dataclass
class ShardPlan:
    requests: list[TeacherRequest]
    samples: list[PlannedSample]
    deduplicated: int = 0  # sample requests answered by an identical request of this shard

    @property
    def answers(self) -> int:
        """Distinct answers the requests return (what the progress bar counts to)."""
        return sum(len(r.keys) for r in self.requests)


def sampling_params(t: TeacherConfig, sample_index: int, mode: TeacherMode = TeacherMode.completion) -> dict[str, Any]:
    """Everything but the prompt that shapes sample ``sample_index``'s answer (part of its cache key)."""
    sp: dict[str, Any] = {
        "temperature": t.temperature,
        "top_p": t.top_p,
        "max_tokens": t.max_tokens,
        "stop": list(t.stop),
        "seed": t.seed + (sample_index if t.variation == SampleVariation.temperature else 0),
    }
    if t.reasoning_effort is not None:  # a reasoning model: the cap covers its hidden reasoning too
        sp["reasoning_effort"] = t.reasoning_effort
        sp["max_completion_tokens"] = sp.pop("max_tokens")
    if t.logprobs:
        if mode == TeacherMode.chat:
            sp.update({"logprobs": True, "top_logprobs": t.top_logprobs})
        else:
            sp["logprobs"] = t.top_logprobs
    return sp


def constraint_params(t: TeacherConfig, labels: list[str], mode: TeacherMode) -> dict[str, Any]:
    """What asks the endpoint to answer only with one of ``labels`` (``teacher.constrain``); part of the cache key.

    The completion prompts end in an output prefix ("Sentiment:") that the model answers with
    a space and the label, so the completion forms allow that leading space.
    """
    c = t.constrain
    if c == Constrain.none or not labels:  # a writing task has no label set to hold the answer to
        return {}
    space = mode == TeacherMode.completion
    if c == Constrain.guided_choice:
        return {"guided_choice": [(" " if space else "") + lab for lab in labels]}
    if c == Constrain.grammar:
        alts = " | ".join(json.dumps(lab) for lab in labels)
        lead = '" "? ' if space else ""
        return {"grammar": f"root ::= {lead}( {alts} )"}
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"],
        "additionalProperties": False,
    }
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}
    }


def endpoint_identity(teacher: TeacherConfig, endpoint: int) -> str:
    """What names the server behind endpoint ``endpoint`` in cache keys, stable across runs.

    A remote endpoint is its base URL; the local teacher, whose port changes every run, is
    its GGUF file (name and size). So two members that serve the same model name from two
    servers never share answers, and the local teacher's answers survive restarts.
    """
    url = teacher.base_url if endpoint == 0 else (teacher.members[endpoint - 1].base_url or teacher.base_url)
    own_url = endpoint > 0 and teacher.members[endpoint - 1].base_url is not None
    if teacher.local and not own_url:
        gguf = Path(teacher.gguf_path) if teacher.gguf_path else default_gguf()
        size = gguf.stat().st_size if gguf.exists() else 0
        return f"local:{gguf.name}:{size}"
    return url or ""


def transport_of(teacher: TeacherConfig, endpoint: int) -> Transport:
    """Endpoint ``endpoint``'s transport: a member's own, else the main teacher's."""
    if endpoint > 0 and teacher.members[endpoint - 1].transport is not None:
        return teacher.members[endpoint - 1].transport or teacher.transport
    return teacher.transport


def plan_shard(
    texts: list[str],
    t: TeacherConfig,
    template: Template,
    *,
    endpoints: Optional[list[str]] = None,
    samples: bool = True,
) -> ShardPlan:
    """Build the requests (and the per-sample bookkeeping) for one shard of texts.

    A request identical to one already planned (same endpoint, model, rendered prompt and
    sampling: a repeated text, say) is not planned again: its samples point at the first
    one's answer, and ``deduplicated`` counts them. ``endpoints`` are the endpoints'
    identities (:func:`endpoint_identity`); computed from ``t`` when not given. With
    ``samples=False`` (``distill plan``, which only counts requests) the per-sample records
    and their prompt hashes are not built: a third of the time per item.
    """
    k = t.samples
    vary = t.variation == SampleVariation.prompt_variants
    if vary:
        template.check_variants(k)
    mixed = t.variation == SampleVariation.teachers
    use_n = t.supports_n and t.variation == SampleVariation.temperature and k > 1
    if endpoints is None:
        endpoints = [endpoint_identity(t, e) for e in range(1 + len(t.members))]
    reqs: list[TeacherRequest] = []
    planned_samples: list[PlannedSample] = []
    planned: set[str] = set()
    dedup = 0
    for i in [0] if use_n else range(k):
        # sample i: which teacher (endpoint index, model, mode) asks it
        if mixed:
            m_idx = i % len(t.members)
            member = t.members[m_idx]
            endpoint, model, mode = m_idx + 1, member.model, member.mode or t.mode
        else:
            endpoint, model, mode = 0, t.model, t.mode
        chat = mode == TeacherMode.chat
        path = "/chat/completions" if chat else "/completions"
        ep = endpoints[endpoint]
        # the key's constant parts (model, sampling, endpoint) serialised once per sample, not per item
        constraint = constraint_params(t, getattr(template, "labels", []), mode)
        if use_n:
            base = {**sampling_params(t, 0, mode), **constraint}
            makers = [KeyMaker(model, {**base, "n": k}, j, ep) for j in range(k)]
            makers_sampling = base
        else:
            makers_sampling = {**sampling_params(t, i, mode), **constraint}
            makers = [KeyMaker(model, makers_sampling, endpoint=ep)]
        for idx, text in enumerate(texts):
            rendered: Any = template.render_chat(text, i, vary) if chat else template.render_completion(text, i, vary)
            keys = [m(rendered) for m in makers]
            if samples:
                ph = prompt_hash(rendered)
                planned_samples.extend(PlannedSample(idx, j if use_n else i, key, ph) for j, key in enumerate(keys))
            if keys[0] in planned:
                dedup += 1
                continue
            planned.add(keys[0])
            payload = {"model": model, **makers_sampling, "n": k} if use_n else {"model": model, **makers_sampling}
            payload["messages" if chat else "prompt"] = rendered
            chars = sum(len(m["content"]) for m in rendered) if chat else len(rendered)
            reqs.append(
                TeacherRequest(
                    keys,
                    path,
                    payload,
                    estimate_tokens(chars, t.max_tokens, len(keys)),
                    endpoint,
                    est_out=t.max_tokens * len(keys),
                )
            )
    return ShardPlan(reqs, planned_samples, dedup)


def choices_per_request(t: TeacherConfig) -> int:
    """Answers one request returns: k when the endpoint honours ``n`` and the samples differ by temperature, else 1."""
    return t.samples if (t.supports_n and t.variation == SampleVariation.temperature and t.samples > 1) else 1
