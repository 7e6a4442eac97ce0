"""HTML sections of a report for a target step's record: the plan, the sensitivity plot and table, size versus
predicted cost of the plan and of uniform formats, the ratios tried, and the study's Pareto plot."""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

e = html.escape


def _num(v, fmt: str = ".3g") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def sensitivity_plot(sens: dict[str, Any], chosen: dict[str, str | None]) -> str:
    """Cost of each layer alone per format (log scale) and the bits per weight the plan gave it."""
    plt = _plt()
    if plt is None or not sens.get("layers"):
        return ""
    units = list(sens["error"])
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 5.5), dpi=100, sharex=True, height_ratios=[3, 1.4])
    for f in sens["formats"]:
        ys = [max(sens["layers"].get(u, {}).get(f, math.nan), 1e-12) for u in units]
        ax.plot(range(len(units)), ys, marker=".", lw=1, label=f)
    ax.set_yscale("log")
    ax.set_ylabel(f"{sens['divergence']} (layer alone)")
    ax.set_title("sensitivity: behaviour cost of quantizing each layer alone")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    bits = [8 * sens["nbytes"][u].get(chosen.get(u) or "float", 0) / max(sens["params"][u], 1) for u in units]
    bx.bar(range(len(units)), bits, color="#d62728")
    bx.set_ylabel("plan bits/weight")
    bx.set_xticks(range(len(units)))
    bx.set_xticklabels([u[-28:] for u in units], rotation=90, fontsize=6)
    bx.grid(alpha=0.3, axis="y")
    return _png(fig)


