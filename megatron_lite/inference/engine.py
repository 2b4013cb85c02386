"""Engine: load a TP-sharded model, prefill, decode, sample, stop, stream.

Every rank of the TP group runs the same ``generate`` call with the same prompts; ranks hold
bitwise-identical logits and identically seeded generators, so they produce the same tokens
and stop at the same step without any broadcast. Printing is the caller's job (the CLI
streams on rank 0 only).

Batches: prompts are right-padded to the longest one and prefilled together; each sequence
then decodes at its own position (a [B] device tensor). ``decode_step`` has static shapes
and no host syncs, so it can be captured in a CUDA graph. The host looks at the generated
tokens every step only when it must (stop strings; streaming, for output only), otherwise
every ``sync_every`` steps; ranks decide to stop only at those rank-identical check points,
so a rank that streams never leaves the decode loop before its peers. On CUDA, decode steps
replay CUDA graphs, one per batch-size bucket and KV read length, and so do prefills of
prompts up to 2k tokens, padded to a power-of-two length (megatron_lite/inference/
cuda_graphs.py); the KV cache then has the bucket's rows and a batch is padded to them.

KV cache (inference/kv_cache.py): sliding-window layers keep a ring buffer of the window's
size, and each decode step reads only the slots written so far, rounded up to a bucket
that the host picks from the step count (no device sync); ``kv_layout="full"`` keeps
``max_seq`` slots on every layer and reads them all, as a reference.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from megatron_lite.comm.communicator import Communicator
from megatron_lite.inference.cuda_graphs import (CUDAGraphDecoder, CUDAGraphPrefill,
                                                 bucket_for)
from megatron_lite.inference.kv_cache import LAYOUTS, KVCache
from megatron_lite.inference.text import (GenerationResult, Prompt, StreamFn, _Stream,
                                          encode_prompt)
from megatron_lite.inference.sampling import sample, validate_sampling
from megatron_lite.models.config import ModelConfig
from megatron_lite.models.decoder import Transformer
from megatron_lite.parallel_state import TPGroup, get_tp_group

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _configure_compile() -> None:
    """torch.compile settings for the compiled decode step (process-wide)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    # Each (batch bucket, cache size, communicator class) is its own static-shape version;
    # past dynamo's default limit of 8 a function silently falls back to eager.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 128)
    dynamo_config.accumulated_recompile_limit = max(
        dynamo_config.accumulated_recompile_limit, 4096)
    # Inductor may pick a kernel's reduction config by timing candidates on each rank, so
    # ranks could sum replicated work (norms, softmax) in different orders; deterministic
    # mode pins the configs where this torch has it. (Tokens agree across ranks either
    # way: they come from all-gathered logits.)
    try:
        inductor_config.deterministic = True
    except AttributeError:
        pass


def default_compile(device: torch.device, world_size: int, cuda_graphs: bool) -> bool:
    """Whether ``Engine(compile=None)`` compiles the decode step: where it was measured
    faster: a CUDA device at TP 1 with CUDA-graph decode (llama3-8b shape on one H200,
    about 1.3x less time per token at batch 1 and 16; docs/results/generate.md). Not at
    TP > 1 until measured there, nor on CPU. The compile costs about a minute on first use
    (``warm_up_decode``), which a long-running engine earns back after some 40 thousand
    tokens at batch 1."""
    return torch.device(device).type == "cuda" and world_size == 1 and cuda_graphs


def default_compile_prefill(compile: bool, device: torch.device, world_size: int,
                            cuda_graphs: bool) -> bool:
    """Whether ``Engine(compile_prefill=None)`` compiles the prefill: with a compiled
    decode step, where that is the default (``default_compile``). Measured on one H100 at
    TP 1 (llama3-8b shape, docs/results/generate.md): TTFT 512 16.5 -> 11.9 ms (graphed),
    2k 60.5 -> 49.0 ms (graphed), 8k 263 -> 216 ms (eager). The dynamic-length compile
    costs about half a minute once (``warm_up_decode``)."""
    return bool(compile) and default_compile(device, world_size, cuda_graphs)


