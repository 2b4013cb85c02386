"""Quantized all-reduce (two-step and one-shot), the backend chain, and the comm config.

Two-step all-reduce (Flash Communication, arXiv 2412.04964), written once against the
Communicator primitives so that gloo, NCCL and the thread simulation run the same code::

    chunks  = scheme.chunk(x, W)              # [W, c]: zero-padded (or channel-permuted)
    send[j] = rs.encode(chunks[j])            # rank r quantizes all W chunks
    all_to_all_single(recv, send)             # = reduce-scatter: rank j gets every chunk j
    acc     = sum_r rs.decode(recv[r])        # fp32, r = 0, 1, ..., W-1 in this order
    mine    = ag.encode(acc)                  # requantize the reduced chunk
    all_gather_into_tensor(all, mine)
    y       = ag.decode(all)                  # every rank decodes the SAME bytes (its own
                                              # chunk included), so ranks are bit-identical

One-shot all-reduce (``algo=one-shot``): every rank quantizes its whole partial sum
once, all ranks gather every rank's bytes and each sums the W decoded partials itself::

    send     = rs.encode(chunks)                  # exactly the two-step send buffer
    all_gather_into_tensor(all, send)             # every rank gets every rank's bytes
    y[j]     = finish(sum_r rs.decode(all[r, j])) # fp32, r = 0, 1, ..., W-1 in this order

Each value is quantized once instead of twice (no re-quantization of the sum), so for W
uncorrelated partials the error power is about half the two-step one at the same bits
per value. The price is traffic: a rank sends its whole message to W - 1 peers,
``(W - 1) * n`` codes against two-step's ``2 (W - 1) / W * n``; equal at W = 2, twice at
W = 4. It is the algorithm of small (latency-bound) messages in vLLM's and
TensorRT-LLM's custom all-reduces, which send bf16 this way.

Backends form a flat chain (vLLM style): each says whether it can take a message and, if
not, why. ``QuantizedCommunicator`` resolves the codec for the call site from a
:class:`CommConfig`, then asks its backends in order. Helper backends (fused GPU kernels,
``auto`` thresholds) are inserted in front with :meth:`QuantizedCommunicator.add_backend`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megatron_lite.comm.codecs import (BF16Codec, Codec, CodecError, codec_bits, get_codec,
                                       parse_codec_spec, saturate)
from megatron_lite.comm.communicator import Communicator, WrappingCommunicator

NATIVE = "native"   # the base communicator's own all-reduce (NCCL / gloo), uncompressed
EMBED_SITE = "embed_tokens"
PATHS = ("auto", "fused", "two-step")   # CommConfig.path
ALGOS = ("two-step", "one-shot")        # CommConfig.algo
BUDGETS = ("site", "model")             # CommConfig.budget
# codecs whose state is per site and comes from a calibration file
CALIBRATED = ("outlier-int4", "weighted-", "klt")


# ----------------------------------------------------------------------------- schemes
class GroupScheme:
    """Flat chunking for group codecs: flatten, zero-pad to ``W * c`` with ``c`` a multiple
    of the group size, chunk j = values ``[j*c, (j+1)*c)``."""

    def __init__(self, codec: Codec):
        self.codec, self.rs, self.ag = codec, codec.rs, codec.ag
        self.group_size = max(self.rs.group_size, self.ag.group_size)
        self.bits_per_value = codec.bits_per_value

    def chunk(self, x: torch.Tensor, world_size: int):
        n, g = x.numel(), self.group_size
        c = -(-n // (world_size * g)) * g
        flat = x.reshape(-1)
        if c * world_size != n:
            flat = torch.cat([flat, flat.new_zeros(c * world_size - n)])
        shape = x.shape

        def restore(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(-1)[:n].reshape(shape)
        return flat.view(world_size, c), restore

    def rs_encode(self, chunks, src):
        return self.rs.encode(chunks)

    def rs_decode(self, recv, chunk_id, c):
        return self.rs.decode(recv, c, torch.float32)

    def ag_encode(self, acc, chunk_id):
        return self.ag.encode(acc)

    def ag_decode(self, gathered, c, out_dtype):
        return self.ag.decode(gathered, c, out_dtype)

    def finish(self, acc, out_dtype):
        """The one-shot output of the fp32 sums ``acc`` [W, c]: the decode's saturation
        (the bf16 codec keeps an Inf, as its decode does). A finite sum beyond the bf16
        range saturates here, where two-step's re-encoding would turn its group to NaN."""
        return saturate(acc, out_dtype, keep_inf=isinstance(self.codec, BF16Codec))

    def rs_error_bound(self, chunks, src):
        return self.rs.error_bound(chunks)

    def ag_error_bound(self, acc, chunk_id):
        return self.ag.error_bound(acc)


