"""distill from Python with data in memory: ``distill.api.distill(cfg, pool=df, gold=ds)``.

Why a module beside the flows rather than a flow parameter: the frames are written once as
Parquet into the run folder (tasks/data/frames.py) and the flow is called with their paths,
so Prefect stores and shows a path, never the rows, and a rerun with the same data resumes.
``cfg`` is a :class:`distill.config.DistillConfig`, or a dict (then ``data.pool_path`` may be
left out when ``pool`` is given).
"""

from __future__ import annotations

from typing import Any, Optional, Union, cast

from distill.config import DistillConfig, config_from_dict

Config = Union[DistillConfig, dict[str, Any]]


def _config(config: Config, pool: Optional[Any]) -> DistillConfig:
    if isinstance(config, DistillConfig):
        return config
    raw = {**config, "data": {**config.get("data", {})}}
    if pool is not None:
        raw["data"].setdefault("pool_path", "(a frame from Python)")  # replaced by the written file's path
    return config_from_dict(raw)


def distill(
    config: Config, *, pool: Optional[Any] = None, gold: Optional[Any] = None, **flow_kwargs: Any
) -> dict[str, Any]:
    """The whole distill flow on ``pool`` and ``gold`` (a pandas.DataFrame or a datasets.Dataset each, optional)."""
    from flows.distillation import distill_flow
    from tasks.pipeline.load import with_frames

    return cast(dict[str, Any], distill_flow(with_frames(_config(config, pool), pool=pool, gold=gold), **flow_kwargs))


def annotate(
    config: Config, *, pool: Optional[Any] = None, gold: Optional[Any] = None, **flow_kwargs: Any
) -> dict[str, Any]:
    """The annotate flow alone (teacher labels and their aggregation) on in-memory data."""
    from flows.annotate import annotate_flow
    from tasks.pipeline.load import with_frames

    return cast(dict[str, Any], annotate_flow(with_frames(_config(config, pool), pool=pool, gold=gold), **flow_kwargs))
