"""The order pytest-xdist hands tests out in: the long ones first, spread over the workers.

Why: the suite is bound by CPU on 2 cores, and with ``--dist worksteal`` each worker starts
on a contiguous block of the collection and steals from the tail of the other's queue. In
collection order the long system tests sit wherever their file sorts, so a two-minute test
could start last and leave one worker idle at the end. Here each worker's block begins with
its share of the long tests, the longest first, so the short tests fill in around them (the
"longest processing time first" rule); the kill/resume chain stays whole at the front of one
block, since its tests share one chain of runs (tests/test_stage_resume.py).

The weights are rough seconds per ``system`` or ``slow`` test of a file on a quiet 2-core
machine (README "Tests"); such a test in a file not listed counts 10 s, any other test 1 s. They only
order the tests: a wrong weight costs some balance, never a result.
"""

from __future__ import annotations

import os

import pytest

# seconds per test, by file (from `make test`'s --durations on a quiet machine, 2026-12-05)
WEIGHTS = {
    "test_stage_resume.py": 20.0,
    "test_generate_flow.py": 100.0,
    "test_secrets.py": 80.0,
    "test_server_away.py": 45.0,
    "test_distill_flow.py": 50.0,
    "test_concurrent_runs.py": 45.0,
    "test_deployments.py": 25.0,
    "test_legacy_models.py": 20.0,
    "test_train.py": 15.0,
    "test_batch.py": 15.0,
}
FIRST = "test_stage_resume.py"  # its tests share one chain: kept together, at the very front


def weight(item: pytest.Item) -> float:
    if not (item.get_closest_marker("system") or item.get_closest_marker("slow")):
        return 1.0  # the unit and fake-teacher tests: about a second each
    return WEIGHTS.get(item.path.name, 10.0)


def xdist_order(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` reordered so that worker i's first block holds its share of the long tests, longest first."""
    if workers < 2 or len(items) < 2 * workers:
        return items
    # the block sizes worksteal hands out at the start: len(pending) // idle workers left, in turn
    sizes, left = [], len(items)
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    heavy = [it for it in items if weight(it) > 1.0]
    light = [it for it in items if weight(it) <= 1.0]
    first = [it for it in heavy if it.path.name == FIRST]
    rest = sorted((it for it in heavy if it.path.name != FIRST), key=weight, reverse=True)
    groups: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    groups[0].extend(first)
    load[0] += sum(weight(it) for it in first)
    for it in rest:  # each long test to the block with the least work so far (and room left)
        i = min((j for j in range(workers) if len(groups[j]) < sizes[j]), key=lambda j: load[j])
        groups[i].append(it)
        load[i] += weight(it)
    for i in range(workers):  # the short tests fill each block to the size worksteal gives it
        need = sizes[i] - len(groups[i])
        groups[i].extend(light[:need])
        light = light[need:]
    ordered = [it for g in groups for it in g] + light
    assert len(ordered) == len(items)
    return ordered


def worker_count() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
