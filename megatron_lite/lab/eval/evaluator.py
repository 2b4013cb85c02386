"""The evaluation loop: every codec on the same batches, compared with the bf16 run.

Model-agnostic: it needs ``forward(codec_index, input_ids[B, T], rows)`` returning fp32
full-vocabulary logits, ``[B, T, V]`` when ``rows`` is None, else ``[B, K, V]`` at the
positions ``rows`` ([B, K] long). Codec 0 is the reference (bf16 communication).

* Text windows need every position (perplexity, KL, agreement): ``rows=None``.
* Task sequences only need the rows predicting their targets, so the LM head, which is
  most of the compute for a 262k vocabulary, runs on those rows only.

Order: batch-outer, codec-inner. For each batch the reference runs first and its
log-probabilities stay in memory while every other codec runs on the same batch; so KL
over the full vocabulary needs one batch of reference log-probs, never the whole study's
(16k tokens x 262k vocab would be 17 GB).

Tensor-parallel ranks all call ``run_study`` with the same inputs, so they issue the same
forward calls in the same order (their collectives match); only the scoring rank
(``score=True``) computes metrics.

Batches are right-padded; the models are causal, so pad tokens never influence scored
positions through attention. (They can through a codec whose quantization groups straddle
token boundaries, i.e. when the group size does not divide the hidden size; every codec
then sees the same padded batch, so the comparison stays paired and deterministic.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from .data import Sequence_, Task, TextWindows, batches_by_length
from .metrics import (compare_rows, delta_ppl_pct_with_se, mc_predictions, paired_delta,
                      perplexity, ref_log_probs, score_targets, summarize_task)

Forward = Callable[[int, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class CodecStats:
    """Raw per-unit results of one codec (windows for text, sequences for tasks)."""
    window_nll: List[float] = field(default_factory=list)
    window_kl: List[float] = field(default_factory=list)
    window_agree: List[int] = field(default_factory=list)
    seq_nll: Dict[str, List[float]] = field(default_factory=dict)
    seq_greedy: Dict[str, List[bool]] = field(default_factory=dict)


@dataclass
class _Unit:
    seq: Sequence_
    source: str                   # "text" or a task name
    index: int


def _pad_batch(seqs: Sequence[Sequence_], pad_id: int) -> torch.Tensor:
    T = max(len(s.ids) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
    return out


def _rows(seqs: Sequence[Sequence_]) -> torch.Tensor:
    """Predicting positions ``start-1 .. end-2`` per sequence, right-padded by repeating
    the last one (the repeated rows are ignored)."""
    K = max(s.end - s.start for s in seqs)
    out = torch.empty((len(seqs), K), dtype=torch.long)
    for i, s in enumerate(seqs):
        r = list(range(s.start - 1, s.end - 1))
        out[i] = torch.tensor(r + [r[-1]] * (K - len(r)))
    return out


def plan_batches(text: Optional[TextWindows], tasks: Sequence[Task], max_batch_tokens: int,
                 max_batch_rows: int) -> List[List[_Unit]]:
    """The study's batches: text windows (all positions) apart from task sequences."""
    text_units = [] if text is None else [_Unit(w, "text", i) for i, w in enumerate(text.windows)]
    task_units = [_Unit(s, t.name, i) for t in tasks for i, s in enumerate(t.sequences())]
    batches: List[List[_Unit]] = []
    for units, rows in ((text_units, None), (task_units, max_batch_rows)):
        for b in batches_by_length([u.seq for u in units], max_batch_tokens, rows):
            batches.append([units[i] for i in b])
    return batches