def tradeoff_plot(rec: dict[str, Any]) -> str:
    """Predicted cost against true bytes: every uniform format and the plan (and the study's trials)."""
    plt = _plt()
    if plt is None or not rec.get("uniform"):
        return ""
    fig, ax = plt.subplots(figsize=(5.8, 3.8), dpi=100)
    uni = [u for u in rec["uniform"] if u["predicted_cost"] > 0]
    ax.scatter([u["nbytes"] / 1e6 for u in uni], [u["predicted_cost"] for u in uni], color="#1f77b4", label="uniform")
    for u in uni:
        ax.annotate(u["format"], (u["nbytes"] / 1e6, u["predicted_cost"]), fontsize=6)
    p = rec["plan"]
    if p["cost"] > 0:
        ax.scatter([p["nbytes"] / 1e6], [p["cost"]], marker="*", s=160, color="#d62728", label="plan (mixed)")
    ax.axvline(rec["budget_bytes"] / 1e6, ls="--", color="#999", label="budget")
    ax.set_yscale("log")
    ax.set_xlabel("size (MB, true bytes)")
    ax.set_ylabel("predicted cost")
    ax.set_title("mixed precision versus uniform formats")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def pareto_plot(study: dict[str, Any], budget: int) -> str:
    plt = _plt()
    trials = [t for t in study.get("trials", []) if t.get("value") is not None]
    if plt is None or not trials:
        return ""
    fig, ax = plt.subplots(figsize=(5.8, 3.8), dpi=100)
    front = {t["number"] for t in study.get("pareto", [])}
    for kind, color in (("random", "#aaa"), ("seed", "#2ca02c"), ("sampled", "#1f77b4")):
        ts = [t for t in trials if t.get("origin", "sampled") == kind and t["number"] not in front]
        if ts:
            ax.scatter([t["nbytes"] / 1e6 for t in ts], [t["value"] for t in ts], s=14, color=color, label=kind)
    fr = sorted((t for t in trials if t["number"] in front), key=lambda t: t["nbytes"])
    if fr:
        ax.plot([t["nbytes"] / 1e6 for t in fr], [t["value"] for t in fr], "-o", color="#ff7f0e", ms=4,
                label="Pareto front")
    ch = study.get("chosen")
    if ch:
        ax.scatter([ch["nbytes"] / 1e6], [ch["value"]], marker="*", s=180, color="#d62728", label="chosen", zorder=5)
    ax.axvline(budget / 1e6, ls="--", color="#999", label="budget")
    ax.set_xlabel("size (MB, true bytes)")
    ax.set_ylabel(study.get("metric", "metric"))
    ax.set_title(f"study ({study.get('sampler', '')}): size versus quality")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def target_section(rec: dict[str, Any]) -> str:
    sens, plan = rec["sensitivity"], rec["plan"]
    chosen = plan["formats"]
    rows = "".join(
        f"<tr><td>{e(u)}</td><td>{sens['params'][u]:,}</td><td>{e(str(chosen.get(u) or 'float'))}</td>"
        f"<td>{sens['nbytes'][u].get(chosen.get(u) or 'float', 0):,}</td>"
        f"<td>{_num(sens['layers'].get(u, {}).get(chosen.get(u)) if chosen.get(u) else 0.0)}</td>"
        f"<td>{_num(sens['hessian'].get(u))}</td></tr>" for u in sens["error"])
    fmts = sens["formats"]
    sens_rows = "".join(
        f"<tr><td>{e(u)}</td>" + "".join(f"<td>{_num(sens['layers'].get(u, {}).get(f))}</td>" for f in fmts) + "</tr>"
        for u in sens["error"])
    sens_rows += "".join(
        f"<tr><td><b>{e(b)}</b> (block)</td>" + "".join(f"<td>{_num(c.get(f))}</td>" for f in fmts) + "</tr>"
        for b, c in sens.get("blocks", {}).items())
    uni = "".join(f"<tr><td>{e(u['format'])}</td><td>{u['nbytes']:,}</td><td>{u['ratio']:.2f}×</td>"
                  f"<td>{_num(u['predicted_cost'])}</td></tr>" for u in rec.get("uniform", []))
    check = rec.get("check")
    check_html = "" if not check else (
        f"<p>check on the evaluation data: {e(check['metric'])} {check['value']:.5g} (float {check['reference']:.5g}), "
        f"drop {check['drop']:.4g}{' relative' if check['relative'] else ''}"
        + (f", allowed {check['max_drop']:.4g}" if check.get("max_drop") is not None else "")
        + (f"; the plan at the budget (÷{rec['missed']['plan']['ratio']:.2f}) dropped {rec['missed']['drop']:.4g}, "
           f"so {len(rec.get('tried', []))} plans were measured and the first within the drop taken"
           if rec.get("missed") else "") + "</p>")
    study = rec.get("study")
    study_html = "" if not study else (
        f"<h3>Study</h3><p>{study['n_trials']} trials ({e(study['sampler'])}), storage {e(study['storage'])}, "
        f"study {e(study['name'])}; chosen trial {study['chosen']['number']}: {study['chosen']['nbytes']:,} bytes, "
        f"{e(study['metric'])} {study['chosen']['value']:.5g}</p>" + pareto_plot(study, rec["budget_bytes"]))
    return f"""<h2>Target</h2>
<p>{e(rec['target'])} · budget {rec['budget_bytes']:,} bytes of {rec['reference_bytes']:,} · plan {plan['nbytes']:,}
bytes (÷{plan['ratio']:.2f}) · method {e(str(rec['method']))} · predicted cost {_num(rec['predicted_cost'])}, measured
{_num(rec['measured_cost'])} ({e(sens['divergence'])} on {rec['heldout_batches']} held-out calibration batch(es)
{f"and {rec['compare_train_batches']} training batch(es)" if rec.get('compare_train_batches') else ""};
costs: {e(rec['cost_source'])}) · {rec['seconds']:.1f} s</p>{check_html}
<p>The plan as a recipe (plan.yaml; edit and rerun with <code>--recipe</code>):</p><pre>{e(rec['plan_yaml'])}</pre>
{tradeoff_plot(rec)}
<table><tr><th>format (uniform)</th><th>bytes</th><th>ratio</th><th>predicted cost</th></tr>{uni}
<tr><td><b>plan (mixed)</b></td><td>{plan['nbytes']:,}</td><td>{plan['ratio']:.2f}×</td><td>{_num(plan['cost'])}</td></tr></table>
<h3>Plan</h3><table><tr><th>layer</th><th>params</th><th>format</th><th>bytes</th><th>cost alone</th><th>tr(H)/n</th></tr>{rows}</table>
<h3>Sensitivity</h3>{sensitivity_plot(sens, chosen)}
<table><tr><th>layer</th>{''.join(f'<th>{e(f)}</th>' for f in fmts)}</tr>{sens_rows}</table>{study_html}"""


def plan_sections(steps: list[dict[str, Any]]) -> str:
    """The sections of every step record that carries a plan (target, sensimix)."""
    out = []
    for rec in steps:
        if rec.get("step") == "target":
            out.append(target_section(rec))
        elif "plan_yaml" in rec:
            p = rec["plan"]
            rows = "".join(f"<tr><td>{e(u)}</td><td>{e(str(f or 'float'))}</td></tr>" for u, f in p["formats"].items())
            out.append(f"<h2>{e(rec['step'])}</h2><p>{p['nbytes']:,} bytes (÷{p['ratio']:.2f}), activations "
                       f"{e(str(p.get('activations')))}</p><pre>{e(rec['plan_yaml'])}</pre>"
                       f"<table><tr><th>layer</th><th>format</th></tr>{rows}</table>")
    return "".join(out)