class Engine:
    """A TP-sharded decoder plus tokenizer, static KV cache and sampler (docs/architecture.md)."""

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch_size: int = 8,
                 max_seq_len: Optional[int] = None, eos_token_ids: Sequence[int] = (),
                 cuda_graphs: Optional[bool] = None, compile: Optional[bool] = None,
                 compile_prefill: Optional[bool] = None, kv_layout: str = "live"):
        if kv_layout not in LAYOUTS:
            raise ValueError(f"unknown kv_layout {kv_layout!r}; choose one of "
                             f"{', '.join(LAYOUTS)}")
        self.kv_layout = kv_layout
        self.model, self.cfg, self.group = model, model.cfg, model.group
        model.group.communicator.set_post_norms(model.post_reduce_norms())   # ef+
        # compile: the decode step's model call goes through torch.compile (static shapes;
        # one compile per batch bucket), which fuses the ~30 small elementwise kernels a
        # layer runs between its GEMMs (norms, RoPE, cache writes, activation, residuals).
        # The TP collectives are custom ops, no graph breaks (parallel_state.TPGroup).
        # compile_prefill: the prefill through a second compile with dynamic prompt lengths
        # (one compile for all of them; graphed prefill captures that compiled model per
        # length bucket). An eager 8k prefill spends about a quarter of its time in
        # elementwise kernels, and compiled it ran 1.2-1.4x faster at 512 to 8k tokens
        # (llama3-8b shape, one H100: docs/results/generate.md). None: each where it was
        # measured faster (default_compile, default_compile_prefill).
        w = model.embed_tokens.weight
        self.cuda_graphs = w.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        tp = model.group.world_size
        if compile is None:
            compile = default_compile(w.device, tp, self.cuda_graphs)
        if compile_prefill is None:
            compile_prefill = default_compile_prefill(compile, w.device, tp, self.cuda_graphs)
        self.compiled, self.compiled_prefill = bool(compile), bool(compile_prefill)
        if compile or compile_prefill:
            _configure_compile()
        self._step_model = torch.compile(model, dynamic=False) if compile else model
        self._prefill_model = (torch.compile(model, dynamic=True) if compile_prefill
                               else model)
        self.tokenizer = tokenizer
        self.device, self.dtype = w.device, w.dtype
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or self.cfg.max_position_embeddings
        self.eos_token_ids = tuple(sorted(set(int(e) for e in eos_token_ids)))
        self.cache: Optional[KVCache] = None
        # cuda_graphs None: on for CUDA devices. False decodes eagerly (e.g. to profile).
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self._graphs: Optional[CUDAGraphDecoder] = None
        self._prefill_graphs: Optional[CUDAGraphPrefill] = None
        self.graph_prefill = self.cuda_graphs   # prompts up to 2k tokens (cuda_graphs.py)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], group: Optional[TPGroup] = None,
                        dtype=None, comm=None, max_batch_size: int = 8,
                        max_seq_len: Optional[int] = None, device=None,
                        compile: Optional[bool] = None,
                        compile_prefill: Optional[bool] = None,
                        kv_layout: str = "live") -> "Engine":
        """Load a shard directory (its TP must equal the world size) or an HF directory
        (sharded in memory). All checks run before any weights are read.

        ``group``: the TP group (default: ``parallel_state.get_tp_group()``). ``comm``: how
        it all-reduces: a Communicator or TPGroup to use as is, or a CommSpec / ``--comm``
        spec string that wraps the group's communicator (comm/build.py).
        """
        from megatron_lite.checkpoint.loader import load_rank_state
        base = _base_group(group, comm)
        device, dtype = _resolve_device_dtype(device, dtype)
        hf_config, state, tok_dir = load_rank_state(path, base.rank, base.world_size,
                                                    dtype=dtype)
        return cls.from_rank_state_dict(hf_config, state, tokenizer=tok_dir,
                                        group=_apply_comm(base, comm, hf_config), dtype=dtype,
                                        device=device, max_batch_size=max_batch_size,
                                        max_seq_len=max_seq_len, compile=compile,
                                        compile_prefill=compile_prefill, kv_layout=kv_layout)

    @classmethod
    def from_hf_state_dict(cls, hf_config: dict, hf_sd, tokenizer=None,
                           group: Optional[TPGroup] = None, dtype=None, comm=None,
                           **kwargs) -> "Engine":
        """From an in-memory HF state dict (e.g. ``model.state_dict()`` of transformers)."""
        from megatron_lite.checkpoint.layout import shard_hf_state_dict
        group = _apply_comm(_base_group(group, comm), comm, hf_config)
        cfg = ModelConfig.from_hf(hf_config)
        state = shard_hf_state_dict(hf_sd, cfg, group.world_size, group.rank)
        return cls.from_rank_state_dict(hf_config, state, tokenizer, group=group, dtype=dtype,
                                        **kwargs)

    @classmethod
    def from_rank_state_dict(cls, hf_config: dict, state: dict, tokenizer=None,
                             group: Optional[TPGroup] = None, dtype=None, device=None,
                             **kwargs) -> "Engine":
        """From this rank's shard (our parameter names). ``tokenizer``: a tokenizer object,
        a directory to load one from, or None (then prompts must be token ids)."""
        group = group or get_tp_group()
        device, dtype = _resolve_device_dtype(device, dtype)
        cfg = ModelConfig.from_hf(hf_config)
        cfg.validate_tp(group.world_size)
        model = Transformer.from_rank_state_dict(cfg, group, state, device=device, dtype=dtype)
        tok_dir = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None
        if tok_dir is not None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        # As transformers' generate: generation_config.json's EOS ids (chat models list their
        # end-of-turn token there), else config.json's; the tokenizer's only as a fallback.
        eos = _generation_config_eos(tok_dir) or set(cfg.eos_token_ids)
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = {int(tokenizer.eos_token_id)}
        return cls(model, tokenizer, eos_token_ids=sorted(eos), **kwargs)

    # ------------------------------------------------------------------ model calls
    def _ensure_cache(self, batch_size: int, max_seq: int) -> KVCache:
        if self.cache is None or not self.cache.fits(batch_size, max_seq, self.kv_layout):
            self.cache = None   # free the old buffers before allocating
            for graphs in (self._graphs, self._prefill_graphs):   # they bake in addresses
                if graphs is not None:
                    graphs.reset()
            self.cache = KVCache(self.cfg, self.group.world_size, batch_size, max_seq,
                                 self.dtype, self.device, layout=self.kv_layout)
        return self.cache

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, max_seq: int,
                all_logits: bool = False) -> torch.Tensor:
        """Run right-padded prompts [B, T] (true lengths [B]) into a fresh cache of
        ``max_seq`` slots. Returns each prompt's last-token logits [B, V] (or [B, T, V])."""
        B, T = tokens.shape
        cache = self._ensure_cache(self._cache_rows(B), max_seq)
        if self.graph_prefill and not all_logits and self._prefill_fits(T):
            try:   # short prompts: one graph replay instead of hundreds of launches
                return self._prefill_graph()(tokens.to(self.device), lengths.to(self.device),
                                             rows=cache.batch_size)[:B]
            except RuntimeError as e:   # e.g. an op that cannot be captured
                import warnings
                warnings.warn(f"CUDA-graph prefill failed ({e}); prefilling eagerly")
                self.graph_prefill = False
        k, v = cache.k, cache.v
        if cache.batch_size != B:   # rows for a CUDA-graph bucket: prefill the first B
            k, v = [t[:B] for t in k], [t[:B] for t in v]
        positions = torch.arange(T, device=self.device).expand(B, T)
        index = None if all_logits else lengths.to(self.device) - 1
        return self._prefill_model(tokens.to(self.device), positions, k, v, kv_len=T,
                                   logits_index=index, causal_prefill=True,
                                   lengths=lengths.to(self.device))

    def prefill_rows(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Prefill of every cache row at once: right-padded prompts [rows, L] (true
        lengths [rows]) -> each row's last-token logits [rows, V]. Static shapes, no host
        syncs: what graphed prefill captures (``pad_prompts`` makes its inputs)."""
        rows, L = tokens.shape
        positions = torch.arange(L, device=self.device).expand(rows, L)
        return self._prefill_model(tokens, positions, self.cache.k, self.cache.v, kv_len=L,
                                   logits_index=lengths - 1, causal_prefill=True,
                                   lengths=lengths)

    def _prefill_graph(self) -> CUDAGraphPrefill:
        if self._prefill_graphs is None:
            self._prefill_graphs = CUDAGraphPrefill(self.prefill_rows, self.device)
        return self._prefill_graphs

    def _prefill_fits(self, prompt_len: int) -> bool:
        """A prefill bucket holds the prompt and the cache holds the bucket."""
        length = self._prefill_graph().bucket(prompt_len)
        return length is not None and length <= self.cache.max_seq

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                    kv_len: Optional[int] = None) -> torch.Tensor:
        """One token per sequence: tokens [B] at positions [B] -> logits [B, V].

        Attention reads the first ``kv_len`` cache slots under a mask (default: all
        ``max_seq``; every position must be below it) and sliding layers their ring: static
        shapes for a given ``kv_len``, no host syncs, no data-dependent Python branches, so
        safe to capture in a CUDA graph.
        """
        cache = self.cache
        return self._step_model(tokens.unsqueeze(1), positions.unsqueeze(1), cache.k, cache.v,
                                kv_len=kv_len or cache.max_seq)[:, 0]

    def _cache_rows(self, batch: int) -> int:
        """KV-cache rows for a batch: its CUDA-graph bucket when graphs are on."""
        if self.cuda_graphs:
            return bucket_for(batch, self._graph_decoder().buckets) or batch
        return batch

    def _graph_decoder(self) -> CUDAGraphDecoder:
        if self._graphs is None:
            self._graphs = CUDAGraphDecoder(self.decode_step, self.device)
        return self._graphs

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor,
                live: Optional[int] = None) -> torch.Tensor:
        """``decode_step`` for the generation loop: padded to the cache's rows, reading the
        bucket of ``live`` slots (positions 0 .. live - 1 written, this step's included; the
        host knows it from the step count; None: all slots), and replayed from a CUDA graph
        when graphs are on (falls back to eager if capture fails)."""
        B, rows = tokens.shape[0], self.cache.batch_size
        kv_len = self.cache.read_len(live) if live is not None else self.cache.max_seq
        if rows != B:
            tokens = torch.cat([tokens, tokens.new_zeros(rows - B)])
            positions = torch.cat([positions, positions.new_zeros(rows - B)])
        if self.cuda_graphs and self._graph_decoder().bucket(rows) == rows:
            try:
                return self._graph_decoder()(tokens, positions, kv_len)[:B]
            except RuntimeError as e:   # e.g. an op that cannot be captured
                import warnings
                warnings.warn(f"CUDA-graph decode failed ({e}); decoding eagerly")
                self.cuda_graphs = False
                self._graphs = None
        return self.decode_step(tokens, positions, kv_len)[:B]

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Full-vocab fp32 logits [B, T, V] of equal-length sequences (no cache kept)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        B, T = ids.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.max_seq_len}")
        # one slot per position (no ring): this call reads every position at once
        tmp = KVCache(self.cfg, self.group.world_size, B, T, self.dtype, self.device,
                      layout="full")
        positions = torch.arange(T, device=self.device).expand(B, T)
        return self.model(ids, positions, tmp.k, tmp.v, kv_len=T).float()

    # ------------------------------------------------------------------ generation
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """``encode_prompt`` with this engine's tokenizer and vocabulary."""
        return encode_prompt(self.tokenizer, prompt, chat, self.cfg.vocab_size)

    def cache_len(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV-cache slots ``generate`` allocates for a batch whose longest prompt has
        ``prompt_len`` tokens: rounded up to 64, and with compile to a power of two (few
        cache sizes -> few compiled versions, one per size x batch bucket)."""
        max_seq = -(-(prompt_len + max_new_tokens) // 64) * 64
        if self.compiled:
            max_seq = 1 << (max_seq - 1).bit_length()
        if self.graph_prefill:   # room for the prompt's graphed-prefill bucket
            max_seq = max(max_seq, self._prefill_graph().bucket(prompt_len) or 0)
        return min(max_seq, self.max_seq_len)

    @torch.inference_mode()
    def warm_up_decode(self, batch_size: int, prompt_len: int, max_new_tokens: int) -> float:
        """Run one decode step at the shapes a ``generate`` call of that batch size,
        longest prompt and ``max_new_tokens`` will use, so that compiling the step (with
        ``compile``) and capturing its CUDA graph happen here instead of inside the timed
        decode loop: one step for each KV read length the decode steps will use (and one
        prefill at the prompt length, which compiles the prefill with ``compile_prefill``
        and, with graphed prefill, captures the length's graph). Returns
        the seconds it took. Every rank must call it (the step runs the TP collectives).
        The cache's contents are left undefined; ``generate`` prefills it anew."""
        rows = self._cache_rows(batch_size)
        cache = self._ensure_cache(rows, self.cache_len(prompt_len, max_new_tokens))
        lives = range(prompt_len + 1, prompt_len + max(max_new_tokens, 2))
        reads = sorted({cache.read_len(live) for live in lives})
        tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._sync()
        t0 = time.perf_counter()
        if self.compiled_prefill or (self.graph_prefill and self._prefill_fits(prompt_len)):
            self.prefill(tokens.new_zeros(batch_size, prompt_len),
                         torch.full((batch_size,), prompt_len, device=self.device),
                         cache.max_seq)
        for kv_len in reads:
            self._decode(tokens, positions, kv_len)   # live == kv_len reads that bucket
        self._sync()
        return time.perf_counter() - t0

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: int = 0,
                 stop: Optional[Union[str, Sequence[str]]] = None, chat: bool = False,
                 stream: Optional[StreamFn] = None,
                 sync_every: int = 8) -> list[GenerationResult]:
        """Generate for each prompt (text, or a list of token ids); one result per prompt.

        Prompts run in batches of ``max_batch_size``. ``stream(batch_index, piece)`` gets
        text pieces as they become final (text that might begin a stop string is held back).
        """
        validate_sampling(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ids = [self.encode(p, chat) for p in prompts]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        results = []
        for lo in range(0, len(ids), self.max_batch_size):
            results += self._generate_batch(prompts[lo:lo + self.max_batch_size],
                                            ids[lo:lo + self.max_batch_size], lo, max_new_tokens,
                                            temperature, top_k, top_p, gen, stops, stream,
                                            sync_every)
        return results

    @torch.inference_mode()
    def _generate_batch(self, prompts, ids, offset, max_new, temperature, top_k, top_p, gen,
                        stops, stream, sync_every) -> list[GenerationResult]:
        B, lengths = len(ids), [len(x) for x in ids]
        T = max(lengths)
        if T + max_new > self.max_seq_len:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new}) exceeds "
                             f"max_seq_len {self.max_seq_len}")
        max_seq = self.cache_len(T, max_new)
        tokens = torch.full((B, T), self.cfg.pad_token_id or 0, dtype=torch.long)
        for b, x in enumerate(ids):
            tokens[b, :len(x)] = torch.tensor(x)
        lengths_dev = torch.tensor(lengths, device=self.device)
        eos = frozenset(self.eos_token_ids)
        results = [GenerationResult(prompt=p, prompt_token_ids=list(x))
                   for p, x in zip(prompts, ids)]
        streams = [_Stream(r, self.tokenizer, eos, stops, max_new,
                           (lambda piece, i=offset + b: stream(i, piece)) if stream else None)
                   for b, r in enumerate(results)]
        # When ranks may stop must depend only on arguments every rank shares (stop strings,
        # sync_every), never on rank-local ones: the CLI streams on rank 0 only, and a rank
        # that left the decode loop early would leave its peers blocked in a collective.
        check_every = 1 if stops else max(1, sync_every)
        emit_every = 1 if stream is not None else check_every

        out = torch.zeros((B, max_new), dtype=torch.long, device=self.device)
        bad = torch.zeros((B, max_new), dtype=torch.bool, device=self.device)

        def pick(logits, step):
            bad[:, step] = ~torch.isfinite(logits).all(dim=-1)
            tok = sample(logits, temperature, top_k, top_p, gen)
            out[:, step] = tok
            return tok

        self._sync()
        t0 = time.perf_counter()
        tok = pick(self.prefill(tokens, lengths_dev, max_seq), 0)
        synced = self._consume(streams, out, bad, 0, 1)
        t_first = time.perf_counter()
        positions = lengths_dev.clone()
        step = checked = 1
        finished = all(s.done for s in streams)
        while step < max_new and not finished:
            # positions now reach T + step - 1 at most: T + step slots are live
            tok = pick(self._decode(tok, positions, T + step), step)
            positions += 1
            step += 1
            if step - synced >= emit_every or step == max_new:
                synced = self._consume(streams, out, bad, synced, step)
            if step - checked >= check_every or step == max_new:
                if synced < step:
                    synced = self._consume(streams, out, bad, synced, step)
                checked = step
                finished = all(s.done for s in streams)
        t_end = time.perf_counter()
        for s in streams:   # finished by the loop bound without a final consume
            if not s.done:
                s.finish("length")
        decode_steps = step - 1
        rate = decode_steps / (t_end - t_first) if decode_steps and t_end > t_first else None
        for r in results:
            r.ttft_s = t_first - t0
            r.tokens_per_s = rate
            r.batch_tokens_per_s = rate * B if rate else None
        return results

    @staticmethod
    def _consume(streams, out, bad, lo: int, hi: int) -> int:
        """Copy generated tokens [lo, hi) to the host (one sync) and advance each stream."""
        toks, flags = out[:, lo:hi].tolist(), bad[:, lo:hi].tolist()
        for s, row, frow in zip(streams, toks, flags):
            for t, f in zip(row, frow):
                if s.done:
                    break
                s.push(t, f)
        return hi

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------- helpers
def _base_group(group: Optional[TPGroup], comm) -> TPGroup:
    """The group whose rank / world size the checkpoint is loaded for."""
    if isinstance(comm, (TPGroup, Communicator)):
        if group is not None:
            raise ValueError("pass a Communicator/TPGroup as group= or comm=, not both")
        return comm if isinstance(comm, TPGroup) else TPGroup.from_communicator(comm)
    return group or get_tp_group()


def _apply_comm(group: TPGroup, comm, hf_config: dict) -> TPGroup:
    """Wrap the group's communicator for a CommSpec / spec string (None: unchanged)."""
    if comm is None or isinstance(comm, (TPGroup, Communicator)):
        return group
    from megatron_lite.comm.build import build_communicator
    wrapped = build_communicator(group.communicator, comm,
                                 num_layers=hf_config.get("num_hidden_layers"),
                                 hf_config=hf_config)
    return group if wrapped is group.communicator else TPGroup.from_communicator(wrapped)


def _resolve_device_dtype(device, dtype):
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.cuda.is_available() else torch.device("cpu"))
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype is None:   # bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def _generation_config_eos(directory: Optional[Path]) -> set[int]:
    """EOS ids of generation_config.json (chat models list end-of-turn ids there)."""
    if directory is None or not (directory / "generation_config.json").is_file():
        return set()
    eos = json.loads((directory / "generation_config.json").read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}
