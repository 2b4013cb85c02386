"""The command-line tools: ``generate``, ``evaluate``, ``calibrate`` and ``sensitivity``.

Each module has ``main(argv=None) -> int``, which ``tools/<name>.py`` and the
``megatron-lite-<name>`` console scripts (pyproject.toml) call. The package sits above the
library and ``megatron_lite.lab`` and may import both; nothing imports it.

Every tool parses its arguments before importing torch, transformers or the lab, so
``--help`` answers at once, and checks every input it can (flags, ``--comm`` specs, files,
the checkpoint's config and tokenizer) before it loads weights. Bad input ends with one
line ``error: ...`` on stderr and exit status 1.
"""
