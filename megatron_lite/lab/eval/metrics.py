"""Metrics of lossy communication, each a comparison with the bf16-communication run.

Definitions (the numbers in docs/accuracy.md mean exactly this):

* **Perplexity**: ``exp(sum NLL / n)`` over every scored token of the text windows, NLL in
  nats from ``log_softmax`` of fp32 logits. ``delta_ppl_pct = 100 * (ppl / ppl_bf16 - 1)``.
* **KL**: mean over the same tokens of ``KL(p_bf16 || p_codec)`` in nats, the full-vocab
  next-token distributions (how much information the codec's model loses relative to the
  reference; 0 for the bf16 row by construction).
* **Top-1 agreement**: share of those tokens where ``argmax p_codec == argmax p_bf16``
  (ties broken by the lowest token id, as ``torch.argmax`` does).
* **Cloze accuracy** (LAMBADA-style): an item is correct iff every target token is the
  greedy (arg-max) prediction given the context and the preceding target tokens, i.e. greedy
  decoding would emit exactly the target tokens. (LAMBADA targets are one word, which may
  be several tokens.)
* **Multiple-choice accuracy**: each choice j is scored by ``ll_j = sum log p(continuation
  tokens | context)``; ``acc`` takes arg-max ``ll_j``, ``acc_norm`` arg-max ``ll_j /
  chars_j`` (per-character normalisation, as OLMo-eval's ``acc_per_char``). The primary
  number reported is ``acc_norm``. Ties go to the lowest index.

Uncertainty: every codec is evaluated on the same items as the bf16 run, so differences
are paired. ``paired_delta`` returns the mean difference and its standard error from the
per-unit differences (units: items for tasks, windows for perplexity/KL), which is much
tighter than two independent binomial errors when the codec flips few items.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch


# -------------------------------------------------------------- per-sequence scoring
# ``pred`` below is always the [n, V] block of logits that predicts the n scored targets
# (rows ``start-1 .. end-2`` of a sequence's logits; see data.py for the convention).
@dataclass
class SeqScore:
    """Per-sequence sufficient statistics of one scored span."""
    nll: float                    # sum of -log p(target) over the span
    n: int                        # scored tokens
    greedy_ok: bool               # every target token is the arg-max prediction


def score_targets(pred: torch.Tensor, targets: Sequence[int]) -> SeqScore:
    """NLL sum and greedy success of ``targets`` under ``pred`` ([n, V])."""
    pred = pred.float()
    tgt = torch.as_tensor(list(targets), dtype=torch.long, device=pred.device)
    logp = torch.log_softmax(pred, dim=-1)
    nll = -logp.gather(-1, tgt[:, None]).sum().item()
    greedy_ok = bool((pred.argmax(-1) == tgt).all().item())
    return SeqScore(nll, len(tgt), greedy_ok)


def ref_log_probs(pred: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` of the reference's logits; computed once per batch, reused by every
    codec of the study."""
    return torch.log_softmax(pred.float(), dim=-1)


def compare_rows(pred: torch.Tensor, ref_logp: torch.Tensor):
    """(sum over rows of KL(p_ref || p), number of rows whose arg-max agrees)."""
    logp = torch.log_softmax(pred.float(), dim=-1)
    # sum_v p_ref (log p_ref - log p); p_ref == 0 contributes 0 (exp(-inf) * -inf would be
    # NaN), which only happens at -inf logits (vocab padding).
    p_ref = ref_logp.exp()
    diff = torch.where(p_ref > 0, ref_logp - logp, torch.zeros_like(logp))
    kl = (p_ref * diff).sum().item()
    agree = int((logp.argmax(-1) == ref_logp.argmax(-1)).sum().item())
    return kl, agree


# ---------------------------------------------------------------------- aggregation
def perplexity(nll_sum: float, n: int) -> float:
    return math.exp(nll_sum / n)


def mc_predictions(choice_ll: Sequence[float], num_chars: Sequence[int]):
    """(acc prediction, acc_norm prediction) for one item; ties -> lowest index."""
    raw = max(range(len(choice_ll)), key=lambda j: (choice_ll[j], -j))
    norm = max(range(len(choice_ll)), key=lambda j: (choice_ll[j] / max(num_chars[j], 1), -j))
    return raw, norm


@dataclass
class PairedDelta:
    delta: float                  # mean(b - a)
    se: float                     # standard error of that mean (sample std / sqrt(n))
    n: int


def paired_delta(a: Sequence[float], b: Sequence[float]) -> PairedDelta:
    if len(a) != len(b) or not a:
        raise ValueError("paired_delta needs two equal, non-empty sequences")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else 0.0
    return PairedDelta(mean, math.sqrt(var / n), n)


def delta_ppl_pct_with_se(ref_window_nll: List[float], window_nll: List[float],
                          window_tokens: List[int]):
    """ΔPPL % and its standard error from per-window NLL sums (windows are the units,
    because tokens inside a window are correlated). Delta method on
    ``100 * (exp(mean_d) - 1)`` where ``d_w`` is the per-token NLL change of window w."""
    per_tok_ref = [x / n for x, n in zip(ref_window_nll, window_tokens)]
    per_tok = [x / n for x, n in zip(window_nll, window_tokens)]
    pdlt = paired_delta(per_tok_ref, per_tok)
    total_n = sum(window_tokens)
    d = (sum(window_nll) - sum(ref_window_nll)) / total_n
    pct = 100.0 * math.expm1(d)
    return pct, 100.0 * math.exp(d) * pdlt.se


def summarize_task(kind: str, ref: Dict[str, List[float]], cur: Dict[str, List[float]]):
    """Accuracy of one task for one codec plus the paired delta vs the bf16 run.

    ``ref``/``cur`` hold per-item 0/1 lists: "correct" for cloze, "acc" and "acc_norm"
    for multiple choice.
    """
    primary = "correct" if kind == "cloze" else "acc_norm"
    out = {}
    for key, vals in cur.items():
        out[key] = sum(vals) / len(vals)
    pd = paired_delta(ref[primary], cur[primary])
    out["accuracy"] = out[primary]
    out["delta"] = pd.delta
    out["delta_se"] = pd.se
    out["n"] = pd.n
    out["flips_lost"] = sum(1 for x, y in zip(ref[primary], cur[primary]) if x and not y)
    out["flips_gained"] = sum(1 for x, y in zip(ref[primary], cur[primary]) if y and not x)
    return out
