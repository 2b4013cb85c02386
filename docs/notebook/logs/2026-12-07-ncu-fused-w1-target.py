"""Nsight Compute target (docs/notebook/2026-12-07.md): the two-shot kernel at one rank on
64 MB bf16 [8192, 4096], 4 blocks per SM, once per codec: int8:128, weighted-int8:128,
hadamard-int8:128, weighted-hadamard-int8:128. Run as one rank without torchrun:
MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 RANK=0 WORLD_SIZE=1 LOCAL_RANK=0."""
import torch
import torch.distributed as dist

dist.init_process_group("nccl")
torch.cuda.set_device(0)
from megatron_lite.comm import fused as backends
from megatron_lite.comm.codecs import CodecSpec, get_scheme
from megatron_lite.comm.codecs.weighted import WeightedScheme
from megatron_lite.kernels import fused_allreduce as fa

state = backends.make_state(None, max_bytes=64 << 20, oneshot_max_bytes=1 << 20)
assert state.ws is not None, state.why
h = 4096
scale = torch.rand(h, generator=torch.Generator().manual_seed(3)) * 8 + 0.05
x = torch.randn(8192, h, device="cuda").to(torch.bfloat16)
for codec in (get_scheme("int8:128"), WeightedScheme(CodecSpec("weighted-int8", 128), scale),
              get_scheme("hadamard-int8:128"),
              WeightedScheme(CodecSpec("weighted-hadamard-int8", 128), scale)):
    plan = codec.kernel_plan(x)
    y = fa.two_shot_all_reduce(state.ws, x, plan, bpsm=4)
    torch.cuda.synchronize()
    print(codec, float(y.float().abs().mean()), int(state.ws.status[0]))
dist.destroy_process_group()
