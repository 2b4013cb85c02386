"""The recommendation table of docs/results/ (tools/make_results.py): which ``--comm`` spec
each row names, from the committed accuracy and speed runs, and the formatting helpers the
results pages share. A row takes the first of its candidate specs that holds its bars
(ΔPPL and bits per value on every configuration, task accuracy where a task bar is set and
measured), else the best measured one, said so."""
from __future__ import annotations

import json
import os
from pathlib import Path


def legacy_label(row: dict) -> str:
    """The ``--comm`` label of a row written before rows were labelled by spec."""
    if "comm" in row:
        return row["comm"]
    b, c = row["backend"], row["codec"]
    return {"nccl": "native", "oneshot": "oneshot-kernel", "fused": f"{c},path=fused",
            "two-step": f"{c},path=two-step", "one-shot-q": f"{c},algo=one-shot,path=two-step",
            "one-shot-k": f"{c},algo=one-shot", "ef-one-shot-k": f"ef+{c},algo=one-shot",
            "auto": c}[b]


def run_config(stem: str):
    """``gemma-3-270m-tp4-weighted`` -> (``gemma-3-270m``, 4)."""
    model, _, rest = stem.partition("-tp")
    return model, int(rest.split("-")[0].split(".")[0])


def load(kind: str, name: str, results: Path) -> dict:
    """One run's JSON, ``results/data/<kind>/<name>``."""
    return json.loads((results / "data" / kind / name).read_text())


def pct_text(v, se=None, digits=2):
    if v is None:
        return "-"
    s = f"{v:+.{digits}f}%"
    return s if se is None else f"{s} ± {se:.{digits}f}"


def md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def size_label(b: int) -> str:
    for unit, m in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= m and b % m == 0:
            return f"{b // m} {unit}"
    return f"{b} B"



def _accuracy_index(results: Path):
    """{(model, tp, spec): row}: for every configuration and spec, the measurement with the
    largest ΔPPL over the texts and calibration files it was measured with (per text and
    file, the largest sample): a calibrated codec's ΔPPL moves with its calibration run,
    and a user gets one such run."""
    best = {}
    for p in sorted((results / "data" / "accuracy").glob("*.details.json")):
        d = json.loads(p.read_text())
        if not d.get("text_tokens"):
            continue
        model, tp = run_config(p.name)
        text = os.path.basename(d["text"])
        for r in d["rows"]:
            if r.get("delta_ppl_pct") is None:
                continue
            key = (model, tp, r["codec"], text, d.get("calibration"))
            if key not in best or d["text_tokens"] > best[key][1]:
                best[key] = (r, d["text_tokens"], p.name)
    out = {}
    for (model, tp, spec, _, _), v in best.items():
        k = (model, tp, spec)
        if k not in out or v[0]["delta_ppl_pct"] > out[k][0]["delta_ppl_pct"]:
            out[k] = v
    return out


def _task_runs(results: Path):
    """(path, run, model, tp) of every task-only accuracy run (no perplexity text)."""
    for p in sorted((results / "data" / "accuracy").glob("*.details.json")):
        d = json.loads(p.read_text())
        if not d.get("text_tokens") and d.get("tasks"):
            yield (p, d) + run_config(p.name)


def task_index(results: Path):
    """{(model, tp, spec): {task: (percent of bf16, items, file)}}: for every task, the
    task-only run with the most items (a larger sample of the same task supersedes a
    smaller one)."""
    out = {}
    for p, d, model, tp in _task_runs(results):
        ref = d["rows"][0]
        for r in d["rows"][1:]:
            got = out.setdefault((model, tp, r["codec"]), {})
            for t, info in d["tasks"].items():
                pct = 100 * r["tasks"][t]["accuracy"] / ref["tasks"][t]["accuracy"]
                if t not in got or info["n"] > got[t][1]:
                    got[t] = (pct, info["n"], p.name)
    return out


def task_misses(tasks, spec: str, bar) -> list:
    """The tasks on which ``spec`` falls below ``100 - bar`` % of bf16 (largest samples)."""
    if bar is None:
        return []
    return [f"{t} {pct:.2f}% of bf16 ({n} items)"
            for (_, _, s), per in tasks.items() if s == spec
            for t, (pct, n, _) in sorted(per.items()) if pct < 100 - bar - 1e-9]


