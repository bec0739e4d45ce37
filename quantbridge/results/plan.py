"""Mixed-precision planning: per-layer backend choices that meet a user's budget.

Inputs are a comparison's per-layer records (weight bytes, latency at one M, and the eval
loss increase with only that layer quantized: `compare --sensitivity`). The model is
additive: a plan's weight bytes and layer latency are sums (exact up to timing noise), its
eval loss is the reference loss plus the chosen layers' loss increases (first order: layers
interact, which `compare --plan` measures). Greedy (see `make_plan`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from quantbridge.plugin.errors import UserError
from quantbridge.results.schema import Comparison

PLAN_SCHEMA = 1


@dataclass(frozen=True)
class Budget:
    max_ppl_increase_pct: float | None = None
    max_weight_gb: float | None = None
    max_latency_ratio: float | None = None

    def __post_init__(self) -> None:
        if all(v is None for v in (self.max_ppl_increase_pct, self.max_weight_gb, self.max_latency_ratio)):
            raise UserError("give a budget: --max-ppl-increase PCT, --max-weight-gb GB or --max-latency-ratio R")


def _table(comp: Comparison, m: str, allowed: list[str] | None) -> tuple[dict, dict]:
    """(reference per layer, candidate options per layer)."""
    ref = comp.reference()
    if ref is None or ref.status != "ok":
        raise UserError("the results have no ok reference row; re-run compare")
    if m not in ref.layers[0].latency_us:
        raise UserError(f"the results have no latency at M={m}; use --batch with one of "
                        f"{', '.join(ref.layers[0].latency_us)}")
    base = {r.name: r for r in ref.layers}
    options: dict[str, list[tuple[str, object]]] = {n: [] for n in base}
    for b in comp.backends:
        # Only rows compare --plan can build again by name: not a --kernels row (WEIGHTS+KERNEL).
        if (b.status != "ok" or b.role != "measured" or "only_kernel" in b.model_metrics
                or (allowed and b.name not in allowed)):
            continue
        for r in b.layers:
            if not r.quantized:
                continue
            if "loss_delta" not in r.error:
                raise UserError(f"{b.name} has no per-layer sensitivity in these results; "
                                f"re-run compare with --sensitivity")
            options[r.name].append((b.name, r))
    if allowed:
        rows = [b.name for b in comp.backends if b.status == "ok" and b.role == "measured"]
        absent = [n for n in allowed if n != ref.name and n not in rows]
        if absent:
            raise UserError(f"--backends {absent[0]} has no ok row in these results (rows: {', '.join(rows) or 'none'}); "
                            f"choose from those or re-run compare with --backends {absent[0]}")
    if not any(options.values()):
        raise UserError("no quantized backend with ok per-layer results to plan with")
    return base, options


def predict(comp: Comparison, layers: dict[str, str], m: str) -> dict:
    """Weight bytes, latency at M and eval perplexity of a per-layer assignment."""
    rows = {b.name: {r.name: r for r in b.layers} for b in comp.backends if b.status == "ok"}
    reference = comp.reference()
    ref = rows[reference.name]
    ref_loss = reference.model_metrics["eval_loss"]
    weight = latency = loss = 0.0
    for n, r0 in ref.items():
        r = rows[layers.get(n, reference.name)][n]
        weight += r.weight_bytes
        latency += r.latency_us[m]["median"]
        loss += r.error.get("loss_delta", 0.0)
    base_latency = sum(r.latency_us[m]["median"] for r in ref.values())
    ppl = math.exp(ref_loss + loss)
    return {"weight_bytes": int(weight), "latency_us": latency, "latency_ratio": latency / base_latency,
            "eval_loss": ref_loss + loss, "eval_ppl": ppl, "ppl_increase_pct": 100 * (ppl / math.exp(ref_loss) - 1),
            "m": int(m)}


def make_plan(comp: Comparison, budget: Budget, m: int, allowed: list[str] | None = None) -> dict:
    """Greedy per-layer assignment that meets `budget` at batch M.

    Layers are visited by their cheapest loss increase per byte saved; each takes the first of
    its options (in that order) that keeps every budget. The perplexity budget is a ceiling
    every move respects. Weight and latency budgets are goals: a move that does not meet one
    yet is taken if it moves towards it. Without a perplexity budget the plan stops as soon as
    the goals are met (best quality that meets them); with one it saves as much memory as
    the perplexity budget allows.
    """
    key = str(m)
    base, options = _table(comp, key, allowed)
    ranked: dict[str, list[tuple[float, str]]] = {}
    for n, opts in options.items():
        scored = sorted((max(r.error["loss_delta"], 0.0) / (base[n].weight_bytes - r.weight_bytes), name)
                        for name, r in opts if base[n].weight_bytes > r.weight_bytes)
        if scored:
            ranked[n] = scored
    order = sorted(ranked, key=lambda n: ranked[n][0])
    layers: dict[str, str] = {}
    current = predict(comp, layers, key)
    for n in order:
        if budget.max_ppl_increase_pct is None and _goals_met(budget, current):
            break
        for _, name in ranked[n]:
            trial = predict(comp, {**layers, n: name}, key)
            if _acceptable(budget, current, trial):
                layers[n], current = name, trial
                break
    if not _goals_met(budget, current):
        raise UserError(f"no plan meets the budget ({_describe(budget)}): the smallest found is "
                        f"{current['weight_bytes'] / 1e9:.4g} GB at {current['latency_ratio']:.3g}× fp16 latency "
                        f"and +{current['ppl_increase_pct']:.3g} % perplexity; loosen a budget")
    return {"schema": PLAN_SCHEMA, "budget": {k: v for k, v in vars(budget).items() if v is not None},
            "m": m, "layers": {n: layers.get(n, comp.reference().name) for n in base},
            "predicted": current, "reference": predict(comp, {}, key),
            "backends": sorted(set(layers.values()))}


def _goals_met(budget: Budget, p: dict) -> bool:
    """Whether a prediction meets every budget given (the perplexity ceiling too: a plan that
    starts above it, e.g. a negative --max-ppl-increase, fails like an unmeetable weight budget)."""
    return ((budget.max_ppl_increase_pct is None or p["ppl_increase_pct"] <= budget.max_ppl_increase_pct)
            and (budget.max_weight_gb is None or p["weight_bytes"] <= budget.max_weight_gb * 1e9)
            and (budget.max_latency_ratio is None or p["latency_ratio"] <= budget.max_latency_ratio))


def _acceptable(budget: Budget, current: dict, trial: dict) -> bool:
    if budget.max_ppl_increase_pct is not None and trial["ppl_increase_pct"] > budget.max_ppl_increase_pct:
        return False
    # A latency goal not met yet accepts any move that reduces latency; once met, it must stay met.
    r = budget.max_latency_ratio
    return r is None or trial["latency_ratio"] <= r or trial["latency_ratio"] < current["latency_ratio"]


def _describe(budget: Budget) -> str:
    parts = {"max_ppl_increase_pct": "--max-ppl-increase {} %", "max_weight_gb": "--max-weight-gb {}",
             "max_latency_ratio": "--max-latency-ratio {}"}
    return ", ".join(f.format(getattr(budget, k)) for k, f in parts.items() if getattr(budget, k) is not None)


def load_plan(path: str) -> dict:
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"plan file {path!r} does not exist; write one with `quantbridge plan RESULTS.json ... --out FILE`")
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"plan file {path} is not JSON ({e}); pass a file written by `quantbridge plan`") from None
    if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA or not isinstance(plan.get("layers"), dict):
        raise UserError(f"{path} is not a quantbridge plan (schema {PLAN_SCHEMA})")
    bad = next(((n, b) for n, b in plan["layers"].items() if not isinstance(b, str)), None)
    listed = plan.get("backends", [])
    if bad is not None or not isinstance(listed, list) or not all(isinstance(b, str) for b in listed):
        what = (f"layer {bad[0]} is assigned {bad[1]!r}, not a backend name" if bad
                else "'backends' is not a list of backend names")
        raise UserError(f"{path} is not a usable quantbridge plan: {what}; write one with `quantbridge plan`")

    # The registry loads every adapter (and torch): only here, so `quantbridge plan --help` stays quick.
    from quantbridge.plugin import backend as registry

    used = sorted(set(plan["layers"].values()))
    try:
        registry.parse_names(",".join(used))  # an unknown backend is named now, not when the plan row runs
    except UserError as e:
        raise UserError(f"plan file {path}: {e}") from None
    # Every backend a layer is assigned runs as a row too (a hand-edited file may not list it).
    plan["backends"] = sorted(set(plan.get("backends") or []) | {b for b in used if registry.get(b).quantized})
    return plan


def check_plan_layers(plan: dict, layers: Iterable[str], quantized: Iterable[str], model: str) -> None:
    """Refuse a plan that would be applied in part: a layer the model lacks, or a quantized
    backend for a layer this run keeps unquantized (--skip, or a checkpoint's float layers)."""

    layers, quantized = list(layers), set(quantized)
    missing = [n for n in plan["layers"] if n not in layers]
    if missing:
        def named(n: str) -> str:  # a typo's correction; never another layer index (layers.9 is not layers.3)
            same = [c for c in layers if re.findall(r"\d+", c) == re.findall(r"\d+", n)]
            close = difflib.get_close_matches(n, same, n=1, cutoff=0.8)
            return f"{n} (did you mean {close[0]}?)" if close else n

        shown = ", ".join(map(named, missing[:3])) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"--plan names {len(missing)} layer(s) model {model} lacks: {shown}; was the plan made for "
                        f"another model? make one from this model's results with `quantbridge plan`")
    from quantbridge.plugin import backend as registry  # see load_plan

    kept = [n for n, b in plan["layers"].items() if registry.get(b).quantized and n not in quantized]
    if kept:
        raise UserError(f"--plan assigns {plan['layers'][kept[0]]} to {kept[0]}, which this run keeps unquantized "
                        f"({len(kept)} such layer(s)); change --skip or the plan")
