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


# ---------------------------------------------------------------------------------------------
# refine --config FILE: a run's refine_config.json replayed; precedence preset < file < command line
# ---------------------------------------------------------------------------------------------
def _saved_config(folder, cfg) -> str:
    """``cfg`` saved as the pipeline saves a run's record (refine_config.json in the run folder)."""
    import json
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "refine_config.json"
    path.write_text(json.dumps(asdict(cfg), indent=2))
    return str(path)


@pytest.fixture
def captured_refine(monkeypatch):
    """run_refine replaced by a recorder: the RefineConfig that `neuro-mar refine` would run."""
    import neuro_mar.refine as refine

    seen = []
    monkeypatch.setattr(refine, "run_refine", lambda cfg, out, resume=False: seen.append(cfg))
    return seen


def _run_config(**kw):
    from neuro_mar.refine import PRESETS, RefineConfig

    return RefineConfig(**{**PRESETS["tiny"], "teacher": "some/teacher", "data": ["a.txt", "b.jsonl"],
                           "text_field": "body", "steps_2": 7, "dt_range": (0.5, 2.0), "eval_tasks": ["arc.jsonl"],
                           "neuron_options": {"T": 4}, "heldout_fraction": 0.2, "mix_generated": True, **kw})


def test_config_replays_a_run_exactly(tmp_path, captured_refine):
    import json
    from dataclasses import asdict

    cfg = _run_config()
    path = _saved_config(tmp_path / "run", cfg)
    assert main(["refine", "--config", path, "--out", str(tmp_path / "again")]) == 0
    (got,) = captured_refine
    assert got == cfg  # the default --preset quick fills nothing the file holds (its steps_1b 3, not 24)
    assert json.dumps(asdict(got), indent=2) == (tmp_path / "run" / "refine_config.json").read_text()


def test_config_options_on_the_command_line_override_the_file(tmp_path, captured_refine):
    cfg = _run_config()
    path = _saved_config(tmp_path / "run", cfg)
    assert main(["refine", "--config", path, "--out", str(tmp_path / "b"), "--steps-2", "11", "--data", "c.txt",
                 "--distill-temperature", "2", "--no-normalize-memory", "--neuron-option", '{"T": 8}',
                 "--dt-range", "0.1", "1"]) == 0
    (got,) = captured_refine
    assert (got.steps_2, got.data, got.temperature, got.neuron_options, got.dt_range) == \
        (11, ["c.txt"], 2.0, {"T": 8}, (0.1, 1.0))
    import dataclasses

    changed = {"steps_2", "data", "temperature", "neuron_options", "dt_range"}
    assert dataclasses.replace(got, **{k: getattr(cfg, k) for k in changed}) == cfg  # everything else: the file's


def test_config_precedence_preset_then_file_then_command_line(tmp_path, captured_refine):
    import json

    from neuro_mar.refine import PRESETS, RefineConfig

    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"seq_len": 64, "steps_2": 5}))
    base = ["refine", "--config", str(path), "--preset", "tiny", "--out", str(tmp_path / "o")]
    assert main(base) == 0
    assert main(base + ["--seq-len", "16"]) == 0
    assert main(["refine", "--preset", "tiny", "--out", str(tmp_path / "o")]) == 0
    file_wins, flag_wins, preset_only = captured_refine
    assert (file_wins.seq_len, file_wins.steps_2) == (64, 5)  # the file beats the preset (tiny: 32, 3)
    assert file_wins.steps_1b == PRESETS["tiny"]["steps_1b"]  # the preset fills what the file leaves out
    assert file_wins.alpha == RefineConfig().alpha  # and RefineConfig what neither sets
    assert (flag_wins.seq_len, flag_wins.steps_2) == (16, 5)  # the command line beats the file
    assert (preset_only.seq_len, preset_only.steps_2) == (PRESETS["tiny"]["seq_len"], PRESETS["tiny"]["steps_2"])


