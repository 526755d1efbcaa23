"""The run's report arithmetic: from the teacher's shards to the annotation's typed figures, and a budget stop.

Why here and not in the flow bodies or the teacher's stage: the flows read as the DAG, and
the teacher's stage returns what it did (shards, the probe); the sums, speeds, bill and
reuse the report shows are worked out from those typed parts in one place, typed again
(tasks/results/stages.py ``Annotation``), and become string keys only in
tasks/pipeline/summary.py.
"""

from __future__ import annotations

from typing import Optional

from distill.config import EnergyConfig, TeacherConfig
from tasks.accounting.carbon import EnergyReading
from tasks.accounting.costs import LedgerSums, teacher_bill
from tasks.results.accounting import TeacherPrice
from tasks.results.stages import Annotation, Reuse
from tasks.results.teacher import EarlierRun, ShardTotals, TeacherSpeed
from tasks.teacher.requests import choices_per_request
from tasks.teacher.stages import AnnotatedShards


def teacher_speed(totals: ShardTotals, teacher: TeacherConfig, earlier: Optional[EarlierRun]) -> TeacherSpeed:
    """Answers per second of the shards that sent requests; when every answer came from the cache, the last run's."""
    wall, ok = totals.sending_wall_s, totals.client.requests_ok
    if wall > 0:  # one request answers choices_per_request samples (k with `n`, else 1)
        return TeacherSpeed(ok / wall, ok * choices_per_request(teacher) / teacher.samples / wall, "this run")
    if earlier is not None and earlier.teacher_items_per_s:
        return TeacherSpeed(
            earlier.teacher_requests_per_s, earlier.teacher_items_per_s, "an earlier run (all answers cached now)"
        )
    return TeacherSpeed(None, None, None)


def reuse_of(pool: ShardTotals, usd_per_item: Optional[float]) -> Reuse:
    """New vs reused pool items and what reusing cached answers saved (what asking again would cost).

    An item is reused when all its answers came from the cache or from a finished part of
    an earlier run (a nightly run over a source that grew annotates only what is new).
    """
    reused, total = pool.items_reused, pool.items + pool.items_in_skipped
    return Reuse(
        total - reused,
        reused,
        reused * usd_per_item if usd_per_item is not None else None,
        (
            f"{reused:,} reused items x teacher_usd_per_item (what labelling one item costs, see its method)"
            if usd_per_item is not None
            else "teacher cost per item unknown"
        ),
    )


def annotation_of(
    shards: AnnotatedShards,
    *,
    prices: list[TeacherPrice],
    ledger: LedgerSums,
    energy: EnergyReading,
    teacher: TeacherConfig,
    energy_cfg: EnergyConfig,
    earlier: Optional[EarlierRun],
) -> Annotation:
    """The annotation as the report reads it: totals, the teacher's speed, this run's bill and the reuse."""
    totals = shards.totals()
    speed = teacher_speed(totals, teacher, earlier)
    bill = teacher_bill(
        totals=totals,
        prices=prices,
        ledger=ledger,
        energy=energy,
        energy_cfg=energy_cfg,
        local=teacher.local,
        samples=teacher.samples,
        answers_per_request=choices_per_request(teacher),
        items_per_s=speed.teacher_items_per_s,
        earlier=earlier,
    )
    return Annotation(
        shards.pool,
        shards.gold,
        shards.probe,
        totals,
        speed,
        bill,
        reuse_of(shards.totals(("pool",)), bill.teacher_usd_per_item),
    )
