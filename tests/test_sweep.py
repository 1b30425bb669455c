"""Neuron-swap experiments on tiny random teachers: Stage 2 only from a saved Stage-1 model
(``refine --from-stage1``), the firing-rate penalty, ``neuro-mar sweep`` (tables, Pareto plot,
resume of an interrupted sweep) and its refusals of bad input before anything is written."""
import copy
import json
import re
import shutil

import pytest
import torch

from neuro_mar.cli import main
from test_refine import WORDS, _tokenizer, data_file, teacher_dir  # noqa: F401 - fixtures
from tiny import tiny_llama

KINDS = ("mixer.in", "mixer.out", "mlp.in", "mlp.down")


def _common(teacher_dir, data_file):
    return ["--preset", "tiny", "--teacher", str(teacher_dir), "--data", str(data_file)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, teacher_dir, data_file):
    """A whole tiny refine run: its stage1/ is what the sweeps start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["refine", "--out", str(out), *_common(teacher_dir, data_file)]) == 0
    return out


RUNS = {"runs": [{"name": "atmn-t2", "neuron": "atmn", "neuron_options": {"T": 2}, "description": "two steps"},
                 {"name": "binary", "neuron": "binary"}]}


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory, base_run, teacher_dir, data_file):
    d = tmp_path_factory.mktemp("sweep")
    runs = d / "runs.json"
    runs.write_text(json.dumps(RUNS))
    out = d / "out"
    assert main(["sweep", "--from-stage1", str(base_run / "stage1"), "--runs", str(runs), "--out", str(out),
                 *_common(teacher_dir, data_file)]) == 0
    return out, runs


# ---------------------------------------------------------------------------------------------
# the firing-rate penalty
# ---------------------------------------------------------------------------------------------
def _tiny_spiking(neuron="atmn"):
    from neuro_mar.convert import llama_to_mar

    torch.manual_seed(0)
    teacher = tiny_llama()
    stage1 = llama_to_mar(teacher).requires_grad_(False)
    batch = torch.randint(3, 97, (4, 16))
    student = copy.deepcopy(stage1).requires_grad_(True)
    student.set_neurons(neuron)
    student.calibrate_thresholds([batch])
    return stage1, student, batch


def _mean_rate(model, batch) -> float:
    from neuro_mar.hardware_models import measure_site_activity

    act = measure_site_activity(model, [batch])
    rates = [v["firing_rate"] for k, v in act.items() if isinstance(k, tuple)]
    return sum(rates) / len(rates)


def test_recorded_rate_is_the_counted_rate():
    """The rate the penalty sees (with gradient) is the rate the sites count, and it has a gradient
    for the thresholds."""
    from neuro_mar.refine.losses import firing_rate_penalty, site_firing_rates

    _, student, batch = _tiny_spiking()
    with site_firing_rates(student) as rates:
        student(input_ids=batch)
    assert len(rates) == 4 * len(student.model.layers)
    penalty = firing_rate_penalty(rates)
    assert float(penalty.detach()) == pytest.approx(_mean_rate(student, batch), rel=1e-5)
    penalty.backward()
    a = student.model.layers[0].mlp.in_site.neuron.a
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    with site_firing_rates(student, enabled=False) as none:
        student(input_ids=batch)
    assert none == [] and float(firing_rate_penalty([])) == 0.0


@pytest.mark.parametrize("neuron", ["atmn", "binary"])
def test_rate_penalty_lowers_the_firing_rate(neuron):
    """Same start, same steps: with --rate-weight the student fires far less than without, and a
    --rate-target pulls the rate towards it."""
    from neuro_mar.refine import RefineConfig
    from neuro_mar.refine.pipeline import _Bound, make_loss_2

    stage1, student, batch = _tiny_spiking(neuron)
    start = _mean_rate(student, batch)

    def train(**kw):
        m = copy.deepcopy(student)
        bound = _Bound(m, stage1, make_loss_2(RefineConfig(**kw)))
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(12):
            opt.zero_grad()
            bound(batch).backward()
            opt.step()
        return _mean_rate(m, batch)

    free, penalised = train(), train(rate_weight=1.0)
    assert penalised < 0.5 * min(free, start), (start, free, penalised)
    if neuron == "atmn":
        target = 0.5 * start
        assert abs(train(rate_weight=20.0, rate_target=target) - target) < 0.3 * start


# ---------------------------------------------------------------------------------------------
# refine --from-stage1
# ---------------------------------------------------------------------------------------------
def test_refine_from_stage1_runs_stage2_only(tmp_path, base_run, teacher_dir, data_file):
    out = tmp_path / "run"
    args = ["refine", "--from-stage1", str(base_run / "stage1"), "--out", str(out), *_common(teacher_dir, data_file),
            "--neuron", "binary", "--rate-weight", "0.5"]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    base = json.loads((base_run / "report.json").read_text())
    assert set(rep["models"]) == {"teacher", "stage1_ssm", "spiking_before_stage2", "spiking_student"}
    # the same Stage-1 model on the same held-out rows
    assert rep["models"]["stage1_ssm"] == pytest.approx(base["models"]["stage1_ssm"])
    assert not (out / "stage1").exists() and (out / "student" / "config.json").is_file()
    stages = {json.loads(l)["stage"] for l in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"stage2"} and set(rep["stage_seconds"]) == {"stage2"}
    cfg = json.loads((out / "refine_config.json").read_text())
    assert cfg["from_stage1"] == str(base_run / "stage1") and cfg["rate_weight"] == 0.5
    ident = json.loads((out / "run_identity.json").read_text())
    assert len(ident["stage1_weights"]) == 64
    assert ident["training_rows"] == json.loads((base_run / "run_identity.json").read_text())["training_rows"]
    # resumed with the Stage-1 model by another path (checked by content); refused without it
    moved = tmp_path / "elsewhere" / "stage1"
    shutil.copytree(base_run / "stage1", moved)
    args[args.index("--from-stage1") + 1] = str(moved)
    assert main(args + ["--resume"]) == 0
    no_stage1 = [a for a in args if a not in ("--from-stage1", str(moved))]
    with pytest.raises(SystemExit, match=r"--resume: .*other options \(--from-stage1 '.*stage1' -> None\)"):
        main(no_stage1 + ["--resume"])


def _bad_stage1(tmp_path, base_run, case):
    """(the --from-stage1 folder, what its error says) of each refused case."""
    if case == "missing":
        return tmp_path / "nope", "does not exist; give the stage1/ folder of a neuro-mar refine run"
    if case == "file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f", "is a file, not a model folder"
    if case == "run_folder":
        return base_run, rf"holds no config.json.*it is a run folder: give {re.escape(str(base_run / 'stage1'))}"
    if case == "teacher":
        d = tmp_path / "llama"
        tiny_llama().save_pretrained(d)
        return d, r"is not a MAR model \(model_type 'llama'\)"
    if case == "student":
        return base_run / "student", r"is a spiking model \(atmn neurons\), not a Stage-1 model.*not RUN/student"
    if case == "other_shapes":
        from transformers import LlamaConfig, LlamaForCausalLM

        from neuro_mar.convert import llama_to_mar

        small = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=8))
        d = tmp_path / "small" / "stage1"
        llama_to_mar(small).save_pretrained(d)
        return d, (r"does not have the shapes of a Stage-1 model of --teacher .*is \[97, 16\] there but \[97, 32\] "
                   r"for this teacher")
    if case == "other_teacher":  # same shapes, but its run says another teacher made it
        d = tmp_path / "other" / "stage1"
        shutil.copytree(base_run / "stage1", d)
        ident = json.loads((base_run / "run_identity.json").read_text())
        (d.parent / "run_identity.json").write_text(json.dumps({**ident, "teacher_weights": "0" * 64}))
        return d, r"the teacher weights of --teacher .* differ from those of the run that made it"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "file", "run_folder", "teacher", "student", "other_shapes",
                                  "other_teacher"])
def test_a_bad_stage1_folder_is_one_error_line_before_anything_is_written(case, tmp_path, base_run, teacher_dir,
                                                                          data_file):
    folder, match = _bad_stage1(tmp_path, base_run, case)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["refine", "--from-stage1", str(folder), "--out", str(out), *_common(teacher_dir, data_file)])
    msg = str(info.value.code)
    assert msg.startswith("error: --from-stage1") and "\n" not in msg, msg
    assert re.search(match, msg), msg
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# neuro-mar sweep
# ---------------------------------------------------------------------------------------------
def _csv(path):
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_a_run_folder_per_run_and_the_tables_and_plot(sweep_out, base_run):
    out, _ = sweep_out
    for name in ("atmn-t2", "binary"):
        for p in ("report.json", "report.md", "student/config.json", "refine_config.json", "run_identity.json"):
            assert (out / name / p).is_file(), (name, p)
    t2, binary = (json.loads((out / n / "refine_config.json").read_text()) for n in ("atmn-t2", "binary"))
    assert (t2["neuron"], t2["neuron_options"], binary["neuron"], binary["neuron_options"]) == \
        ("atmn", {"T": 2}, "binary", {})
    assert t2["from_stage1"] == binary["from_stage1"] == str(base_run / "stage1")
    assert t2["steps_2"] == binary["steps_2"] and t2["seed"] == binary["seed"]  # the same budget and data order
    ids = [json.loads((out / n / "run_identity.json").read_text()) for n in ("atmn-t2", "binary")]
    assert ids[0] == ids[1]  # the same teacher, rows and Stage-1 model
    assert json.loads((out / "binary" / "student" / "config.json").read_text())["neurons"] == \
        {k: "binary" for k in KINDS}

    rows = _csv(out / "sweep.csv")
    assert [(r["name"], r["kind"], r["status"]) for r in rows] == [
        ("teacher", "reference", "reference"), ("stage1", "reference", "reference"),
        ("atmn-t2", "run", "finished"), ("binary", "run", "finished")]
    by = {r["name"]: r for r in rows}
    for name in ("atmn-t2", "binary"):
        rep = json.loads((out / name / "report.json").read_text())
        r = by[name]
        assert float(r["kl_to_teacher"]) == pytest.approx(rep["models"]["spiking_student"]["kl_to_teacher"])
        assert float(r["top1_agreement"]) == pytest.approx(rep["models"]["spiking_student"]["top1_agreement"])
        assert float(r["mean_firing_rate"]) == pytest.approx(rep["mean_firing_rate"])
        assert all(0 <= float(r[f"rate {k}"]) <= 1 for k in KINDS)
        for target, t in rep["energy_per_token"]["64"].items():
            assert float(r[f"pJ/token {target}"]) == pytest.approx(t["student_J_per_token"] * 1e12)
        assert float(r["ACs per token"]) > 0 and float(r["ACs / dense MAC"]) > 0
        assert float(r["wall_seconds"]) > 0
    # ACs: rate x T x fan-in x fan-out per site; T=2 ternary against the default T=4 binary
    from neuro_mar.hardware_models.counting import site_fanout
    from neuro_mar.models import MARConfig

    config = MARConfig.from_pretrained(out / "atmn-t2" / "student")
    fan = site_fanout(config)
    firing = json.loads((out / "atmn-t2" / "report.json").read_text())["firing_rates"]
    want = sum(rate * 2 * fan[k[4:]][0] * fan[k[4:]][1] for k, rate in firing.items())
    assert float(by["atmn-t2"]["ACs per token"]) == pytest.approx(want)
    rep = json.loads((out / "binary" / "report.json").read_text())
    assert float(by["teacher"]["pJ/token 45nm-fp32"]) == pytest.approx(
        rep["energy_per_token"]["64"]["45nm-fp32"]["teacher_J_per_token"] * 1e12)
    assert float(by["stage1"]["top1_agreement"]) == pytest.approx(rep["models"]["stage1_ssm"]["top1_agreement"])

    md = (out / "sweep.md").read_text()
    assert md.startswith("# Neuron sweep") and "| atmn-t2 |" in md and "| binary |" in md and "| *teacher* |" in md
    assert "front on 45nm-fp32:" in md and "`atmn-t2`: two steps" in md and "Warning" not in md
    assert (out / "sweep_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sweep_pareto.pdf").read_bytes()[:5] == b"%PDF-"


def test_pareto_front():
    from neuro_mar.refine.sweep import pareto_front

    pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (0.5, 0.2), (2.0, 0.65), (4.0, 0.9)]
    assert pareto_front(pts) == [3, 0, 1, 5]


def test_an_interrupted_sweep_resumes_and_skips_finished_runs(tmp_path, sweep_out, base_run, teacher_dir, data_file,
                                                              monkeypatch):
    """The second run crashes after its checkpoint at step 2; the same command again skips the first
    run, resumes the second from its checkpoint, and the tables list both."""
    import neuro_mar.refine.sweep as sweep
    from neuro_mar.refine.trainer import Trainer

    src, runs = sweep_out
    out = tmp_path / "out"
    shutil.copytree(src, out)
    shutil.rmtree(out / "binary")
    finished = (out / "atmn-t2" / "report.json").read_text()
    calls = []
    real_run_refine, real_run = sweep.run_refine, Trainer.run

    def spy(cfg, folder, resume=False, progress=True):
        calls.append((folder.name, resume))
        return real_run_refine(cfg, folder, resume=resume, progress=progress)

    def crash(self, stop_after=None):
        real_run(self, stop_after=2)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(sweep, "run_refine", spy)
    monkeypatch.setattr(Trainer, "run", crash)
    args = ["sweep", "--from-stage1", str(base_run / "stage1"), "--runs", str(runs), "--out", str(out),
            *_common(teacher_dir, data_file)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    assert calls == [("binary", False)]
    assert (out / "binary" / "checkpoints" / "stage2.pt").is_file() and not (out / "binary" / "report.json").exists()
    monkeypatch.setattr(Trainer, "run", real_run)
    assert main(args) == 0
    assert calls == [("binary", False), ("binary", True)]
    assert (out / "atmn-t2" / "report.json").read_text() == finished
    steps = [json.loads(l)["step"] for l in (out / "binary" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # continued from the checkpoint, not restarted
    assert [(r["name"], r["status"]) for r in _csv(out / "sweep.csv")][2:] == [("atmn-t2", "finished"),
                                                                               ("binary", "finished")]
    # --only: one subset per GPU; everything finished is skipped, the tables still list every run
    calls.clear()
    assert main(args + ["--only", "binary"]) == 0
    assert calls == [] and len(_csv(out / "sweep.csv")) == 4


def _bad_runs(tmp_path):
    """(runs file content or None for a missing file, extra arguments, what the error says)."""
    return [
        (None, [], r"--runs .*missing.json does not exist; give a JSON file that lists the runs"),
        (b'{"runs": [{"name": "a",', [], r"is not JSON \(.* at line 1, column \d+\)"),
        (b'{"runs": []}', [], "lists no runs"),
        (b'{"rnus": []}', [], r"unknown key\(s\) 'rnus'"),
        (b'[{"neuron": "binary"}]', [], r"run 1 has no name"),
        (b'[{"name": "a/b"}]', [], r"run 1 has the name 'a/b'"),
        (b'[{"name": "a"}, {"name": "a"}]', [], "two runs are named 'a'"),
        (b'[{"name": "a", "nueron": "binary"}]', [], r"run 'a': unknown option 'nueron'; did you mean 'neuron'\?"),
        (b'[{"name": "a", "seq_len": 16}]', [], r"'seq_len' is not a Stage-2 option.*\(--seq-len\)"),
        (b'[{"name": "a", "steps_2": "5"}]', [], r"'steps_2' must be an integer, got '5'"),
        (b'[{"name": "a", "neuron_options": 2}]', [], r"'neuron_options' must be a JSON object"),
        (b'[{"name": "a", "neuron": "nope"}]', [], r"run 'a': unknown neuron 'nope'; see `neuro-mar neurons`"),
        (b'[{"name": "a", "neuron": "binary", "neuron_options": {"D": 3}}]', [],
         r"run 'a': neuron 'binary' with options"),
        (b'[{"name": "a", "rate_target": 2}]', [], r"run 'a': --rate-target must be a firing rate in \[0, 1\]"),
        (b'[{"name": "a"}]', ["--only", "a,b"], r"--only: no run named 'b' in the runs file \(its runs: a\)"),
    ]


def test_a_bad_runs_file_is_one_error_line_before_anything_is_written(tmp_path, base_run, teacher_dir, data_file):
    out = tmp_path / "out"
    for i, (content, extra, match) in enumerate(_bad_runs(tmp_path)):
        path = tmp_path / ("missing.json" if content is None else f"runs{i}.json")
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(SystemExit) as info:
            main(["sweep", "--from-stage1", str(base_run / "stage1"), "--runs", str(path), "--out", str(out),
                  *_common(teacher_dir, data_file), *extra])
        msg = str(info.value.code)
        assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
        assert re.search(match, msg), (match, msg)
        assert not out.exists()
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(RUNS))
    with pytest.raises(SystemExit, match=r"error: --from-stage1 .*is a spiking model"):
        main(["sweep", "--from-stage1", str(base_run / "student"), "--runs", str(ok), "--out", str(out),
              *_common(teacher_dir, data_file)])
    assert not out.exists()


def test_a_run_started_with_other_options_is_refused_before_any_run(tmp_path, sweep_out, base_run, teacher_dir,
                                                                    data_file):
    src, _ = sweep_out
    out = tmp_path / "out"
    shutil.copytree(src, out)
    changed = tmp_path / "runs.json"
    changed.write_text(json.dumps({"runs": [{"name": "atmn-t2", "neuron": "atmn", "neuron_options": {"T": 3}},
                                            {"name": "binary", "neuron": "binary"}]}))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit, match=r"error: --runs .*run 'atmn-t2': .*started with other options "
                                         r"\(--neuron-option \{'T': 2\} -> \{'T': 3\}\).*new name"):
        main(["sweep", "--from-stage1", str(base_run / "stage1"), "--runs", str(changed), "--out", str(out),
              *_common(teacher_dir, data_file)])
    assert sorted(p.name for p in out.iterdir()) == before


def test_sweep_help_shows_every_option_with_its_default(capsys, monkeypatch):
    from test_cli_help import test_every_option_has_a_help_text_and_shows_its_default as check

    check(capsys, monkeypatch, "sweep")


def test_the_example_runs_file_reads_and_every_run_is_valid():
    from pathlib import Path

    from neuro_mar.refine import RefineConfig
    from neuro_mar.refine.sweep import read_runs, run_config

    path = Path(__file__).resolve().parent.parent / "examples" / "sweep_neurons.json"
    runs = read_runs(path)
    configs = [run_config(RefineConfig(), r) for r in runs]  # every run's options and neuron checked
    assert len(runs) >= 6 and all(r.description for r in runs)
    neurons = {c.neuron for c in configs}
    assert {"atmn", "binary"} <= neurons and len(neurons) >= 3
    assert any(c.rate_weight > 0 for c in configs)
    assert {c.neuron_options.get("T", 4) for c in configs if c.neuron == "atmn"} >= {1, 2, 4}