def _bad_configs(tmp_path):
    """(what the --config file holds, bytes or a folder, what its error says)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "refine_config.json").write_text("{}")
    return [
        (tmp_path / "missing.json", None, "does not exist"),
        (run, "folder", "is a folder, not a refine_config.json file; give the file: "
                        f"--config {run / 'refine_config.json'}"),
        (tmp_path / "broken.json", b'{"seq_len": 64,', r"is not JSON \(.* at line 1, column 16\)"),
        (tmp_path / "binary.json", b"\xff\xfe\x00\x01", "is not UTF-8 text"),
        (tmp_path / "list.json", b"[1, 2]", "holds a JSON list, not an object of refine options"),
        (tmp_path / "unknown.json", b'{"seq_len": 64, "seqlen": 3}',
         r"unknown field 'seqlen' .*did you mean 'seq_len'\?"),
        (tmp_path / "flag.json", b'{"steps-2": 3}', r"unknown field 'steps-2' .*did you mean 'steps_2'\?"),
        (tmp_path / "nonsense.json", b'{"zzzz": 3}', r"unknown field 'zzzz' .*; fields: teacher, data, "),
        (tmp_path / "type.json", b'{"steps_2": "5"}', r"field 'steps_2' must be an integer, got '5'"),
        (tmp_path / "bool.json", b'{"steps_2": true}', r"field 'steps_2' must be an integer, got True"),
        (tmp_path / "float.json", b'{"lr_2": "fast"}', r"field 'lr_2' must be a number, got 'fast'"),
        (tmp_path / "flag2.json", b'{"fsdp": 1}', r"field 'fsdp' must be true or false, got 1"),
        (tmp_path / "data.json", b'{"data": "a.txt"}', r"field 'data' must be a list, got 'a.txt'"),
        (tmp_path / "data2.json", b'{"data": [1]}', r"field 'data' must be a list of strings, got \[1\]"),
        (tmp_path / "range.json", b'{"dt_range": [0.3, 3.0, 9]}', r"field 'dt_range' must be a list of two numbers"),
        (tmp_path / "ctx.json", b'{"energy_contexts": [64.5]}', r"field 'energy_contexts' must be a list of integers"),
        (tmp_path / "opt.json", b'{"max_tokens": "all"}', r"field 'max_tokens' must be an integer, got 'all'"),
        (tmp_path / "opts.json", b'{"neuron_options": [8]}', r"field 'neuron_options' must be a JSON object"),
    ]


def test_a_bad_config_file_is_one_error_line_naming_file_and_field(tmp_path, monkeypatch, captured_refine):
    monkeypatch.chdir(tmp_path)
    for path, content, match in _bad_configs(tmp_path):
        if isinstance(content, bytes):
            path.write_bytes(content)
        msg = _refused(["refine", "--config", str(path), "--out", str(tmp_path / "out")])
        assert msg.startswith(f"error: --config {path}"), msg
        assert re.search(match, msg), (match, msg)
    assert captured_refine == [] and not (tmp_path / "out").exists()


def test_config_null_is_taken_where_the_field_allows_it(tmp_path, captured_refine):
    import json

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_tokens": None, "eval_data": None, "seq_len": 64}))
    assert main(["refine", "--config", str(path), "--out", str(tmp_path / "o")]) == 0
    assert captured_refine[0].max_tokens is None and captured_refine[0].seq_len == 64
    path.write_text(json.dumps({"seq_len": None}))
    assert "field 'seq_len' must be an integer, got None" in _refused(
        ["refine", "--config", str(path), "--out", str(tmp_path / "o")])


def test_config_replays_a_real_run_and_resumes_it(tmp_path):
    """A tiny run's own refine_config.json replays it into a new folder (the same record, the same
    data and teacher fingerprints) and resumes it (the options match the record)."""
    import torch

    from test_refine import WORDS, _tokenizer
    from tiny import tiny_llama

    teacher = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher)
    _tokenizer().save_pretrained(teacher)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "train.txt"
    data.write_text(" ".join(WORDS[(i * 7 + int(torch.randint(0, 3, (1,), generator=g))) % 90] for i in range(3000)))
    first, second = tmp_path / "r1", tmp_path / "r2"
    assert main(["refine", "--out", str(first), "--preset", "tiny", "--teacher", str(teacher), "--data", str(data),
                 "--gamma", "0.1", "--distill-temperature", "1.5"]) == 0
    record = first / "refine_config.json"
    assert main(["refine", "--config", str(record), "--out", str(second)]) == 0
    for name in ("refine_config.json", "run_identity.json"):
        assert (second / name).read_text() == (first / name).read_text(), name
    assert (second / "student" / "config.json").is_file()
    assert main(["refine", "--config", str(record), "--out", str(first), "--resume"]) == 0
    with pytest.raises(SystemExit, match=r"started with other options \(--gamma 0.1 -> 0.2\)"):
        main(["refine", "--config", str(record), "--out", str(first), "--resume", "--gamma", "0.2"])


# ---------------------------------------------------------------------------------------------
# examples/my_chip.toml and docs/cost-tables.md: the example loads through the real loader and prices
# ---------------------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_chip.toml"


def _spiking_folder(path):
    from test_hardening import _mar_folder

    return _mar_folder(path, neurons={k: "atmn" for k in ("mixer.in", "mixer.out", "mlp.in", "mlp.down")})


def test_the_example_cost_table_loads_and_prices_energy(tmp_path, capsys):
    import math

    import torch

    from neuro_mar.hardware_models import estimate_energy, get_target, load_table
    from neuro_mar.hardware_models.targets import PJ
    from neuro_mar.models import MARForCausalLM

    table = load_table(EXAMPLE)
    assert get_target(str(EXAMPLE)) == table and (table.name, table.kind) == ("my-chip", "neuromorphic")
    folder = _spiking_folder(tmp_path / "m")
    model = MARForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    model.calibrate_thresholds([ids])
    rep = estimate_energy(model, [ids], targets=[str(EXAMPLE)], context=64)
    t = rep.targets["my-chip"]
    rows = t["per_part"]
    ac = sum((r["ac_pos"] or 0) + (r["ac_neg"] or 0) for r in rows)
    updates = sum(r["neuron_update"] or 0 for r in rows)
    assert ac > 0 and updates > 0
    assert t["components"]["synaptic AC"] == pytest.approx(ac * table.e_ac * PJ)
    assert t["components"]["neuron updates"] == pytest.approx(updates * table.e_neuron_update * PJ)
    assert t["components"]["companion (non-synaptic)"] > 0  # billed on dense_fallback
    assert t["student_J_per_token"] == pytest.approx(sum(t["components"].values()))
    mapping = t["mapping"]
    assert mapping["applicable"] and mapping["cores"] > 0
    assert mapping["chips"] == math.ceil(mapping["cores"] / table.cores_per_chip)
    T = max(v["T"] for k, v in measure(model, ids).items() if isinstance(k, tuple) and not v["dense"])
    assert t["static_J_per_token"] == pytest.approx(table.static_power_w_per_chip * mapping["chips"] * T
                                                    / table.timestep_hz)
    # the command line, as the README and docs/cost-tables.md show it
    assert main(["energy", str(folder), "--target", str(EXAMPLE), "--target", "loihi", "--seq-len", "16",
                 "--max-tokens", "64", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^my-chip\s+\d", out, re.M) and re.search(r"^loihi\s+\d", out, re.M), out
    assert main(["simulate", str(folder), "--text", "w1 w2 w3", "--target", str(EXAMPLE), "--quantize"]) == 0
    assert capsys.readouterr().out.startswith("my-chip: ")


def measure(model, ids):
    from neuro_mar.hardware_models import measure_site_activity

    return measure_site_activity(model, [ids])


def test_the_cost_table_docs_describe_every_field_and_their_examples_load(tmp_path):
    import dataclasses

    from neuro_mar.hardware_models import CostTable, load_table

    doc = (ROOT / "docs" / "cost-tables.md").read_text()
    for f in dataclasses.fields(CostTable):
        assert f"| `{f.name}` |" in doc, f"docs/cost-tables.md does not describe {f.name}"
    example = EXAMPLE.read_text()
    for f in dataclasses.fields(CostTable):  # the example shows every field (some commented out)
        assert re.search(rf"^#? ?{f.name} = ", example, re.M), f"examples/my_chip.toml lacks {f.name}"
    blocks = re.findall(r"```(toml|json)\n(.*?)```", doc, re.S)
    assert [kind for kind, _ in blocks] == ["toml", "json"]
    for i, (kind, text) in enumerate(blocks):
        path = tmp_path / f"t{i}.{kind}"
        path.write_text(text)
        assert load_table(path).name == "my-asic-int8"


# ---------------------------------------------------------------------------------------------
# progress bars (tqdm on stderr) of eval, energy and simulate
# ---------------------------------------------------------------------------------------------
class _Bars:
    """Stands in for tqdm.auto.tqdm and records every bar: its keywords and how far it went."""

    def __init__(self):
        self.bars = []

    def __call__(self, iterable=None, **kw):
        bar = _Bar(iterable, kw)
        self.bars.append(bar)
        return bar

    def named(self, prefix):
        return [b for b in self.bars if str(b.kw.get("desc", "")).startswith(prefix)]


class _Bar:
    def __init__(self, iterable, kw):
        self.iterable, self.kw, self.n, self.closed = iterable, kw, 0, False

    def __iter__(self):  # as tqdm, a bar over an iterable closes when the iterable ends
        for x in self.iterable:
            self.n += 1
            yield x
        self.closed = True

    def update(self, k=1):
        self.n += k

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    import tqdm.auto

    b = _Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", b)
    return b


def test_eval_shows_progress_and_its_numbers_do_not_change(tmp_path, capsys, bars):
    import json

    from neuro_mar.models import MARForCausalLM
    from neuro_mar.refine import perplexity
    from neuro_mar.refine.data import read_texts, tokenize_and_pack

    from test_refine import _tokenizer

    folder = _spiking_folder(tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"w{i % 90}" for i in range(300)))
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text("\n".join(json.dumps({"goal": f"w{i} w{i + 1}", "sol1": "w3 w4", "sol2": "w5", "label": 0})
                              for i in range(3)))
    assert main(["eval", str(folder), "--data", str(data), "--teacher", str(folder), "--seq-len", "16",
                 "--max-tokens", "160"]) == 0
    got = json.loads(capsys.readouterr().out)
    rows = tokenize_and_pack(read_texts(str(data), "text"), _tokenizer(), 16, 160)
    (ppl,) = bars.named("perplexity")
    (agree,) = bars.named("agreement")
    assert rows.shape[0] == 10 and len(ppl.iterable) == len(agree.iterable) == 2  # batches of 8 rows
    assert ppl.n == agree.n == 2 and ppl.closed and agree.closed
    assert got["perplexity"] == perplexity(MARForCausalLM.from_pretrained(folder).eval(), rows)
    # the suite: one bar per task, numbered
    assert main(["eval", str(folder), "--suite-task", f"a:piqa={piqa}", "--suite-task", f"b:piqa={piqa}"]) == 0
    descs = [b.kw["desc"] for b in bars.bars if b.kw.get("unit") == "req" and "tokenizing" not in b.kw["desc"]]
    assert descs == [f"{folder}: a (1/2)", f"{folder}: b (2/2)"]
    assert all(b.n == 6 for b in bars.bars if b.kw.get("desc") in descs)  # 3 documents x 2 choices
    tokenizing = [b for b in bars.bars if "(tokenizing)" in str(b.kw.get("desc"))]
    assert [b.kw["desc"] for b in tokenizing] == [f"{d} (tokenizing)" for d in descs]
    assert all(b.n == 6 for b in tokenizing)


def test_energy_measures_once_with_progress(tmp_path, bars, monkeypatch):
    import neuro_mar.hardware_models as hm

    folder = _spiking_folder(tmp_path / "m")
    calls = []
    real = hm.measure_site_activity
    for module in (hm, hm.energy):  # the command's own measurement and estimate_energy's
        monkeypatch.setattr(module, "measure_site_activity",
                            lambda model, batches: calls.append(1) or real(model, batches))
    assert main(["energy", str(folder), "--target", "45nm-fp32", "--seq-len", "16", "--max-tokens", "64",
                 "--context", "64", "--context", "128", "--out", str(tmp_path / "e")]) == 0
    (bar,) = bars.named("measuring spikes")
    assert bar.n == 4 and calls == [1]  # 64 tokens in 4 sequences of 16, measured once for both contexts
    import json

    for ctx in (64, 128):
        assert json.loads((tmp_path / "e" / f"energy_ctx{ctx}.json").read_text())["tokens_measured"] == 64


def test_simulate_shows_progress_per_token(tmp_path, bars):
    import torch

    from neuro_mar.models import MARForCausalLM
    from neuro_mar.simulate import EventDrivenExecutor

    folder = _spiking_folder(tmp_path / "m")
    model = MARForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([5, 6, 7, 8, 9])
    model.calibrate_thresholds([ids[None]])
    bars.bars.clear()  # loading bars of transformers
    quiet = EventDrivenExecutor(model, "loihi", quantize=True).run(ids)
    assert bars.bars == []  # off unless asked
    loud = EventDrivenExecutor(model, "loihi", quantize=True).run(ids, progress=True)
    (bar,) = bars.bars
    assert bar.n == 5 and bar.kw["unit"] == "tok" and torch.equal(quiet, loud)
    assert main(["simulate", str(folder), "--text", "w1 w2 w3", "--quantize"]) == 0
    assert bars.named("simulating on loihi")[-1].n == 3
