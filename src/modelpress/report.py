"""Report: what a compression cost, reference vs compressed; terminal table, JSON and HTML with plots."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# metrics where lower is better (for the "better/worse" colouring and the plot's direction)
LOWER_IS_BETTER = {"perplexity", "log_loss", "logloss", "kl_divergence", "mean_abs_diff"}


def json_ready(obj: Any) -> Any:
    """`obj` with every number a JSON number: NaN and infinities (an SQNR of identical outputs, the AUC of one class)
    become null, which strict parsers (jq, JSON.parse) accept; numpy / torch scalars become floats."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    try:
        v = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return v if math.isfinite(v) else None


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (no NaN / Infinity tokens): what `--json` prints and report.json holds."""
    return json.dumps(json_ready(obj), indent=indent, allow_nan=False)


@dataclass
class Report:
    model: str
    recipe: dict[str, Any]
    metrics: dict[str, dict[str, float | None]]
    size: dict[str, float]
    latency: dict[str, Any]
    layers: list[dict[str, Any]]
    seconds: float
    task: str = ""
    notes: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # what each recipe step recorded (Context.report)
    kernels: dict[str, Any] = field(default_factory=dict)  # kernel mode, CPU, how paths were chosen (see layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return dumps(self.to_dict(), indent=indent)

    @property
    def primary_metric(self) -> str | None:
        """The task's headline metric (first task metric, else first behaviour metric)."""
        task = [k for k, v in self.metrics.items() if v.get("reference") is not None]
        return (task or list(self.metrics) or [None])[0]

    def table(self):
        """A rich Table of metrics, size and latency."""
        from rich.table import Table

        t = Table(title=f"{self.model} · recipe {self.recipe.get('name', '?')} · {self.seconds:.1f} s")
        for col in ("metric", "reference", "compressed", "delta"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
        for name, v in self.metrics.items():
            d = v.get("delta")
            style = ""
            if d and not math.isnan(d):  # (a NaN delta, e.g. AUC over one class, is neither better nor worse)
                worse = d > 0 if name in LOWER_IS_BETTER else d < 0
                style = "red" if worse else "green"
            t.add_row(name, fmt(v.get("reference")), fmt(v.get("compressed")),
                      f"[{style}]{d:+.4g}[/{style}]" if d is not None and style else fmt(d))
        s = self.size
        t.add_row("size (bytes)", f"{s['reference_bytes']:,}", f"{s['compressed_bytes']:,}", f"÷{s['ratio']:.2f}")
        if s.get("kernel_bytes"):
            t.add_row("+ kernel copies (bytes)", "", f"{s['kernel_bytes']:,}", "in memory, not saved")
        if s.get("reference_params") and s.get("compressed_params") != s.get("reference_params"):
            t.add_row("parameters", f"{s['reference_params']:,}", f"{s['compressed_params']:,}",
                      f"×{s['compressed_params'] / s['reference_params']:.3f}")
        if s.get("sparsity"):
            t.add_row("sparsity (pruned layers)", "0", f"{s['sparsity']:.3f}", "")
        if self.latency:
            la = self.latency
            t.add_row("latency (ms, median)", f"{la['reference_ms']:.3f}", f"{la['compressed_ms']:.3f}",
                      f"×{la['speedup']:.2f}")
        if self.kernels:
            t.add_row("kernel mode", "", str(self.kernels.get("mode")), self.kernel_summary())
            t.caption = f"kernels: {self.kernels.get('cpu', '')}; {self.kernels.get('tuning', '')}"
        return t

    def kernel_rows(self) -> list[dict[str, Any]]:
        """One row per quantized layer and bucket of rows it ran with: path and measured speed against float."""
        return [{"layer": r["name"], "format": r["format"], **k} for r in self.layers for k in r.get("kernels", [])]

    def kernel_summary(self) -> str:
        speeds = [k["speedup"] for k in self.kernel_rows() if k.get("speedup") is not None]
        if not speeds:
            return f"{len(self.kernel_rows())} layer paths, speed not measured" if self.kernel_rows() else ""
        return f"{sum(v >= 1 for v in speeds)}/{len(speeds)} layer paths ≥ float"

    def kernel_table(self, limit: int = 40):
        """A rich Table of each quantized layer's kernel path per bucket of rows and its speed against float."""
        from rich.table import Table

        t = Table(title=f"kernels · mode {self.kernels.get('mode', '?')}")
        for col in ("layer", "format", "rows ≤", "path", "× vs float", "timed"):
            t.add_column(col, justify="right" if col in ("rows ≤", "× vs float") else "left")
        rows = self.kernel_rows()
        for k in rows[:limit]:
            sp = k.get("speedup")
            t.add_row(k["layer"], k["format"], str(k["rows"]), k["path"], "—" if sp is None else
                      (f"[red]{sp:.2f}[/red]" if sp < 1 else f"{sp:.2f}"), k.get("timed") or "—")
        if len(rows) > limit:
            t.add_row(f"... {len(rows) - limit} more (report.json)", "", "", "", "", "")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        c = Console(width=100, record=True, file=io.StringIO())
        c.print(self.table())
        if self.kernel_rows():
            c.print(self.kernel_table())
        return c.export_text()

    def _plot_png(self) -> str | None:
        """Size versus quality (base64 PNG), or None without matplotlib / a metric."""
        key = self.primary_metric
        if key is None:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        m = self.metrics[key]
        ref = m["reference"] if m["reference"] is not None else (1.0 if "cosine" in key or "overlap" in key else None)
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        xs = [self.size["reference_bytes"] / 1e6, self.size["compressed_bytes"] / 1e6]
        if ref is not None:
            ax.plot(xs, [ref, m["compressed"]], "--", color="#999")
            ax.scatter(xs[:1], [ref], s=60, label="reference (float)", color="#1f77b4")
        ax.scatter(xs[1:], [m["compressed"]], s=60, label=f"compressed ({self.recipe.get('name', '')})", color="#d62728")
        ax.set_xlabel("size (MB, true bytes)")
        ax.set_ylabel(key)
        ax.set_title("size versus quality")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    def to_html(self) -> str:
        e = html.escape
        rows = "".join(
            f"<tr><td>{e(k)}</td><td>{_num(v.get('reference'))}</td><td>{_num(v.get('compressed'))}</td>"
            f"<td>{_num(v.get('delta'))}</td></tr>" for k, v in self.metrics.items())
        s, la = self.size, self.latency
        rows += (f"<tr><td>size (bytes)</td><td>{s['reference_bytes']:,}</td><td>{s['compressed_bytes']:,}</td>"
                 f"<td>ratio {s['ratio']:.2f}×</td></tr>")
        if s.get("kernel_bytes"):
            rows += f"<tr><td>+ kernel copies (bytes)</td><td></td><td>{s['kernel_bytes']:,}</td><td>in memory, not saved</td></tr>"
        if s.get("reference_params") and s.get("compressed_params") != s.get("reference_params"):  # (as table())
            rows += (f"<tr><td>parameters</td><td>{s['reference_params']:,}</td><td>{s['compressed_params']:,}</td>"
                     f"<td>×{s['compressed_params'] / s['reference_params']:.3f}</td></tr>")
        if s.get("sparsity"):
            rows += f"<tr><td>sparsity (pruned layers)</td><td>0</td><td>{s['sparsity']:.3f}</td><td></td></tr>"
        if la:
            rows += (f"<tr><td>latency (ms)</td><td>{la['reference_ms']:.3f}</td><td>{la['compressed_ms']:.3f}</td>"
                     f"<td>speedup {la['speedup']:.2f}×</td></tr>")
        layer_rows = "".join(
            f"<tr><td>{e(str(r['name']))}</td><td>{e(str(r['type']))}</td><td>{r['params']:,}</td><td>{e(str(r['format']))}</td>"
            f"<td>{r['bytes']:,}</td><td>{r.get('bits_per_param', 0):.3f}</td><td>{e(_kernels_html(r))}</td></tr>"
            for r in self.layers)
        if self.kernels:
            rows += (f"<tr><td>kernel mode</td><td></td><td>{e(str(self.kernels.get('mode')))}</td>"
                     f"<td>{e(self.kernel_summary())}</td></tr>")
        png = self._plot_png()
        img = f'<img alt="size versus quality" src="data:image/png;base64,{png}">' if png else "<p>(no plot)</p>"
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes)
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>modelpress report: {e(self.model)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>
</head><body><h1>modelpress report</h1>
<p>model <b>{e(self.model)}</b> · task {e(self.task)} · recipe <b>{e(str(self.recipe.get('name', '')))}</b> · {self.seconds:.1f} s</p>
<h2>Metrics</h2><table><tr><th>metric</th><th>reference</th><th>compressed</th><th>delta</th></tr>{rows}</table>
{img}<ul>{notes}</ul>
{_step_table(self.steps)}
{_step_sections(self.steps)}
<h2>Layers</h2><p>{e(_kernels_note(self.kernels))}</p>
<table><tr><th>layer</th><th>type</th><th>params</th><th>format</th><th>bytes</th><th>bits/param</th><th>kernel @rows × vs float</th></tr>{layer_rows}</table>
<h2>Recipe</h2><pre>{e(json.dumps(self.recipe, indent=1))}</pre></body></html>"""

    def save(self, folder: "str | os.PathLike") -> tuple[Path, Path]:
        """Write report.json and report.html into `folder` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return _atomic_write(folder / "report.json", self.to_json()), _atomic_write(folder / "report.html", self.to_html())


def _step_table(steps: list[dict[str, Any]]) -> str:
    """HTML table of what each step recorded in a few words (its numbers, strings and flags; the rest is in
    report.json): channels removed, training steps and losses, stopped early ..."""
    e = html.escape
    rows = []
    for i, r in enumerate(steps):
        items = []
        for k, v in r.items():
            if k == "step":
                continue
            if isinstance(v, float):
                items.append(f"{k} {v:.4g}")
            elif isinstance(v, int) or (isinstance(v, str) and len(v) <= 60):  # (bool is an int)
                items.append(f"{k} {v}")
        rows.append(f"<tr><td>{i + 1}</td><td>{e(str(r.get('step', '')))}</td><td>{e(', '.join(items))}</td></tr>")
    return f"<h2>Steps</h2><table><tr><th>#</th><th>step</th><th>recorded</th></tr>{''.join(rows)}</table>" if rows else ""


def _step_sections(steps: list[dict[str, Any]]) -> str:
    """HTML of what steps recorded that has its own section (a target's plan, sensitivity and study)."""
    if not any("plan_yaml" in r for r in steps):
        return ""
    from .search.report_html import plan_sections

    return plan_sections(steps)


def _kernels_html(layer: dict) -> str:
    return ", ".join(f"{k['path']} @{k['rows']}" + (f" ×{k['speedup']:.2f}" if k.get("speedup") is not None else "")
                     + (f" ({k['timed']})" if k.get("timed") else "") for k in layer.get("kernels", []))


def _kernels_note(kernels: dict) -> str:
    if not kernels:
        return ""
    return (f"Kernel mode {kernels.get('mode')} ({kernels.get('mode_means', '')}); {kernels.get('cpu', '')}; "
            f"{kernels.get('tuning', '')}.")


def _num(v) -> str:
    return "—" if v is None else f"{v:.5g}"


def _atomic_write(path: Path, text: str) -> Path:
    from .io.atomic import usual_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        usual_mode(Path(tmp))  # mkstemp makes 0600; the report follows the umask like the model files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
