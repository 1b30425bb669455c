"""The pipeline under bad options, divergence, changed resumes and planted checkpoints: each case
ends in one `error:` line (or is refused by the API) before anything is written, and no
checkpoint runs code when it is loaded."""
import json
import math
import pickle

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from neuro_mar.cli import main
from neuro_mar.convert import llama_to_mar
from neuro_mar.io_utils import finite_or_none
from neuro_mar.refine import TrainConfig, Trainer, TrainingDiverged
from test_refine import _tiny_trainer, data_file, teacher_dir  # noqa: F401 - fixtures

BASE = ["refine", "--preset", "tiny"]


def _refine(tmp_path, teacher_dir, data_file, *extra, out="run"):
    return main(BASE + ["--out", str(tmp_path / out), "--teacher", str(teacher_dir), "--data", str(data_file),
                        *extra])


@pytest.mark.parametrize("option,value,match", [
    ("--distill-temperature", "nan", "--distill-temperature must be a number > 0, got nan"),
    ("--temperature", "0", "--distill-temperature must be a number > 0"),
    ("--alpha", "nan", "--alpha must be a number >= 0"),
    ("--lr-2", "0", "--lr-2 must be a number > 0"),
    ("--lr-1c", "inf", "--lr-1c must be a number > 0, got inf"),
    ("--calib-percentile", "150", r"--calib-percentile must be a percentile in \(0, 100\]"),
    ("--eval-rows", "0", "--eval-rows must be an integer >= 1"),
    ("--micro-batch", "0", "--micro-batch must be an integer >= 1"),
    ("--steps-2", "-1", "--steps-2 must be an integer >= 0"),
    ("--warmup", "-3", "--warmup must be an integer >= 0"),
    ("--gamma", "-0.5", "--gamma must be a number >= 0"),
    ("--seconds-1c", "-1", "--seconds-1c must be a number >= 0"),
    ("--neuron-option", '{"T": 0}', "neuron 'atmn' with options"),
    ("--neuron-option", '{"tau": 0}', "tau must be a finite positive number"),
    ("--neuron-option", '{"nope": 1}', "does not take option"),
])
def test_bad_option_stops_before_anything_is_written(tmp_path, teacher_dir, data_file, option, value, match):
    with pytest.raises(SystemExit, match=f"error: .*{match}"):
        _refine(tmp_path, teacher_dir, data_file, option, value)
    assert not (tmp_path / "run").exists()


def test_no_stage2_loss_is_refused(tmp_path, teacher_dir, data_file):
    with pytest.raises(SystemExit, match="Stage 2 would have no loss"):
        _refine(tmp_path, teacher_dir, data_file, "--alpha", "0", "--beta", "0")
    assert not (tmp_path / "run").exists()


def test_divergence_stops_loudly_and_keeps_the_last_good_checkpoint(tmp_path):
    """A NaN loss at step 4 stops the stage before the update, naming stage, step and values; the
    checkpoint of step 2 is untouched and the weights are those of step 3."""
    torch.manual_seed(0)
    model = torch.nn.Embedding(20, 4)
    rows = torch.randint(0, 20, (16, 8))
    calls = {"n": 0}

    def loss(m, b):
        calls["n"] += 1
        out = m(b).pow(2).mean()
        return out * float("nan") if calls["n"] == 4 else out

    tr = Trainer(model, loss, rows, TrainConfig(steps=10, micro_batch=2, ckpt_every=2, warmup=0), tmp_path, "s",
                 progress=False)
    with pytest.raises(TrainingDiverged, match=r"stage s diverged at step 4: loss nan.*last good checkpoint"):
        tr.run()
    assert tr.step == 3 and torch.isfinite(model.weight).all()
    saved = torch.load(tmp_path / "checkpoints" / "s.pt", weights_only=True)
    assert saved["step"] == 2
    rows_logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_logged] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows_logged)


def test_diverging_refine_is_one_error_line_and_writes_no_model(tmp_path, teacher_dir, data_file):
    with pytest.raises(SystemExit, match=r"error: stage stage1b diverged at step \d+: loss (nan|inf)"):
        _refine(tmp_path, teacher_dir, data_file, "--lr-1b", "1e30", "--warmup", "0")
    assert not (tmp_path / "run" / "stage1").exists() and not (tmp_path / "run" / "student").exists()


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_never_runs(tmp_path, teacher_dir, data_file):
    """A checkpoint holding a pickled callable is refused on --resume with one error line; the
    payload does not run."""
    assert _refine(tmp_path, teacher_dir, data_file) == 0
    marker = tmp_path / "pwned"
    p = _Payload()
    p.marker = marker
    ckpt = tmp_path / "run" / "checkpoints" / "stage1b.pt"
    ckpt.write_bytes(pickle.dumps({"step": p}))
    # stage1/ exists, so the Stage-1 sub-stages are skipped: plant Stage 2's checkpoint too
    (tmp_path / "run" / "checkpoints" / "stage2.pt").write_bytes(pickle.dumps({"step": p}))
    with pytest.raises(SystemExit, match=r"error: checkpoint .*stage2.pt cannot be read as plain weights: it "
                                         r"holds more than tensors") as refused:
        _refine(tmp_path, teacher_dir, data_file, "--resume")
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # torch's hint to load it anyway is not passed on


