"""The typed configuration of the kernels: what a codec looks like to a kernel, and the
tuning knobs, read once. This module imports neither triton nor the comm layer, so the
codecs (megatron_lite/comm/codecs/) can describe themselves to the kernels on a machine
without triton, and the kernels never import the comm layer.

``KernelCodec`` is the compile-time description of one wire codec (the bf16 pass-through
or a group codec of megatron_lite/comm/codecs/group.py); the codec builds it once
(``GroupCodec.kernel_codec``), so a launch allocates nothing to describe it.

``KernelConfig`` holds the knobs the fused kernels read, from the environment once per
process (``kernel_config()``):

* ``MEGATRON_LITE_SPIN_LIMIT``: polls a flag wait makes before it gives up and reports a
  timeout through the workspace status word (0: the default, 2^26 on a GPU, 2^16 under
  the interpreter);
* ``MEGATRON_LITE_BLOCKS_PER_SM``: blocks per SM of the two-shot grid at every size,
  instead of the measured table (kernels/thresholds.py); for sweeps (tests/gpu/sweep_grid.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

KIND_BF16, KIND_ASYM, KIND_SYM, KIND_FP8 = 0, 1, 2, 3
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_opts() -> dict:
    """Triton launch options of every kernel that must give the reference's bits: no FMA
    contraction, since the reference rounds every product and sum separately (the
    interpreter runs numpy, which never contracts, and takes no such option)."""
    return {} if INTERPRET else {"enable_fp_fusion": False}


@dataclass(frozen=True)
class KernelCodec:
    """One wire codec as the kernels see it.

    ``kind``: KIND_BF16 / KIND_ASYM (step + offset) / KIND_SYM (bound) / KIND_FP8;
    ``bits`` per code; ``group`` values per group (1 for bf16); ``qmax`` the largest code;
    ``c2`` = fl32(2 / qmax), the asymmetric step factor; ``n_meta`` bf16 metadata arrays.
    """

    kind: int
    bits: int
    group: int
    qmax: int
    c2: float
    n_meta: int

    def nbytes(self, n: int) -> int:
        """Encoded bytes of a chunk of ``n`` values (the reference codec's layout)."""
        if self.kind == KIND_BF16:
            return 2 * n
        return n * self.bits // 8 + 2 * self.n_meta * (n // self.group)

    def constexprs(self, prefix: str = "") -> dict:
        return {prefix + "KIND": self.kind, prefix + "BITS": self.bits,
                prefix + "QMAX": self.qmax, prefix + "C2": self.c2}


BF16_KERNEL = KernelCodec(KIND_BF16, 16, 1, 0, 0.0, 0)


@dataclass(frozen=True)
class KernelPlan:
    """How the fused kernels run one scheme on one message: the plain wire codecs of the
    two stages (``rs`` reduce-scatter, ``ag`` all-gather; equal for one-stage codecs),
    and the maps folded around them (``rot``: a Hadamard rotation of that many values,
    the ``hadamard-`` codecs; ``scale``: fp32 channel scales on the message's device, the
    ``weighted-`` codecs, with ``inv_scale`` their correctly rounded reciprocals fl32(1/s),
    which the CUDA kernels multiply by in place of most of the restore's divisions:
    csrc/codec_weighted.cuh's ``Unscale``). kernels/maps.py applies the maps bit-exactly."""

    rs: KernelCodec
    ag: KernelCodec
    rot: Optional[int] = None
    scale: Optional[object] = None       # torch.Tensor (not imported here: no torch needed)
    inv_scale: Optional[object] = None   # torch.Tensor, with scale

    def __post_init__(self):
        if (self.scale is None) != (self.inv_scale is None) or (
                self.scale is not None and self.inv_scale.numel() != self.scale.numel()):
            raise ValueError("channel scales come with their reciprocals, of the same length")
        groups = {k.group for k in (self.rs, self.ag) if k.kind != KIND_BF16}
        if len(groups) > 1:   # both stages are coded on the same tiles
            raise ValueError(f"the two stages use different group sizes {sorted(groups)}")
        if self.rot is not None and self.rot != self.group:
            raise ValueError(f"a rotation of {self.rot} values needs a codec of group {self.rot}")

    @property
    def mapped(self) -> bool:
        return self.rot is not None or self.scale is not None

    @property
    def group(self) -> int:
        """The group size that sets the two-shot tiles: the stages' common group (128 for
        the bf16 pass-through, whose tiles need no group)."""
        groups = {k.group for k in (self.rs, self.ag) if k.kind != KIND_BF16}
        return groups.pop() if groups else 128


@dataclass(frozen=True)
class KernelConfig:
    spin_limit: int
    blocks_per_sm: int      # 0: by message size from kernels/thresholds.py


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}")
    return value


@functools.lru_cache(maxsize=None)
def kernel_config() -> KernelConfig:
    """The process's kernel configuration, read from the environment on first use."""
    spin = _env_int("MEGATRON_LITE_SPIN_LIMIT") or ((1 << 16) if INTERPRET else (1 << 26))
    return KernelConfig(spin_limit=spin, blocks_per_sm=_env_int("MEGATRON_LITE_BLOCKS_PER_SM"))
