"""``outlier-int4``: static outlier channels in bf16, the rest int4 (Dong et al., arXiv
2411.07942), as a two-step all-reduce scheme, plus the calibration file it reads.

Channels. A message is ``[..., H]`` (H = hidden size); its T = numel / H rows are tokens,
and channel = index % H. The calibration names, per site, ``k_eff = W * kw`` outlier
channels (k rounded up to a multiple of the TP size W, so every rank's chunk holds the
same number). With ``nn = H/W - kw`` normal channels per chunk, a static permutation
gives chunk j the channels::

    perm[j*H/W : (j+1)*H/W] = normal[j*nn : (j+1)*nn] ++ outlier[j*kw : (j+1)*kw]

(``normal`` and ``outlier`` each ascending). The two-step all-reduce moves chunk j of
every token to rank j, so each chunk knows its channels, and all chunks have equal size.

Chunk byte layout (chunk j, T tokens, values token-major; P = T*nn rounded up to a
multiple of 32 (static) or of G (dynamic), zero-padded)::

    static  (outlier-int4):    [P/2 bytes int4 codes][T*kw bf16 outlier values]
    dynamic (outlier-int4:G):  [int4-sym:G encoding of the P normal values
                                (codecs.py layout: P/2 code bytes, P/G bf16 bounds)]
                               [T*kw bf16 outlier values]

Static codes: value ``t*nn + i`` is token t, i-th normal channel of the chunk, packed like
int4 (low nibble first), offset binary ``q + 8``, ``q = clamp(rint(x * fl(1/s_c)), -7, 7)``
with the calibrated step ``s_c`` (fp32; ``1/s_c`` taken as 0 when ``s_c == 0``); decode
``q * s_c``. Code 0 (q = -8, never produced for finite x) marks a non-finite input and
decodes to NaN; outlier channels carry NaN/Inf through bf16 unchanged. Steps differ per
stage: the reduce-scatter encodes rank r's partial sums with ``rs_scale[r, c]``, the
all-gather encodes the reduced sums with ``ag_scale[c]``.

Bits per value, all on-the-wire bytes counted (indices and static scales travel in the
calibration file, not on the wire, as in the paper): static ``4 + 12*kw/(H/W)``, which
is 4.1875 at k = H/64; dynamic ``(4 + 16/G)*nn/(H/W) + 16*kw/(H/W)``; plus the padding
of the normal stream to P values.

Calibration file: safetensors with tensors ``{site}.outlier_idx`` (int32 [k_eff],
ascending), ``{site}.rs_scale`` (fp32 [W, H]), ``{site}.ag_scale`` (fp32 [H]) and a
metadata entry ``megatron_lite`` holding JSON: ``{"format": "megatron_lite.calibration",
"version": 1, "model": str, "fingerprint": str, "tp": W, "hidden": H, "k": k,
"k_per_rank": kw, "sites": [...], ...}``. Optional, for the ``weighted-`` codecs
(comm/weighting.py): ``{site}.channel_scale`` (fp32 [H], finite, positive) and a metadata
entry ``"channel_scales": {"exponents": [a, b], "num_seqs": n, "tokens": t}``; files
without them still load (only ``weighted-`` codecs then refuse them). Optional, for the
``klt`` codecs (comm/transform.py): ``{site}.klt_weight`` (fp32 [H], positive),
``{site}.klt_basis`` (fp32 [W, H, H]) and ``{site}.klt_errors_g{G}`` (fp32 [W, H/G, 9],
one per group size), ``{site}.klt_loss_scale`` (float64 [1], positive; what ``budget=model``
needs; files from before 2026-11-30's fourth session lack it) and a metadata entry
``"transform": {"num_seqs": n, ...}``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from megatron_lite.comm.codecs import (BF16_MAX, CodecError, CodecSpec, GroupCodec,
                                       pack_bits, saturate, unpack_bits)
from megatron_lite.errors import MegatronLiteError

CALIB_FORMAT = "megatron_lite.calibration"
CALIB_VERSION = 1
_META_KEY = "megatron_lite"
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "vocab_size")


class CalibrationError(MegatronLiteError, ValueError):
    """Calibration file missing, corrupt, or made for another model / TP size."""


def model_fingerprint(hf_config: dict) -> str:
    """Short hash of the architecture fields of an HF config (text_config if nested)."""
    cfg = hf_config.get("text_config") or hf_config
    blob = json.dumps({k: cfg.get(k, hf_config.get(k)) for k in _FINGERPRINT_KEYS},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SiteCalibration:
    outlier_idx: torch.Tensor   # int64 [k_eff], ascending
    rs_scale: torch.Tensor      # fp32 [W, H]: static step of rank r's partial sums
    ag_scale: torch.Tensor      # fp32 [H]: static step of the reduced sums
    channel_scale: Optional[torch.Tensor] = None   # fp32 [H]: weighted- codecs' scales
    klt_weight: Optional[torch.Tensor] = None      # fp32 [H]: klt codecs' weight d
    klt_basis: Optional[torch.Tensor] = None       # fp32 [W, H, H]: per-rank bases
    klt_errors: Dict[int, torch.Tensor] = field(default_factory=dict)  # G -> [W, H/G, 9]
    klt_loss_scale: Optional[float] = None         # tables -> Fisher-weighted (loss) units


class Calibration:
    """Outlier channels and static scales for every row-parallel site, at one TP size."""

    def __init__(self, meta: dict, sites: Dict[str, SiteCalibration]):
        self.meta, self.sites = meta, sites
        self.tp, self.hidden = int(meta["tp"]), int(meta["hidden"])
        self.k_per_rank = int(meta["k_per_rank"])

    def check(self, tp: Optional[int] = None, hf_config: Optional[dict] = None) -> None:
        """Raise CalibrationError unless this file fits the TP size and model."""
        if tp is not None and tp != self.tp:
            raise CalibrationError(f"calibration was made for TP {self.tp}, but this run has "
                                   f"TP {tp}; rerun tools/calibrate.py with --tp {tp}")
        if hf_config is not None:
            fp = model_fingerprint(hf_config)
            if fp != self.meta.get("fingerprint"):
                raise CalibrationError(f"calibration was made for model "
                                       f"{self.meta.get('model')!r} (fingerprint "
                                       f"{self.meta.get('fingerprint')}), not this one ({fp})")

    def site(self, name: str) -> SiteCalibration:
        if name not in self.sites:
            raise CalibrationError(f"calibration has no site {name!r} (it has "
                                   f"{len(self.sites)} sites, e.g. {next(iter(self.sites), '-')})")
        return self.sites[name]

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename)."""
        from safetensors.torch import save_file
        tensors = {}
        for name, sc in self.sites.items():
            tensors[f"{name}.outlier_idx"] = sc.outlier_idx.to(torch.int32).contiguous()
            tensors[f"{name}.rs_scale"] = sc.rs_scale.float().contiguous()
            tensors[f"{name}.ag_scale"] = sc.ag_scale.float().contiguous()
            if sc.channel_scale is not None:
                tensors[f"{name}.channel_scale"] = sc.channel_scale.float().contiguous()
            if sc.klt_basis is not None:
                if sc.klt_weight is None or not sc.klt_errors:
                    raise CalibrationError(f"site {name!r}: klt tables incomplete (a basis "
                                           "needs its weight and error tables)")
                tensors[f"{name}.klt_weight"] = sc.klt_weight.float().contiguous()
                tensors[f"{name}.klt_basis"] = sc.klt_basis.float().contiguous()
                for g, t in sc.klt_errors.items():
                    tensors[f"{name}.klt_errors_g{g}"] = t.float().contiguous()
                if sc.klt_loss_scale is not None:
                    tensors[f"{name}.klt_loss_scale"] = torch.tensor(
                        [float(sc.klt_loss_scale)], dtype=torch.float64)
        meta = dict(self.meta, format=CALIB_FORMAT, version=CALIB_VERSION,
                    sites=sorted(self.sites))
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".tmp", dir=d)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def load_calibration(path) -> Calibration:
    """Read and validate a calibration file (shapes, index ranges, balance)."""
    if isinstance(path, Calibration):
        return path
    from safetensors import safe_open
    if not path or not os.path.isfile(path):
        raise CalibrationError(f"calibration file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CalibrationError(f"{path} is not a megatron_lite calibration file "
                               f"({type(exc).__name__}: {exc})") from None
    if meta.get("format") != CALIB_FORMAT or int(meta.get("version", -1)) != CALIB_VERSION:
        raise CalibrationError(f"{path}: unsupported calibration format "
                               f"{meta.get('format')!r} version {meta.get('version')!r}")
    w, h, kw = int(meta["tp"]), int(meta["hidden"]), int(meta["k_per_rank"])
    sites = {}
    for name in meta["sites"]:
        try:
            sc = SiteCalibration(tensors[f"{name}.outlier_idx"].long(),
                                 tensors[f"{name}.rs_scale"].float(),
                                 tensors[f"{name}.ag_scale"].float(),
                                 tensors.get(f"{name}.channel_scale"))
        except KeyError as exc:
            raise CalibrationError(f"{path}: site {name!r} lacks tensor {exc}") from None
        idx = sc.outlier_idx
        ok = (idx.numel() == w * kw and tuple(sc.rs_scale.shape) == (w, h)
              and tuple(sc.ag_scale.shape) == (h,) and bool((idx >= 0).all())
              and bool((idx < h).all()) and bool((idx[1:] > idx[:-1]).all())
              and bool((sc.rs_scale >= 0).all()) and bool((sc.ag_scale >= 0).all()))
        cs = sc.channel_scale
        if cs is not None:
            cs = sc.channel_scale = cs.float()
            ok = ok and tuple(cs.shape) == (h,) and bool(torch.isfinite(cs).all()) and bool(
                (cs > 0).all())
        if f"{name}.klt_basis" in tensors:
            _load_klt(path, name, tensors, sc, w, h)
        if not ok:
            raise CalibrationError(f"{path}: site {name!r} has inconsistent shapes or indices "
                                   f"(tp {w}, hidden {h}, k_per_rank {kw})")
        sites[name] = sc
    return Calibration(meta, sites)