def test_resume_with_other_options_is_refused_and_keeps_the_record(tmp_path, teacher_dir, data_file):
    data = tmp_path / "train.txt"
    data.write_text(data_file.read_text())
    data_file = data
    assert _refine(tmp_path, teacher_dir, data_file) == 0
    record = (tmp_path / "run" / "refine_config.json").read_text()
    with pytest.raises(SystemExit, match=r"--resume: .* other options \(--neuron 'atmn' -> 'binary'; "
                                         r"--seq-len 32 -> 16\)"):
        _refine(tmp_path, teacher_dir, data_file, "--resume", "--neuron", "binary", "--seq-len", "16")
    assert (tmp_path / "run" / "refine_config.json").read_text() == record
    original = data.read_text()
    data.write_text(" ".join(f"w{(i * 5) % 90}" for i in range(3000)))  # same file, other text
    with pytest.raises(SystemExit, match="--resume: the training rows differ from those"):
        _refine(tmp_path, teacher_dir, data_file, "--resume")
    data.write_text(original)
    ident_file = tmp_path / "run" / "run_identity.json"
    ident = ident_file.read_text()
    ident_file.unlink()  # without it nothing could tell the teacher or the data apart
    with pytest.raises(SystemExit, match=r"--resume: .*run_identity.json is missing"):
        _refine(tmp_path, teacher_dir, data_file, "--resume")
    ident_file.write_text(ident)
    (tmp_path / "run" / "refine_config.json").write_text(record[: len(record) // 2])
    with pytest.raises(SystemExit, match=r"--resume: .*refine_config.json is damaged \(not JSON"):
        _refine(tmp_path, teacher_dir, data_file, "--resume")
    (tmp_path / "run" / "refine_config.json").write_text(record)
    # the data by another path (checked by content) and other evaluation options are accepted
    moved = tmp_path / "copy" / "train.txt"
    moved.parent.mkdir()
    moved.write_text(original)
    assert _refine(tmp_path, teacher_dir, moved, "--resume", "--eval-max-tokens", "100") == 0
    ident = json.loads(ident_file.read_text())
    assert set(ident) == {"teacher_weights", "tokenizer", "training_rows"} and all(len(v) == 64 for v in ident.values())


def test_report_json_is_standard_json():
    assert finite_or_none({"a": float("nan"), "b": [1.0, float("inf"), (2, float("-inf"))], "c": "x"}) == \
        {"a": None, "b": [1.0, None, [2, None]], "c": "x"}


def test_qwen2_attention_biases_are_carried():
    """Qwen2 has q/k/v biases and no `attention_bias` config field: the student's in_proj takes
    them (v and k repeated to the query heads, q scaled like its weight)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    teacher = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in teacher.model.layers:
            for n in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, n).bias.normal_()
    student = llama_to_mar(teacher)
    assert student.config.mixer_bias
    att, mix = teacher.model.layers[1].self_attn, student.model.layers[1].mixer
    d, hd = mix.d_inner, 8
    bias = mix.in_proj.bias.detach()
    rep = lambda b: b.view(2, hd).repeat_interleave(2, dim=0).reshape(-1)  # noqa: E731
    torch.testing.assert_close(bias[:d], rep(att.v_proj.bias.detach()))
    torch.testing.assert_close(bias[d:2 * d], rep(att.k_proj.bias.detach()))
    torch.testing.assert_close(bias[2 * d:3 * d], att.q_proj.bias.detach() / math.sqrt(hd))
    with pytest.raises(ValueError, match="would drop the teacher's biases"):
        llama_to_mar(teacher, mixer_bias=False)


@pytest.mark.parametrize("name,content,match", [
    ("bin.txt", b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 20, r"bin.txt:1: not UTF-8 text"),
    ("nul.txt", b"hello\nworld\x00\x00\n", r"nul.txt:2: holds NUL bytes"),
    ("null.jsonl", b'{"text": "fine"}\n{"text": null}\n', r"null.jsonl:2: field 'text' holds NoneType"),
    ("int.jsonl", b'{"text": 7}\n', r"int.jsonl:1: field 'text' holds int"),
    ("list.jsonl", b'["a", "b"]\n', r"list.jsonl:1: a line holds list, not a JSON object"),
    ("broken.parquet", b"PAR1 not really parquet", r"broken.parquet: not a readable parquet file"),
])
def test_data_readers_refuse_what_is_not_text(tmp_path, name, content, match):
    from neuro_mar.refine import DataError, read_texts

    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_texts(p)


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    """Editors on Windows start UTF-8 files with a BOM: it is dropped, not refused or trained on."""
    from neuro_mar.refine import read_texts

    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfplain text\n")
    assert read_texts(tmp_path / "a.jsonl") == ["first", "second"]
    assert read_texts(tmp_path / "a.txt") == ["plain text\n"]


def test_integer_parquet_column_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from neuro_mar.refine import DataError, read_texts

    p = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), p)
    with pytest.raises(DataError, match=r"nums.parquet: column 'text': row 0 holds int"):
        read_texts(p)


@pytest.mark.parametrize("layers", [1, 3])
def test_a_checkpoint_whose_config_does_not_match_its_weights_is_refused(tmp_path, layers):
    from tiny import tiny_mar

    from neuro_mar.models import MARForCausalLM

    tiny_mar(seed=0).save_pretrained(tmp_path / "m")  # 2 layers
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    cfg["num_hidden_layers"] = layers
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    what = "unexpected" if layers == 1 else "missing"
    with pytest.raises(ValueError, match=f"weights do not match config.json: .*{what} .*model.layers"):
        MARForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match=f"error: .*weights do not match config.json"):
        main(["energy", str(tmp_path / "m")])


def test_calibration_refuses_non_finite_activations():
    """One NaN in the calibration sample would make a channel's threshold NaN for good: refused,
    naming the site."""
    from tiny import tiny_mar

    from neuro_mar.neurons import create

    n = create("atmn", channels=4)
    x = torch.randn(64, 4)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN or infinite values \(channels \[2\]\)"):
        n.calibrate(x)
    m = tiny_mar(seed=0, neurons={"mlp.in": "atmn"})
    with torch.no_grad():
        m.model.layers[0].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.in_site: calibrate: .*NaN"):
        m.calibrate_thresholds([torch.randint(0, 97, (2, 16))])


def test_eval_of_a_nan_model_is_an_error_not_a_number(tmp_path, capsys):
    """Outputs that are NaN although every weight is finite (NaN weights are refused at load,
    test_a_model_with_non_finite_weights_is_refused_at_load): an LM head whose products overflow."""
    from tiny import tiny_mar

    from test_refine import _tokenizer

    m = tiny_mar(seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight.fill_(3e38)  # finite, but h * 3e38 overflows: inf - inf = NaN logits
    m.save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    with pytest.raises(SystemExit, match=r"error: 1 result\(s\) are NaN or infinite \(perplexity\)"):
        main(["eval", str(tmp_path / "m"), "--data", str(data), "--seq-len", "16", "--max-tokens", "200"])
    assert '"perplexity": null' in capsys.readouterr().out


def test_generate_from_an_empty_prompt(tmp_path, capsys):
    from tiny import tiny_mar

    from test_refine import _tokenizer

    tiny_mar(seed=0).save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "", "--max-new-tokens", "3"]) == 0  # crashed in the conv
    assert capsys.readouterr().out.endswith("\n")


def test_a_second_refine_into_a_running_folder_is_refused(tmp_path, teacher_dir, data_file):
    """While one refine holds the folder's lock, another (even with --resume) stops; the lock goes
    with the run."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("4242")
        fh.flush()
        with pytest.raises(SystemExit, match=r"error: .*run is being written by another refine \(pid 4242\)"):
            _refine(tmp_path, teacher_dir, data_file, "--resume")
    assert _refine(tmp_path, teacher_dir, data_file, "--resume") == 0
    assert not (out / ".lock").exists() and (out / "student" / "config.json").is_file()


def test_resume_logs_each_step_once(tmp_path):
    """Steps logged after the checkpoint a run resumes from are dropped, so metrics.jsonl holds
    each step of a stage once."""
    rows = torch.randint(0, 20, (16, 8))
    cfg = dict(steps=6, micro_batch=2, ckpt_every=2, warmup=0)
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    torch.manual_seed(0)
    Trainer(torch.nn.Embedding(20, 4), loss, rows, TrainConfig(**cfg), tmp_path, "s", progress=False).run(stop_after=3)
    t = Trainer(torch.nn.Embedding(20, 4), loss, rows, TrainConfig(**cfg), tmp_path, "s", progress=False)
    assert t.try_resume() and t.step == 2
    t.run()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_of_a_run_recorded_before_an_option_existed():
    """An option newer than a run's refine_config.json counts as changed only when it is not at
    its default; evaluation options never count."""
    from dataclasses import asdict, replace

    from neuro_mar.refine import RefineConfig
    from neuro_mar.refine.pipeline import config_changes

    saved = json.loads(json.dumps(asdict(RefineConfig())))
    del saved["train_1"]
    assert config_changes(saved, RefineConfig()) == []
    assert config_changes(saved, replace(RefineConfig(), train_1="mixers")) == ["--train-1 None -> 'mixers'"]
    assert config_changes(saved, replace(RefineConfig(), eval_limit=5, steps_2=7)) == ["--steps-2 40 -> 7"]


def test_generate_from_a_nan_model_is_an_error(tmp_path):
    """A broken model printed an empty string (greedy argmax of NaN logits); now one error line.
    Its weights are finite (NaN weights are refused at load); its logits overflow."""
    from tiny import tiny_mar

    from test_refine import _tokenizer

    m = tiny_mar(seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight.fill_(3e38)
    m.save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="error: .* gives NaN or infinite logits for the prompt"):
        main(["generate", str(tmp_path / "m"), "--prompt", "w1 w2", "--max-new-tokens", "3"])


def test_spike_sites_raise_on_non_finite_input_with_the_debug_knob():
    """A NaN upstream of a site gives finite spikes (a neuron compares, it does not propagate NaN);
    with the check on, the first site that sees it raises, naming itself; off, nothing changes."""
    from tiny import tiny_mar

    from neuro_mar.neurons import NonFiniteSiteInput, check_finite_enabled, set_check_finite

    m = tiny_mar(seed=0, neurons={"mlp.in": "atmn"})
    ids = torch.randint(0, 97, (2, 16))
    m.calibrate_thresholds([ids])
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    assert not check_finite_enabled()
    with torch.no_grad():
        m(input_ids=ids)  # no error with the knob off (the default)
    set_check_finite(True)
    try:
        with pytest.raises(NonFiniteSiteInput, match=r"model.layers.1.mlp.in_site: the input holds 32 NaN .*channels \[3\]"):
            m(input_ids=ids)
        with torch.no_grad():
            m.model.layers[1].post_attention_layernorm.weight[3] = 1.0
        m(input_ids=ids)  # finite again: no error
    finally:
        set_check_finite(False)


@pytest.mark.parametrize("field,value,match", [
    ("neurons_per_core", -5, "neurons_per_core must be a whole number >= 1, got -5"),
    ("neurons_per_core", 0, r"neurons_per_core must be a whole number >= 1, got 0 \(leave it out"),
    ("cores_per_chip", 0, "cores_per_chip must be a whole number >= 1"),
    ("weight_bits", 0, "weight_bits must be a whole number >= 1"),
    ("fanin_per_core", 256.5, "fanin_per_core must be a whole number >= 1, got 256.5"),
    ("synapse_bits_per_core", "big", "synapse_bits_per_core must be a whole number >= 1, got 'big'"),
    ("weight_bits", True, "weight_bits must be a whole number >= 1, got True"),
    ("e_ac", True, "e_ac must be a finite non-negative number of pJ, got True"),
    ("e_mac", "4.6", "e_mac must be a finite non-negative number of pJ, got '4.6'"),
    ("static_power_w_per_chip", -1.0, "static_power_w_per_chip must be a finite number > 0 of watts"),
    ("timestep_hz", 0, "timestep_hz must be a finite number > 0 of hertz"),
    ("notes", 3, "notes must be a string, got 3"),
])
def test_cost_table_mapping_fields_are_checked(tmp_path, field, value, match):
    """Mapping limits, powers and energies of a user cost table: refused with the file and field
    before anything is counted (0 no longer means 'unset', true is not 1 pJ, a string does not
    crash after counting)."""
    from neuro_mar.hardware_models import load_table

    good = {"name": "mychip", "kind": "neuromorphic", "source": "datasheet v1", "scope": "synop only",
            "e_ac": 2.0, "e_mac": 2.0, "e_mul": 2.0, "e_add": 2.0, "dense_fallback": "45nm-int8",
            "neurons_per_core": 256, "weight_bits": 8}
    path = tmp_path / "chip.json"
    path.write_text(json.dumps({**good, field: value}))
    with pytest.raises(ValueError, match=f"cost table {path}: {match}"):
        load_table(path)
    path.write_text(json.dumps({**good, "cores_per_chip": None}))
    assert load_table(path).cores_per_chip is None  # null: not published
    with pytest.raises(SystemExit, match=f"error: cost table .*{field}"):
        path.write_text(json.dumps({**good, field: value}))
        main(["energy", "smollm2-135m", "--target", str(path)])


def _killed_writer(code: str) -> None:
    """Run ``code`` in a fresh interpreter that SIGKILLs itself at the end (a writer killed before
    its rename)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code + "\nimport os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert proc.returncode == -9


def test_temporaries_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    """A killed write leaves its temporary (a file, a trace's .part, a model folder); the next write
    of the same target removes it, and never one of a writer that still runs."""
    import os

    from neuro_mar.io_utils import atomic_write_text, make_temp, temp_prefix
    from neuro_mar.traces.sonata import SonataWriter

    target, trace, folder = tmp_path / "report.json", tmp_path / "spikes.h5", tmp_path / "student"
    _killed_writer(f"from neuro_mar.io_utils import atomic_target\n"
                   f"cm = atomic_target({str(target)!r}); t = cm.__enter__(); open(t, 'w').write('half')\n"
                   f"from neuro_mar.traces.sonata import SonataWriter\n"
                   f"w = SonataWriter({str(trace)!r}, T=4, L_max=8)\n"
                   f"from neuro_mar.io_utils import make_temp\n"
                   f"make_temp({str(folder)!r}, folder=True)")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and all(n.startswith((".report.json.", ".spikes.h5.", ".student.")) for n in left), left
    live = make_temp(target)  # this process's own temporary: kept
    assert live.name.startswith(temp_prefix(target))
    atomic_write_text(target, "{}")
    with SonataWriter(trace, T=4, L_max=8):
        pass
    make_temp(folder, folder=True).rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "report.json", "spikes.h5"])
    assert target.read_text() == "{}"
    os.unlink(live)


def test_a_tokenizer_larger_than_the_teachers_vocabulary_is_refused(tmp_path, data_file):
    """Token ids past the teacher's embedding failed only inside Stage 1 (an index error after the
    run folder existed); now refused before anything is written."""
    from tiny import tiny_llama

    from test_refine import _tokenizer

    d = tmp_path / "teacher"
    teacher = tiny_llama()
    teacher.resize_token_embeddings(40)  # the tokenizer has 93 tokens
    teacher.save_pretrained(d)
    _tokenizer().save_pretrained(d)
    with pytest.raises(SystemExit, match=r"error: the tokenizer gives token id \d+ \(it has 93 tokens\) but the "
                                         r"teacher's embedding has 40 rows"):
        main(BASE + ["--out", str(tmp_path / "run"), "--teacher", str(d), "--data", str(data_file)])
    assert not (tmp_path / "run").exists()


# --- model folders, data files and tables that are not what they claim (outside adversarial pass) ---

def _refused(argv) -> str:
    """Run the CLI on ``argv``, which must stop with one ``error:`` line (a SystemExit whose
    message Python prints to stderr, exit status 1; no traceback); returns that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    msg = info.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert "Traceback" not in msg and "ignore_mismatched_sizes" not in msg and "weights_only=False" not in msg
    return msg


def _mar_folder(path, poison=None, value=float("nan"), **kw):
    """A tiny MAR checkpoint folder with its tokenizer; ``poison``: a parameter set to ``value``."""
    from tiny import tiny_mar

    from test_refine import _tokenizer

    m = tiny_mar(seed=0, **kw)
    if poison:
        with torch.no_grad():
            m.get_parameter(poison).view(-1)[0] = value
    m.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _every_command(folder, tmp_path):
    """Each command that loads a model, on ``folder``, writing (if it got that far) under tmp_path/out."""
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"w{i % 90}" for i in range(200)))
    out = tmp_path / "out"
    return [["eval", str(folder), "--data", str(data), "--seq-len", "16", "--max-tokens", "64"],
            ["generate", str(folder), "--prompt", "w1 w2", "--max-new-tokens", "2"],
            ["energy", str(folder), "--target", "45nm-fp32", "--max-tokens", "32", "--out", str(out)],
            ["trace", str(folder), "--text", "w1 w2 w3", "--out", str(out / "t.h5")],
            ["simulate", str(folder), "--text", "w1 w2", "--quantize", "--out", str(out)]]


