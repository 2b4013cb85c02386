"""Evaluation inputs: text windows for perplexity/KL, cloze and multiple-choice task files.

Everything here is tokenizer-level preparation; no model runs. Items become plain token
id lists plus the positions whose predictions are scored, so the same prepared items feed
every codec of a study (paired comparison: each codec sees exactly the bf16 run's tokens).

Conventions (stated once, used by metrics.py):

* A sequence ``ids`` of length T gives T-1 next-token predictions; position t of the
  logits predicts ``ids[t+1]``. A "scored span" ``[start, end)`` lists the *target*
  token indices; their predicting logits are ``logits[start-1:end-1]``.
* Text windows: the file (or the built-in text ``python-docs``, pydocs.py) is
  tokenized once without special tokens and cut into
  non-overlapping chunks; each window is ``[BOS] + chunk`` when the tokenizer has a BOS
  that it adds by default (Gemma), else the bare chunk (SmolLM2). Every token after
  position 0 is scored, so a window of W tokens scores W-1 tokens in both cases.
* Context + continuation (cloze target, MC choice): tokenized as in lm-evaluation-harness:
  ``whole = encode(context + continuation)``, ``ctx = encode(context)`` and the
  continuation tokens are ``whole[len(ctx):]`` when ``ctx`` is a prefix of ``whole``
  (true for both our tokenizers on these files), else the two encodings are concatenated.
  A trailing space of the context is moved to the continuation first, because BPE
  tokenizers attach spaces to the following word.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from megatron_lite.errors import MegatronLiteError


class EvalDataError(MegatronLiteError, ValueError):
    """A bad evaluation input (missing file, malformed jsonl, unknown task shape)."""


# ----------------------------------------------------------------------------- items
@dataclass
class Sequence_:
    """One model input: token ids and the scored target span ``[start, end)``."""
    ids: List[int]
    start: int
    end: int

    def __post_init__(self):
        if not (1 <= self.start < self.end <= len(self.ids)):
            raise EvalDataError(f"bad scored span [{self.start}, {self.end}) "
                                f"for a sequence of {len(self.ids)} tokens")


@dataclass
class TextWindows:
    """Non-overlapping windows of a text file; every token after position 0 is scored."""
    path: str
    windows: List[Sequence_]

    @property
    def num_tokens(self) -> int:
        return sum(w.end - w.start for w in self.windows)


@dataclass
class ClozeItem:
    seq: Sequence_


@dataclass
class MCItem:
    choices: List[Sequence_]
    num_chars: List[int]          # characters of each continuation (per-char normalisation)
    label: int


@dataclass
class Task:
    """A task file: ``kind`` is "cloze" ({"context","target"}) or "mc"
    ({"contexts","continuations","label"})."""
    name: str                     # file stem, the key in the JSON "tasks" dict
    kind: str
    path: str
    items: List[Union[ClozeItem, MCItem]] = field(default_factory=list)

    def sequences(self) -> List[Sequence_]:
        if self.kind == "cloze":
            return [it.seq for it in self.items]
        return [s for it in self.items for s in it.choices]


# ------------------------------------------------------------------------- tokenizing
def _encode(tokenizer, text: str, add_special_tokens: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def bos_prefix(tokenizer) -> List[int]:
    """The special tokens the tokenizer puts in front of a text by default ([] or [BOS])."""
    with_sp = _encode(tokenizer, "a", True)
    without = _encode(tokenizer, "a", False)
    n = len(with_sp) - len(without)
    if n < 0 or with_sp[n:] != without:
        # Suffix special tokens (EOS) would be wrong for LM scoring; refuse rather than guess.
        raise EvalDataError("tokenizer adds special tokens after the text; "
                            "cannot build scoring sequences")
    return with_sp[:n]


def encode_pair(tokenizer, context: str, continuation: str) -> Sequence_:
    """Token ids of ``context + continuation`` and the continuation's scored span."""
    if not continuation:
        raise EvalDataError("empty continuation")
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = _encode(tokenizer, context + continuation, True)
    ctx = _encode(tokenizer, context, True)
    if len(ctx) < len(whole) and whole[:len(ctx)] == ctx:
        ids, start = whole, len(ctx)
    else:
        ids = ctx + _encode(tokenizer, continuation, False)
        start = len(ctx)
    if start == 0:
        # Nothing predicts the first token of a sequence; an empty context without BOS
        # cannot be scored.
        raise EvalDataError("empty context and no BOS token: continuation cannot be scored")
    return Sequence_(ids, start, len(ids))


