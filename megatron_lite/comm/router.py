"""The quantized communicator: which scheme and which backend carry each all-reduce.

``QuantizedCommunicator.all_reduce(x, site)`` looks up a cached plan for
``(site, shape, dtype, device)``: the site's scheme (from the CommSpec's codec and
overrides, built once per site) and the first backend of a flat chain that takes the
message (vLLM's communicator style: each backend says whether it can take a message and,
if not, why). A native site, or a message under ``min_bytes``, goes to the base
communicator uncompressed. Planning runs once per key; a call afterwards costs a dict
lookup before the backend runs (tools/bench_allreduce.py --host-overhead measures it).

The chain ends with :class:`PortableBackend` (comm/algorithms.py over the Communicator
primitives: any device, codec and float dtype; chunked so that coding overlaps the
exchange). On an NCCL group whose GPUs have peer access, comm/fused.py puts the kernel
backends in front of it (``install_fused``); comm/build.py assembles the whole.

An ``auto`` site (comm/spec.py) is served only by a backend that ``serves_auto`` (the
kernel chooser); where none takes it, by the base communicator's own all-reduce, never
by the portable bf16 two-step (that is what ``bf16`` asks for). ``explain`` prints the
plan, the transport (how it was found) and what the transport's table says
(kernels/thresholds.py; "unmeasured: falls back to ..." where no run measured it).

``all_reduce_add_rmsnorm`` (the sum followed by the residual add and RMSNorm,
comm/norm.py) runs as one kernel where the call's planned backend has one for the
message (``add_rmsnorm_unsupported`` is None: the one-shot paths over a P2P workspace,
comm/fused.py); everywhere else it is ``all_reduce`` plus torch ops.
"""
from __future__ import annotations

import fnmatch
import re
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_lite.comm.algorithms import Algo, in_pieces, quantized_all_reduce
from megatron_lite.comm.calibration import Calibration, load_calibration
from megatron_lite.comm.codecs import CodecError, CodecSpec, Scheme, get_scheme
from megatron_lite.comm.codecs.registry import entry
from megatron_lite.comm.communicator import Communicator, WrappingCommunicator
from megatron_lite.comm.norm import Layout, check_layout
from megatron_lite.comm.spec import AUTO, BF16, EMBED_SITE, Budget, CommSpec, Path
from megatron_lite.comm.transport import TransportInfo
from megatron_lite.kernels.thresholds import Table, table_for
from megatron_lite.lru import LruDict

# Plans kept per communicator (megatron_lite/lru.py): a model's sites times the message
# shapes in use; one forgotten is planned again on its next call (tens of microseconds).
PLAN_CACHE_SIZE = 4096
# Runners (Backend.runner) kept per communicator: each may hold a prepared kernel launch,
# so they are bounded like the kernel backends' own (comm/fused.py's LAUNCH_CACHE_SIZE).
RUN_CACHE_SIZE = 1024


class Backend:
    """One way to run a quantized all-reduce. ``unsupported`` returns None if the backend
    can take ``x`` with ``scheme``, else a short reason (shown by ``explain``).
    ``returns_error``: ``all_reduce_with_error`` also returns this rank's error part
    (error feedback uses such a backend where it takes the message)."""

    name = "backend"
    returns_error = False
    uses_kernels = False      # a kernel backend (comm/fused.py): install_fused replaces it
    serves_auto = False       # it may carry an ``auto`` site (the uncompressed paths only)
    fuses_add_rmsnorm = False  # may run all_reduce_add_rmsnorm as one kernel

    def unsupported(self, x: torch.Tensor, scheme: Scheme,
                    comm: "QuantizedCommunicator") -> Optional[str]:
        raise NotImplementedError

    def all_reduce(self, x: torch.Tensor, scheme: Scheme,
                   comm: "QuantizedCommunicator") -> torch.Tensor:
        raise NotImplementedError

    def runner(self, x: torch.Tensor, scheme: Scheme,
               comm: "QuantizedCommunicator") -> Callable[[torch.Tensor], torch.Tensor]:
        """The call of messages like ``x`` (shape, dtype, device) with ``scheme``, as one
        callable: ``runner(x, scheme, comm)(y)`` is ``all_reduce(y, scheme, comm)``. The
        router keeps one per kind of call, so that the kernel backends, whose runner is
        their prepared launch (comm/fused.py), spend no lookup of their own on an eager
        call."""
        # the communicator by weak reference: it keeps this runner, and a cycle would leave
        # it (and the workspace its backends hold) to the cycle collector
        ref = weakref.ref(comm)
        return lambda y: self.all_reduce(y, scheme, ref())

    def all_reduce_with_error(self, x, scheme, comm) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{self.name} does not return error parts")

    def describe(self, x: torch.Tensor, scheme: Scheme, comm: "QuantizedCommunicator") -> str:
        """What ``explain`` calls this backend's path for ``x``."""
        return self.name

    def add_rmsnorm_unsupported(self, x: torch.Tensor, scheme: Scheme,
                                comm: "QuantizedCommunicator") -> Optional[str]:
        """None if this backend, planned for ``x``, can also do the residual add and
        RMSNorm in its kernel (``all_reduce_add_rmsnorm``), else why not."""
        return f"{self.name} has no fused add + RMSNorm"

    def all_reduce_add_rmsnorm(self, x, scheme, comm, residual, norm_weight, eps, **norm):
        """``(residual', normed)`` of comm/norm.py in one kernel; ``norm``: the keyword
        arguments of ``Communicator.all_reduce_add_rmsnorm``."""
        raise NotImplementedError(f"{self.name} has no fused add + RMSNorm")