@pytest.mark.parametrize("field,value,tensor,shapes", [
    ("hidden_size", 48, "model.embed_tokens.weight", r"\[97, 32\] in model.safetensors but \[97, 48\]"),
    ("vocab_size", 101, "model.embed_tokens.weight", r"\[97, 32\] in model.safetensors but \[101, 32\]"),
    ("d_state", 16, "model.layers.0.mixer.conv1d.bias", r"\[64\] in model.safetensors but \[96\]"),
])
def test_a_config_whose_shapes_do_not_match_the_weights_is_refused(tmp_path, field, value, tensor, shapes):
    """An edited hidden_size / vocab_size / d_state ended in transformers' RuntimeError suggesting
    ignore_mismatched_sizes; now one line naming the folder, the tensors with both shapes and the
    fix, from every command, before anything is written."""
    from neuro_mar.models import MARForCausalLM

    folder = _mar_folder(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    match = (f"{folder}: config.json does not match the weights: .*{tensor} is {shapes} by config.json"
             ".*not from the same model")
    with pytest.raises(ValueError, match=match):
        MARForCausalLM.from_pretrained(folder)
    for argv in _every_command(folder, tmp_path):
        assert tensor in _refused(argv), argv
    assert not (tmp_path / "out").exists()


def test_a_shape_mismatch_is_one_stderr_line_from_the_command(tmp_path):
    """The installed entry point: exit status 1, one stderr line, no traceback, no load report."""
    import subprocess
    import sys

    folder = _mar_folder(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 101
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "neuro_mar", "generate", str(folder), "--prompt", "w1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}: config.json does not match"), proc.stderr


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_a_damaged_weights_file_is_refused(tmp_path, damage):
    """A truncated or random model.safetensors gave safetensors' SafetensorError traceback."""
    import os

    from neuro_mar.models import MARForCausalLM

    folder = _mar_folder(tmp_path / "m")
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    match = f"{f}: the weights file is damaged or incomplete .*re-save the model or copy the file again"
    with pytest.raises(ValueError, match=match):
        MARForCausalLM.from_pretrained(folder)
    for argv in _every_command(folder, tmp_path)[:2]:
        assert str(f) in _refused(argv)


@pytest.mark.parametrize("content,problem", [
    ('{"model_type": "neuro_mar", "hidden_size": 3', "is not valid JSON"),
    ("3", "holds int, not a JSON object"),
])
def test_a_broken_config_json_is_named(tmp_path, content, problem):
    """A truncated config.json gave `error: Expecting ',' delimiter ...`, naming no file."""
    folder = _mar_folder(tmp_path / "m")
    (folder / "config.json").write_text(content)
    for argv in _every_command(folder, tmp_path)[:3]:
        msg = _refused(argv)
        assert f"{folder / 'config.json'}: {problem}" in msg and "restore" in msg, msg


@pytest.mark.parametrize("value", ["{bad", "3", '["T", 4]'])
def test_neuron_option_must_be_a_json_object(tmp_path, value):
    msg = _refused(BASE + ["--out", str(tmp_path / "run"), "--neuron-option", value])
    assert msg.startswith("error: --neuron-option must be a JSON object"), msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content,match", [
    ("3", "holds int, not a JSON object"),
    ("null", "holds NoneType, not a JSON object"),
    ('["name", "kind"]', "holds list, not a JSON object"),
    ('"loihi"', "holds str, not a JSON object"),
])
def test_a_cost_table_that_is_not_an_object_is_refused(tmp_path, content, match):
    """Valid JSON that is not an object gave a TypeError from set(data)."""
    from neuro_mar.hardware_models import load_table

    path = tmp_path / "chip.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"cost table {path}: {match}.*fields"):
        load_table(path)
    assert str(path) in _refused(["energy", "smollm2-135m", "--target", str(path)])
    folder = _mar_folder(tmp_path / "m")
    assert str(path) in _refused(["simulate", str(folder), "--text", "w1", "--target", str(path)])


