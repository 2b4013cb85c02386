"""The calibration file: per-site state of the calibrated codecs (outlier-int4, weighted-,
klt), written by ``tools/calibrate.py`` (megatron_lite/lab/calibration.py measures it)
and read once by the comm config. This module is its one definition.

Calibration file: safetensors with tensors ``{site}.outlier_idx`` (int32 [k_eff],
ascending), ``{site}.rs_scale`` (fp32 [W, H]), ``{site}.ag_scale`` (fp32 [H]) and a
metadata entry ``megatron_lite`` holding JSON: ``{"format": "megatron_lite.calibration",
"version": 1, "model": str, "fingerprint": str, "tp": W, "hidden": H, "k": k,
"k_per_rank": kw, "sites": [...], ...}``. Optional, for the ``weighted-`` codecs
(comm/codecs/weighted.py): ``{site}.channel_scale`` (fp32 [H], finite, positive) and a metadata
entry ``"channel_scales": {"exponents": [a, b], "num_seqs": n, "tokens": t}``; files
without them still load (only ``weighted-`` codecs then refuse them). Optional, for the
``klt`` codecs (comm/codecs/klt.py): ``{site}.klt_weight`` (fp32 [H], positive),
``{site}.klt_basis`` (fp32 [W, H, H]) and ``{site}.klt_errors_g{G}`` (fp32 [W, H/G, 9],
one per group size), ``{site}.klt_loss_scale`` (float64 [1], positive; what ``budget=model``
needs; older files lack it) and a metadata entry
``"transform": {"num_seqs": n, ...}``.

Every file is checked on load (shapes, index ranges, finite values) and against the run
(TP size, model fingerprint) before any compute; writes are atomic.
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
    """The klt tables of one site (comm/codecs/klt.py), checked: weight finite and positive,
    basis finite, one error table per group size that divides H, finite, non-negative."""
    # function-local: importing the codecs registers every family, and the calibrated
    # families import this module
    from megatron_lite.comm.codecs.base import GROUP_SIZES
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
