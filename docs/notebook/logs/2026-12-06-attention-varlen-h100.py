# scratch: decode attention through flash varlen with seqused_k vs SDPA with a mask
import torch, torch.nn.functional as F, time, statistics
torch.manual_seed(0)
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name())

def flash_decode(q, k, v, used, scale):
    """q [B, Hq, 1, D]; k/v [B, Hkv, S, D] contiguous; used [B] int32 live slots."""
    B, hq, _, D = q.shape
    hkv, S = k.shape[1], k.shape[2]
    # every row b as a varlen sequence starting at row b*hkv*S of a (rows, hkv, D) view
    # whose row stride is D and head stride S*D: exactly the [B, Hkv, S, D] layout
    rows = (B - 1) * hkv * S + S
    kk = k.as_strided((rows, hkv, D), (D, S * D, 1))
    vv = v.as_strided((rows, hkv, D), (D, S * D, 1))
    qq = q.reshape(B, hq, D)
    cq = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    ck = cq * (hkv * S)
    out = torch.ops.aten._flash_attention_forward(qq, kk, vv, cq, ck, 1, S, 0.0, False, False,
                                                  scale=scale, seqused_k=used)[0]
    return out.view(B, hq, 1, D)

def flash_groups(q, k, v, used, scale, splits=None):
    """heads as sequences: sequence (b, h) = g query rows against k[b, h] (one head)."""
    B, hq, _, D = q.shape
    hkv, S = k.shape[1], k.shape[2]
    g = hq // hkv
    n = B * hkv
    qq = q.reshape(n * g, 1, D)
    kk = k.reshape(n * S, 1, D); vv = v.reshape(n * S, 1, D)
    idx = torch.arange(n + 1, device=q.device, dtype=torch.int32)
    u = used.repeat_interleave(hkv)
    out = torch.ops.aten._flash_attention_forward(qq, kk, vv, idx * g, idx * S, g, S, 0.0, False, False,
                                                  scale=scale, seqused_k=u, num_splits=splits)[0]
    return out.view(B, hq, 1, D)

def flash_strided_splits(splits):
    def f(q, k, v, used, scale):
        B, hq, _, D = q.shape
        hkv, S = k.shape[1], k.shape[2]
        rows = (B - 1) * hkv * S + S
        kk = k.as_strided((rows, hkv, D), (D, S * D, 1))
        vv = v.as_strided((rows, hkv, D), (D, S * D, 1))
        qq = q.reshape(B, hq, D)
        cq = torch.arange(B + 1, device=q.device, dtype=torch.int32)
        return torch.ops.aten._flash_attention_forward(qq, kk, vv, cq, cq * (hkv * S), 1, S, 0.0, False, False,
                   scale=scale, seqused_k=used, num_splits=splits)[0].view(B, hq, 1, D)
    return f

def sdpa_masked(q, k, v, used, scale):
    S = k.shape[2]
    mask = (torch.arange(S, device=q.device) < used.unsqueeze(-1)).view(-1, 1, 1, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

def timeit(fn, n=20, reps=9):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / n)
    return statistics.median(ts), g