@pytest.mark.parametrize("field", ["name", "kind", "source", "e_ac", "e_add"])
def test_cost_table_required_fields_are_not_null(tmp_path, field):
    """A required field set to null passed the checks and failed (or priced nothing) later."""
    from neuro_mar.hardware_models import load_table

    good = {"name": "mychip", "kind": "digital", "source": "datasheet v1", "scope": "synop only",
            "e_ac": 2.0, "e_mac": 2.0, "e_mul": 2.0, "e_add": 2.0}
    path = tmp_path / "chip.json"
    path.write_text(json.dumps({**good, field: None}))
    with pytest.raises(ValueError, match=f"cost table {path}: {field} is required, got null"):
        load_table(path)


def test_energy_and_trace_read_data_as_refine_does(tmp_path):
    """--data went through read_text(errors='replace'): a binary file or a .jsonl was tokenized as
    garbage. Now the refine readers: .jsonl/.parquet by field, --text-field, and a file that is
    not UTF-8 text refused naming it, before anything is written."""
    from neuro_mar.cli import _token_batches
    from neuro_mar.refine.data import read_texts

    from test_refine import _tokenizer

    folder = _mar_folder(tmp_path / "m", neurons={"mlp.in": "atmn"})
    tok = _tokenizer()
    rows = [{"body": " ".join(f"w{(i + j) % 90}" for j in range(12)), "id": i} for i in range(4)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = _token_batches(tok, read_texts(jl, "body"), seq_len=16, max_tokens=1000)
    got = torch.cat([b[0] for b in batches]).tolist()
    want = []
    for r in rows:
        want += tok(r["body"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert got == want  # the texts of the field, not the JSON syntax
    out = tmp_path / "out"
    assert main(["trace", str(folder), "--data", str(jl), "--text-field", "body", "--out", str(out / "t.h5")]) == 0
    assert "no field 'text'" in _refused(["trace", str(folder), "--data", str(jl), "--out", str(tmp_path / "x.h5")])
    assert main(["eval", str(folder), "--data", str(jl), "--text-field", "body", "--seq-len", "8"]) == 0
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"w1 w2\n\x89PNG\r\n\x1a\n\xff\xfe" * 20)
    for argv in (["energy", str(folder), "--data", str(bad), "--out", str(tmp_path / "e")],
                 ["trace", str(folder), "--data", str(bad), "--out", str(tmp_path / "t.h5")]):
        assert f"{bad}:2: not UTF-8 text" in _refused(argv)
    assert not (tmp_path / "e").exists() and not (tmp_path / "t.h5").exists() and not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
                                    "model.layers.1.input_layernorm.weight"])
