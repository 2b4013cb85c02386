"""Error feedback: the next reduce cancels the previous one's error exactly (in sum)."""
from __future__ import annotations

import pytest
import torch

from megatron_lite.comm.allreduce import build_communicator
from megatron_lite.comm.feedback import ErrorFeedbackCommunicator
from megatron_lite.comm.simulate import run_simulated
from tests._dist import run_distributed


def _two_reduces(comm, spec, xs, ef):
    q = build_communicator(comm, spec)
    c = ErrorFeedbackCommunicator(q) if ef else q
    c.all_reduce(xs[0][comm.rank], "embed_tokens")            # resets the state
    y1 = c.all_reduce(xs[1][comm.rank], "layers.0.self_attn.o_proj")
    y2 = c.all_reduce(xs[2][comm.rank], "layers.0.mlp.down_proj")
    y3 = q.all_reduce(xs[2][comm.rank], "layers.0.mlp.down_proj")  # same message, no carry
    return y1, y2, y3


@pytest.mark.parametrize("spec", ["int4:32", "hadamard-int3:64", "int4-int8:32"])
def test_residual_carries_only_the_last_error(spec):
    torch.manual_seed(0)
    w = 3
    xs = torch.randn(3, w, 4, 128)
    xs[2] *= 0.5
    ys = run_simulated(_two_reduces, w, spec, xs, True)
    y1, y2, _ = ys[0]
    for r in ys[1:]:                                           # ranks bitwise identical
        assert all(torch.equal(a, b) for a, b in zip(r, ys[0]))
    exact1, exact2 = xs[1].sum(0), xs[2].sum(0)
    e1 = y1 - exact1
    # The second reduce delivered exact2 - e1 + e2, with e2 the error of quantizing the
    # compensated message: the stream h + y1 + y2 is off by e2 only.
    resid = (y1 + y2) - (exact1 + exact2)
    plain = run_simulated(_two_reduces, w, spec, xs, False)[0]
    resid_plain = (plain[0] + plain[1]) - (exact1 + exact2)
    assert resid.pow(2).mean() < 0.75 * resid_plain.pow(2).mean()
    # and y2 is the quantized sum of (x2 - own error parts), whose sum is exactly -e1:
    assert ((y2 - (exact2 - e1)).pow(2).mean() <
            0.5 * (y2 - exact2).pow(2).mean())


def _real(rank, world_size, spec, xs):
    return _two_reduces(__import__("megatron_lite.comm.communicator", fromlist=["x"])
                        .DistCommunicator(), spec, xs, True)


def test_error_feedback_gloo_equals_simulation():
    torch.manual_seed(1)
    xs = torch.randn(3, 2, 3, 64)
    sim = run_simulated(_two_reduces, 2, "int4:64", xs, True)
    real = run_distributed(_real, 2, "int4:64", xs)
    for r in real:
        assert all(torch.equal(a, b) for a, b in zip(r, sim[0]))
