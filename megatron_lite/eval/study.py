"""An accuracy study of comm codecs: validate inputs, run every codec, summarise.

``prepare`` checks everything a user can get wrong (checkpoint and TP, codec specs,
calibration file vs model and TP, data files) and tokenizes the inputs, before any model
is loaded. ``execute`` then loads one model per rank, runs every codec through a
:class:`~megatron_lite.eval.runner.CodecSwitch`, and returns result rows on the scoring
rank (rank 0), ``None`` elsewhere.

Bits per value of a comm config: the mean, over the 2L row-parallel reduces (o_proj and
down_proj of every layer; they all carry ``hidden`` values per token), of the bits of the
codec each site uses (native sites count as 16: bf16 on the wire). The embedding reduce
stays bf16 unless an override names it, and is not counted; the issue quantizes only the
row-parallel reduces.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from megatron_lite.errors import MegatronLiteError

from .data import EvalDataError, Task, TextWindows, load_task, load_text_windows
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
    bits: List[float]
    text: Optional[TextWindows]
    tasks: List[Task]
    pad_id: int


def model_name(ckpt: str, hf_config: dict) -> str:
    """A readable model name: the GGUF/HF ``_model_name_or_path`` if set, else the dir."""
    name = hf_config.get("_model_name_or_path") or hf_config.get("_name_or_path")
    return str(name) if name else os.path.basename(os.path.normpath(ckpt))


def comm_bits(cfg, num_layers: int) -> float:
    """Mean bits/value over the row-parallel sites of a CommConfig (module docstring)."""
    sites = row_parallel_sites(num_layers)
    total = 0.0
    for s in sites:
        codec = cfg.codec_for(s)
        total += 16.0 if codec is None else float(codec.bits_per_value)
    return total / len(sites)


def _canonical_comms(specs: List[str], calibration: Optional[str], num_layers: int):
    """Parsed configs with bf16 first (added if absent); duplicates removed."""
    from megatron_lite.comm.allreduce import parse_comm_arg
    from megatron_lite.comm.feedback import PREFIX as EF
    names, cfgs = [], []
    for spec in [REFERENCE] + list(specs):
        ef = str(spec).strip().lower().startswith(EF)
        cfg = parse_comm_arg(str(spec).strip()[len(EF):] if ef else spec,
                             calibration=calibration, num_layers=num_layers)
        name = (EF if ef else "") + str(cfg)
        if str(cfg) == "native":
            raise EvalDataError("--comm native is not a codec: the bf16 reference row is "
                                "always included")
        if name not in names:
            names.append(name)
            cfgs.append(cfg)
    return names, cfgs


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
    for p in ([args.text] if args.text else []) + list(args.tasks):
        if not os.path.isfile(p):
            raise EvalDataError(f"file not found: {p}")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in args.tasks]
    if len(set(stems)) != len(stems):
        raise EvalDataError(f"two task files share a name stem: {stems}")
    hf_config, _ = inspect_checkpoint(args.ckpt, args.tp)
    cfg = ModelConfig.from_hf(hf_config)
    names, cfgs = _canonical_comms(args.comms, args.calibration, cfg.num_layers)
    if args.calibration:
        from megatron_lite.comm.outlier import load_calibration
        load_calibration(args.calibration).check(tp=args.tp, hf_config=hf_config)
    bits = [comm_bits(c, cfg.num_layers) for c in cfgs]   # builds every site's codec
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    text = None
    if args.text:
        text = load_text_windows(tok, args.text, args.window, args.max_tokens)
        if args.window > cfg.max_position_embeddings:
            raise EvalDataError(f"--window {args.window} exceeds the model's "
                                f"{cfg.max_position_embeddings} positions")
    tasks = [load_task(tok, p, args.task_limit) for p in args.tasks]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Prepared(args, model_name(args.ckpt, hf_config), hf_config, names, bits, text,
                    tasks, int(pad))


def execute(prep: Prepared) -> Optional[List[dict]]:
    """Run the study on every rank; result rows on rank 0, None on other real ranks."""
    from megatron_lite.comm.allreduce import build_communicator
    from megatron_lite.models.config import ModelConfig

    a = prep.args
    num_layers = ModelConfig.from_hf(prep.hf_config).num_layers

    def rank_main(comm):
        # Configs are parsed per rank: each rank owns its codec caches.
        # build_communicator wraps "ef+" names in error feedback.
        comms = [build_communicator(comm, n, calibration=a.calibration, num_layers=num_layers)
                 for n in prep.codec_names]
        switch = CodecSwitch(comm, comms)
        engine = load_rank_engine(a.ckpt, switch, a.dtype)
        # The Engine hands the post-norm gains to its own communicator, the switch; the
        # error-feedback communicators behind it need them too.
        norms = engine.model.post_reduce_norms()
        for c in comms:
            if hasattr(c, "set_post_norms"):
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
            "text": a.text, "window": a.window,
            "text_windows": len(prep.text.windows) if prep.text else 0,
            "text_tokens": prep.text.num_tokens if prep.text else 0,
            "tasks": {t.name: {"path": t.path, "kind": t.kind, "n": len(t.items),
                               "primary": "acc" if t.kind == "cloze" else "acc_norm"}
                      for t in prep.tasks},
            "rows": rows}


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


__all__ = ["StudyArgs", "Prepared", "prepare", "execute", "details_doc", "comm_bits",
           "MegatronLiteError"]
