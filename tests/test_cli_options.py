"""Every command's options under bad values: one `error:` line naming the option and what it must
be, a nonzero exit, no traceback, checked before any model loads or anything is written."""
import os
import re
import sys

import pytest

from neuro_mar.cli import main

MODEL = "no-such-model-folder"  # never loaded: the options are refused first


def _refused(argv, errno_ok=False) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    msg = info.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert "Traceback" not in msg and (errno_ok or "Errno" not in msg), msg
    return msg


@pytest.mark.parametrize("argv,match", [
    (["generate", MODEL, "--prompt", "x", "--temperature", "nan"], "--temperature must be a number >= 0, got nan"),
    (["generate", MODEL, "--prompt", "x", "--temperature", "-1"], "--temperature must be a number >= 0, got -1.0"),
    (["generate", MODEL, "--prompt", "x", "--temperature", "inf"], "--temperature must be a number >= 0, got inf"),
    (["generate", MODEL, "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 1"),
    (["generate", MODEL, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["generate", MODEL, "--prompt", "x", "--seed", "-1"], "--seed must be an integer from 0 to 2\\*\\*32 - 1"),
    (["generate", MODEL, "--prompt", "x", "--seed", str(2**70)], "--seed must be an integer from 0"),
    (["eval", MODEL, "--max-tokens", "-1"], "--max-tokens must be an integer >= 1, got -1"),
    (["eval", MODEL, "--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["eval", MODEL, "--max-tokens", "100"], r"--max-tokens must be an integer >= --seq-len \(256\), got 100"),
    (["eval", MODEL, "--limit", "-1"], "--limit must be an integer >= 1, got -1"),
    (["eval", MODEL, "--limit", "0"], "--limit must be an integer >= 1, got 0"),
    (["eval", MODEL, "--max-length", "0"], "--max-length must be an integer >= 2, got 0"),
    (["eval", MODEL, "--context-tokens", "0"], "--context-tokens must be an integer >= 1, got 0"),
    (["eval", MODEL, "--batch-tokens", "0"], "--batch-tokens must be an integer >= 1, got 0"),
    (["eval", MODEL, "--batch-tokens", "-5"], "--batch-tokens must be an integer >= 1, got -5"),
    (["eval", MODEL, "--seq-len", "0"], "--seq-len must be an integer >= 2, got 0"),
    (["eval", MODEL, "--seq-len", "1"], "--seq-len must be an integer >= 2, got 1"),
    (["plot-trace", "t.h5", "--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["plot-trace", "t.h5", "--max-channels", "-1"], "--max-channels must be an integer >= 1, got -1"),
    (["energy", MODEL, "--context", "0"], "--context must be an integer >= 1, got 0"),
    (["energy", MODEL, "--context", "512", "--context", "-1"], "--context must be an integer >= 1, got -1"),
    (["energy", MODEL, "--seq-len", "0"], "--seq-len must be an integer >= 1, got 0"),
    (["energy", MODEL, "--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["trace", MODEL, "--text", "x", "--out", "t.h5", "--seq-len", "0"], "--seq-len must be an integer >= 1"),
    (["trace", MODEL, "--text", "x", "--out", "t.h5", "--max-tokens", "-3"], "--max-tokens must be an integer >= 1"),
    (["simulate", MODEL, "--text", "x", "--chips", "0"], "--chips must be an integer >= 1, got 0"),
    (["simulate", MODEL, "--text", "x", "--chips", "-1"], "--chips must be an integer >= 1, got -1"),
    (["refine", "--out", "run", "--teacher", MODEL, "--seed", "-1"], "--seed must be an integer from 0 to 2\\*\\*32 - 1, got -1"),
])
def test_a_bad_number_is_one_error_line_naming_the_option(tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    msg = _refused(argv)
    assert re.search(match, msg), msg
    assert os.listdir(tmp_path) == []  # nothing written (no run folder, no trace, no .part)


@pytest.mark.parametrize("spec,match", [
    ("bogus", r"^error: --device: 'bogus' is not a torch device \(cpu, cuda, cuda:N\)$"),
    ("cuda:x", r"^error: --device: 'cuda:x' is not a torch device"),
    ("meta", r"^error: --device: 'meta' is not a device the models can run on \(cpu, cuda, cuda:N\)$"),
    ("cuda", r"^error: --device cuda: CUDA is not available on this machine .*; use --device cpu$"),
    ("cuda:1", r"^error: --device cuda:1: CUDA is not available on this machine"),
])
def test_a_bad_device_is_one_error_line(monkeypatch, spec, match):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert re.search(match, _refused(["eval", MODEL, "--device", spec]))


def test_a_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "this machine has 1 CUDA device(s) (cuda:0 to cuda:0)" in _refused(["eval", MODEL, "--device", "cuda:3"])


@pytest.mark.parametrize("argv,line", [
    (["refine", "--out", "r", "--seq-len", "nan"],
     "error: --seq-len must be an integer, got 'nan' (see neuro-mar refine --help)"),
    (["refine", "--out", "r", "--lr-2", "fast"], "error: --lr-2 must be a number, got 'fast' (see neuro-mar refine --help)"),
    (["refine", "--out", "r", "--dt-range", "0.3", "x"],
     "error: --dt-range must be a number, got 'x' (see neuro-mar refine --help)"),
    (["generate", MODEL, "--prompt", "x", "--max-new-tokens", "1.5"],
     "error: --max-new-tokens must be an integer, got '1.5' (see neuro-mar generate --help)"),
    (["refine", "--out", "r", "--lr-1b", "-inf"],
     "error: argument --lr-1b: expected one argument; a value that starts with '-' is written --lr-1b=VALUE "
     "(see neuro-mar refine --help)"),
    (["refine", "--preset", "nope", "--out", "r"], "error: argument --preset: invalid choice: 'nope'"),
    (["refine"], "error: the following arguments are required: --out (see neuro-mar refine --help)"),
    (["nope"], "error: argument COMMAND: invalid choice: 'nope'"),
])
def test_argparse_errors_are_one_line_without_usage(capsys, argv, line):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line) and "usage:" not in err, err


def test_a_negative_value_in_equals_form_reaches_the_range_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--temperature must be a number >= 0, got -1.0" in _refused(
        ["generate", MODEL, "--prompt", "x", "--temperature=-1"])


def _out_cases(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    d = tmp_path / "folder"
    d.mkdir()
    folder_cmds = [["refine", "--out"], ["energy", MODEL, "--out"], ["eval", MODEL, "--data", "d.txt", "--out"],
                   ["simulate", MODEL, "--text", "x", "--out"], ["plot-trace", "t.h5", "--out"]]
    cases = []
    for cmd in folder_cmds:
        cases.append((cmd + [str(f)], f"--out {f} exists and is not a folder"))
        cases.append((cmd + [str(f / "sub")], f"--out {f / 'sub'}: {f} is a file, not a folder"))
    trace = ["trace", MODEL, "--text", "x", "--out"]
    cases += [(trace + [str(d)], f"--out {d} is a folder, but a file is written there"),
              (trace + [str(f / "t.h5")], f"--out {f / 't.h5'}: {f} is a file, not a folder"),
              (trace + [str(tmp_path / "t.nwb"), "--format", "nwb"], None)]  # valid: reaches the model load
    return cases


def test_a_bad_out_path_is_refused_before_anything_runs(tmp_path):
    for argv, match in _out_cases(tmp_path):
        before = sorted(os.listdir(tmp_path))
        msg = _refused(argv)
        if match is None:
            assert "--out" not in msg, msg
        else:
            assert match in msg and "choose another path" in msg, msg
        assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "folder") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
@pytest.mark.parametrize("cmd", [["refine", "--out"], ["energy", MODEL, "--out"], ["trace", MODEL, "--text", "x", "--out"]])
def test_an_out_path_that_cannot_be_created_is_refused(cmd):
    msg = _refused(cmd + ["/proc/nope"])
    assert "--out /proc/nope: /proc takes no new files" in msg and "choose another path" in msg, msg


def test_a_trace_whose_rename_fails_leaves_no_temporary(tmp_path, monkeypatch):
    from test_hardening import _mar_folder

    import neuro_mar.traces.sonata as sonata

    folder = _mar_folder(tmp_path / "m", neurons={"mlp.in": "atmn"})
    out = tmp_path / "out"
    out.mkdir()
    real = os.replace

    def failing(src, dst):
        if str(src).endswith(".part"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(sonata.os, "replace", failing)
    msg = _refused(["trace", str(folder), "--text", "w1 w2 w3", "--out", str(out / "t.h5")], errno_ok=True)
    assert "No space left on device" in msg
    assert os.listdir(out) == []  # no t.h5, no .t.h5.PID.RANDOM.part


def test_an_atomic_write_whose_rename_fails_removes_its_temporary(tmp_path):
    from neuro_mar.io_utils import atomic_write_text, remove_own_temps

    target = tmp_path / "report.json"
    target.mkdir()  # os.replace of a file onto a folder fails
    with pytest.raises(OSError):
        atomic_write_text(target, "{}")
    assert os.listdir(tmp_path) == ["report.json"]
    stray = tmp_path / f".x.{os.getpid()}.abc.part"
    stray.write_text("x")
    assert remove_own_temps(tmp_path / "x") == [stray] and not stray.exists()


def test_valid_defaults_pass_the_checks(tmp_path, monkeypatch):
    from neuro_mar.cli import _check_options, build_parser

    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    for argv in (["energy", MODEL, "--out", "e"], ["eval", MODEL, "--device", "cpu", "--out", "ev"],
                 ["generate", MODEL, "--prompt", "x"], ["trace", MODEL, "--text", "x", "--out", "a/b/t.h5"],
                 ["plot-trace", "t.h5"], ["simulate", MODEL, "--text", "x"], ["refine", "--out", "new/run"],
                 ["eval", MODEL, "--max-tokens", "256", "--seq-len", "256", "--limit", "1"]):
        args = parser.parse_args(argv)
        if args.command == "energy":
            args.context = [512]
        _check_options(args)
    assert os.listdir(tmp_path) == []
