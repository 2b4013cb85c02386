"""kernels/decode_attention.py (split-KV attention of a decode step) against SDPA, under
``TRITON_INTERPRET=1`` on the CPU (in a child process: the interpreter is chosen when
triton is first imported). Masks as the model builds them (causal over a bucket with
unwritten slots, a sliding window, a ring buffer, rows of different lengths), GQA and
plain heads, ranges that end inside a step and ranges with no live slot, one range and
several (combined by the last to finish, whose counter returns to zero).

The kernel rounds the probabilities to the value dtype before the product with V (as
flash attention does) and sums in another order, so the check is a tolerance: the
output against SDPA in fp32 on the same bf16/fp16 inputs, within 1% of the output's
scale (a probability's bf16 rounding is 2^-8 relative).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _masks(B: int, S: int):
    """(name, bool [B, 1, 1, S]) masks of megatron_lite.models.decoder.attention_mask."""
    from megatron_lite.models.decoder import attention_mask
    pos = torch.tensor([S - 9, S // 3][:B])
    return [("causal bucket", attention_mask(pos.unsqueeze(1), S, None)),
            ("window 40", attention_mask(pos.unsqueeze(1), S, 40)),
            ("ring", attention_mask(pos.unsqueeze(1) + 3 * S, S, None, ring=S))]


def _check() -> dict:
    from megatron_lite.kernels import decode_attention as da
    worst = 0.0
    cases = 0
    for (B, HQ, HKV, S, D, dt) in ((2, 8, 2, 200, 64, torch.bfloat16),
                                   (1, 4, 4, 130, 128, torch.float16),
                                   (2, 6, 2, 64, 32, torch.bfloat16)):
        g = torch.Generator().manual_seed(S + D)
        q = torch.randn(B, 1, HQ, D, generator=g).to(dt).transpose(1, 2)   # the model's view
        kc = torch.randn(B, HKV, S + 17, D, generator=g).to(dt)           # a cache, sliced
        vc = torch.randn(B, HKV, S + 17, D, generator=g).to(dt)
        k, v = kc[:, :, :S], vc[:, :, :S]
        scale = D ** -0.5
        for name, mask in _masks(B, S):
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  attn_mask=mask, scale=scale,
                                                  enable_gqa=HQ != HKV)
            for sms in (1, 4):      # one range per (row, KV head), and several
                got = da.decode_attention_impl(q, k, v, mask, scale, sms)
                assert got.shape == (B, HQ, 1, D) and got.dtype == dt and got.is_contiguous()
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                assert err < 1e-2, (B, HQ, HKV, S, D, dt, name, sms, err)
                worst = max(worst, err)
                cases += 1
    # a range whose slots are all masked: the mask's first live slot lies past it
    B, HQ, HKV, S, D = 1, 4, 1, 256, 64
    q = torch.randn(B, HQ, 1, D).to(torch.bfloat16)
    k, v = (torch.randn(B, HKV, S, D).to(torch.bfloat16) for _ in range(2))
    mask = (torch.arange(S) >= 200).view(1, 1, 1, S)
    assert da.split_geometry(B * HKV, S, 4)[0] == 4
    got = da.decode_attention_impl(q, k, v, mask, 0.125, 4)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          scale=0.125, enable_gqa=True)
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert torch.isfinite(got).all() and err < 1e-2, err
    assert not da._COUNTERS[None].any()             # every combine put its counter back
    return {"cases": cases + 1, "worst": max(worst, err)}


def test_split_geometry_covers_the_slots_in_whole_steps():
    pytest.importorskip("triton")
    from megatron_lite.kernels.decode_attention import BLOCK_N, split_geometry
    for rows_heads, slots, sms in ((8, 1024, 132), (128, 1024, 132), (1, 64, 132),
                                   (3, 1000, 7), (8, 65, 132)):
        splits, per = split_geometry(rows_heads, slots, sms)
        assert per % BLOCK_N == 0 and splits * per >= slots > (splits - 1) * per
        assert splits == 1 or rows_heads * (splits - 1) < 2 * sms
    assert split_geometry(8, 1024, 132) == (16, 64)     # llama3-8b, batch 1: 128 programs


def test_decode_attention_matches_sdpa_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cases"] == 19 and got["worst"] < 1e-2


def test_takes_only_a_gpu_decode_token():
    pytest.importorskip("triton")
    from megatron_lite.kernels.decode_attention import takes
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 16, 128, dtype=torch.bfloat16)
    assert not takes(q, k)                                  # a CPU tensor: SDPA


if __name__ == "__main__":
    print(json.dumps(_check()))
