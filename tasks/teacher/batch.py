"""The batch transport: a shard's requests through the provider's Batch API instead of one HTTP call each.

Why a transport and not a price: a provider bills its batch rate (half, at OpenAI) only for
requests that went through its Batch API, so distill prices each answer by the transport
that fetched it. :class:`BatchClient` has the online client's interface (``run`` answers a
list of requests, ``stats`` counts them) and writes every answer into the same response
cache with its usage and log-probabilities, so aggregation, resume and plan history do
not know which transport answered.

What it does with the requests the cache does not hold:
  1. re-attaches to batches an earlier (killed) run recorded for any of them;
  2. splits the rest at ``teacher.batch.max_requests`` and ``max_bytes``; for each batch,
     reserves its worst-case cost under ``budget.max_usd`` (a batch that could cross the
     cap is not submitted), records it, uploads its JSONL and submits it, at most
     ``max_in_flight`` at once;
  3. polls with a doubling interval; a finished batch's output and error files are read,
     its answers and its "collected" mark committed in one transaction;
  4. requests that failed inside a batch, or whose batch expired, failed or was
     cancelled, go into the next batch (``max_rounds`` in all) or online
     (``retry_online``); never lost, never submitted twice;
  5. past ``max_wait_s`` it stops waiting: the requests still at the provider are
     reported pending, and whichever run asks for them next collects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import aiohttp

from distill.config import BatchConfig, ClientConfig
from distill.faults import failpoint
from tasks.accounting.budget import BudgetExhausted, SpendMeter
from tasks.results.teacher import ClientStats
from tasks.teacher.batch_api import TERMINAL, BatchAPI, BatchJob, BatchLedger, input_line, read_lines, write_input
from tasks.teacher.cache import ResponseCache
from tasks.teacher.client import Endpoint, Outcome, TeacherRequest, from_cache
from tasks.teacher.responses import (
    RETRYABLE_STATUS,
    ServerError,
    extract_answers,
    model_matches,
    reasoning_tokens,
    usage_of,
)
from tasks.templates.tokens import TokenCounter, heuristic_counter

log = logging.getLogger("distill.teacher.batch")


class BatchesPending(BudgetExhausted):
    """The run stopped waiting (``teacher.batch.max_wait_s``) with batches still at the provider.

    A stop like the budget's: what was answered is in the cache, the shards are written as
    partial parts, and the message says how to go on: run again (or let the schedule), and
    the recorded batches are collected, nothing submitted twice.
    """


class BatchClient:
    """Async; use as ``async with BatchClient(...) as c: await c.run(requests)``, like the online client."""

    def __init__(
        self,
        endpoint: Endpoint,
        cache: ResponseCache,
        run_id: str,
        settings: ClientConfig,
        batch: BatchConfig,
        *,
        meter: Optional[SpendMeter] = None,
        counter: Optional[TokenCounter] = None,
        on_result: Optional[Callable[[ClientStats], None]] = None,
        logger: Any = None,
        deadline: Optional[float] = None,
    ) -> None:
        self.endpoint = endpoint
        self.base_url = endpoint.base_url.rstrip("/")
        self.cache = cache
        self.ledger = BatchLedger(cache)
        self.run_id = run_id
        self.settings = settings
        self.batch = batch
        # the JSONL inputs beside the cache: any run that shares the cache can re-attach to them
        self.work_dir = Path(cache.path).parent / "batches"
        self.meter = meter
        self.counter = counter or heuristic_counter()
        self.on_result = on_result
        self.log = logger if logger is not None else log
        self.deadline = deadline  # epoch seconds: when to stop waiting (else max_wait_s from run(), or never)
        self.submit_only = False  # submit(): up to max_in_flight in the whole ledger, return without waiting
        self.stats = ClientStats()
        self.retry_online: list[TeacherRequest] = []  # what failed inside batches, for the online client
        self._session: Optional[aiohttp.ClientSession] = None
        self._api: Optional[BatchAPI] = None
        self._artifact: Any = None  # the Prefect progress artifact the UI shows while batches run
        self._last_report = 0.0

    def __repr__(self) -> str:  # never show the key
        return f"BatchClient({self.base_url!r})"

    async def __aenter__(self) -> BatchClient:
        headers = {"Authorization": f"Bearer {self.endpoint.api_key}"} if self.endpoint.api_key else {}
        timeout = aiohttp.ClientTimeout(total=max(self.settings.timeout_s, 300.0))  # files can be large
        self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)
        self._api = BatchAPI(self._session, self.base_url, self.settings, api_key=self.endpoint.api_key)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.cache.flush()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def api(self) -> BatchAPI:
        assert self._api is not None, "use BatchClient as an async context manager"
        return self._api

    # ------------------------------------------------------------------ the loop
    async def submit(self, requests: list[TeacherRequest]) -> dict[str, Outcome]:
        """Submit batches for what the cache and the ledger do not hold, and return without waiting (all pending)."""
        self.submit_only = True
        try:
            return await self.run(requests)
        finally:
            self.submit_only = False

    async def run(self, requests: list[TeacherRequest]) -> dict[str, Outcome]:
        """Answer every request: from the cache, from batches already submitted, or through new batches."""
        results, todo = from_cache(self.cache, requests, self.stats)
        self._progress()
        ours = {r.keys[0]: r for r in todo}
        rounds: dict[str, int] = {}
        jobs: dict[str, BatchJob] = {}
        waiting: set[str] = set()  # every request of the batches re-attached to, ours or not
        for job in self.ledger.open_jobs(self.base_url):  # 1. what an earlier run submitted
            asked = self.ledger.requests_of(job.local_id)
            held = asked.keys() & ours.keys()
            if held:
                waiting.update(asked)
                await self._finish_submission(job)
                jobs[job.local_id] = job
                if self.meter is not None:
                    self.meter.hold(job.reserved_usd)
                for cid in held:
                    rounds[cid] = job.round
                self.log.info(
                    "batch transport: re-attached to %s (%s, %d requests)", job.batch_id, job.state, len(held)
                )
        pending = [r for r in todo if r.keys[0] not in waiting]
        if self.submit_only:
            return await self._submit_only(pending, jobs, rounds, results, ours)
        deadline = self.deadline
        if deadline is None and self.batch.max_wait_s:
            deadline = time.time() + self.batch.max_wait_s
        delay = self.batch.poll_interval_s
        while pending or jobs:
            pending, submitted = await self._submit_what_fits(pending, jobs, rounds, results)
            if submitted:
                delay = self.batch.poll_interval_s
            if not jobs:
                continue  # nothing in flight: what is left was stopped by the budget (pending is empty then)
            if deadline is not None and time.time() >= deadline:
                self._stop_waiting(jobs, ours, results)
                break
            wait = delay if deadline is None else max(0.0, min(delay, deadline - time.time()))
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.batch.poll_max_interval_s)
            for job in list(jobs.values()):
                assert job.batch_id is not None
                b = await self.api.get(job.batch_id)
                status = str(b.get("status"))
                if status != job.state:
                    self.ledger.update(job, state=status)
                if status in TERMINAL:
                    failpoint("batch:finished")
                    retry = await self._collect(job, b, ours, results)
                    del jobs[job.local_id]
                    pending.extend(self._next_round(retry, job, ours, rounds, results))
            self._progress()
            await self._report(jobs, total=len(todo), done=sum(1 for r in todo if r.keys[0] in results))
        return results

    async def _report(self, jobs: dict[str, BatchJob], *, total: int, done: int) -> None:
        """While batches run: a log line and a Prefect progress artifact (batches by state, requests done)."""
        now = time.monotonic()
        if now - self._last_report < 30 and done < total:
            return
        self._last_report = now
        states: dict[str, int] = {}
        for j in jobs.values():
            states[j.state] = states.get(j.state, 0) + 1
        line = (
            f"batch transport: {len(jobs)} batches at the provider ({', '.join(f'{n} {s}' for s, n in states.items())}"
            f"{'' if jobs else 'none'}), {self.stats.batches_submitted} submitted and {self.stats.batches_collected} "
            f"collected by this shard; {done:,} of {total:,} requests done"
        )
        self.log.info(line)
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return  # outside a Prefect run there is no UI to tell
        with contextlib.suppress(Exception):
            from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

            pct = 100.0 * done / total if total else 100.0
            if self._artifact is None:
                self._artifact = await acreate_progress_artifact(pct, key="distill-batches", description=line)
            else:
                await aupdate_progress_artifact(self._artifact, pct, description=line)

    async def _submit_only(
        self,
        pending: list[TeacherRequest],
        jobs: dict[str, BatchJob],
        rounds: dict[str, int],
        results: dict[str, Outcome],
        ours: dict[str, TeacherRequest],
    ) -> dict[str, Outcome]:
        """The first pass of a run over its shards: submit what the ledger has room for, wait for nothing.

        Every shard's batches then run at the provider at once; the second pass (the usual
        :meth:`run`) re-attaches to them shard by shard, so a run's waits overlap instead of
        adding up. What was not submitted here is submitted there.
        """
        others = len(self.ledger.open_jobs(self.base_url)) - len(jobs)
        await self._submit_what_fits(pending, jobs, rounds, results, room=self.batch.max_in_flight - others)
        for r in ours.values():
            for k in r.keys:
                results.setdefault(k, Outcome(None, cached=False, error="submitted", pending=True, transport="batch"))
        return results

    async def _submit_what_fits(
        self,
        pending: list[TeacherRequest],
        jobs: dict[str, BatchJob],
        rounds: dict[str, int],
        results: dict[str, Outcome],
        room: Optional[int] = None,
    ) -> tuple[list[TeacherRequest], bool]:
        """Submit batches of ``pending`` while fewer than ``max_in_flight`` run (``room``: of the ledger's) and the
        budget allows."""
        submitted = False
        limit = self.batch.max_in_flight if room is None else len(jobs) + max(0, room)
        while pending and len(jobs) < limit:
            lines = self._chunk(pending)
            chunk = pending[: len(lines)]
            reservation = self._worst_case(chunk)
            if self.meter is not None and not self.meter.try_reserve(reservation):
                if jobs or self.submit_only:
                    break  # wait for the batches in flight: their unused reservations come back
                chunk = self._fitting(chunk)
                reservation = self._worst_case(chunk)
                if not chunk or not self.meter.try_reserve(reservation):
                    self._budget_stop(pending, results)
                    return [], submitted
            pending = pending[len(chunk) :]
            rnd = max(rounds.get(r.keys[0], 0) for r in chunk) + 1
            job = await self._submit(chunk, lines[: len(chunk)], reservation, rnd)
            jobs[job.local_id] = job
            for r in chunk:
                rounds[r.keys[0]] = rnd
            submitted = True
        return pending, submitted

    def _chunk(self, pending: list[TeacherRequest]) -> list[bytes]:
        """The JSONL lines of the next batch (of ``pending``'s head): at most ``max_requests`` and ``max_bytes``.

        Serialised once: the lines that size the batch are the ones written to its input file.
        """
        lines: list[bytes] = []
        size = 0
        for r in pending[: self.batch.max_requests]:
            line = input_line(r)
            if lines and size + len(line) > self.batch.max_bytes:
                break
            size += len(line)
            lines.append(line)
        return lines

    def _worst_case(self, chunk: list[TeacherRequest]) -> float:
        """What ``chunk`` could cost at most at the batch price (prompt tokens bounded as the meter bounds them)."""
        if self.meter is None or self.meter.limit_usd is None:
            return 0.0
        m, e = self.meter, self.endpoint.index
        return sum(m.estimate(e, self._prompt_bound(r), r.est_out, batch=True) for r in chunk)

    def _prompt_bound(self, r: TeacherRequest) -> int:
        """Prompt tokens of ``r`` at most: the teacher's tokenizer where distill has it, else its UTF-8 bytes.

        A batch cannot be stopped halfway, so its reservation must be an upper bound: no
        byte-level tokenizer makes more tokens than bytes (a few more per chat message).
        """
        if self.counter.exact or (self.meter is not None and self.meter.ratio_known):
            return self.counter.count_prompt(r.payload)
        body = r.payload.get("prompt") or r.payload.get("messages") or ""
        text = body if isinstance(body, str) else "".join(str(m.get("content", "")) + "xxxxxxxx" for m in body)
        return len(text.encode("utf-8")) + 8

    def _fitting(self, chunk: list[TeacherRequest]) -> list[TeacherRequest]:
        """The longest head of ``chunk`` whose worst case fits under the cap."""
        assert self.meter is not None and self.meter.limit_usd is not None
        room = self.meter.limit_usd - self.meter.spent_usd() - self.meter.reserved_usd
        total, n = 0.0, 0
        for r in chunk:
            total += self._worst_case([r])
            if total > room:
                break
            n += 1
        return chunk[:n]

    # ------------------------------------------------------------------ one batch
    async def _submit(self, chunk: list[TeacherRequest], lines: list[bytes], reservation: float, rnd: int) -> BatchJob:
        """Record, write, upload and submit one batch; each step is in the ledger before the next starts."""
        local_id = f"distill-{uuid.uuid4().hex[:16]}"
        path = self.work_dir / f"{local_id}.jsonl"
        write_input(path, lines)
        job = BatchJob(
            local_id,
            self.base_url,
            "/v1" + chunk[0].path,
            str(path),
            len(chunk),
            reservation,
            None,
            None,
            "written",
            rnd,
        )
        self.ledger.record(job, chunk, self.run_id)
        failpoint("batch:written")
        await self._finish_submission(job)
        self.stats.batches_submitted += 1
        self.stats.batch_requests += len(chunk)
        self.stats.requests_sent += len(chunk)
        self.log.info(
            "batch transport: submitted %s (%d requests, round %d, up to $%.4f held against the budget)",
            job.batch_id,
            len(chunk),
            rnd,
            reservation,
        )
        return job

    async def _finish_submission(self, job: BatchJob) -> None:
        """Take a recorded batch on to "submitted", adopting a file or batch a killed run had already made."""
        if job.state == "written":
            fid = await self.api.find_file(Path(job.input_path).name) or await self.api.upload(Path(job.input_path))
            self.ledger.update(job, file_id=fid, state="uploaded")
            failpoint("batch:uploaded")
        if job.state == "uploaded":
            assert job.file_id is not None
            b = await self.api.find_batch(job.local_id)
            if b is None:
                b = await self.api.create(job.file_id, job.url, self.batch.completion_window, job.local_id)
                failpoint("batch:created")
            self.ledger.update(job, batch_id=str(b["id"]), state=str(b.get("status") or "submitted"))
            failpoint("batch:submitted")

    async def _collect(
        self, job: BatchJob, b: dict[str, Any], ours: dict[str, TeacherRequest], results: dict[str, Outcome]
    ) -> dict[str, str]:
        """Write a finished batch's answers to the cache; returns custom_id -> why, for what must be asked again."""
        asked = self.ledger.requests_of(job.local_id)
        bodies = await self._inputs(job)
        out_lines = read_lines(await self.api.content(b["output_file_id"])) if b.get("output_file_id") else []
        err_lines = read_lines(await self.api.content(b["error_file_id"])) if b.get("error_file_id") else []
        failpoint("batch:downloaded")
        retry: dict[str, str] = {}
        seen: set[str] = set()
        for line in out_lines + err_lines:
            cid = str(line.get("custom_id"))
            if cid not in asked or cid in seen:
                continue
            seen.add(cid)
            why = self._one(line, cid, keys=asked[cid], body=bodies.get(cid) or {}, job=job, ours=ours, results=results)
            if why is not None:
                retry[cid] = why
        for cid in asked.keys() - seen:  # no line at all: the batch expired, failed or was cancelled before it
            why = f"batch {b.get('id')} {b.get('status')} before answering it"
            self._record_failure(
                cid,
                bodies.get(cid) or {},
                job,
                kind=f"batch_{b.get('status')}",
                status=None,
                usage=(None, None),
                why=why,
            )
            retry[cid] = why
        self.cache.flush(also=(BatchLedger.collected(job),))
        if self.meter is not None:
            self.meter.release(job.reserved_usd)
        self.stats.batches_collected += 1
        self.log.info(
            "batch transport: collected %s (%s): %d answered, %d to ask again",
            b.get("id"),
            b.get("status"),
            len(asked) - len(retry),
            len(retry),
        )
        return retry

    async def _inputs(self, job: BatchJob) -> dict[str, dict[str, Any]]:
        """custom_id -> request body, from the JSONL written before upload (or the provider's copy of it)."""
        p = Path(job.input_path)
        data = p.read_bytes() if p.exists() else await self.api.content(str(job.file_id))
        return {str(d.get("custom_id")): d.get("body") or {} for d in read_lines(data)}

    def _one(
        self,
        line: dict[str, Any],
        cid: str,
        *,
        keys: list[str],
        body: dict[str, Any],
        job: BatchJob,
        ours: dict[str, TeacherRequest],
        results: dict[str, Outcome],
    ) -> Optional[str]:
        """One output or error line: an answer (cached, charged), or why its request must be asked again."""
        resp = line.get("response") if isinstance(line.get("response"), dict) else {}
        status = resp.get("status_code") if isinstance(resp, dict) else None
        data = resp.get("body") if isinstance(resp, dict) else None
        usage = usage_of(data)
        if status != 200:
            err = line.get("error") or (data.get("error") if isinstance(data, dict) else None)
            why = f"HTTP {status} inside batch {job.batch_id}: {str(err)[:200]}"
            self._record_failure(cid, body, job, kind=f"batch_http_{status}", status=status, usage=usage, why=why)
            self._charge(usage, body, billed=usage != (None, None))
            return why if status is None or status in RETRYABLE_STATUS or status >= 500 else "final: " + why
        try:
            answers, pt, ct = extract_answers(data, len(keys))
            if self.endpoint.check_model and not model_matches(body.get("model"), (data or {}).get("model")):
                raise ServerError(f"answer is for model {str((data or {}).get('model'))[:80]!r}")
        except ServerError as e:
            why = f"unusable answer inside batch {job.batch_id}: {e}"
            self._record_failure(cid, body, job, kind="batch_bad_response", status=200, usage=usage, why=why)
            self._charge(usage, body, billed=usage != (None, None))
            return why
        source = "reported"
        if pt is None or ct is None:
            source = self.counter.usage_source
            pt = pt if pt is not None else self.counter.count_prompt(body)
            ct = ct if ct is not None else sum(self.counter.count_completion(a.text, a.finish_reason) for a in answers)
            self.stats.tokens_counted += (pt or 0) + (ct or 0)
            answers[0].prompt_tokens, answers[0].completion_tokens = pt, ct
        for a in answers:
            a.usage_source = source
            a.transport = "batch"
        self.stats.tokens_reasoning += reasoning_tokens(data)
        self.cache.put_success(
            list(zip(keys, answers)),
            body,
            self.run_id,
            attempt=job.round,
            http_status=200,
            latency_s=None,
            transport="batch",
        )
        self._charge((pt, ct), body, billed=True)
        self.stats.requests_ok += 1
        self.stats.tokens_in += pt or 0
        self.stats.tokens_out += ct or 0
        self.stats.bump("ok")
        if cid in ours:
            for k, a in zip(keys, answers):
                results[k] = Outcome(
                    a.text,
                    cached=False,
                    attempts=job.round,
                    prompt_tokens=a.prompt_tokens,
                    completion_tokens=a.completion_tokens,
                    usage_source=source,
                    logprobs=a.logprobs,
                    finish_reason=a.finish_reason,
                    transport="batch",
                )
        return None

    def _charge(self, usage: tuple[Optional[int], Optional[int]], body: dict[str, Any], *, billed: bool) -> None:
        if self.meter is not None and billed:
            est = self.counter.count_prompt(body) if body else 0
            self.meter.charge_batch(
                self.endpoint.index, prompt_tokens=usage[0], completion_tokens=usage[1], est_prompt=est
            )

    def _record_failure(
        self,
        cid: str,
        body: dict[str, Any],
        job: BatchJob,
        *,
        kind: str,
        status: Optional[int],
        usage: tuple[Optional[int], Optional[int]],
        why: str,
    ) -> None:
        self.stats.attempt_errors += 1
        self.stats.bump(kind)
        self.stats.tokens_in += usage[0] or 0
        self.stats.tokens_out += usage[1] or 0
        self.cache.put_attempt(
            cid,
            self.run_id,
            job.round,
            status=kind,
            http_status=status,
            latency_s=0.0,
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            error=why,
            model=body.get("model"),
            transport="batch",
        )

    # ------------------------------------------------------------------ what is not answered
    def _next_round(
        self,
        retry: dict[str, str],
        job: BatchJob,
        ours: dict[str, TeacherRequest],
        rounds: dict[str, int],
        results: dict[str, Outcome],
    ) -> list[TeacherRequest]:
        """Of the requests a batch did not answer, those that go into the next batch; the rest online or failed."""
        again: list[TeacherRequest] = []
        for cid, why in retry.items():
            r = ours.get(cid)
            if r is None:
                continue  # another shard's or run's request: it asks again when it needs it
            rounds[cid] = max(rounds.get(cid, 0), job.round)
            if why.startswith("final: "):
                self._give_up(r, why[len("final: ") :], rounds[cid], results)
            elif self.batch.retry_online:
                self.retry_online.append(r)
            elif rounds[cid] < self.batch.max_rounds:
                again.append(r)
            else:
                self._give_up(r, f"not answered in {rounds[cid]} batches; last: {why}", rounds[cid], results)
        return again

    def _give_up(self, r: TeacherRequest, why: str, attempts: int, results: dict[str, Outcome]) -> None:
        self.stats.requests_failed += 1
        for k in r.keys:
            results[k] = Outcome(None, cached=False, error=why, attempts=attempts, transport="batch")

    def _budget_stop(self, pending: list[TeacherRequest], results: dict[str, Outcome]) -> None:
        why = "not sent: a batch of these requests could cross budget.max_usd"
        for r in pending:
            self.stats.not_sent_budget += 1
            for k in r.keys:
                results[k] = Outcome(None, cached=False, error=why, budget_stop=True, transport="batch")

    def _stop_waiting(
        self, jobs: dict[str, BatchJob], ours: dict[str, TeacherRequest], results: dict[str, Outcome]
    ) -> None:
        """Past ``max_wait_s``: what is still at the provider is pending; the next run collects it."""
        for job in jobs.values():
            for cid in set(self.ledger.requests_of(job.local_id)) & ours.keys():
                self.stats.batch_pending += 1
                why = f"in batch {job.batch_id} ({job.state}) at the provider; the next run collects it"
                for k in ours[cid].keys:
                    results[k] = Outcome(None, cached=False, error=why, pending=True, transport="batch")
        self.log.warning(
            "batch transport: stopped waiting after teacher.batch.max_wait_s with %d batches at the provider (%s);"
            " run again to collect them, nothing is submitted twice",
            len(jobs),
            ", ".join(str(j.batch_id) for j in jobs.values()),
        )

    def _progress(self) -> None:
        if self.on_result:
            self.on_result(self.stats)
