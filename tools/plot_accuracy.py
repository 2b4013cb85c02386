#!/usr/bin/env python
"""One figure from several ``tools/evaluate.py --details`` files: ΔPPL %, KL and each
task's accuracy relative to bf16, against bits per value, one colour per model/TP.

    python tools/plot_accuracy.py a.details.json b.details.json --out docs/accuracy/all.png
"""
from __future__ import annotations

import json
import os
import sys

from megatron_lite.cli.common import make_parser  # noqa: E402
from megatron_lite.errors import report_error  # noqa: E402


def _short(spec: str) -> str:
    """Plot label of a --comm spec: the default codec, ``+1shot`` for the one-shot
    algorithm, ``+alloc`` for per-site overrides."""
    items = spec.split(",")
    opts = [i for i in items[1:] if i.startswith(("algo=", "path=", "min_bytes="))]
    tag = "+1shot" if "algo=one-shot" in opts else ""
    return items[0] + tag + ("+alloc" if len(items) - 1 > len(opts) else "")


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("details", nargs="+", metavar="DETAILS",
                   help="tools/evaluate.py --details files (one colour per model and TP)")
    p.add_argument("--out", required=True, metavar="FILE", help="PNG file to write")
    p.add_argument("--max-bits", type=float, default=9.0, metavar="BITS",
                   help="x-axis limit in bits per value (9 hides the bf16 reference)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        docs = []
        for path in args.details:
            with open(path) as f:
                docs.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        return report_error(e)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for d in docs for t in d["tasks"]})
    panels = [("ΔPPL % vs bf16 comm (symlog)", "dppl"), ("KL(bf16 || codec), nats/token", "kl")]
    panels += [(f"{t}: % of bf16 accuracy", t) for t in tasks]
    ncols = 2
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.3 * nrows), squeeze=False)
    axes = [[ax for row in grid for ax in row]]
    for ax in axes[0][len(panels):]:
        ax.set_visible(False)
    groups: dict = {}
    for d in docs:   # several files of one model/TP (e.g. paper codecs + methods) share a colour
        groups.setdefault(f"{d['model']} TP{d['tp']}", []).append(d)
    for (label, docs_g), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        seen, labelled = set(), set()
        for d in docs_g:
            for r in d["rows"]:
                if r["codec"] in seen or r["bits_per_value"] > args.max_bits:
                    continue
                seen.add(r["codec"])
                ref = d["rows"][0]
                for ax, (_, key) in zip(axes[0], panels):
                    if key == "dppl":
                        y = r.get("delta_ppl_pct")
                    elif key == "kl":
                        y = r.get("kl")
                    else:
                        t, b = r["tasks"].get(key), ref["tasks"].get(key)
                        y = 100 * t["accuracy"] / b["accuracy"] if t and b and b["accuracy"] else None
                    if y is None or (key == "kl" and y <= 0):
                        continue
                    first = id(ax) not in labelled
                    labelled.add(id(ax))
                    ax.scatter([r["bits_per_value"]], [y], color=color, s=16,
                               label=label if first else None)
                    short = _short(r["codec"])
                    ax.annotate(short, (r["bits_per_value"], y), fontsize=6, color=color,
                                xytext=(2, 2), textcoords="offset points")
    for ax, (title, key) in zip(axes[0], panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("bits per value (all metadata counted)")
        ax.grid(alpha=0.3)
        if key == "dppl":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(1.0, color="k", lw=0.6, ls="--")
        elif key == "kl":
            ax.set_yscale("log")
        else:
            ax.axhline(99.5, color="k", lw=0.6, ls="--")
        ax.axvline(4.3, color="r", lw=0.6, ls=":")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".tmp-" + os.path.basename(args.out))
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
