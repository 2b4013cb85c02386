"""An accuracy study of comm codecs: validate inputs, run every codec, summarise.

``prepare`` checks everything a user can get wrong (checkpoint and TP, codec specs,
calibration file vs model and TP, data files) and tokenizes the inputs, before any model
is loaded. ``execute`` then loads one model per rank, runs every codec through a
:class:`~megatron_lite.lab.eval.runner.CodecSwitch`, and returns result rows on the scoring
rank (rank 0), ``None`` elsewhere.

Bits per value of a comm config: the mean, over the 2L row-parallel reduces (o_proj and
down_proj of every layer; they all carry ``hidden`` values per token), of the bits of the
codec each site uses (native sites count as 16: bf16 on the wire). The embedding reduce
stays bf16 unless an override names it, and is not counted: both methods this package
implements (docs/architecture.md) quantize only the row-parallel reduces.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from megatron_lite.errors import MegatronLiteError

from .data import EvalDataError, Task, TextWindows, is_text_source, load_task, load_text_windows
from .evaluator import run_study, summarize
from .runner import CodecSwitch, launch, load_rank_engine, rank_logits, row_parallel_sites

REFERENCE = "bf16"


@dataclass
class StudyArgs:
    ckpt: str
    tp: int
    comms: List[str]
    calibration: Optional[str] = None
    text: Optional[str] = None
    max_tokens: Optional[int] = 16384
    window: int = 512
    tasks: List[str] = field(default_factory=list)
    task_limit: Optional[int] = None
    batch_tokens: int = 1024
    batch_rows: int = 512
    dtype: torch.dtype = torch.float32
    simulated: bool = True
    progress: bool = True


@dataclass
class Prepared:
    args: StudyArgs
    model_name: str
    hf_config: dict
    codec_names: List[str]
    specs: list              # CommSpec of each name
    bits: List[float]
    text: Optional[TextWindows]
    tasks: List[Task]
    pad_id: int


def model_name(ckpt: str, hf_config: dict) -> str:
    """A readable model name: the GGUF/HF ``_model_name_or_path`` if set, else the dir."""
    name = hf_config.get("_model_name_or_path") or hf_config.get("_name_or_path")
    return str(name) if name else os.path.basename(os.path.normpath(ckpt))


def comm_bits(spec, num_layers: int) -> float:
    """Mean bits/value over the row-parallel sites of a CommSpec (module docstring);
    builds every site's scheme, so a bad calibration fails here."""
    from megatron_lite.comm.router import SiteCodecs
    codecs = SiteCodecs(spec, num_layers)
    sites = row_parallel_sites(num_layers)
    total = 0.0
    for s in sites:
        scheme = codecs.scheme_for(s)
        total += 16.0 if scheme is None else float(scheme.bits_per_value)
    return total / len(sites)


def _canonical_comms(specs: List[str], calibration: Optional[str]):
    """``(names, CommSpecs)`` with bf16 first (added if absent), duplicates removed;
    a name is the spec without its calibration file, so two specs that differ only in
    their calibration files are refused (a row would silently stand for both)."""
    from megatron_lite.comm.spec import format_comm, parse_comm
    names, parsed = [], []
    for text in [REFERENCE] + list(specs):
        spec = parse_comm(text, calibration)
        if spec.is_native:
            raise EvalDataError("--comm native is not a codec: the bf16 reference row is "
                                "always included")
        name = format_comm(spec, with_calibration=False)
        if name not in names:
            names.append(name)
            parsed.append(spec)
        elif format_comm(spec) != format_comm(parsed[names.index(name)]):
            raise EvalDataError(f"two --comm specs are {name} with different calibration "
                                "files: evaluate each calibration in a run of its own")
    return names, parsed


