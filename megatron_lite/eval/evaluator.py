"""The evaluation loop: every codec on the same batches, compared with the bf16 run.

Model-agnostic: it only needs ``forward(codec_index, input_ids[B, T]) -> logits[B, T, V]``
(fp32, full vocabulary). Codec 0 is the reference (bf16 communication).

Order: batch-outer, codec-inner. For each batch the reference runs first and its
log-probabilities over the scored spans stay in memory while every other codec runs on
the same batch; so KL over the full vocabulary needs one batch of reference log-probs,
never the whole study's (16k tokens x 262k vocab would be 17 GB).

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
from .metrics import (compare_span, delta_ppl_pct_with_se, mc_predictions, paired_delta,
                      perplexity, ref_log_probs, score_span, summarize_task)

Forward = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class _Unit:
    """One sequence of the study and where its results go."""
    seq: Sequence_
    source: str                   # "text" or a task name
    index: int                    # window / item-choice index within the source


@dataclass
class CodecStats:
    window_nll: List[float] = field(default_factory=list)
    window_kl: List[float] = field(default_factory=list)
    window_agree: List[int] = field(default_factory=list)
    seq_nll: Dict[str, List[float]] = field(default_factory=dict)     # per task sequence
    seq_greedy: Dict[str, List[bool]] = field(default_factory=dict)


def _pad_batch(seqs: Sequence[Sequence_], pad_id: int) -> torch.Tensor:
    T = max(len(s.ids) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
    return out


def run_study(forward: Forward, codec_names: Sequence[str], text: Optional[TextWindows],
              tasks: Sequence[Task], max_batch_tokens: int = 2048, pad_id: int = 0,
              progress: bool = True) -> List[CodecStats]:
    """Run every codec over every sequence; returns raw per-sequence statistics."""
    units: List[_Unit] = []
    if text is not None:
        units += [_Unit(w, "text", i) for i, w in enumerate(text.windows)]
    for t in tasks:
        units += [_Unit(s, t.name, i) for i, s in enumerate(t.sequences())]
    if not units:
        raise ValueError("nothing to evaluate: give --text and/or --task")
    stats = [CodecStats() for _ in codec_names]
    for st in stats:
        if text is not None:
            n = len(text.windows)
            st.window_nll, st.window_kl, st.window_agree = [0.0] * n, [0.0] * n, [0] * n
        for t in tasks:
            n = len(t.sequences())
            st.seq_nll[t.name], st.seq_greedy[t.name] = [0.0] * n, [False] * n

    batches = batches_by_length([u.seq for u in units], max_batch_tokens)
    total_tokens = sum(len(u.seq.ids) for u in units) * len(codec_names)
    bar = tqdm(total=total_tokens, unit="tok", disable=not progress, desc="evaluate",
               dynamic_ncols=True)
    for b in batches:
        bu = [units[i] for i in b]
        ids = _pad_batch([u.seq for u in bu], pad_id)
        ref_logp: List[Optional[torch.Tensor]] = [None] * len(bu)
        for c in range(len(codec_names)):
            bar.set_postfix_str(codec_names[c], refresh=False)
            logits = forward(c, ids)
            for j, u in enumerate(bu):
                s = u.seq
                sc = score_span(logits[j], s.ids, s.start, s.end)
                st = stats[c]
                if u.source == "text":
                    if c == 0:
                        ref_logp[j] = ref_log_probs(logits[j], s.start, s.end)
                    kl, agree = compare_span(logits[j], ref_logp[j], s.start, s.end)
                    st.window_nll[u.index], st.window_kl[u.index] = sc.nll, kl
                    st.window_agree[u.index] = agree
                else:
                    st.seq_nll[u.source][u.index] = sc.nll
                    st.seq_greedy[u.source][u.index] = sc.greedy_ok
            del logits
            bar.update(int(sum(len(u.seq.ids) for u in bu)))
        del ref_logp
    bar.close()
    return stats


def summarize(codec_names: Sequence[str], bits: Sequence[float], stats: List[CodecStats],
              text: Optional[TextWindows], tasks: Sequence[Task]) -> List[dict]:
    """Rows for report.py: the issue's keys plus uncertainties (``*_se``) and sizes."""
    ref = stats[0]
    rows = []
    ref_task = {t.name: _task_outcomes(t, ref) for t in tasks}
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
            row["tasks"][t.name] = summarize_task(t.kind, ref_task[t.name], _task_outcomes(t, st))
        rows.append(row)
    return rows


def _task_outcomes(task: Task, st: CodecStats) -> Dict[str, List[float]]:
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
