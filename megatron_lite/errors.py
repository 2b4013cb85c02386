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
    _linger_for_peers()
    return code


# torchrun stops every rank as soon as one exits with an error, so a rank that refuses its
# input and exits at once can cut off a peer that is still starting up before the peer
# prints its own refusal. Seconds a rank of a multi-rank torchrun job waits after its error
# line: ranks start within about a second of each other here, even on a loaded 2-core
# machine (tests/test_cli.py's two-rank refusals).
LINGER_S = 3.0


def _linger_for_peers() -> None:
    import os
    import time
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(LINGER_S)


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
