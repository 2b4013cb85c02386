"""Error types for bad input: every CLI prints ``error: <message>`` (one line) and exits 1.

Raise these for problems the user can fix (a missing file, an unsupported config, a corrupt
or mismatched checkpoint). Anything else is a bug and keeps its traceback.
"""


class MegatronLiteError(Exception):
    """Base class: a one-line, user-facing message about bad input."""


class ConfigError(MegatronLiteError, ValueError):
    """The model config cannot be served: unknown model_type, TP not dividing heads, ..."""


class CheckpointError(MegatronLiteError):
    """A checkpoint directory is missing, incomplete, corrupt or made for another TP size."""


def report_error(message, code: int = 1) -> int:
    """Print the CLIs' one-line ``error: <message>`` to stderr; return the exit code."""
    import sys
    # One write of the whole line: with PYTHONUNBUFFERED, print() issues the text and the
    # newline as two writes, and torchrun ranks sharing stderr interleave between them.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return code
