"""What the command-line tools share: help formatting, one-line errors, the ``--comm`` and
``--text`` flags.

Only the standard library and ``megatron_lite.errors`` are imported at module level, so
that ``--help`` stays fast; the helpers import what they need when called.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from megatron_lite.errors import MegatronLiteError, report_error

# The name of the built-in text (lab/eval/pydocs.py); kept here so --help needs no import.
PYTHON_DOCS = "python-docs"
TEXT_HELP = (f"a text file, or {PYTHON_DOCS!r}: English prose from the docstrings of this "
             "Python's standard library (every machine has it; the Python version is "
             "recorded)")


class UsageError(MegatronLiteError):
    """A flag value the tool refuses (the message names the flag)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows every option's default.

    ``(default: X)`` is appended to the help of an option that takes a value and has a
    default, unless the help already says what the default is (options whose absence
    means something, e.g. "default: bf16 on GPU, fp32 on CPU", say it in words).
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or "default" in text.lower()
                or default is None or default is argparse.SUPPRESS or default == []):
            return text
        return f"{text} (default: %(default)s)"


def make_parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def fail(message) -> int:
    """Print the one-line ``error: <message>``; return exit status 1."""
    return report_error(message)


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of the torchrun environment; (0, 1) without one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------- checks
def check_output(path, option: str) -> None:
    """An output file's directory must exist (checked before any work, so nothing is lost
    at the end of a long run)."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(str(path)))
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path}: directory {directory} does not exist")


def check_input_file(path, option: str) -> None:
    if path is not None and not os.path.isfile(str(path)):
        raise UsageError(f"{option}: file not found: {path}")


def check_text_source(source, option: str = "--text") -> None:
    """``--text``: an existing file or the built-in text's name."""
    if source is not None and source != PYTHON_DOCS and not os.path.isfile(str(source)):
        raise UsageError(f"{option}: file not found: {source} (or give {PYTHON_DOCS!r})")


def text_meta(source: str) -> dict:
    """What a result file records about its ``--text``: the file's name, or the built-in
    text's name plus the Python version whose standard library it came from."""
    if source == PYTHON_DOCS:
        from megatron_lite.lab.eval.pydocs import describe
        return describe()
    return {"text": os.path.basename(str(source))}


# ----------------------------------------------------------------------------- --comm
def parse_comm_flag(text, calibration=None, option: str = "--comm"):
    """``parse_comm`` with a one-line error that names the flag and the value."""
    from megatron_lite.comm.spec import parse_comm
    try:
        return parse_comm(text, calibration)
    except MegatronLiteError as e:
        raise UsageError(f"{option} {text!r}: {e}") from None


def parse_comm_flags(texts: Sequence[str], calibration=None, option: str = "--comm") -> list:
    return [parse_comm_flag(t, calibration, option) for t in texts]


def check_calibration(calibration, specs: Sequence) -> None:
    """``--calibration FILE``: it must exist, and some ``--comm`` spec must use it."""
    if calibration is None:
        return
    check_input_file(calibration, "--calibration")
    if not any(s.calibration == str(calibration) for s in specs if not s.is_native):
        raise UsageError(f"--calibration {calibration} is given but no --comm spec uses it "
                         "(give a codec, e.g. --comm weighted-hadamard-int8:128)")


def check_comm_for_model(spec, hf_config: dict, tp: int, option: str = "--comm") -> None:
    """Build every site's scheme of ``spec`` for this model and TP size, before any weights
    load: a calibration file made for another model or TP size, or an override that
    resolves to nothing buildable, fails here with a line naming the flag."""
    if spec.is_native:
        return
    from megatron_lite.comm.router import SiteCodecs
    from megatron_lite.comm.spec import EMBED_SITE, format_comm
    from megatron_lite.models.config import ModelConfig
    num_layers = ModelConfig.from_hf(hf_config).num_layers
    try:
        sites = SiteCodecs(spec, num_layers)
        if sites.calibration is not None:
            sites.calibration.check(tp=tp, hf_config=hf_config)
        for i in range(num_layers):
            for s in ("self_attn.o_proj", "mlp.down_proj"):
                sites.scheme_for(f"layers.{i}.{s}")
        sites.scheme_for(EMBED_SITE)
    except (MegatronLiteError, ValueError) as e:
        raise UsageError(f"{option} {format_comm(spec)!r}: {e}") from None


# ----------------------------------------------------------------------------- output
def write_json(path, doc: dict) -> None:
    """Write ``doc`` atomically (temporary file + rename)."""
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