def test_a_model_with_non_finite_weights_is_refused_at_load(tmp_path, tensor):
    """NaN weights gave silent NaN results (eval, generate, trace, simulate --quantize) unless
    NEURO_MAR_CHECK_FINITE=1; every load now scans parameters and buffers."""
    from neuro_mar.models import MARForCausalLM

    folder = _mar_folder(tmp_path / "m", poison=tensor, value=float("inf") if "embed" in tensor else float("nan"),
                         tie_word_embeddings=False)
    match = f"{folder}: the weights hold NaN or infinite values in 1 tensor\\(s\\) \\({tensor}\\): the model is damaged"
    with pytest.raises(ValueError, match=match):
        MARForCausalLM.from_pretrained(folder)
    assert MARForCausalLM.from_pretrained(folder, check_finite=False) is not None  # for inspection
    for argv in _every_command(folder, tmp_path):
        assert f"({tensor}): the model is damaged" in _refused(argv), argv
    assert not (tmp_path / "out").exists()


def test_a_teacher_with_non_finite_weights_is_refused_at_load(tmp_path):
    from tiny import tiny_llama

    from test_refine import _tokenizer

    t = tiny_llama()
    with torch.no_grad():
        t.model.layers[0].input_layernorm.weight[2] = float("nan")
    t.save_pretrained(tmp_path / "teacher")
    _tokenizer().save_pretrained(tmp_path / "teacher")
    msg = _refused(["energy", str(tmp_path / "teacher"), "--target", "45nm-fp32", "--max-tokens", "32"])
    assert f"{tmp_path / 'teacher'}: the weights hold NaN" in msg and "model.layers.0.input_layernorm.weight" in msg


