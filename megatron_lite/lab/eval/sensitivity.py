"""Per-layer bit allocation from measured sensitivity.

1. **Measure.** For every row-parallel site s and candidate codec c, run the model with c
   at s alone (every other site bf16) and record ``KL_s(c)``, the mean over tokens of
   KL(p_bf16 || p) of the next-token distributions, on calibration text.
2. **Allocate.** Assume the damage adds up over sites, and pick one codec per site to
   minimise ``sum_s KL_s(c_s)`` subject to ``mean_s bits(c_s) <= budget`` (all sites carry
   the same number of values). This multiple-choice knapsack is solved by the Lagrangian
   method: for a price ``lam`` per bit every site independently takes
   ``argmin_c KL_s(c) + lam * bits(c)``; bisection on ``lam`` finds the cheapest price
   that meets the budget. (Exact up to the convex hull of each site's options, which is
   all the additivity assumption can support anyway.)
3. **Emit** a ``--comm`` string: the most common choice as default plus one override per
   other site, e.g. ``hadamard-int4:128,layers.1.self_attn.o_proj=hadamard-int8:128``.

The additivity assumption is checked, not trusted: tools/evaluate.py measures the emitted
config as a whole.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .metrics import compare_rows, ref_log_probs
from .runner import CodecSwitch, launch, load_rank_engine, rank_logits, row_parallel_sites


def measure(ckpt: str, tp: int, num_layers: int, codecs: Sequence[str], windows,
            simulated: bool = True, progress: bool = True
            ) -> Optional[Dict[str, Dict[str, float]]]:
    """``{site: {codec: mean KL vs the all-bf16 run}}`` over the token ``windows``; None
    on the other ranks of a real (torchrun) run."""
    from tqdm import tqdm

    from megatron_lite.comm.build import build_communicator
    sites = row_parallel_sites(num_layers)
    configs = ["bf16"] + [f"bf16,{s}={c}" for s in sites for c in codecs]
    ids = torch.tensor([w.ids for w in windows])

    def rank_main(comm):
        switch = CodecSwitch(comm, [build_communicator(comm, c, num_layers=num_layers)
                                    for c in configs])
        engine = load_rank_engine(ckpt, switch)
        kl = {}
        bar = tqdm(total=len(configs) * len(windows), unit="seq", desc="sensitivity",
                   disable=not progress or comm.rank != 0, dynamic_ncols=True, mininterval=5)
        ref = []
        for i, cfg in enumerate(configs):
            switch.active = i
            total, n = 0.0, 0
            for j in range(ids.shape[0]):
                logits = rank_logits(engine, ids[j:j + 1])[0, :-1]
                if comm.rank == 0:
                    if i == 0:
                        ref.append(ref_log_probs(logits))
                    total += compare_rows(logits, ref[j])[0]
                    n += logits.shape[0]
                bar.update(1)
            if i and comm.rank == 0:
                site, codec = cfg.split(",", 1)[1].split("=", 1)
                kl.setdefault(site, {})[codec] = total / n
        bar.close()
        return kl if comm.rank == 0 else None   # only rank 0 scores
    return launch(rank_main, tp, simulated)[0]


def allocate(sens: Dict[str, Dict[str, float]], bits: Dict[str, float], budget: float
             ) -> Tuple[Dict[str, str], float, float]:
    """(site -> codec, mean bits, predicted total KL) minimising the summed KL within the
    mean-bits ``budget``. Raises ValueError if even the cheapest choices exceed it."""
    sites = list(sens)

    def choose(lam: float) -> Dict[str, str]:
        # ties: fewer bits, then name, so the choice is deterministic
        return {s: min(sens[s], key=lambda c: (sens[s][c] + lam * bits[c], bits[c], c))
                for s in sites}

    def mean_bits(ch):
        return sum(bits[c] for c in ch.values()) / len(ch)

    cheapest = {s: min(sens[s], key=lambda c: (bits[c], c)) for s in sites}
    if mean_bits(cheapest) > budget + 1e-9:
        raise ValueError(f"budget {budget} bits/value is below the cheapest option "
                         f"({mean_bits(cheapest):.3f})")
    lo, hi = 0.0, 1.0
    while mean_bits(choose(hi)) > budget + 1e-9:
        hi *= 2.0
        if hi > 1e12:
            return cheapest, mean_bits(cheapest), sum(sens[s][c] for s, c in cheapest.items())
    if mean_bits(choose(lo)) <= budget + 1e-9:
        hi = lo
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mean_bits(choose(mid)) <= budget + 1e-9:
            hi = mid
        else:
            lo = mid
    best = choose(hi)
    # Spend what the price step left unused: upgrade sites greedily by KL saved per bit.
    while True:
        room = budget * len(sites) - sum(bits[c] for c in best.values())
        moves = [((sens[s][best[s]] - sens[s][c]) / (bits[c] - bits[best[s]]), s, c)
                 for s in sites for c in sens[s]
                 if 0 < bits[c] - bits[best[s]] <= room + 1e-9
                 and sens[s][c] < sens[s][best[s]]]
        if not moves:
            break
        _, s, c = max(moves)
        best[s] = c
    return best, mean_bits(best), sum(sens[s][c] for s, c in best.items())


def comm_string(choice: Dict[str, str], order: List[str]) -> str:
    """``--comm`` syntax: the most common codec as default, overrides for the rest."""
    default = Counter(choice.values()).most_common(1)[0][0]
    items = [default] + [f"{s}={choice[s]}" for s in order if choice[s] != default]
    return ",".join(items)