class PortableBackend(Backend):
    """The algorithms of comm/algorithms.py over the base communicator's primitives."""

    name = "portable"

    def unsupported(self, x, scheme, comm):
        if not x.is_floating_point():
            return f"dtype {x.dtype} is not floating point"
        return None

    def all_reduce(self, x, scheme, comm):
        return quantized_all_reduce(comm.base, x, scheme, comm.spec.algo,
                                    chunk_bytes=comm.spec.chunk_bytes)

    def describe(self, x, scheme, comm):
        return comm.spec.algo.value + in_pieces(x, scheme, comm.spec.chunk_bytes)


@dataclass(frozen=True)
class Plan:
    """How one kind of call runs: ``backend`` and ``scheme`` None where the sum stays
    native; ``why``: the explanation ``explain`` prints."""

    backend: Optional[Backend]
    scheme: Optional[Scheme]
    why: str


class SiteCodecs:
    """The scheme of every site under a CommSpec, each built once: the codec from the
    spec's overrides (first match wins) or its default, with the site's calibrated state.
    ``num_layers`` resolves negative layer indices in override globs."""

    def __init__(self, spec: CommSpec, num_layers: Optional[int] = None):
        self.spec, self.num_layers = spec, num_layers
        if num_layers is None and any(re.search(r"layers\.-\d", p) for p, _ in spec.overrides):
            raise CodecError("comm override with a negative layer index needs num_layers "
                             "(the model's layer count)")
        self.calibration: Optional[Calibration] = (
            load_calibration(spec.calibration) if spec.calibration else None)
        self._schemes: Dict[Optional[str], Optional[Scheme]] = {}
        self._budgets: Dict[CodecSpec, Dict[str, float]] = {}

    def codec_for(self, site: Optional[str]) -> Optional[CodecSpec]:
        """The codec the spec assigns to a site (None: native)."""
        if site is None:
            return None
        names = [site]
        m = re.match(r"^layers\.(\d+)\.(.*)$", site)
        if m and self.num_layers:
            names.append(f"layers.{int(m.group(1)) - self.num_layers}.{m.group(2)}")
        for pattern, codec in self.spec.overrides:
            if any(fnmatch.fnmatchcase(nm, pattern) for nm in names):
                return codec
        return None if site == EMBED_SITE else self.spec.codec

    def scheme_for(self, site: Optional[str]) -> Optional[Scheme]:
        """The site's scheme (calibrated codecs: with the site's state), or None; an
        ``auto`` site's is bf16 (what a kernel that carries it puts on the wire)."""
        if site not in self._schemes:
            cs = self.codec_for(site)
            cs = BF16 if cs == AUTO else cs
            scheme = None
            if cs is not None:
                budget = None
                if self.spec.budget == Budget.MODEL and entry(cs.name).model_budgets:
                    budget = self.model_budgets(cs).get(site)
                scheme = get_scheme(cs, self.calibration, site, budget=budget)
            self._schemes[site] = scheme
        return self._schemes[site]

    def model_budgets(self, cs: CodecSpec) -> Dict[str, float]:
        """``budget=model``: bits per value of every site that uses ``cs``, split by the
        codec's family over the model (the same on every rank: a pure function of the
        calibration file)."""
        if cs not in self._budgets:
            sites = [s for s in self.calibration.sites
                     if s != EMBED_SITE and self.codec_for(s) == cs]
            self._budgets[cs] = entry(cs.name).model_budgets(self.calibration, sites, cs)
        return self._budgets[cs]


