"""Writers for an accuracy study: the results JSON, a markdown table, a matplotlib plot.

The JSON has exactly this form (nothing more, so consumers can validate it)::

    {"model": str, "tp": int, "simulated": bool,
     "rows": [{"codec": "int4:128", "bits_per_value": 4.25, "ppl": float, "delta_ppl_pct":
               float, "kl": float, "top1_agreement": float, "tasks": {"<stem>": float}}]}

``ppl``/``delta_ppl_pct``/``kl``/``top1_agreement`` are ``null`` when no ``--text`` was
given. Uncertainties and sample sizes go to the markdown table, which is what people read.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Dict, List, Optional

ROW_KEYS = ("codec", "bits_per_value", "ppl", "delta_ppl_pct", "kl", "top1_agreement", "tasks")
TOP_KEYS = ("model", "tp", "simulated", "rows")


def atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_doc(model: str, tp: int, simulated: bool, rows: List[dict]) -> dict:
    """The results JSON document from full result rows (extra row keys are dropped)."""
    return {"model": model, "tp": int(tp), "simulated": bool(simulated),
            "rows": [{k: r.get(k) if k != "tasks" else
                      {name: t["accuracy"] for name, t in r.get("tasks", {}).items()}
                      for k in ROW_KEYS} for r in rows]}


def validate_json_doc(doc: dict) -> None:
    """Raise ValueError unless ``doc`` has exactly the results JSON's schema."""
    if not isinstance(doc, dict) or set(doc) != set(TOP_KEYS):
        raise ValueError(f"top-level keys must be {TOP_KEYS}")
    if not isinstance(doc["model"], str) or not isinstance(doc["tp"], int) \
            or not isinstance(doc["simulated"], bool) or not isinstance(doc["rows"], list):
        raise ValueError("model: str, tp: int, simulated: bool, rows: list")
    for r in doc["rows"]:
        if set(r) != set(ROW_KEYS):
            raise ValueError(f"row keys must be {ROW_KEYS}, got {sorted(r)}")
        if not isinstance(r["codec"], str) or not isinstance(r["bits_per_value"], (int, float)):
            raise ValueError("codec: str, bits_per_value: number")
        for k in ("ppl", "delta_ppl_pct", "kl", "top1_agreement"):
            if r[k] is not None and not isinstance(r[k], (int, float)):
                raise ValueError(f"{k}: number or null")
        if not isinstance(r["tasks"], dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) for k, v in r["tasks"].items()):
            raise ValueError("tasks: {str: number}")
    if not any(r["codec"].split(":")[0] == "bf16" for r in doc["rows"]):
        raise ValueError("the bf16 reference row is missing")


def write_json(path: str, doc: dict) -> None:
    validate_json_doc(doc)
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- markdown
def _f(x: Optional[float], fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown_table(rows: List[dict], task_meta: Dict[str, dict]) -> str:
    """One row per codec. ``±`` is one paired standard error vs the bf16 row.

    ``task_meta[name]`` = {"kind": "cloze"|"mc", "n": items}.
    """
    has_text = any(r.get("ppl") is not None for r in rows)
    head = ["codec", "bits/value"]
    if has_text:
        head += ["PPL", "ΔPPL %", "KL (nats)", "top-1 agree"]
    for name, m in task_meta.items():
        metric = "acc" if m["kind"] == "cloze" else "acc_norm"
        head += [f"{name} {metric}", "Δ vs bf16 (pp)", "% of bf16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = rows[0]
    for r in rows:
        cells = [f"`{r['codec']}`", _f(r["bits_per_value"], ".3f")]
        if has_text:
            se = r.get("delta_ppl_pct_se")
            dppl = _f(r.get("delta_ppl_pct"), "+.3f")
            if se:
                dppl += f" ± {se:.3f}"
            cells += [_f(r.get("ppl"), ".4f"), dppl, _f(r.get("kl"), ".5f"),
                      _f(r.get("top1_agreement"), ".4f")]
        for name in task_meta:
            t = r["tasks"][name]
            base = ref["tasks"][name]["accuracy"]
            d = f"{100 * t['delta']:+.2f} ± {100 * t['delta_se']:.2f}"
            rel = _f(100 * t["accuracy"] / base if base else None, ".2f")
            cells += [f"{t['accuracy']:.4f}", d, rel]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- plot
def plot(rows: List[dict], path: str, title: str) -> None:
    """Quality vs bits per value: ΔPPL %, KL and each task's accuracy relative to bf16."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(rows[0].get("tasks", {}))
    panels = []
    if any(r.get("ppl") is not None for r in rows):
        panels += [("ΔPPL % vs bf16", lambda r: r["delta_ppl_pct"], "symlog"),
                   ("KL(bf16 || codec), nats/token", lambda r: r["kl"], "log")]
    for name in task_names:
        base = rows[0]["tasks"][name]["accuracy"]
        panels.append((f"{name}: % of bf16 accuracy",
                       lambda r, n=name, b=base: 100 * r["tasks"][n]["accuracy"] / b if b else None,
                       "linear"))
    if not panels:
        raise ValueError("nothing to plot: no text and no tasks")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for ax, (label, get, scale) in zip(axes[0], panels):
        pts = [(r["bits_per_value"], get(r), r["codec"]) for r in rows]
        pts = [p for p in pts if p[1] is not None and not (scale == "log" and p[1] <= 0)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
        for x, y, c in pts:
            ax.annotate(c, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=0.1)
        elif scale == "log":
            ax.set_yscale("log")
        ax.set_xlabel("bits per value (with metadata)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, ".tmp-" + os.path.basename(path))
    fig.savefig(tmp, dpi=110, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)
    os.replace(tmp, path)