def run_study(forward: Forward, codec_names: Sequence[str], text: Optional[TextWindows],
              tasks: Sequence[Task], max_batch_tokens: int = 1024, max_batch_rows: int = 512,
              pad_id: int = 0, score: bool = True, progress: bool = True) -> List[CodecStats]:
    """Run every codec over every sequence; returns raw per-unit statistics (empty
    statistics when ``score`` is False: a non-scoring TP rank only runs the forwards)."""
    batches = plan_batches(text, tasks, max_batch_tokens, max_batch_rows)
    if not batches:
        raise ValueError("nothing to evaluate: give --text and/or --task")
    stats = [CodecStats() for _ in codec_names]
    for st in stats:
        if text is not None:
            n = len(text.windows)
            st.window_nll, st.window_kl, st.window_agree = [0.0] * n, [0.0] * n, [0] * n
        for t in tasks:
            n = len(t.sequences())
            st.seq_nll[t.name], st.seq_greedy[t.name] = [0.0] * n, [False] * n

    total = sum(len(u.seq.ids) for b in batches for u in b) * len(codec_names)
    bar = tqdm(total=total, unit="tok", disable=not (progress and score), desc="evaluate",
               dynamic_ncols=True, mininterval=5.0)
    for bu in batches:
        seqs = [u.seq for u in bu]
        ids = _pad_batch(seqs, pad_id)
        is_text = bu[0].source == "text"
        rows = None if is_text else _rows(seqs)
        ref_logp: List[Optional[torch.Tensor]] = [None] * len(bu)
        for c in range(len(codec_names)):
            bar.set_postfix_str(codec_names[c], refresh=False)
            logits = forward(c, ids, rows)
            if score:
                for j, u in enumerate(bu):
                    s = u.seq
                    pred = logits[j, s.start - 1:s.end - 1] if is_text else \
                        logits[j, :s.end - s.start]
                    sc = score_targets(pred, s.ids[s.start:s.end])
                    st = stats[c]
                    if is_text:
                        if c == 0:
                            ref_logp[j] = ref_log_probs(pred)
                        kl, agree = compare_rows(pred, ref_logp[j])
                        st.window_nll[u.index], st.window_kl[u.index] = sc.nll, kl
                        st.window_agree[u.index] = agree
                    else:
                        st.seq_nll[u.source][u.index] = sc.nll
                        st.seq_greedy[u.source][u.index] = sc.greedy_ok
            del logits
            bar.update(sum(len(s.ids) for s in seqs))
        del ref_logp
    bar.close()
    return stats


def summarize(codec_names: Sequence[str], bits: Sequence[float], stats: List[CodecStats],
              text: Optional[TextWindows], tasks: Sequence[Task]) -> List[dict]:
    """Rows for report.py: the results JSON's keys plus uncertainties (``*_se``) and sizes."""
    ref = stats[0]
    rows = []
    ref_task = {t.name: task_outcomes(t, ref) for t in tasks}
    for name, b, st in zip(codec_names, bits, stats):
        row = {"codec": name, "bits_per_value": float(b), "ppl": None, "delta_ppl_pct": None,
               "kl": None, "top1_agreement": None, "tasks": {}}
        if text is not None:
            ntok = [w.end - w.start for w in text.windows]
            n = sum(ntok)
            row["ppl"] = perplexity(sum(st.window_nll), n)
            pct, pct_se = delta_ppl_pct_with_se(ref.window_nll, st.window_nll, ntok)
            row["delta_ppl_pct"], row["delta_ppl_pct_se"] = pct, pct_se
            row["kl"] = sum(st.window_kl) / n
            row["kl_se"] = paired_delta([0.0] * len(ntok),
                                        [k / m for k, m in zip(st.window_kl, ntok)]).se
            row["top1_agreement"] = sum(st.window_agree) / n
            row["text_tokens"], row["text_windows"] = n, len(ntok)
        for t in tasks:
            row["tasks"][t.name] = summarize_task(t.kind, ref_task[t.name], task_outcomes(t, st))
        rows.append(row)
    return rows


def task_outcomes(task: Task, st: CodecStats) -> Dict[str, List[float]]:
    """Per-item 0/1 outcomes: {"correct"} for cloze, {"acc", "acc_norm"} for MC."""
    if task.kind == "cloze":
        return {"correct": [float(x) for x in st.seq_greedy[task.name]]}
    nll = st.seq_nll[task.name]
    acc, acc_norm, k = [], [], 0
    for it in task.items:
        ll = [-nll[k + j] for j in range(len(it.choices))]
        k += len(it.choices)
        raw, norm = mc_predictions(ll, it.num_chars)
        acc.append(float(raw == it.label))
        acc_norm.append(float(norm == it.label))
    return {"acc": acc, "acc_norm": acc_norm}
