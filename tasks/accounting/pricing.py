"""Teacher prices: resolved before any request, applied to every attempt.

Why a module of its own: peers show "N/A" for unpriced models and forget retries. Here a
teacher without a price is an error before the first request (unless the run marks it
free), and the cost is computed from the attempt ledger, so retries, invalid answers and
failed calls that reported usage are all on the bill. A local or self-hosted teacher is
priced by the hours its hardware is busy with the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from distill.config import ModelPrice, PricingConfig, TeacherConfig, read_yaml
from tasks.results.accounting import TeacherPrice

REPO = Path(__file__).resolve().parents[2]


class PricingError(ValueError):
    """A teacher has no usable price; the message names the model and how to price it."""


def load_table(path: str | Path) -> dict[str, ModelPrice]:
    """Read a price table; errors name the file and the model entry."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO / p).exists():
        p = REPO / p  # the bundled table, when run from another directory
    raw = read_yaml(p, PricingError, "price table (pricing.table)")
    models = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models, dict):
        raise PricingError(f"{p}: expected a top-level 'models:' mapping of model name -> prices")
    out: dict[str, ModelPrice] = {}
    for name, entry in models.items():
        try:
            out[str(name)] = ModelPrice.model_validate(entry or {})
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'entry'}: {err['msg']}" for err in e.errors())
            raise PricingError(f"{p}: models.{name}: {msgs}") from None
    return out


def _from_entry(model: str, e: ModelPrice, source: str) -> TeacherPrice:
    common: dict[str, Any] = {
        "kwh_per_request": e.kwh_per_request,
        "kwh_per_1k_output_tokens": e.kwh_per_1k_output_tokens,
        "source": e.source or source,
    }
    if e.free:
        return TeacherPrice(model, "free", **common)
    if e.usd_per_hour is not None:
        return TeacherPrice(model, "hourly", usd_per_hour=e.usd_per_hour, **common)
    return TeacherPrice(
        model,
        "tokens",
        input_per_mtok=e.input_per_mtok,
        output_per_mtok=e.output_per_mtok,
        per_request_usd=e.per_request_usd,
        batch_discount=e.batch_discount,
        **common,
    )


def resolve_price(
    model: str, local: bool, pc: PricingConfig, table: Optional[dict[str, ModelPrice]] = None
) -> TeacherPrice:
    """Price of ``model``: run overrides, then the local hardware rate, then the table; else an error.

    The online price: answers that come through the Batch API are billed at
    :meth:`TeacherPrice.batch_variant` of it, by the transport that fetched them.
    """
    if pc.free:
        return TeacherPrice(model, "free", source="marked free by pricing.free")
    if model in pc.models:
        return _from_entry(model, pc.models[model], "pricing.models in the run config")
    if local:
        return TeacherPrice(
            model,
            "hourly",
            usd_per_hour=pc.hardware_usd_per_hour,
            source=f"local teacher on {pc.hardware_name} at pricing.hardware_usd_per_hour",
        )
    table = load_table(pc.table) if table is None else table
    if model in table:
        return _from_entry(model, table[model], pc.table)
    raise PricingError(
        f"teacher model {model!r} has no price: add it to {pc.table} or to pricing.models in the run config "
        f"(input_per_mtok/output_per_mtok, or usd_per_hour for a self-hosted server), or set pricing.free: true "
        f"if it really costs nothing. No request was sent."
    )


def resolve_prices(t: TeacherConfig, pricing: PricingConfig) -> list[TeacherPrice]:
    """One price per endpoint of the run: index 0 the main teacher, then teacher.members in order."""
    table = None if pricing.free else _table_if_needed(t, pricing)
    prices = [resolve_price(t.model, t.local, pricing, table)]
    for m in t.members:
        prices.append(resolve_price(m.model, t.local and m.base_url is None, pricing, table))
    return prices


def _table_if_needed(t: TeacherConfig, pricing: PricingConfig) -> Optional[dict[str, ModelPrice]]:
    models = [(t.model, t.local)] + [(m.model, t.local and m.base_url is None) for m in t.members]
    if all(local or name in pricing.models for name, local in models):
        return {}
    return load_table(pricing.table)


def busy_cost(price: TeacherPrice, busy_s: float) -> float:
    return price.usd_per_hour * busy_s / 3600.0 if price.kind == "hourly" else 0.0