def _load_klt(path, name: str, tensors: dict, sc: SiteCalibration, w: int, h: int) -> None:
    """The klt tables of one site (comm/transform.py), checked: weight finite and positive,
    basis finite, one error table per group size that divides H, finite, non-negative."""
    from megatron_lite.comm.codecs import GROUP_SIZES
    weight, basis = tensors.get(f"{name}.klt_weight"), tensors[f"{name}.klt_basis"].float()
    errors, why = {}, None
    pre = f"{name}.klt_errors_g"
    for k, v in tensors.items():
        if k.startswith(pre):
            g = k[len(pre):]
            if not g.isdigit() or int(g) not in GROUP_SIZES or h % int(g):
                why = f"error table {k!r} names no group size that divides hidden {h}"
                break
            errors[int(g)] = v.float()
    if why is None and (weight is None or tuple(weight.shape) != (h,)
                        or not bool(torch.isfinite(weight).all()) or not bool((weight > 0).all())):
        why = "klt_weight is missing or not a finite positive [hidden] vector"
    if why is None and (tuple(basis.shape) != (w, h, h) or not bool(torch.isfinite(basis).all())):
        why = f"klt_basis is not a finite [{w}, {h}, {h}] tensor"
    if why is None and not errors:
        why = "klt tables incomplete: no error table"
    if why is None:
        for g, t in errors.items():
            if tuple(t.shape) != (w, h // g, 9) or not bool(torch.isfinite(t).all()) or bool(
                    (t < 0).any()):
                why = f"klt error table for group size {g} is not finite, non-negative [{w}, {h // g}, 9]"
                break
    scale = tensors.get(f"{name}.klt_loss_scale")
    if why is None and scale is not None and (
            tuple(scale.shape) != (1,) or not math.isfinite(float(scale[0]))
            or not float(scale[0]) > 0):
        why = "klt_loss_scale is not one finite positive number"
    if why is not None:
        raise CalibrationError(f"{path}: site {name!r}: {why}")
    sc.klt_weight, sc.klt_basis, sc.klt_errors = weight.float(), basis, errors
    sc.klt_loss_scale = None if scale is None else float(scale[0])