@pytest.mark.parametrize("damage", ["shape", "truncated"])
def test_a_teacher_folder_that_does_not_match_or_is_damaged_is_refused(tmp_path, damage):
    """The same checks on a teacher folder (energy, trace, simulate convert it; eval --teacher)."""
    from tiny import tiny_llama

    from test_refine import _tokenizer

    d = tmp_path / "teacher"
    tiny_llama().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    if damage == "shape":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 40
        (d / "config.json").write_text(json.dumps(cfg))
        want = (f"{d}: config.json does not match the weights: 6 tensor(s) of another shape "
                "(model.layers.0.mlp.down_proj.weight is [32, 48] in model.safetensors but [32, 40] by config.json")
    else:
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        want = f"{f}: the weights file is damaged or incomplete"
    assert want in _refused(["energy", str(d), "--target", "45nm-fp32", "--max-tokens", "32"])


def _teacher_folder(path):
    """A tiny Llama teacher folder with its tokenizer."""
    from tiny import tiny_llama

    from test_refine import _tokenizer

    tiny_llama().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,file", [("mar", "tokenizer_config.json"), ("teacher", "tokenizer_config.json"),
                                       ("teacher", "config.json")])
def test_a_folder_that_names_custom_code_is_refused_and_the_code_never_runs(tmp_path, monkeypatch, kind, file):
    """transformers would ask on stdin whether to run a folder's own tokenizer or model class (and
    a `y` there ran it): neuro-mar never runs a folder's code, whatever stdin holds."""
    import io

    d = _mar_folder(tmp_path / "m") if kind == "mar" else _teacher_folder(tmp_path / "t")
    marker = tmp_path / "pwned"
    (d / "evil.py").write_text(f"import os\nos.system('touch {marker}')\n"
                               "from transformers import PreTrainedTokenizerFast as Evil\n")
    cfg = json.loads((d / file).read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil.Evil"]} if file != "config.json" else \
        {"AutoModelForCausalLM": "evil.Evil", "AutoConfig": "evil.Evil"}
    (d / file).write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    msg = _refused(["generate", str(d), "--prompt", "w1", "--max-new-tokens", "2"])
    assert f"{d / file} names custom code" in msg and "never runs" in msg
    if kind == "teacher":
        assert f"{d / file} names custom code" in _refused(BASE + ["--out", str(tmp_path / "run"), "--teacher", str(d)])
        assert not (tmp_path / "run").exists()
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["mar", "teacher"])
def test_a_pickled_weights_file_is_refused_without_running(tmp_path, kind):
    """A folder whose weights are a `pytorch_model.bin` pickle that runs a command when unpickled:
    transformers loads it with weights_only, which refuses it; the refusal is one line."""
    d = _mar_folder(tmp_path / "m") if kind == "mar" else _teacher_folder(tmp_path / "t")
    (d / "model.safetensors").unlink()
    p = _Payload()
    p.marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": p}))
    msg = _refused(["energy", str(d), "--target", "45nm-fp32", "--max-tokens", "16"])
    assert f"{d}: its weights file cannot be read as plain weights" in msg and "not loaded" in msg
    assert not p.marker.exists()