def _speed(cfg, spec: str, results: Path) -> str:
    """Speed-up over native of a spec's kernel path at ``cfg['speed_bytes']``, from the
    all-reduce runs ``cfg['speed_files']`` (in order); a spec with error feedback falls back
    to its codec without it, said so."""
    tries = [(spec + ",path=fused", ""), (spec, "")]
    if spec.startswith("ef+"):
        tries += [(spec[3:] + ",path=fused", " (without feedback)"), (spec[3:], " (without feedback)")]
    for f in cfg["speed_files"]:
        d = load("allreduce", f, results)
        rows = {legacy_label(r): r for r in d["rows"] if r["bytes"] == cfg["speed_bytes"]}
        for label, note in tries:
            if label in rows:
                r = rows[label]
                sp = r.get("speedup_vs_native", r.get("speedup_vs_nccl"))
                return (f"{sp:.2f}x at {size_label(cfg['speed_bytes'])}, {d['world']} x "
                        f"{d['device'].replace('NVIDIA ', '')}{note}")
    return "not measured"


def recommendation(cfg, results: Path) -> tuple:
    """(recommended.json's dict, the table's rows, the candidates set aside before the
    chosen one, each with why). A row takes its first candidate that holds on every
    configuration, else the best measured one."""
    idx, tasks = _accuracy_index(results), task_index(results)
    configs = [tuple(c) for c in cfg["configs"]]
    doc, rejected = {"off": "native"}, []
    table = [["off", "`native`", "16", "-", "-", "1.00x", "the baseline: the backend's own all-reduce"]]
    for row, spec_bar in cfg["rows"].items():
        bar, max_bits = spec_bar["max_delta_ppl_pct"], spec_bar["max_bits"]
        best = None
        for spec in spec_bar["candidates"]:
            meas = {c: idx.get((c[0], c[1], spec)) for c in configs}
            got = {c: m for c, m in meas.items() if m is not None}
            if not got:
                continue
            bits = max(m[0]["bits_per_value"] for m in got.values())
            worst = max(m[0]["delta_ppl_pct"] for m in got.values())
            misses = task_misses(tasks, spec, spec_bar.get("max_task_drop_pct"))
            holds = bits <= max_bits + 1e-9 and not misses and all(
                m[0]["delta_ppl_pct"] <= bar for m in got.values())
            cand = (holds, len(got), -worst, spec, got, bits, misses)
            if not holds:   # why, for recommended.md
                why = [f"{bits:.3f} bits > {max_bits}"] * (bits > max_bits + 1e-9) + [
                    f"ΔPPL {pct_text(m[0]['delta_ppl_pct'], m[0].get('delta_ppl_pct_se'))} on "
                    f"{c[0]} TP {c[1]}" for c, m in got.items() if m[0]["delta_ppl_pct"] > bar]
                rejected.append((row, spec, "; ".join(why + [
                    f"{m} (task bar: within {spec_bar['max_task_drop_pct']}% of bf16)"
                    for m in misses])))
            if best is None or cand[:3] > best[:3]:
                best = cand
            if holds and len(got) == len(configs):
                break
        if best is None:
            doc[row] = None
            table.append([row, "-", "-", "-", "-", "-", "no candidate measured"])
            continue
        holds, n, _, spec, got, bits, misses = best
        doc[row] = spec
        cells = ", ".join(
            f"{c[0]} TP {c[1]} {pct_text(got[c][0]['delta_ppl_pct'], got[c][0].get('delta_ppl_pct_se'))}"
            if c in got else f"{c[0]} TP {c[1]} not measured" for c in configs)
        tbar = spec_bar.get("max_task_drop_pct")
        verdict = ("holds on every measured model" if holds else
                   f"**does not hold** (best measured candidate; bar ΔPPL ≤ {bar}%"
                   + (f", tasks within {tbar}% of bf16: misses {', '.join(misses)}"
                      if misses else "") + ")")
        if holds and n < len(configs):
            verdict += f"; {len(configs) - n} of {len(configs)} configurations not measured"
        if holds and tbar is not None and not any(s == spec for (_, _, s) in tasks):
            verdict += f"; its task accuracy (bar: within {tbar}% of bf16) is not measured"
        table.append([row, f"`{spec}`", f"{bits:.3f}", f"≤ {bar}%", cells, _speed(cfg, spec, results),
                      verdict])
    doc["calibration"] = cfg["calibration"]
    doc["holds"] = {r[0]: r[6].startswith("holds") or r[0] == "off" for r in table}
    rejected = [(r, s, why) for r, s, why in rejected if doc.get(r) != s]
    return doc, table, rejected


