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
    """Print the CLIs' one-line ``error: <message>`` to stderr; return the exit code.

    Under torchrun the line also goes to this rank's torchelastic error file, so that the
    failure summary torchrun prints after the ranks exit shows it as the rank's cause
    (``traceback : error: ...``) instead of a link to the torchelastic docs.
    """
    import sys
    line = f"error: {message}"
    # One write of the whole line: with PYTHONUNBUFFERED, print() issues the text and the
    # newline as two writes, and torchrun ranks sharing stderr interleave between them.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    _record_for_torchrun(line)
    return code


def _record_for_torchrun(line: str) -> None:
    """Write ``line`` to ``$TORCHELASTIC_ERROR_FILE`` (set by torchrun for each rank) in
    the layout of torch.distributed.elastic's ErrorHandler.record_exception, whose
    ``py_callstack`` torchrun's ChildFailedError summary prints as the rank's traceback."""
    import json
    import os
    import time
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    doc = {"message": {"message": line,
                       "extraInfo": {"py_callstack": line,
                                     "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(doc, f)
    except OSError:
        pass    # the summary then says what it says without the file; the line is printed