@pytest.mark.parametrize("damage,want", [
    ("layers3", "the weights do not match config.json: 9 missing (model.layers.2"),
    ("layers1", "the weights do not match config.json: 9 unexpected (model.layers.1"),
    ("hidden", "config.json does not match the weights"),
    ("truncated", "model.safetensors: the weights file is damaged or incomplete"),
    ("list", "config.json: holds list, not a JSON object"),
    ("model_type", "config.json: transformers cannot build a model from it"),
    ("no_tokenizer", ": the tokenizer cannot be loaded"),
    ("tokenizer_json", ": the tokenizer cannot be loaded"),
    ("tokenizer_config", "tokenizer_config.json: is not valid JSON"),
])
def test_a_teacher_folder_is_checked_as_strictly_as_a_mar_folder(tmp_path, damage, want):
    """`refine --teacher` and the commands that convert a teacher load it through the same checks:
    a random or dropped layer is never trained on, a damaged file never a traceback."""
    from neuro_mar.teachers import load_teacher

    d = _teacher_folder(tmp_path / "t")
    cfg = json.loads((d / "config.json").read_text())
    if damage in ("layers3", "layers1", "hidden", "model_type"):
        cfg.update({"layers3": {"num_hidden_layers": 3}, "layers1": {"num_hidden_layers": 1},
                    "hidden": {"hidden_size": 64}, "model_type": {"model_type": "no-such-model"}}[damage])
        (d / "config.json").write_text(json.dumps(cfg))
    elif damage == "truncated":
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif damage == "list":
        (d / "config.json").write_text("[1, 2]")
    elif damage == "no_tokenizer":
        for f in d.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                f.unlink()
    elif damage == "tokenizer_json":
        (d / "tokenizer.json").write_text('{"version": ')
    else:
        (d / "tokenizer_config.json").write_text('{"model_max_length": ')
    with pytest.raises(ValueError, match=None) as info:
        load_teacher(str(d))
    assert want in str(info.value) and str(d) in str(info.value), str(info.value)
    assert want in _refused(BASE + ["--out", str(tmp_path / "run"), "--teacher", str(d)])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,want", [
    ("neurons", {"mixer.in": "nosuch"}, "nosuch"),
    ("chunk_size", 0, "chunk_size must be an integer >= 1, got 0"),
    ("neuron_options", {"mixer.in": {"T": -3}}, "T"),
])
def test_a_mar_config_field_out_of_range_names_the_config(tmp_path, field, value, want):
    d = _mar_folder(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    if field == "neuron_options":
        cfg["neurons"] = {**(cfg.get("neurons") or {}), "mixer.in": "atmn"}
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _refused(["generate", str(d), "--prompt", "w1", "--max-new-tokens", "2"])
    assert f"{d / 'config.json'}: " in msg and want in msg and "restore the config.json" in msg, msg


def test_a_model_without_a_tokenizer_refuses_a_fallback_that_does_not_fit(tmp_path):
    d = _mar_folder(tmp_path / "m")
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    msg = _refused(["generate", str(d), "--prompt", "w1", "--max-new-tokens", "2"])
    assert "has no tokenizer of its own" in msg and "pass --tokenizer" in msg


def test_a_resume_into_a_folder_without_a_run_record_is_refused(tmp_path, teacher_dir, data_file):
    """A deleted refine_config.json (or a folder that never held a run) gives a resume nothing to
    check against: refused, instead of continuing (or overwriting) with whatever options are given."""
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"--resume: .*notes holds files \(mine.txt\) but no refine_config.json"):
        _refine(tmp_path, teacher_dir, data_file, "--resume", out="notes")
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]
    assert _refine(tmp_path, teacher_dir, data_file, "--steps-2", "0") == 0
    (tmp_path / "run" / "refine_config.json").unlink()
    with pytest.raises(SystemExit, match="but no refine_config.json"):
        _refine(tmp_path, teacher_dir, data_file, "--resume", "--steps-2", "0")


@pytest.mark.parametrize("state,want", [
    ({"foo": torch.zeros(2)}, "no cfg, history, module"),
    ([1, 2], "it holds list"),
    ("nan", "not finite or not tensors"),
])
def test_a_checkpoint_that_is_not_the_trainers_is_refused(tmp_path, state, want):
    trainer, _ = _tiny_trainer(tmp_path, 4)
    trainer.run()
    ckpt = trainer.ckpt_path
    if state == "nan":
        saved = torch.load(ckpt, weights_only=True)
        for t in saved["module"].values():
            t.fill_(float("nan"))
        torch.save(saved, ckpt)
    else:
        torch.save(state, ckpt)
    fresh, _ = _tiny_trainer(tmp_path, 4)
    with pytest.raises(ValueError, match=f"checkpoint .* is not one this trainer wrote or is damaged .*{want}"):
        fresh.try_resume()