def prepare(args: StudyArgs) -> Prepared:
    """Validate and tokenize; raises MegatronLiteError subclasses with one-line messages."""
    from transformers import AutoTokenizer

    from megatron_lite.checkpoint.loader import inspect_checkpoint
    from megatron_lite.models.config import ModelConfig

    if args.tp < 1:
        raise EvalDataError(f"--tp must be >= 1, got {args.tp}")
    if args.text is None and not args.tasks:
        raise EvalDataError("nothing to evaluate: give --text FILE and/or --task FILE")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EvalDataError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.text and not is_text_source(args.text):
        raise EvalDataError(f"--text: file not found: {args.text}")
    for p in args.tasks:
        if not os.path.isfile(p):
            raise EvalDataError(f"--task: file not found: {p}")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in args.tasks]
    if len(set(stems)) != len(stems):
        raise EvalDataError(f"two task files share a name stem: {stems}")
    hf_config, _ = inspect_checkpoint(args.ckpt, args.tp)
    cfg = ModelConfig.from_hf(hf_config)
    names, specs = _canonical_comms(args.comms, args.calibration)
    from megatron_lite.comm.calibration import load_calibration
    for path in sorted({s.calibration for s in specs if s.calibration}):
        load_calibration(path).check(tp=args.tp, hf_config=hf_config)
    bits = [comm_bits(s, cfg.num_layers) for s in specs]   # builds every site's codec
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    text = None
    if args.text:
        text = load_text_windows(tok, args.text, args.window, args.max_tokens)
        if args.window > cfg.max_position_embeddings:
            raise EvalDataError(f"--window {args.window} exceeds the model's "
                                f"{cfg.max_position_embeddings} positions")
    tasks = [load_task(tok, p, args.task_limit) for p in args.tasks]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Prepared(args, model_name(args.ckpt, hf_config), hf_config, names, specs, bits,
                    text, tasks, int(pad))


def execute(prep: Prepared) -> Optional[List[dict]]:
    """Run the study on every rank; result rows on rank 0, None on other real ranks."""
    from megatron_lite.comm.build import build_communicator
    from megatron_lite.models.config import ModelConfig

    a = prep.args
    num_layers = ModelConfig.from_hf(prep.hf_config).num_layers

    def rank_main(comm):
        # Communicators are built per rank: each rank owns its scheme caches.
        # build_communicator wraps "ef+" specs in error feedback.
        comms = [build_communicator(comm, s, num_layers=num_layers) for s in prep.specs]
        switch = CodecSwitch(comm, comms)
        engine = load_rank_engine(a.ckpt, switch, a.dtype)
        # The Engine hands the post-norm gains to its own communicator, the switch; the
        # error-feedback communicators behind it need them too.
        norms = engine.model.post_reduce_norms()
        for c in comms:
            c.set_post_norms(norms)

        def forward(c, ids, rows):
            switch.active = c
            return rank_logits(engine, ids, rows)
        return run_study(forward, prep.codec_names, prep.text, prep.tasks, a.batch_tokens,
                         a.batch_rows, prep.pad_id, score=comm.rank == 0,
                         progress=a.progress)

    results = launch(rank_main, a.tp, a.simulated)
    if not a.simulated and int(os.environ.get("RANK", "0")) != 0:
        return None
    return summarize(prep.codec_names, prep.bits, results[0], prep.text, prep.tasks)


def details_doc(prep: Prepared, rows: List[dict]) -> dict:
    """Everything behind the table (uncertainties, sample sizes, settings) for the docs."""
    a = prep.args
    return {"model": prep.model_name, "tp": a.tp, "simulated": a.simulated,
            "ckpt": a.ckpt, "calibration": a.calibration, "dtype": str(a.dtype),
            "text": a.text, "window": a.window, **_text_origin(a.text),
            "text_windows": len(prep.text.windows) if prep.text else 0,
            "text_tokens": prep.text.num_tokens if prep.text else 0,
            "tasks": {t.name: {"path": t.path, "kind": t.kind, "n": len(t.items),
                               "primary": "acc" if t.kind == "cloze" else "acc_norm"}
                      for t in prep.tasks},
            "rows": rows}


def _text_origin(text: Optional[str]) -> dict:
    """The Python version behind the built-in text (its content depends on it)."""
    from .pydocs import NAME, describe
    if text != NAME:
        return {}
    return {k: v for k, v in describe().items() if k != "text"}


__all__ = ["StudyArgs", "Prepared", "prepare", "execute", "details_doc", "comm_bits",
           "MegatronLiteError"]