def scheme_for(codec) -> "GroupScheme":
    """The scheme of a codec (outlier and klt codecs are their own scheme)."""
    return codec if hasattr(codec, "rs_encode") or hasattr(codec, "encode_partial") else GroupScheme(codec)


def two_step_all_reduce(comm: Communicator, x: torch.Tensor, scheme) -> torch.Tensor:
    """Quantized sum of ``x`` over ``comm``'s ranks; output in ``x.dtype`` and shape."""
    if not x.is_floating_point():
        raise CodecError(f"quantized all-reduce needs a float tensor, got {x.dtype}")
    w, rank = comm.world_size, comm.rank
    chunks, restore = scheme.chunk(x, w)
    c = chunks.shape[-1]
    send = scheme.rs_encode(chunks, rank).contiguous()
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send)
    acc = _rank_order_sum(scheme.rs_decode(recv, rank, c))
    mine = scheme.ag_encode(acc, rank).contiguous()
    gathered = torch.empty((w * mine.numel(),), dtype=torch.uint8, device=mine.device)
    comm.all_gather_into_tensor(gathered, mine)
    return restore(scheme.ag_decode(gathered.view(w, -1), c, x.dtype))


def _rank_order_sum(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in fp32, in this fixed rank order: the sum is the same
    on every backend and rank."""
    acc = parts[0].clone()
    for r in range(1, parts.shape[0]):
        acc += parts[r]
    return acc


def _check_one_stage(spec) -> None:
    """One-shot sends one code per value: refuse the two-stage ``int4-int8`` family."""
    if spec and str(spec).split(":")[0].endswith("int4-int8"):
        raise CodecError(f"algo=one-shot: {spec} is a two-stage codec (int4 "
                         "reduce-scatter, int8 all-gather); one-shot has one stage")


def one_shot_all_reduce(comm: Communicator, x: torch.Tensor, scheme) -> torch.Tensor:
    """Quantized sum of ``x`` with one quantization per value (module docstring)."""
    if not x.is_floating_point():
        raise CodecError(f"quantized all-reduce needs a float tensor, got {x.dtype}")
    _check_one_stage(getattr(scheme, "spec", None) or scheme.codec.spec)
    w, rank = comm.world_size, comm.rank
    if hasattr(scheme, "encode_partial"):   # klt codecs: each rank's own basis, per row
        if scheme.world_size != w:
            raise CodecError(f"{scheme.spec}: calibrated for TP {scheme.world_size}, the "
                             f"group has {w} ranks")
        send = scheme.encode_partial(x, rank).contiguous()
        gathered = torch.empty((w,) + tuple(send.shape), dtype=torch.uint8, device=send.device)
        comm.all_gather_into_tensor(gathered.view(-1), send.view(-1))
        acc = _rank_order_sum(torch.stack([scheme.decode_partial(gathered[r], r)
                                           for r in range(w)]))
        return scheme.finish(acc, x.dtype).reshape(x.shape)
    chunks, restore = scheme.chunk(x, w)
    c = chunks.shape[-1]
    send = scheme.rs_encode(chunks, rank).contiguous()
    gathered = torch.empty((w,) + tuple(send.shape), dtype=torch.uint8, device=send.device)
    comm.all_gather_into_tensor(gathered.view(-1), send.view(-1))
    acc = torch.stack([_rank_order_sum(scheme.rs_decode(gathered[:, j], j, c))  # [W src, c]
                       for j in range(w)])
    return restore(scheme.finish(acc, x.dtype))


def quantized_all_reduce(comm: Communicator, x: torch.Tensor, scheme,
                         algo: str = "two-step") -> torch.Tensor:
    """``x`` summed over ``comm`` with ``scheme``, by ``algo`` (one of :data:`ALGOS`)."""
    if algo == "one-shot":
        return one_shot_all_reduce(comm, x, scheme)
    return two_step_all_reduce(comm, x, scheme)


# ----------------------------------------------------------------------------- backends
class Backend:
    """One way to run an all-reduce. ``unsupported`` returns None if the backend can take
    ``x`` with ``codec``, else a short reason (shown by ``QuantizedCommunicator.explain``)."""

    name = "backend"

    def unsupported(self, x: torch.Tensor, codec, comm: "QuantizedCommunicator") -> Optional[str]:
        raise NotImplementedError

    def all_reduce(self, x: torch.Tensor, codec, comm: "QuantizedCommunicator") -> torch.Tensor:
        raise NotImplementedError


class TwoStepBackend(Backend):
    """The portable path over torch.distributed primitives (any device, any codec, any
    length and float dtype): the two-step algorithm, or the one-shot one where the config
    asks for it."""

    name = "two-step"

    def unsupported(self, x, codec, comm):
        if codec is None:
            return "no codec for this call"
        if not x.is_floating_point():
            return f"dtype {x.dtype} is not floating point"
        return None

    def label(self, comm) -> str:
        """What ``explain`` calls this path: the algorithm it runs."""
        return getattr(comm.config, "algo", self.name)

    def all_reduce(self, x, codec, comm):
        return quantized_all_reduce(comm.base, x, scheme_for(codec),
                                    getattr(comm.config, "algo", "two-step"))


# ----------------------------------------------------------------------------- config
@dataclass
class CommConfig:
    """Which codec each all-reduce site uses.

    * ``codec``: default for the row-parallel sites (None = native uncompressed).
    * ``overrides``: ``[(glob, codec-or-"native"), ...]``; the first glob matching the site
      wins. ``layers.-1.*`` style negative layer indices count from the last layer
      (needs ``num_layers``). Globs are :mod:`fnmatch` patterns on the site name.
    * The embedding reduce (site ``embed_tokens``) stays native unless an override names it.
    * ``min_bytes``: messages smaller than this (in their own dtype) go native.
    * ``path``: which implementation carries a quantized site on a GPU group. ``auto``
      (default): the measured size chooser, which sends a message uncompressed through
      NCCL or the one-shot kernel wherever those measured faster than the codec's fused
      kernel (kernels/thresholds.py). ``fused``: the codec's fused two-shot kernel
      whenever it takes the message, else the portable two-step path; never
      uncompressed. ``two-step``: always the portable two-step path (torch.distributed
      primitives). Compressed paths give the reference's bits, so ``path`` changes
      speed, never results; on gloo every path is the portable one. With
      ``algo=one-shot`` the size chooser does not apply and ``path=fused`` is refused.
    * ``algo``: ``two-step`` (default; Flash Communication's reduce-scatter + all-gather,
      two quantizations per value) or ``one-shot`` (one quantization per value, all
      ranks gather every partial; about half the error power, ``W / 2`` times the
      two-step traffic; module docstring). This changes results. On an NCCL group it
      runs the Triton quantize / dequantize-and-sum kernels around NCCL's all-gather
      (kernels/backends.py ``OneShotKernelsBackend``, same bits); elsewhere, and with
      ``path=two-step``, the portable torch path.
    * ``budget`` (the klt codecs only): ``site`` (default) spends ``kltN``'s N + 1/4 bits
      per value at every site; ``model`` spends them on average over all the sites that
      use that codec, each site getting the share that removes the most loss (Fisher-
      weighted error, from the calibration tables: comm/transform.py ``model_budgets``).
      Messages then differ in size between sites; the run's mean bits per value stays
      within N + 1/4. Needs a calibration file with loss scales (written since
      2026-11-30's fourth session).
    * ``calibration``: file for ``outlier-int4`` and the ``weighted-`` and ``klt`` codecs
      (see comm/outlier.py, comm/weighting.py, comm/transform.py).
    """

    codec: Optional[str] = None
    overrides: List[Tuple[str, str]] = field(default_factory=list)
    min_bytes: int = 0
    calibration: Optional[str] = None
    num_layers: Optional[int] = None
    path: str = "auto"
    algo: str = "two-step"
    budget: str = "site"

    def __post_init__(self):
        # Validate everything now: a typo must fail before any compute.
        if self.codec is not None:
            self.codec = _canonical(self.codec)
        self.overrides = [(str(p), _canonical(c) or NATIVE) for p, c in self.overrides]
        if int(self.min_bytes) < 0:
            raise CodecError(f"min_bytes must be >= 0, got {self.min_bytes}")
        self.min_bytes = int(self.min_bytes)
        if self.path not in PATHS:
            raise CodecError(f"path={self.path!r}: expected one of {', '.join(PATHS)}")
        if self.algo not in ALGOS:
            raise CodecError(f"algo={self.algo!r}: expected one of {', '.join(ALGOS)}")
        specs = [self.codec] + [c for _, c in self.overrides]
        if self.algo == "one-shot" and self.path == "fused":
            raise CodecError("path=fused runs the fused two-shot kernel (algo=two-step); "
                             "algo=one-shot takes path=auto or path=two-step")
        if self.algo == "one-shot":
            for s in specs:
                _check_one_stage(s)
        has_klt = any(s and s.startswith("klt") for s in specs)
        if self.algo != "one-shot" and has_klt:
            raise CodecError("the klt codecs code each rank's partial in its own basis: "
                             "they need algo=one-shot")
        if self.budget not in BUDGETS:
            raise CodecError(f"budget={self.budget!r}: expected one of {', '.join(BUDGETS)}")
        if self.budget == "model" and not has_klt:
            raise CodecError("budget=model shares the bits of a klt codec between sites: "
                             "it needs a klt codec")
        for pre in CALIBRATED:
            if any(s and s.startswith(pre) for s in specs) and not self.calibration:
                raise CodecError(f"{pre.rstrip('-')} needs a calibration file "
                                 "(--calibration FILE)")
        self._codecs = {}
        self._calib = None
        self._budgets: Dict[str, Dict[str, float]] = {}    # klt spec -> site -> budget

    @classmethod
    def from_spec(cls, spec: Optional[str], calibration: Optional[str] = None,
                  num_layers: Optional[int] = None) -> "CommConfig":
        """Parse the ``--comm`` syntax (see :func:`parse_comm_arg`)."""
        return parse_comm_arg(spec, calibration=calibration, num_layers=num_layers)

    def spec_for(self, site: Optional[str]) -> Optional[str]:
        """Canonical codec spec for a site, or None for the native all-reduce."""
        if site is None:
            return None
        if self.num_layers is None and any(re.search(r"layers\.-\d", p) for p, _ in
                                           self.overrides):
            raise CodecError("comm override with a negative layer index needs num_layers "
                             "(build_communicator(..., num_layers=N))")
        names = [site]
        m = re.match(r"^layers\.(\d+)\.(.*)$", site)
        if m and self.num_layers:
            names.append(f"layers.{int(m.group(1)) - self.num_layers}.{m.group(2)}")
        for pattern, spec in self.overrides:
            if any(fnmatch.fnmatchcase(nm, pattern) for nm in names):
                return None if spec == NATIVE else spec
        if site == EMBED_SITE:
            return None
        return self.codec

    def codec_for(self, site: Optional[str]):
        """Codec object for a site (cached), or None for native."""
        spec = self.spec_for(site)
        if spec is None:
            return None
        per_site = spec.startswith(CALIBRATED)
        key = (spec, site) if per_site else (spec, None)
        if key not in self._codecs:
            if per_site:
                calib = self.calibration_data()
                budget = None
                if self.budget == "model" and spec.startswith("klt"):
                    budget = self.model_budgets(spec).get(site)
                self._codecs[key] = get_codec(spec, calib, site, budget=budget)
            else:
                self._codecs[key] = get_codec(spec)
        return self._codecs[key]

    def model_budgets(self, spec: str) -> Dict[str, float]:
        """``budget=model``: bits per value of every calibrated site that uses the klt
        codec ``spec`` (cached; the same on every rank, a pure function of the file)."""
        if spec not in self._budgets:
            from megatron_lite.comm.outlier import CalibrationError
            from megatron_lite.comm.transform import model_budgets
            calib = self.calibration_data()
            cs = parse_codec_spec(spec)
            tables = {}
            for site in calib.sites:
                if site == EMBED_SITE or self.spec_for(site) != spec:
                    continue
                sc = calib.site(site)
                if sc.klt_loss_scale is None or cs.group_size not in sc.klt_errors:
                    raise CalibrationError(
                        f"budget=model needs the klt tables for group size {cs.group_size} "
                        f"and loss scales at site {site!r}: rerun tools/calibrate.py "
                        "--transform")
                tables[site] = (sc.klt_errors[cs.group_size], sc.klt_loss_scale)
            self._budgets[spec] = model_budgets(tables, cs.group_size,
                                                codec_bits(spec))
        return self._budgets[spec]

    def calibration_data(self):
        """The loaded calibration (None if the config needs none)."""
        if self.calibration and self._calib is None:
            from megatron_lite.comm.outlier import load_calibration
            self._calib = load_calibration(self.calibration)
        return self._calib

    def __str__(self) -> str:
        items = [self.codec or NATIVE]
        items += [f"{p}={c}" for p, c in self.overrides]
        if self.min_bytes:
            items.append(f"min_bytes={self.min_bytes}")
        if self.path != "auto":
            items.append(f"path={self.path}")
        if self.algo != "two-step":
            items.append(f"algo={self.algo}")
        if self.budget != "site":
            items.append(f"budget={self.budget}")
        return ",".join(items)


def _canonical(spec: Optional[str]) -> Optional[str]:
    if spec is None or str(spec).strip().lower() in (NATIVE, "none"):
        return None
    return str(parse_codec_spec(spec))


_SIZE_RE = re.compile(r"^(\d+)\s*(|b|k|kb|kib|m|mb|mib)$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 2 ** 20, "mb": 2 ** 20,
              "mib": 2 ** 20}


def _parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise CodecError(f"bad size {text!r}: expected e.g. 65536, 64KiB or 1MiB")
    return int(m.group(1)) * _SIZE_MULT[m.group(2).lower()]


def parse_comm_arg(spec: Optional[str], calibration: Optional[str] = None,
                   num_layers: Optional[int] = None) -> CommConfig:
    """Parse a ``--comm`` value into a :class:`CommConfig`.

    Syntax: comma-separated items; the first is the default codec ``CODEC[:GROUP]`` (or
    ``native``); later items are ``GLOB=CODEC`` overrides (first match wins) or
    ``min_bytes=SIZE``, ``path=auto|fused|two-step``, ``algo=two-step|one-shot`` or
    ``budget=site|model`` (see :class:`CommConfig`). Examples::

        int4:128
        int4:128,layers.0.*=int8,layers.-1.*=int8      # first and last layer at int8
        int4,*.o_proj=int8:64,min_bytes=256KiB
        native,embed_tokens=int8                       # only the embedding reduce
        weighted-hadamard-int8:128,path=fused          # always compressed on GPU
        ef+weighted-hadamard-int4:128,algo=one-shot    # one quantization per value
        klt4:64,algo=one-shot,budget=model             # (with calibration=FILE)
        outlier-int4    (with calibration=FILE)
    """
    if spec is None or isinstance(spec, CommConfig):
        return spec if spec is not None else CommConfig(calibration=calibration,
                                                        num_layers=num_layers)
    items = [s.strip() for s in str(spec).split(",")]
    if not items[0] or "=" in items[0]:
        raise CodecError(f"bad --comm {spec!r}: it must start with a codec, e.g. int4:128")
    overrides, min_bytes, path, algo, budget = [], 0, "auto", "two-step", "site"
    for item in items[1:]:
        if "=" not in item:
            raise CodecError(f"bad --comm item {item!r}: expected GLOB=CODEC, min_bytes=SIZE, "
                             "path=PATH, algo=ALGO or budget=site|model")
        key, val = (t.strip() for t in item.split("=", 1))
        if key == "min_bytes":
            min_bytes = _parse_size(val)
        elif key == "path":
            path = val.lower()
        elif key == "algo":
            algo = val.lower()
        elif key == "budget":
            budget = val.lower()
        elif not key:
            raise CodecError(f"bad --comm item {item!r}: empty site pattern")
        else:
            overrides.append((key, val))
    return CommConfig(codec=items[0], overrides=overrides, min_bytes=min_bytes,
                      calibration=calibration, num_layers=num_layers, path=path, algo=algo,
                      budget=budget)


# ----------------------------------------------------------------------------- communicator
class QuantizedCommunicator(WrappingCommunicator):
    """``all_reduce(x, site)`` through the codec that ``config`` assigns to ``site``.

    Native (uncompressed) calls, all_gather and the primitives go to ``base``. Every rank
    must hold the same config, so they all pick the same codec and backend.
    """

    def __init__(self, base: Communicator, config: CommConfig,
                 backends: Optional[List[Backend]] = None, hf_config: Optional[dict] = None):
        super().__init__(base)
        self.config = config
        self.backends: List[Backend] = list(backends) if backends else [TwoStepBackend()]
        calib = config.calibration_data()
        if calib is not None:
            calib.check(tp=base.world_size, hf_config=hf_config)

    def add_backend(self, backend: Backend, first: bool = True) -> None:
        self.backends.insert(0 if first else len(self.backends), backend)

    def choose(self, x: torch.Tensor, site: Optional[str] = None):
        """``(backend, codec, why)`` for a call: backend and codec are None where the sum
        stays native (no codec for the site, or below ``min_bytes``); raises CodecError
        when no backend in the chain takes the call."""
        codec = self.config.codec_for(site)
        if codec is None:
            return None, None, "native: no codec for this site"
        nbytes = x.numel() * x.element_size()
        if nbytes < self.config.min_bytes:
            return None, None, f"native: {nbytes} B < min_bytes {self.config.min_bytes}"
        reasons = []
        for b in self.backends:
            why = b.unsupported(x, codec, self)
            if why is None:
                return b, codec, (b.label(self) if hasattr(b, "label") else b.name)
            reasons.append(f"{b.name}: {why}")
        raise CodecError(f"no backend can all-reduce {tuple(x.shape)} {x.dtype} at site "
                         f"{site!r} with {codec.spec}: " + "; ".join(reasons))

    def explain(self, x: torch.Tensor, site: Optional[str] = None) -> str:
        """Which backend/codec a call would use, and why (for logs and debugging)."""
        _, codec, why = self.choose(x, site)
        return why if codec is None else f"{why} with {codec.spec}"

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        if self.world_size == 1:
            return x
        backend, codec, _ = self.choose(x, site)
        if backend is None:
            return self.base.all_reduce(x, site)
        return backend.all_reduce(x, codec, self)


def build_communicator(base: Communicator, comm=None, calibration: Optional[str] = None,
                       num_layers: Optional[int] = None, hf_config: Optional[dict] = None
                       ) -> Communicator:
    """Wrap ``base`` for a comm setting: None / "native" -> ``base`` unchanged; a spec
    string (``--comm`` syntax) or a CommConfig -> a QuantizedCommunicator.

    ``num_layers`` enables ``layers.-1.*`` patterns; ``hf_config`` (the model's config
    dict) lets an outlier calibration file be checked against the model.

    ``ef+SPEC``: SPEC's communicator wrapped in error feedback (comm/feedback.py), which
    runs the portable path of SPEC's algorithm, or the one-shot kernels on an NCCL group.
    On a sandwich-norm model the caller hands it the post-norm gains
    (``set_post_norms``; the Engine does).
    """
    from megatron_lite.comm.feedback import PREFIX as EF, ErrorFeedbackCommunicator
    if isinstance(comm, str) and comm.strip().lower().startswith(EF):
        inner = build_communicator(base, comm.strip()[len(EF):], calibration, num_layers,
                                   hf_config)
        if inner is base:
            raise CodecError(f"--comm {comm!r}: error feedback needs a quantizing codec")
        return ErrorFeedbackCommunicator(inner)
    if isinstance(comm, str) and comm.split(",")[0].strip().lower() == "auto":
        # "auto": no compression (the bf16 codec), served by the fused size chooser
        comm = "bf16" + comm.strip()[4:]
    if isinstance(comm, CommConfig):
        cfg = comm
        if num_layers is not None and cfg.num_layers is None:
            cfg.num_layers = num_layers
    else:
        cfg = parse_comm_arg(comm, calibration=calibration, num_layers=num_layers)
    if cfg.codec is None and not cfg.overrides:
        return base
    qc = QuantizedCommunicator(base, cfg, hf_config=hf_config)
    _install_fused(qc)
    return qc


def _install_fused(qc: QuantizedCommunicator) -> None:
    """Put megatron_lite.kernels' ``auto`` backend (one-shot bf16 / NCCL / fused two-shot
    by measured size thresholds) and the one-shot kernels backend (``algo=one-shot``) in
    front of the chain when the base is an NCCL group.
    Collective: every rank builds its communicator at the same point. Without triton,
    symmetric memory or P2P the chain stays as it is (``explain`` says why)."""
    import torch.distributed as dist
    from megatron_lite.comm.communicator import DistCommunicator
    if not isinstance(qc.base, DistCommunicator) or not dist.is_initialized():
        return
    if dist.get_backend(qc.base.process_group) != "nccl":
        return
    try:
        from megatron_lite.kernels.backends import install_fused
    except ImportError:
        return
    install_fused(qc)


