"""The command line's front door: every command's --help gives every option a help text and its
default, --version prints the package's version, and renamed options keep their old spellings as
hidden aliases."""
import argparse
import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import neuro_mar
from neuro_mar.cli import _refine_config, build_parser, main
from neuro_mar.refine import PRESETS, RefineConfig

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["neurons", "energy", "trace", "plot-trace", "refine", "clean", "eval", "generate", "simulate", "sweep"]


def _commands(parser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv + ["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """{first option string: its help text, whitespace joined} parsed from --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[^ ,]+)(?:[^ ]| (?! ))*(?: {2,}(.*))?$", line)
        if m:
            current = m.group(1)
            entries[current] = (m.group(2) or "").strip()
        elif current and re.match(r"^ {4,}\S", line):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


def test_the_tests_cover_every_command():
    assert sorted(_commands(build_parser())) == sorted(COMMANDS)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_every_option_has_a_help_text_and_shows_its_default(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    sub = parser if command is None else _commands(parser)[command]
    text = _help(capsys, [] if command is None else [command])
    entries = _entries(text)
    visible = [a for a in sub._actions if a.option_strings and a.help is not argparse.SUPPRESS]
    assert visible and "-h" in entries
    for action in visible:
        flag = action.option_strings[0]
        assert flag in entries, f"{command}: {flag} not in --help:\n{text}"
        body = entries[flag]
        if action.default is argparse.SUPPRESS:  # -h, --version: nothing to default
            assert len(body) > 10, (flag, body)
            continue
        m = re.fullmatch(r"(.+?) \((default: (.+)|required)\)", body)
        assert m, f"{command} {flag}: no default shown: {body!r}"
        assert len(m.group(1)) > 5 and not m.group(1).startswith("(default"), \
            f"{command} {flag}: no help text: {body!r}"
        if action.required:
            assert m.group(2) == "required", (flag, body)
        elif action.default is not None:  # a plain default: shown as it is
            assert m.group(3) == _shown(action.default), (command, flag, body)
    for action in sub._actions:
        if not action.option_strings and action.help is not argparse.SUPPRESS and action.dest != "command":
            assert action.help and len(action.help) > 5, f"{command}: positional {action.metavar} has no help"


def test_refine_help_shows_the_preset_resolved_defaults(capsys, monkeypatch):
    """refine's options default to None (the preset, --config or RefineConfig decide): --help shows
    the value --preset quick gives, and the other presets' where they differ."""
    monkeypatch.setenv("COLUMNS", "100")
    entries = _entries(_help(capsys, ["refine"]))
    resolved = RefineConfig(**PRESETS["quick"])
    refine = _commands(build_parser())["refine"]
    fields = {f.name for f in dataclasses.fields(RefineConfig)}
    checked = 0
    for action in refine._actions:
        if action.dest not in fields or action.help is argparse.SUPPRESS:
            continue
        value = getattr(resolved, action.dest)
        default = re.search(r"\(default: (.+)\)$", entries[action.option_strings[0]]).group(1)
        expected = {"max_tokens": "all"}.get(action.dest, _shown(value))
        assert default.split(";")[0].startswith(expected), (action.option_strings[0], default, expected)
        checked += 1
    assert checked >= 60
    steps = entries["--steps-1b"]
    assert steps.endswith(f"(default: {PRESETS['quick']['steps_1b']}; --preset gpu {PRESETS['gpu']['steps_1b']}, "
                          f"tiny {PRESETS['tiny']['steps_1b']})"), steps
    assert entries["--seq-len-1a"].endswith("(default: 256)")  # no preset sets it
    assert "precedence: preset < config file < command line" in entries["--config"]


#: options that exist only in a run's --config file (neuron_options: --neuron-option JSON)
CONFIG_ONLY = {"heldout_fraction", "energy_contexts", "neuron_options"}


def test_every_refine_config_field_has_an_option():
    refine = _commands(build_parser())["refine"]
    dests = {a.dest for a in refine._actions}
    fields = {f.name for f in dataclasses.fields(RefineConfig)}
    assert fields - dests == CONFIG_ONLY
    assert dests - fields == {"help", "out", "config", "preset", "resume", "neuron_option"}


def test_version_prints_the_package_version(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert neuro_mar.__version__ == version
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"neuro-mar {version}\n"
    run = subprocess.run([sys.executable, "-m", "neuro_mar", "--version"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == f"neuro-mar {version}\n", run.stderr


# (command line before the option, old spelling, documented spelling, dest, values, parsed value)
ALIASES = [
    (["eval", "M"], "--task", "--suite-task", "suite_task", ["piqa=p.jsonl"], ["piqa=p.jsonl"]),
    (["eval", "M"], "--tasks", "--multiple-choice", "multiple_choice", ["arc.jsonl"], ["arc.jsonl"]),
    (["refine", "--out", "r"], "--eval-task", "--eval-multiple-choice", "eval_tasks", ["arc.jsonl"], ["arc.jsonl"]),
    (["refine", "--out", "r"], "--temperature", "--distill-temperature", "temperature", ["2.5"], 2.5),
    (["refine", "--out", "r"], "--gen-max-new", "--gen-max-new-tokens", "gen_max_new", ["99"], 99),
]


@pytest.mark.parametrize("base,old,new,dest,values,parsed", ALIASES, ids=[a[1] for a in ALIASES])
def test_an_old_spelling_still_works_hidden(capsys, base, old, new, dest, values, parsed):
    parser = build_parser()
    by_old = parser.parse_args(base + [old, *values])
    by_new = parser.parse_args(base + [new, *values])
    assert getattr(by_old, dest) == parsed and vars(by_old) == vars(by_new)
    if isinstance(parsed, list):  # repeatable: both spellings add to one list
        both = parser.parse_args(base + [old, *values, new, "second"])
        assert getattr(both, dest) == parsed + ["second"]
    if base[0] == "refine":  # and it reaches the run's configuration
        assert getattr(_refine_config(by_old), dest) == parsed
    text = _help(capsys, base[:1])
    assert re.search(rf"(?<![\w-]){re.escape(new)}(?![\w-])", text)
    assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text), f"{old} is shown in {base[0]} --help"


def test_generate_temperature_is_still_the_sampling_temperature():
    args = build_parser().parse_args(["generate", "M", "--prompt", "x", "--temperature", "0.7"])
    assert args.temperature == 0.7
    refine = build_parser().parse_args(["refine", "--out", "r", "--temperature", "3"])
    cfg = _refine_config(refine)
    assert cfg.temperature == 3.0 and cfg.gen_temperature == RefineConfig().gen_temperature


def test_no_option_is_split_at_a_hyphen_in_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    for command in COMMANDS:
        text = _help(capsys, [command])
        assert not re.search(r"--[\w-]*-\n", text), command