# ------------------------------------------------------------------------ text windows
def load_text_windows(tokenizer, path: str, window: int, max_tokens: Optional[int]) -> TextWindows:
    """Cut ``path`` into windows of ``window`` tokens scoring at most ``max_tokens`` tokens.

    Only whole windows are used (a short tail would be scored with less context than the
    rest). ``max_tokens`` is rounded down to whole windows, but at least one window.
    """
    if window < 2:
        raise EvalDataError(f"--window must be >= 2, got {window}")
    prefix = _text_reader(path)
    bos = bos_prefix(tokenizer)
    chunk = window - len(bos)
    # Tokenize only as much text as needed (a window is rarely more than ~8 chars/token).
    need_windows = None if max_tokens is None else max(1, max_tokens // (window - 1))
    ids: List[int] = []
    if need_windows is not None:
        n_chars = need_windows * chunk * 8 + 1000
        while True:
            text, whole = prefix(n_chars)
            ids = _encode(tokenizer, text, False)
            if len(ids) > need_windows * chunk or whole:
                break
            n_chars *= 2
    else:
        ids = _encode(tokenizer, prefix(None)[0], False)
    n = len(ids) // chunk
    if need_windows is not None:
        n = min(n, need_windows)
    if n == 0:
        raise EvalDataError(f"{path}: {len(ids)} tokens, fewer than one window of {window}")
    windows = [Sequence_(bos + ids[i * chunk:(i + 1) * chunk], 1, window) for i in range(n)]
    return TextWindows(path, windows)


def is_text_source(path: str) -> bool:
    """A ``--text`` value that names something readable: a file or a built-in text."""
    from .pydocs import NAME
    return path == NAME or os.path.isfile(path)


def _text_reader(path: str):
    """``prefix(n_chars) -> (text, whole)``: the first ``n_chars`` characters of the text
    (all of it for None), and whether that is the whole text. ``path`` is a file, or
    ``python-docs`` (pydocs.py), which is read only as far as a prefix needs."""
    from .pydocs import NAME, python_docs
    if path == NAME:
        def builtin(n_chars):
            text = python_docs(n_chars)
            return (text, True) if n_chars is None or len(text) < n_chars \
                else (text[:n_chars], False)
        return builtin
    text = _read(path)
    return lambda n_chars: (text, True) if n_chars is None or n_chars >= len(text) \
        else (text[:n_chars], False)


# ------------------------------------------------------------------------------ tasks
def _read(path: str) -> str:
    if not os.path.isfile(path):
        raise EvalDataError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _task_kind(obj: dict, where: str) -> str:
    keys = set(obj)
    if {"context", "target"} <= keys:
        return "cloze"
    if {"contexts", "continuations", "label"} <= keys:
        return "mc"
    raise EvalDataError(f"{where}: expected keys {{context, target}} (cloze) or "
                        f"{{contexts, continuations, label}} (multiple choice), got {sorted(keys)}")


def load_task(tokenizer, path: str, limit: Optional[int] = None) -> Task:
    """Read a cloze or multiple-choice jsonl file (told apart by the first line's keys).

    ``limit`` keeps the first N items: files are read in order, so every codec and every
    rerun sees the same subset.
    """
    if limit is not None and limit < 1:
        raise EvalDataError(f"--task-limit must be >= 1, got {limit}")
    name = os.path.splitext(os.path.basename(path))[0]
    lines = [ln for ln in _read(path).splitlines() if ln.strip()]
    if not lines:
        raise EvalDataError(f"{path}: empty task file")
    if limit is not None:
        lines = lines[:limit]
    kind = None
    items: List[Union[ClozeItem, MCItem]] = []
    for i, line in enumerate(lines, 1):
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{where}: expected a JSON object")
        k = _task_kind(obj, where)
        if kind is None:
            kind = k
        elif k != kind:
            raise EvalDataError(f"{where}: {k} item in a {kind} file")
        try:
            items.append(_cloze_item(tokenizer, obj) if k == "cloze" else _mc_item(tokenizer, obj))
        except EvalDataError as e:
            raise EvalDataError(f"{where}: {e}") from None
    return Task(name, kind, path, items)


def _cloze_item(tokenizer, obj: dict) -> ClozeItem:
    ctx, tgt = obj["context"], obj["target"]
    if not isinstance(ctx, str) or not isinstance(tgt, str):
        raise EvalDataError("context and target must be strings")
    return ClozeItem(encode_pair(tokenizer, ctx, tgt))


def _mc_item(tokenizer, obj: dict) -> MCItem:
    ctxs, conts, label = obj["contexts"], obj["continuations"], obj["label"]
    if not (isinstance(ctxs, list) and isinstance(conts, list)) or len(ctxs) != len(conts):
        raise EvalDataError("contexts and continuations must be lists of equal length")
    if len(conts) < 2:
        raise EvalDataError("a multiple-choice item needs at least 2 choices")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(conts):
        raise EvalDataError(f"label {label!r} out of range for {len(conts)} choices")
    if not all(isinstance(s, str) for s in list(ctxs) + list(conts)):
        raise EvalDataError("contexts and continuations must be strings")
    return MCItem([encode_pair(tokenizer, c, k) for c, k in zip(ctxs, conts)],
                  [len(k) for k in conts], label)


def batches_by_length(seqs: Sequence[Sequence_], max_batch_tokens: int,
                      max_batch_rows: Optional[int] = None) -> List[List[int]]:
    """Group sequence indices into batches of similar length (sorted, longest first).

    A batch of B sequences is padded to its longest, L, and to its longest scored span, K;
    it obeys ``B * L <= max_batch_tokens`` and, if given, ``B * K <= max_batch_rows`` (the
    logits rows kept, which bound memory at a 262k vocabulary). A single sequence always
    forms a batch. Deterministic: ties keep input order.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    out: List[List[int]] = []
    cur: List[int] = []
    longest = rows = 0
    for i in order:
        n, k = len(seqs[i].ids), seqs[i].end - seqs[i].start
        new_len, new_rows = max(longest, n), max(rows, k)
        too_big = new_len * (len(cur) + 1) > max_batch_tokens or (
            max_batch_rows is not None and new_rows * (len(cur) + 1) > max_batch_rows)
        if cur and too_big:
            out.append(cur)
            cur, new_len, new_rows = [], n, k
        cur.append(i)
        longest, rows = new_len, new_rows
    if cur:
        out.append(cur)
    return out
