"""The command-line tools as a whole: every tool's --help answers fast without importing
torch, every flag has help text and shows its default, the descriptions are whole, the
console scripts of pyproject.toml resolve to the tools' mains, tools/<name>.py are thin
wrappers of megatron_lite/cli, and tools/sensitivity.py takes codec-only --comm specs."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import time

import pytest

from tests.conftest import REPO, run_tool
from tests.test_calibrate import load_tool, run_main

CLI_TOOLS = ["generate", "evaluate", "calibrate", "sensitivity"]
TOOLS = CLI_TOOLS + ["bench_generate", "bench_hf_generate", "plot_accuracy",
                     "convert_hf_checkpoint", "bench_allreduce", "make_results"]
HEAVY = ("torch", "transformers", "matplotlib", "numpy", "safetensors", "tokenizers",
         "megatron_lite.lab", "megatron_lite.comm", "megatron_lite.inference")
# bench_hf_generate lists the serving shapes in its help: a table of dicts, no imports;
# make_results's page helpers import only the standard library.
LIGHT = ("megatron_lite.lab", "megatron_lite.lab.shapes", "megatron_lite.lab.results")


def _module(tool):
    """The module whose parser and docstring a tool uses."""
    if tool in CLI_TOOLS:
        return importlib.import_module(f"megatron_lite.cli.{tool}")
    if tool == "convert_hf_checkpoint":
        return importlib.import_module("megatron_lite.cli.convert")
    return load_tool(tool)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_is_fast_and_imports_nothing_heavy(tool):
    t0 = time.perf_counter()
    proc = run_tool(["-X", "importtime", f"tools/{tool}.py", "--help"], timeout=60)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ")
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "argparse" in imported                        # the probe does see the imports
    heavy = [m for m in imported if (m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY)))
             and m not in LIGHT]
    assert not heavy, heavy
    assert wall < 5.0, f"{tool} --help took {wall:.1f} s"


def _option_help(parser, action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_has_help_and_shows_its_default(tool):
    mod = _module(tool)
    parser = mod.build_parser()
    # the whole module docstring, not a first line cut mid-sentence
    assert parser.description.strip() == mod.__doc__.strip()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = _option_help(parser, action)
        name = action.option_strings or action.dest
        assert text.strip(), f"{tool} {name}: no help text"
        if not action.option_strings or action.required:
            continue
        if action.nargs != 0 or isinstance(action, argparse.BooleanOptionalAction):
            assert "default" in text.lower(), f"{tool} {name}: help shows no default: {text}"
        if action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, f"{tool} {name}: {text}"


def test_one_name_per_flag():
    names = {tool: {s for a in _module(tool).build_parser()._actions for s in a.option_strings}
             for tool in TOOLS}
    assert "--json" in names["generate"] and "--output-json" not in names["generate"]
    assert "--comm" in names["sensitivity"] and "--codec" not in names["sensitivity"]
    evaluate = _module("evaluate").build_parser()
    (dtype,) = [a for a in evaluate._actions if "--dtype" in a.option_strings]
    assert dtype.choices == ["bf16", "fp16", "fp32"]


@pytest.mark.parametrize("tool", CLI_TOOLS)
def test_tools_are_thin_wrappers_of_the_cli(tool):
    src = (REPO / "tools" / f"{tool}.py").read_text()
    assert f"from megatron_lite.cli.{tool} import main" in src and "sys.exit(main())" in src
    assert len(src.splitlines()) <= 15
    assert load_tool(tool).main is _module(tool).main


def test_console_scripts_resolve_to_the_tools():
    import tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for tool in CLI_TOOLS:
        assert scripts[f"megatron-lite-{tool}"] == f"megatron_lite.cli.{tool}:main"
    for name, target in scripts.items():
        # what the installed script does: load the entry point, call it
        fn = importlib.metadata.EntryPoint(name, target, "console_scripts").load()
        assert callable(fn), name
        if name.removeprefix("megatron-lite-") in CLI_TOOLS:
            assert fn is _module(name.removeprefix("megatron-lite-")).main
            with pytest.raises(SystemExit) as e:
                fn(["--help"])
            assert e.value.code == 0


# ------------------------------------------------------------------ sensitivity --comm
@pytest.mark.parametrize("spec,msg", [
    ("int4:128,layers.0.*=int8", "a candidate names only a codec"),
    ("int4:128,algo=one-shot", "a candidate names only a codec"),
    ("int4:128,min_bytes=1024", "a candidate names only a codec"),
    ("int4:128,calibration=c.safetensors", "a candidate names only a codec"),
    ("ef+int4:128", "a candidate names only a codec"),
    ("native", "native is not a codec"),
    ("outlier-int4", "calibrated codecs (outlier-, weighted-, klt)"),
    ("weighted-int8:128", "calibrated codecs (outlier-, weighted-, klt)"),
    ("int7", "unknown codec"),
])
def test_sensitivity_takes_only_codecs(tiny_hf_dir, tmp_path, capsys, spec, msg):
    out = tmp_path / "s.json"
    rc, err = run_main("sensitivity", ["--ckpt", tiny_hf_dir("llama"), "--tp", "2", "--text",
                                       "python-docs", "--comm", "int8:32", "--comm", spec,
                                       "--out", out], capsys)
    assert rc == 1 and err.startswith(f"error: --comm {spec!r}: ") and msg in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_sensitivity_bad_input(tiny_hf_dir, tmp_path, capsys):
    base = ["--ckpt", tiny_hf_dir("llama"), "--tp", "2", "--comm", "int8:32"]
    stale = tmp_path / "old.json"
    stale.write_text('{"kl": {"layers.0.mlp.down_proj": {"int4:32": 0.1}}}')
    for extra, msg in [
        ([], "--text is required"),
        (["--text", tmp_path / "none.txt"], "--text: file not found"),
        (["--text", "python-docs", "--tp", "1"], "--tp 1: TP 1 has no all-reduce"),
        (["--text", "python-docs", "--budget", "0"], "--budget must be > 0"),
        (["--from-json", stale], f"--from-json {stale} has no KL for 'int8:32'"),
        (["--text", "python-docs", "--out", tmp_path / "no" / "s.json"], "--out"),
    ]:
        rc, err = run_main("sensitivity", base + extra, capsys)
        assert rc == 1 and err.startswith("error: ") and msg in err, (extra, err)
        assert len(err.strip().splitlines()) == 1