def balanced_k(k: int, hidden: int, tp: int) -> int:
    """Outliers per rank: ceil(k / tp), so every chunk has the same size."""
    if hidden % tp:
        raise CalibrationError(f"hidden size {hidden} is not divisible by TP {tp}")
    kw = -(-max(int(k), 0) // tp)
    if kw >= hidden // tp:
        raise CalibrationError(f"k={k} leaves no int4 channels at hidden {hidden}, TP {tp}")
    return kw


def build_calibration(stats: Dict[str, dict], k: int, tp: int, model: str,
                      fingerprint: str, extra: Optional[dict] = None) -> Calibration:
    """Outlier choice and static steps from per-channel statistics.

    ``stats[site]`` holds EMA ranges: ``rs_min``/``rs_max`` (fp32 [W, H], rank r's partial
    sums) and ``ag_min``/``ag_max`` (fp32 [H], reduced sums). The ``W*ceil(k/W)`` channels
    with the widest partial-sum range (max over ranks) become outliers; every other
    channel gets the symmetric int4 step ``max(|min|, |max|) / 7``.
    """
    sites, hidden, kw = {}, None, None
    for name, st in stats.items():
        rs_min, rs_max = st["rs_min"].float(), st["rs_max"].float()
        ag_min, ag_max = st["ag_min"].float(), st["ag_max"].float()
        w, h = rs_min.shape
        if w != tp:
            raise CalibrationError(f"site {name}: statistics for {w} ranks, expected TP {tp}")
        hidden = h
        kw = balanced_k(k, h, tp)
        width = (rs_max - rs_min).amax(0)
        # Ties broken by channel index (stable) so the choice is reproducible.
        order = torch.sort(width, descending=True, stable=True).indices
        idx = torch.sort(order[: tp * kw]).values
        rs_scale = torch.maximum(rs_min.abs(), rs_max.abs()) / 7.0
        ag_scale = torch.maximum(ag_min.abs(), ag_max.abs()) / 7.0
        sites[name] = SiteCalibration(idx, rs_scale, ag_scale)
    meta = dict(extra or {}, model=model, fingerprint=fingerprint, tp=tp, hidden=hidden, k=k,
                k_per_rank=kw)
    return Calibration(meta, sites)


# ----------------------------------------------------------------------------- the scheme
def nominal_bits(cs: CodecSpec, k_ratio: float = 1 / 64, tp: int = 1) -> float:
    """bits/value at k = k_ratio * hidden with no padding (the figure quoted in tables)."""
    kw_frac = k_ratio
    if cs.group_size is None:
        return 4.0 + 12.0 * kw_frac
    return (4.0 + 16.0 / cs.group_size) * (1 - kw_frac) + 16.0 * kw_frac


class OutlierCodec:
    """Two-step scheme for one site: chunk by permuted channels, int4 + bf16 outliers."""

    def __init__(self, cs: CodecSpec, calib: Calibration, site: str):
        sc = calib.site(site)
        self.spec, self.site, self.calib = str(cs), site, calib
        self.name, self.group_size = cs.name, cs.group_size
        self.tp, self.hidden, self.kw = calib.tp, calib.hidden, calib.k_per_rank
        self.hw = self.hidden // self.tp
        self.nn = self.hw - self.kw
        is_out = torch.zeros(self.hidden, dtype=torch.bool)
        is_out[sc.outlier_idx] = True
        normal = torch.nonzero(~is_out).flatten()
        outl = sc.outlier_idx
        self.perm = torch.cat([torch.cat([normal[j * self.nn:(j + 1) * self.nn],
                                          outl[j * self.kw:(j + 1) * self.kw]])
                               for j in range(self.tp)])
        # Static steps per chunk in the chunk's channel order (normal channels only).
        pc = self.perm.view(self.tp, self.hw)[:, : self.nn]
        # rs_step[src, chunk, i], ag_step[chunk, i]
        self.rs_step = torch.stack([sc.rs_scale[r][pc] for r in range(self.tp)])
        self.ag_step = sc.ag_scale[pc]
        self.dyn = None if cs.group_size is None else GroupCodec("int4-sym", 4, "sym",
                                                                 cs.group_size)
        self.pad_to = 32 if self.dyn is None else cs.group_size
        self.bits_per_value = (nominal_bits(cs, self.kw / self.hw))

    # -- chunking ----------------------------------------------------------------------
    def chunk(self, x: torch.Tensor, world_size: int):
        if world_size != self.tp:
            raise CodecError(f"outlier-int4 calibration is for TP {self.tp}, not {world_size}")
        if x.shape[-1] != self.hidden:
            raise CodecError(f"outlier-int4 at {self.site}: message last dim {x.shape[-1]} "
                             f"!= calibrated hidden size {self.hidden}")
        shape, t = x.shape, x.numel() // self.hidden
        perm = self.perm.to(x.device)
        xp = x.reshape(t, self.hidden).index_select(1, perm)
        chunks = xp.view(t, self.tp, self.hw).transpose(0, 1).reshape(self.tp, t * self.hw)

        def restore(y: torch.Tensor) -> torch.Tensor:
            yp = y.view(self.tp, t, self.hw).transpose(0, 1).reshape(t, self.hidden)
            out = torch.empty_like(yp)
            out[:, perm] = yp
            return out.reshape(shape)
        return chunks, restore

    # -- one chunk -----------------------------------------------------------------------
    def _npad(self, t: int) -> int:
        return -(-t * self.nn // self.pad_to) * self.pad_to

    def chunk_nbytes(self, n: int) -> int:
        t = n // self.hw
        p = self._npad(t)
        body = p // 2 if self.dyn is None else self.dyn.encoded_nbytes(p)
        return body + 2 * t * self.kw

    def encode_chunk(self, xc: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One chunk ``[T*hw]`` (channel-permuted) -> bytes; ``step`` [nn] static steps."""
        t = xc.numel() // self.hw
        x = xc.float().view(t, self.hw)
        normal, outl = x[:, : self.nn], x[:, self.nn:]
        p = self._npad(t)
        flat = torch.zeros(p, dtype=torch.float32, device=x.device)
        if self.dyn is not None:
            flat[: t * self.nn] = normal.reshape(-1)
            body = self.dyn.encode(flat)
        else:
            step = step.to(x.device)
            rinv = torch.where(step > 0, torch.ones_like(step)
                               / torch.where(step > 0, step, torch.ones_like(step)),
                               torch.zeros_like(step))
            q = torch.round(normal * rinv).clamp(-7, 7) + 8
            q = torch.where(normal.abs() <= BF16_MAX, q, torch.zeros_like(q))  # 0 = NaN mark
            codes = torch.zeros(p, dtype=torch.int32, device=x.device)
            codes[: t * self.nn] = q.reshape(-1).to(torch.int32)
            body = pack_bits(codes, 4)
        tail = outl.reshape(-1).to(torch.bfloat16).view(torch.uint8)
        return torch.cat([body, tail])

    def decode_chunk(self, buf: torch.Tensor, n: int, step: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
        t = n // self.hw
        p = self._npad(t)
        nbody = self.chunk_nbytes(n) - 2 * t * self.kw
        if self.dyn is not None:
            normal = self.dyn.decode(buf[:nbody], p, torch.float32)[: t * self.nn]
        else:
            codes = unpack_bits(buf[:nbody], 4, p)[: t * self.nn].view(t, self.nn)
            normal = (codes - 8).float() * step.to(buf.device)
            normal = torch.where(codes == 0, torch.full_like(normal, math.nan), normal)
        outl = buf[nbody:].contiguous().view(torch.bfloat16).float()
        y = torch.cat([normal.reshape(t, self.nn), outl.view(t, self.kw)], 1)
        # Only bf16 outlier values can be Inf here (int4 codes decode to finite or NaN).
        return saturate(y.reshape(-1), out_dtype, keep_inf=True)

    def chunk_error_bound(self, xc: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Per-element bound on |decode(encode(xc)) - xc| (fp32 output)."""
        t = xc.numel() // self.hw
        x = xc.float().view(t, self.hw)
        normal, outl = x[:, : self.nn], x[:, self.nn:]
        if self.dyn is not None:
            p = self._npad(t)
            flat = torch.zeros(p, dtype=torch.float32, device=x.device)
            flat[: t * self.nn] = normal.reshape(-1)
            eb_n = self.dyn.error_bound(flat)[: t * self.nn].view(t, self.nn)
        else:
            s = step.to(x.device)
            clip = (normal.abs() - 7 * s).clamp(min=0)
            eb_n = torch.maximum(s * (0.5 + 2.0 ** -10), clip + s * 2.0 ** -10)
            eb_n = eb_n + normal.abs() * 2.0 ** -22 + 2.0 ** -148
            eb_n = torch.where(normal.abs() <= BF16_MAX, eb_n, torch.full_like(eb_n, math.inf))
        eb_o = outl.abs() * 2.0 ** -8 + 2.0 ** -134
        eb_o = torch.where(outl.abs() <= BF16_MAX, eb_o, torch.full_like(eb_o, math.inf))
        return torch.cat([eb_n, eb_o], 1).reshape(-1)

    # -- two-step scheme interface (see comm/allreduce.py) -------------------------------
    def rs_encode(self, chunks, src):
        return torch.stack([self.encode_chunk(chunks[j], self.rs_step[src, j])
                            for j in range(self.tp)])

    def rs_decode(self, recv, chunk_id, c):
        return torch.stack([self.decode_chunk(recv[r], c, self.rs_step[r, chunk_id], torch.float32)
                            for r in range(self.tp)])

    def ag_encode(self, acc, chunk_id):
        return self.encode_chunk(acc, self.ag_step[chunk_id])

    def ag_decode(self, gathered, c, out_dtype):
        return torch.stack([self.decode_chunk(gathered[j], c, self.ag_step[j], out_dtype)
                            for j in range(self.tp)])

    def finish(self, acc, out_dtype):
        """One-shot output of the fp32 sums ``acc`` [W, c], saturated as ``decode_chunk``."""
        return saturate(acc, out_dtype, keep_inf=True)

    def rs_error_bound(self, chunks, src):
        return torch.stack([self.chunk_error_bound(chunks[j], self.rs_step[src, j])
                            for j in range(self.tp)])

    def ag_error_bound(self, acc, chunk_id):
        return self.chunk_error_bound(acc, self.ag_step[chunk_id])

    def __repr__(self) -> str:
        return f"<codec {self.spec} at {self.site}: {self.bits_per_value:.4g} bits/value>"


def outlier_codec(cs: CodecSpec, calibration, site: Optional[str]) -> OutlierCodec:
    if calibration is None or site is None:
        raise CodecError("outlier-int4 needs a calibration file and a site name "
                         "(--comm outlier-int4 --calibration FILE)")
    return OutlierCodec(cs, load_calibration(calibration), site)
