"""The GEMV kernel's sum (kernels/csrc/gemv.cu) on the CPU, in its order: lane L of the
row's warp sums the products of 16-byte words L, L + 32, ... (8 values each, in order) in
fp32, then the lanes meet in a butterfly (xor 16, 8, 4, 2, 1); lane 0's sum rounded to
bf16. A product of two bf16 values is exact in fp32, so a rounded sum of it is the
kernel's fused multiply-add."""
import torch


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y [N] (bf16) = x [K] W^T for bf16 x and W [N, K], K a multiple of 8."""
    n, k = w.shape
    words = k // 8
    wf = w.detach().cpu().float().view(n, words, 8)
    xf = x.detach().cpu().float().reshape(words, 8)
    acc = torch.zeros(n, 32)
    lanes = torch.arange(32)
    for j in range((words + 31) // 32):
        idx = lanes + 32 * j
        live = idx < words
        for i in range(8):
            acc[:, live] = acc[:, live] + wf[:, idx[live], i] * xf[idx[live], i]
    for o in (16, 8, 4, 2, 1):
        acc = acc + acc[:, lanes ^ o]
    return acc[:, 0].to(torch.bfloat16)
