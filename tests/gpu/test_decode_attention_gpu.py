"""GPU: kernels/decode_attention.py (split-KV attention of a decode step) against SDPA
in fp32 on the model's shapes and masks, and as the custom op inside torch.compile and a
CUDA graph (the compiled, graphed decode step): the same bits as the eager call.
tests/test_decode_attention.py checks the same kernels under the interpreter."""
import pytest
import torch
import torch.nn.functional as F

from tests.gpu._harness import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


def _case(B, HQ, HKV, S, D, dt, seed):
    from megatron_lite.models.decoder import attention_mask
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, 1, HQ, D, generator=g, device="cuda").to(dt).transpose(1, 2)
    kc = torch.randn(B, HKV, S + 64, D, generator=g, device="cuda").to(dt)
    vc = torch.randn(B, HKV, S + 64, D, generator=g, device="cuda").to(dt)
    pos = torch.randint(0, S, (B, 1), generator=g, device="cuda")
    return q, kc[:, :, :S], vc[:, :, :S], attention_mask(pos, S, None)


@pytest.mark.parametrize("B,HQ,HKV,S,D", [(1, 32, 8, 1024, 128), (16, 32, 8, 1024, 128),
                                          (1, 8, 2, 4096, 128), (2, 4, 1, 300, 256),
                                          (3, 9, 3, 64, 64)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_decode_attention_matches_sdpa(B, HQ, HKV, S, D, dt):
    from megatron_lite.kernels import decode_attention as da
    q, k, v, mask = _case(B, HQ, HKV, S, D, dt, seed=S + B)
    assert da.takes(q, k)
    got = da.decode_attention(q, k, v, mask, D ** -0.5)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          scale=D ** -0.5, enable_gqa=HQ != HKV)
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-2, err
    # whichever range finishes last combines them in range order: the same bits on every
    # call; and every combine puts its counter back
    assert torch.equal(got, da.decode_attention(q, k, v, mask, D ** -0.5))
    assert not da._COUNTERS[q.device.index].any()


def test_decode_attention_compiled_and_graphed_is_the_eager_op():
    from megatron_lite.kernels import decode_attention as da
    q, k, v, mask = _case(1, 32, 8, 1024, 128, torch.bfloat16, seed=3)
    step = torch.compile(lambda q, k, v, m: da.decode_attention(q * 1.0, k, v, m, 0.088),
                         fullgraph=True, dynamic=False)
    eager = da.decode_attention(q, k, v, mask, 0.088)
    assert torch.equal(step(q, k, v, mask), eager)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(q, k, v, mask)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = step(q, k, v, mask)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, da.decode_attention(q, k, v, mask, 0.088))