class QuantizedCommunicator(WrappingCommunicator):
    """``all_reduce(x, site)`` through the scheme the spec assigns to ``site``.

    Native calls, ``all_gather`` and the primitives go to ``base``. Every rank holds the
    same spec, so every rank picks the same scheme and backend. ``num_layers`` resolves
    negative layer indices in override globs; ``hf_config`` (the model's config dict)
    lets a calibration file be checked against the model.
    """

    def __init__(self, base: Communicator, spec: CommSpec,
                 backends: Optional[List[Backend]] = None, num_layers: Optional[int] = None,
                 hf_config: Optional[dict] = None):
        super().__init__(base)
        self.spec = spec
        if spec.transport is not None:
            self.transport = TransportInfo(spec.transport, f"--comm transport="
                                           f"{spec.transport.value}; detected {base.transport}")
        self.sites = SiteCodecs(spec, num_layers)
        if self.sites.calibration is not None:
            self.sites.calibration.check(tp=base.world_size, hf_config=hf_config)
        self._plans = LruDict(PLAN_CACHE_SIZE)   # plans and the other per-call answers
        self._runs = LruDict(RUN_CACHE_SIZE)     # (site, shape, dtype, device) -> runner
        self._tables: Dict[torch.device, Table] = {}
        self.set_backends(list(backends) if backends else [PortableBackend()])

    def table(self, device: torch.device) -> Table:
        """The ``auto`` chooser's table of this transport, GPU kind and world size."""
        if device not in self._tables:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            self._tables[device] = table_for(self.transport.transport.value, name,
                                             self.world_size)
        return self._tables[device]

    # -- plans -----------------------------------------------------------------------
    def set_backends(self, backends: List[Backend]) -> None:
        self.backends = list(backends)
        self.fuses_add_rmsnorm = any(b.fuses_add_rmsnorm for b in self.backends)
        self._plans.clear()
        self._runs.clear()

    def plan(self, x: torch.Tensor, site: Optional[str] = None) -> Plan:
        """The cached plan of a call; raises CodecError when no backend takes it."""
        key = (site, x.shape, x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(x, site)
        return plan

    def _make_plan(self, x: torch.Tensor, site: Optional[str]) -> Plan:
        scheme = self.sites.scheme_for(site)
        if scheme is None:
            return Plan(None, None, "native: no codec for this site")
        nbytes = x.numel() * x.element_size()
        if nbytes < self.spec.min_bytes:
            return Plan(None, None, f"native: {nbytes} B < min_bytes {self.spec.min_bytes}")
        auto = self.sites.codec_for(site) == AUTO
        reasons = []
        for b in self.backends:
            why = b.unsupported(x, scheme, self)
            if why is None and auto and not b.serves_auto:
                why = "not for auto (the bf16 codec takes it)"
            if why is None:
                return Plan(b, scheme, b.describe(x, scheme, self))
            reasons.append(f"{b.name}: {why}")
        if auto:
            if self.table(x.device).entry is None:      # an unmeasured transport
                return Plan(None, None, "auto -> native")
            return Plan(None, None, "auto -> native, no kernel takes it (" +
                        "; ".join(reasons) + ")")
        raise CodecError(f"no backend can all-reduce {tuple(x.shape)} {x.dtype} at site "
                         f"{site!r} with {scheme.spec}: " + "; ".join(reasons))

    def error_backend(self, x: torch.Tensor, scheme: Scheme) -> Optional[Backend]:
        """The first backend that returns error parts and takes the message, or None
        (cached like the plans)."""
        key = ("error", id(scheme), x.shape, x.dtype, x.device)
        if key not in self._plans:
            self._plans[key] = next((b for b in self.backends if b.returns_error
                                     and b.unsupported(x, scheme, self) is None), None)
        return self._plans[key]

    def explain(self, x: torch.Tensor, site: Optional[str] = None) -> str:
        """Which backend and codec a call uses and why, over which transport (how it was
        found) and what the transport's table says for it (for logs and debugging)."""
        p = self.plan(x, site)
        text = p.why if p.scheme is None else f"{p.why} with {p.scheme.spec}"
        return f"{text}; transport {self.transport}" + self._table_clause(x, site)

    def _table_clause(self, x: torch.Tensor, site: Optional[str]) -> str:
        """What the size table says for this call, where the chooser runs (path=auto,
        two-step) on a site with a codec above min_bytes; '' elsewhere."""
        scheme = self.sites.scheme_for(site)
        nbytes = x.numel() * x.element_size()
        if (scheme is None or nbytes < self.spec.min_bytes or self.spec.path != Path.AUTO
                or self.spec.algo != Algo.TWO_STEP):
            return ""
        auto = self.sites.codec_for(site) == AUTO
        return "; " + self.table(x.device).explain(scheme.name, nbytes, auto)

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        if self.world_size == 1:
            return x
        return self.route(x, site)

    def route(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        """The planned call: ``all_reduce`` without its one-rank short cut (benchmarks
        time the launch path with it on one GPU; at one rank the sum is the codec's round
        trip)."""
        key = (site, x.shape, x.dtype, x.device)
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = self._make_run(x, site)
        return run(x)

    def _make_run(self, x: torch.Tensor, site: Optional[str]
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The planned call of messages like ``x`` at ``site`` as one callable (``route``
        keeps it, so that an eager call costs one lookup before the backend's launch)."""
        p = self.plan(x, site)
        if p.backend is None:
            base = self.base
            return lambda y: base.all_reduce(y, site)
        return p.backend.runner(x, p.scheme, self)

    # -- the sum with the residual add and RMSNorm -------------------------------------
    def add_rmsnorm_plan(self, x: torch.Tensor, site: Optional[str] = None
                         ) -> Tuple[Optional[Backend], str]:
        """``(backend, why)``: the planned backend of ``x`` where it also takes the add
        and the norm in its kernel, else None and why not (None for a native sum);
        cached like the plans."""
        key = ("add_rmsnorm", site, x.shape, x.dtype, x.device)
        got = self._plans.get(key)
        if got is None:
            p = self.plan(x, site)
            if p.backend is None:
                got = (None, None)             # native: explain says why
            else:
                why = p.backend.add_rmsnorm_unsupported(x, p.scheme, self)
                got = (p.backend, p.why) if why is None else (None, why)
            self._plans[key] = got
        return got

    def all_reduce_add_rmsnorm(self, partial, residual, norm_weight, eps, site=None, *,
                               layout=Layout.PRE_NORM, post_norm_weight=None, offset=0.0,
                               scale_in_fp32=False, bias=None):
        """The fused kernel of the planned backend where it takes the call (the sum is
        that backend's own, bit for bit; see kernels/allreduce_norm.py for the norms),
        else the reference (``Communicator.all_reduce_add_rmsnorm``)."""
        if self.world_size > 1 and self.fuses_add_rmsnorm:
            backend, _ = self.add_rmsnorm_plan(partial, site)
            if backend is not None:
                check_layout(layout, post_norm_weight)
                out = backend.all_reduce_add_rmsnorm(
                    partial, self.plan(partial, site).scheme, self, residual, norm_weight,
                    eps, sandwich=Layout(layout) == Layout.SANDWICH,
                    post_norm_weight=post_norm_weight, offset=offset,
                    scale_in_fp32=scale_in_fp32, bias=bias)
                if out is not None:
                    return out
        return super().all_reduce_add_rmsnorm(
            partial, residual, norm_weight, eps, site, layout=layout,
            post_norm_weight=post_norm_weight, offset=offset, scale_in_fp32=scale_in_fp32,
            bias=bias)

    def explain_add_rmsnorm(self, x: torch.Tensor, site: Optional[str] = None) -> str:
        backend, why = self.add_rmsnorm_plan(x, site)
        if backend is not None:
            return f"fused add + RMSNorm: {self.explain(x, site)}"
        return f"unfused{f' ({why})' if why else ''}: {self.explain(x, site)}, then torch ops"