def _task_lines(doc, cfg, results: Path) -> str:
    """The task accuracy of each recommended spec, from the task-only runs, in row order;
    a row with a ``max_task_drop_pct`` bar says whether every task stays within it (the
    spec's accuracy at least ``100 - bar`` % of bf16's)."""
    order = ("safe", "balanced", "aggressive")
    lines = []
    for p, d, model, tp in _task_runs(results):
        ref = d["rows"][0]
        for row in order:
            spec = doc.get(row)
            r = next((x for x in d["rows"] if x["codec"] == spec), None)
            if r is None:
                continue
            pct = {t: 100 * r["tasks"][t]["accuracy"] / ref["tasks"][t]["accuracy"]
                   for t in d["tasks"]}
            parts = [f"{t} {pct[t]:.2f}% of bf16 ({100 * r['tasks'][t]['delta']:+.2f} ± "
                     f"{100 * r['tasks'][t]['delta_se']:.2f} pp, {d['tasks'][t]['n']} items)"
                     for t in d["tasks"]]
            bar = cfg["rows"].get(row, {}).get("max_task_drop_pct")
            verdict = ""
            if bar is not None:
                short = [t for t in d["tasks"] if pct[t] < 100 - bar - 1e-9]
                verdict = (f"; within {bar}% of bf16 on every task" if not short else
                           f"; **misses** the {bar}% bar on {', '.join(short)}")
                # a miss by less than two standard errors of the paired difference is
                # not resolved by these items: other items could move it either way
                close = [t for t in short if 100 * r["tasks"][t]["delta"] > -(
                    bar * ref["tasks"][t]["accuracy"] + 200 * r["tasks"][t]["delta_se"])]
                if close:
                    verdict += (f" (by less than two standard errors on {', '.join(close)}: "
                                "not resolved by these items)")
            lines.append((order.index(row), f"* **{row}** `{spec}`, {model} TP {tp}: "
                          + "; ".join(parts) + verdict + f" (`data/accuracy/{p.name}`)."))
    lines = [text for _, text in sorted(lines, key=lambda x: x[0])]
    return ("\nTask accuracy of the recommended specs, where measured:\n\n"
            + "\n".join(lines) + "\n") if lines else ""


def recommended_page(cfg, results: Path, header: str) -> tuple:
    doc, table, rejected = recommendation(cfg, results)
    text = (header + "# Which `--comm` to use\n\n" + cfg["intro"] + "\n\n"
            + md_table(["row", "`--comm`", "bits/value", "bar", "ΔPPL measured (simulated TP, "
                         "[accuracy.md](accuracy.md))", "all-reduce vs NCCL "
                         "([allreduce.md](allreduce.md))", "verdict"], table)
            + _task_lines(doc, cfg, results)
            + ("\nCandidates measured and set aside (in sources.json's order of "
               "preference):\n\n" + "\n".join(f"* **{r}** `{s}`: {why}."
                                               for r, s, why in rejected) + "\n"
               if rejected else "")
            + "\nThe calibrated codecs (`weighted-`) need a calibration file made for the model "
              "and TP size (`{text}`: any text file of the model's domain, or `python-docs`, "
              "the prose of the Python standard library's docstrings, which every machine "
              "has):\n\n```bash\n" + cfg["calibration"] + "\n```\n\n" + cfg["speed"] + "\n")
    return text, doc


README_BEGIN = "<!-- recommended:begin (generated by tools/make_results.py from docs/results/) -->"
README_END = "<!-- recommended:end -->"


def readme_block(table) -> str:
    """The README's four rows: the spec, its bits, the worst measured ΔPPL and the speed."""
    rows = []
    for row, spec, bits, bar, cells, speed, verdict in table:
        worst = "-"
        if cells != "-":
            allc = cells.split(", ")
            vals = [c for c in allc if "not measured" not in c]
            worst = max(vals, key=lambda c: float(c.split("TP ")[1].split()[1].rstrip("%")))
            worst = f"{worst.split(' ±')[0]} (worst of {len(vals)} of {len(allc)} measured)"
        state = "" if row == "off" or verdict.startswith("holds") else " (misses its bar)"
        if "task accuracy" in verdict and "not measured" in verdict:
            state += " (task bar not measured)"
        rows.append([f"**{row}**{state}", spec, bits, worst, speed])
    return md_table(["", "`--comm`", "bits/value", "worst ΔPPL measured",
                      "all-reduce vs NCCL"], rows)