for (B, hq, hkv, D, S, lens) in [(1, 32, 8, 128, 1024, [987]), (16, 32, 8, 128, 1024, list(range(900, 996, 6))),
                                 (1, 32, 8, 128, 4096, [3000]), (1, 8, 4, 256, 1024, [1024]),
                                 (4, 16, 8, 256, 4096, [100, 2000, 4000, 4096]), (1, 32, 8, 128, 8192, [8000])]:
    q = torch.randn(B, hq, 1, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, hkv, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, hkv, S, D, device=dev, dtype=torch.bfloat16)
    used = torch.tensor(lens, device=dev, dtype=torch.int32)
    scale = D ** -0.5
    ref = sdpa_masked(q, k, v, used, scale)
    got = flash_decode(q, k, v, used, scale)
    err = (got.float() - ref.float()).abs().max().item()
    # fp32 reference
    mask = (torch.arange(S, device=dev) < used.unsqueeze(-1)).view(-1, 1, 1, S)
    r32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=True)
    e_ref = (ref.float() - r32).abs().max().item(); e_got = (got.float() - r32).abs().max().item()
    t_sdpa, _ = timeit(lambda: sdpa_masked(q, k, v, used, scale))
    t_fl, g = timeit(lambda: flash_decode(q, k, v, used, scale))
    extra = []
    for name, fn in [("groups", lambda *a: flash_groups(*a)), ("groups-s4", lambda *a: flash_groups(*a, splits=4)),
                     ("groups-s16", lambda *a: flash_groups(*a, splits=16)),
                     ("strided-s4", flash_strided_splits(4)), ("strided-s16", flash_strided_splits(16))]:
        try:
            o2 = fn(q, k, v, used, scale)
            e2 = (o2.float() - r32).abs().max().item()
            t2, _ = timeit(lambda: fn(q, k, v, used, scale))
            extra.append(f"{name} {t2:.2f} us (err {e2:.1e})")
        except Exception as ex:
            extra.append(f"{name} failed: {str(ex).splitlines()[0][:100]}")
    try:
        lv = lens[0]
        t_live, _ = timeit(lambda: F.scaled_dot_product_attention(q[:1], k[:1, :, :lv], v[:1, :, :lv], scale=scale, enable_gqa=True))
        extra.append(f"sdpa-live(row0) {t_live:.2f} us")
    except Exception as ex:
        extra.append(f"sdpa-live failed {ex}")
    # graph replay honours a changed length
    used.copy_(torch.tensor([max(1, l - 37) for l in lens], device=dev, dtype=torch.int32))
    out_holder = {}
    gg = torch.cuda.CUDAGraph()
    st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st): flash_decode(q, k, v, used, scale)
    torch.cuda.current_stream().wait_stream(st)
    with torch.cuda.graph(gg): o = flash_decode(q, k, v, used, scale)
    used.copy_(torch.tensor(lens, device=dev, dtype=torch.int32)); gg.replay(); torch.cuda.synchronize()
    replay_ok = torch.equal(o, got)
    print(f"B={B} hq={hq} hkv={hkv} D={D} S={S} lens={lens[:4]}: sdpa-mask {t_sdpa:.2f} us  flash-varlen {t_fl:.2f} us"
          f"  max|flash-sdpa| {err:.2e}  vs fp32: sdpa {e_ref:.2e} flash {e_got:.2e}  replay-equal {replay_ok}")
    print("    " + " | ".join(extra))

# compile
B, hq, hkv, D, S = 1, 32, 8, 128, 1024
q = torch.randn(B, hq, 1, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(B, hkv, S, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
used = torch.tensor([500], device=dev, dtype=torch.int32)
f = torch.compile(lambda q, k, v, u: flash_decode(q * 1.5, k, v, u, 0.1) + 1, fullgraph=True)
a = f(q, k, v, used); b = flash_decode(q * 1.5, k, v, used, 0.1) + 1
print("compiled equal:", torch.equal(a, b))
f2 = torch.compile(lambda q, k, v, u: flash_groups(q * 1.5, k, v, u, 0.1) + 1, fullgraph=True)
print("compiled groups equal:", torch.equal(f2(q, k, v, used), flash_groups(q * 1.5, k, v, used, 0.1) + 1))
# a mutated cache then the view, as in the model
def step(q, k, v, u, knew, pos):
    k.index_copy_(2, pos, knew); v.index_copy_(2, pos, knew)
    return flash_groups(q, k, v, u, 0.1)
f3 = torch.compile(step, fullgraph=True)
pos = torch.tensor([499], device=dev); knew = torch.randn(1, hkv, 1, D, device=dev, dtype=torch.bfloat16)
k2, v2 = k.clone(), v.clone()
a = f3(q, k, v, used, knew, pos); b = step(q, k2, v2, used, knew, pos)
print("compiled mutate+groups equal:", torch.equal(a, b), torch.equal(k, k2))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(3): f3(q, k, v, used, knew, pos)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8))
