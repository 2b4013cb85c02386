"""The text side of generation: prompts to token ids, token ids to text as they stream,
stop strings, and the result of one prompt (``GenerationResult``). inference/engine.py
runs the model; this module never touches it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

Prompt = Union[str, Sequence[int]]
StreamFn = Callable[[int, str], None]


@dataclass
class GenerationResult:
    """One prompt's completion.

    ``token_ids`` are the generated ids (a final EOS id included; none of the prompt);
    ``text`` their decoding without special tokens, cut before a stop string.
    ``finish_reason``: "eos", "stop" (a stop string), "length" (max_new_tokens) or
    "nonfinite" (NaN/Inf logits; the bad step's token is dropped).
    Timings are of the batch the prompt ran in: ``ttft_s`` from prefill start to the first
    token on the host; ``tokens_per_s`` decode steps per second after the first token (the
    speed one stream sees); ``batch_tokens_per_s`` the same times the batch size.
    """
    prompt: Prompt
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    ttft_s: float = 0.0
    tokens_per_s: Optional[float] = None
    batch_tokens_per_s: Optional[float] = None


def decode_text(tokenizer, ids) -> str:
    """Token ids -> text, the way every generation result is decoded."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = False,
                  vocab_size: Optional[int] = None) -> list[int]:
    """A prompt's token ids, the way ``Engine.generate`` encodes it: a list of ids as is;
    text with the tokenizer's default special tokens (e.g. Gemma's BOS), or with ``chat``
    as one user turn of the chat template plus the generation prompt.

    The empty string is refused on every model (whether it would give a BOS alone or no
    token at all depends on the tokenizer), as is an empty id list and an id outside
    ``[0, vocab_size)``. Raises ValueError.
    """
    if not isinstance(prompt, str):
        ids = [int(t) for t in prompt]
    else:
        if tokenizer is None:
            raise ValueError("no tokenizer: pass prompts as token ids")
        if not prompt:
            raise ValueError("empty prompt: nothing to condition on")
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("the tokenizer has no chat template; run without chat")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError("empty prompt: nothing to condition on")
    if vocab_size is not None and (max(ids) >= vocab_size or min(ids) < 0):
        raise ValueError(f"prompt token id out of range [0, {vocab_size})")
    return list(ids)


class IncrementalDetokenizer:
    """Text of a growing token list, decoding only a short window per new token.

    Decoding the whole list at every step costs O(n) per token. Instead keep two offsets
    (vLLM's incremental detokenization): ``prefix`` .. ``read`` are tokens whose text is
    already committed, decoded again only as left context, because a token's text can
    depend on its neighbours (SentencePiece's leading-space strip, byte-fallback pieces of
    one UTF-8 character). The new text is decode(ids[prefix:]) minus decode(ids[prefix:
    read]); while it ends in U+FFFD (an incomplete UTF-8 sequence) nothing is committed.
    ``text`` is therefore always a prefix of the full decode up to the last complete
    character; ``full()`` decodes everything once (for the final result)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        """Append a token; return the text it completed ("" while a character is partial)."""
        self.ids.append(token)
        head = decode_text(self.tok, self.ids[self.prefix:self.read])
        window = decode_text(self.tok, self.ids[self.prefix:])
        if window.endswith("\ufffd") or len(window) <= len(head) \
                or not window.startswith(head):
            return ""
        new = window[len(head):]
        self.text += new
        # Keep a few committed tokens of left context for the next window.
        self.prefix, self.read = max(self.read - 4, 0), len(self.ids)
        return new

    def full(self) -> str:
        return decode_text(self.tok, self.ids)


class _Stream:
    """Host-side bookkeeping of one sequence: EOS, stop strings, incremental text."""

    def __init__(self, result: GenerationResult, tokenizer, eos: frozenset, stop: list[str],
                 max_new: int, emit: Optional[Callable[[str], None]]):
        self.r, self.tok, self.eos, self.stop, self.max_new = result, tokenizer, eos, stop, max_new
        self.emit, self.emitted, self.scanned = emit, 0, 0
        self.need_text = tokenizer is not None and (bool(stop) or emit is not None)
        self.detok = IncrementalDetokenizer(tokenizer) if self.need_text else None
        self.holdback = max((len(s) for s in stop), default=1) - 1

    @property
    def done(self) -> bool:
        return self.r.finish_reason is not None

    def push(self, token: int, nonfinite: bool) -> None:
        r = self.r
        if nonfinite:
            return self.finish("nonfinite")
        r.token_ids.append(token)
        if token in self.eos:
            return self.finish("eos")
        if self.need_text:
            self.detok.push(token)
            r.text = self.detok.text
            cut = self._find_stop(r.text)
            if cut is not None:
                r.text = r.text[:cut]
                return self.finish("stop")
            safe = len(r.text) - self.holdback
            while safe > self.emitted and r.text[safe - 1] == "\ufffd":   # partial UTF-8
                safe -= 1
            self._emit_to(safe)
        if len(r.token_ids) >= self.max_new:
            self.finish("length")

    def _decode(self) -> str:
        return decode_text(self.tok, [t for t in self.r.token_ids if t not in self.eos])

    def _find_stop(self, text: str) -> Optional[int]:
        start = max(0, self.scanned - self.holdback)
        self.scanned = len(text)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit_to(self, end: int) -> None:
        if self.emit is not None and end > self.emitted:
            self.emit(self.r.text[self.emitted:end])
            self.emitted = end

    def finish(self, reason: str) -> None:
        r = self.r
        r.finish_reason = reason
        if self.tok is not None and reason != "stop":
            r.text = self._decode()
        self._emit_to(len(r.text))
