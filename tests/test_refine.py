"""The refinement pipeline on tiny random teachers: stage losses, exact resume, data-parallel
equivalence, bad inputs, an end-to-end run, and the zero-shot scorer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from neuro_mar.cli import main
from neuro_mar.convert import llama_to_mar
from neuro_mar.models import SITE_KINDS
from neuro_mar.refine import (PRESETS, RefineConfig, TrainConfig, Trainer, load_multiple_choice, sbds_logit_loss,
                              score_multiple_choice)
from neuro_mar.refine.pipeline import _Bound, loss_1a, loss_1b, loss_1c, make_loss_2
from tiny import tiny_llama

WORDS = [f"w{i}" for i in range(90)]


def _tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    tiny_llama().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    # a text with structure (a repeating pattern with noise) so there is something to learn
    words = [WORDS[(i * 7 + int(torch.randint(0, 3, (1,), generator=g))) % 90] for i in range(3000)]
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(" ".join(words))
    return p


def _fit(fn, student, teacher, batch, steps=15, lr=3e-3):
    bound = _Bound(student, teacher, fn)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        first = float(bound(batch))
    for _ in range(steps):
        opt.zero_grad()
        bound(batch).backward()
        opt.step()
    with torch.no_grad():
        return first, float(bound(batch))


@pytest.mark.parametrize("stage", ["1a", "1b", "1c", "2"])
def test_each_stage_lowers_its_own_loss(stage):
    torch.manual_seed(0)
    teacher = tiny_llama()
    teacher.set_attn_implementation("eager")
    teacher.requires_grad_(False)
    student = llama_to_mar(teacher)
    batch = torch.randint(3, 97, (4, 16))
    if stage == "2":
        stage1 = student
        with torch.no_grad():  # a random tiny model is near-uniform: sharpen it so spikes matter
            stage1.lm_head.weight.mul_(40)
        stage1.requires_grad_(False)
        import copy

        student = copy.deepcopy(stage1).requires_grad_(True)
        student.set_neurons("atmn", T=2)  # coarse spikes: a clear gap to close
        student.calibrate_thresholds([batch])
        fn, teacher, lr = make_loss_2(RefineConfig(gamma=0.1)), stage1, 3e-4
    else:
        fn, lr = {"1a": loss_1a, "1b": loss_1b, "1c": loss_1c}[stage], 3e-3
    first, last = _fit(fn, student, teacher, batch, lr=lr)
    assert last < 0.8 * first, (stage, first, last)


def _tiny_trainer(out, steps, seed=0):
    torch.manual_seed(seed)
    teacher = tiny_llama()
    teacher.requires_grad_(False)
    student = llama_to_mar(teacher)
    rows = torch.randint(3, 97, (10, 12), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=steps, lr=1e-3, warmup=2, micro_batch=2, grad_accum=2, ckpt_every=3, seed=3)
    return Trainer(_Bound(student, teacher, loss_1c), lambda m, b: m(b), rows, cfg, out, "s", progress=False), student


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    full, s_full = _tiny_trainer(tmp_path / "a", 7)
    h_full = full.run()
    part, _ = _tiny_trainer(tmp_path / "b", 7)
    part.run(stop_after=3)  # "crash" after the checkpoint at step 3
    resumed, s_res = _tiny_trainer(tmp_path / "b", 7)
    assert resumed.try_resume() and resumed.step == 3
    h_res = resumed.run()
    assert [r["loss"] for r in h_res] == [r["loss"] for r in h_full]
    for (n, p), (_, q) in zip(s_full.state_dict().items(), s_res.state_dict().items()):
        assert torch.equal(p, q), n


DDP_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from neuro_mar.refine.trainer import TrainConfig, Trainer, init_distributed, shutdown_distributed, world
from neuro_mar.refine.pipeline import _Bound, loss_1c
from neuro_mar.convert import llama_to_mar
from tiny import tiny_llama
init_distributed()
torch.manual_seed(0)
teacher = tiny_llama(); teacher.requires_grad_(False)
student = llama_to_mar(teacher)
rows = torch.randint(3, 97, (16, 12), generator=torch.Generator().manual_seed(1))
mb, fsdp = int(sys.argv[1]), sys.argv[2] == "fsdp"
budget = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
cfg = TrainConfig(steps=40 if budget else 5, lr=1e-3, warmup=1, micro_batch=mb, grad_accum=1, seed=2,
                  ckpt_every=100, fsdp=fsdp, max_seconds=budget)
tr = Trainer(_Bound(student, teacher, loss_1c), lambda m, b: m(b), rows, cfg, None, "ddp", progress=False,
             shard_units=lambda b: list(b.student.model.layers))
h = tr.run()
counts = [len(h)]
if world()[1] > 1:  # gathered and printed by rank 0 alone: two ranks' prints interleave on one pipe
    counts = [None] * world()[1]
    torch.distributed.all_gather_object(counts, len(h))
if world()[0] == 0:
    print("STEPS", json.dumps(counts), flush=True)
final = tr.result().student.lm_head.weight.sum().item()
if world()[0] == 0:
    print("LOSSES", json.dumps([r["loss"] for r in h] + [final]), flush=True)
del tr  # its DDP wrapper must not outlive the process group (see shutdown_distributed)
shutdown_distributed()
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(tmp_path, mode):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), "4", "none"], capture_output=True, text=True, timeout=600, env=env)
    import socket

    with socket.socket() as sock:  # a free port, so runs never collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), str(script), "2", mode],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = json.loads(one.stdout.split("LOSSES")[-1].splitlines()[0])
    l2 = json.loads(two.stdout.split("LOSSES")[-1].splitlines()[0])
    assert len(l1) == len(l2) == 6  # five losses, then a checksum of the trained (unsharded) weights
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (l1, l2)


def test_two_processes_agree_on_a_budget_cut(tmp_path):
    """Under a wall-time budget every rank takes rank 0's step count (no rank waits in a collective
    that another rank has left)."""
    import socket

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), str(script), "2", "ddp", "0.3"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    from neuro_mar.refine.trainer import BUDGET_PROBE_STEPS

    steps = json.loads(two.stdout.split("STEPS")[-1].splitlines()[0])
    assert len(steps) == 2 and steps[0] == steps[1], two.stdout
    assert BUDGET_PROBE_STEPS <= steps[0] < 40, steps


@pytest.mark.parametrize("case", ["missing", "empty", "not_llama", "seq_too_long", "bad_neuron", "bad_task",
                                  "bad_ablation", "ce_weight_with_fused_sbds"])
def test_bad_input_clear_error_and_no_output_folder(case, tmp_path, teacher_dir, data_file, monkeypatch):
    out = tmp_path / "run"
    args = ["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data", str(data_file)]
    if case == "missing":
        args[-1] = str(tmp_path / "nope.txt")
        match = "does not exist"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("  \n")
        args[-1] = str(tmp_path / "empty.txt")
        match = "empty"
    elif case == "not_llama":
        from transformers import GPT2Config, GPT2LMHeadModel

        gdir = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=93)).save_pretrained(gdir)
        _tokenizer().save_pretrained(gdir)
        args[args.index("--teacher") + 1] = str(gdir)
        match = "not a Llama-shaped"
    elif case == "seq_too_long":
        args += ["--seq-len", "100000"]
        match = "fewer than one sequence"
    elif case == "bad_task":
        args += ["--eval-multiple-choice", str(tmp_path / "arc.jsonl")]
        match = "eval-multiple-choice.*does not exist"
    elif case == "bad_ablation":
        args += ["--ablation-neuron", "nope"]
        match = "unknown neuron"
    elif case == "ce_weight_with_fused_sbds":  # refused before Stage 1, not at Stage 2's first step
        pytest.importorskip("triton")
        from neuro_mar.kernels import atmn_ops

        monkeypatch.setattr(atmn_ops._backend, "value", "triton")
        args += ["--ce-weight", "0.1"]
        match = "ce-weight needs materialised logits"
    else:
        args += ["--neuron", "nope"]
        match = "unknown neuron"
    with pytest.raises(SystemExit, match=match):
        main(args)
    assert not out.exists()


def test_end_to_end_tiny_run_and_resume(tmp_path, teacher_dir, data_file):
    out = tmp_path / "run"
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir),
                 "--data", str(data_file), "--gamma", "0.1"]) == 0
    for p in ("stage1/config.json", "student/config.json", "student/tokenizer.json", "report.json", "report.md",
              "loss_curves.png", "firing_rates.png", "metrics.jsonl"):
        assert (out / p).is_file(), p
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["models"]) == {"teacher", "stage1_ssm", "spiking_before_stage2", "spiking_student"}
    assert 0 < rep["mean_firing_rate"] < 1 and rep["energy_per_token"]["64"]["45nm-fp32"]["ratio_teacher"] > 0
    stages = {json.loads(l)["stage"] for l in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"stage1a", "stage1b", "stage1c", "stage2"}
    cfg = json.loads((out / "student" / "config.json").read_text())
    assert all(cfg["neurons"][k] == "atmn" for k in SITE_KINDS)
    # Stage 1's checkpoints go once stage1/ is saved (a resume loads stage1/); Stage 2's stay
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage2.pt"]
    with pytest.raises(SystemExit, match="not empty"):
        main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data", str(data_file)])
    first_times = rep["stage_seconds"]
    assert rep["wall_seconds"] > sum(first_times.values())
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
                 str(data_file), "--gamma", "0.1", "--resume"]) == 0
    # a resumed run that had nothing left to train reports the stage times of the run that trained them,
    # and its wall time adds this invocation's to the first one's
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["stage_seconds"] == first_times
    assert rep2["wall_seconds"] > rep["wall_seconds"]
    # eval and generate on the result
    assert main(["eval", str(out / "student"), "--data", str(data_file), "--teacher", str(teacher_dir),
                 "--seq-len", "32", "--max-tokens", "400"]) == 0
    assert main(["generate", str(out / "student"), "--prompt", "w1 w2 w3", "--max-new-tokens", "4"]) == 0
    # neuro-mar clean: a complete run needs no checkpoint; a dry run lists, a run removes, a resume then refuses
    stale = out / "checkpoints" / ".stage2.pt.999999999.x.tmp"  # a killed writer's temporary (no such pid)
    stale.write_bytes(b"x")
    assert main(["clean", str(out), "--dry-run"]) == 0
    assert (out / "checkpoints" / "stage2.pt").is_file()
    assert main(["clean", str(out)]) == 0
    assert not (out / "checkpoints").exists() and (out / "student" / "config.json").is_file()
    with pytest.raises(SystemExit, match="is complete .* nothing to continue"):
        main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
              str(data_file), "--gamma", "0.1", "--resume"])
    with pytest.raises(SystemExit, match="not a refine run folder"):
        main(["clean", str(tmp_path)])


def test_clean_keeps_what_an_unfinished_run_needs(tmp_path):
    """An unfinished run: Stage 1's checkpoints go once stage1/ is saved, Stage 2's stay; before
    stage1/ exists nothing goes; a run being written (its lock held) is refused."""
    from neuro_mar.refine.clean import clean_run
    from neuro_mar.refine.pipeline import RunLock

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "refine_config.json").write_text("{}")
    for name in ("stage1b", "stage1c", "stage2"):
        (out / "checkpoints" / f"{name}.pt").write_bytes(b"w" * 10)
    assert clean_run(out) == []
    (out / "stage1").mkdir()
    (out / "stage1" / "config.json").write_text("{}")
    assert [p.name for p, _ in clean_run(out, dry_run=True)] == ["stage1b.pt", "stage1c.pt"]
    lock = RunLock(out)
    with pytest.raises(SystemExit, match="being written by another refine"):
        main(["clean", str(out)])
    lock.release()
    assert main(["clean", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage2.pt"]


def test_multiple_choice_scorer_matches_brute_force(tmp_path):
    teacher = tiny_llama()
    tok = _tokenizer()
    items_jsonl = tmp_path / "arc.jsonl"
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        q = " ".join(WORDS[int(j)] for j in torch.randint(0, 90, (5,), generator=g))
        choices = [" ".join(WORDS[int(j)] for j in torch.randint(0, 90, (int(k),), generator=g)) for k in (1, 2, 3, 2)]
        rows.append({"id": str(i), "question": q, "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "C"})
    items_jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_multiple_choice(items_jsonl)
    got = score_multiple_choice(teacher, tok, items, batch=5)
    acc = acc_norm = 0
    with torch.no_grad():
        for it in items:
            lls = []
            for ch in it["choices"]:
                ctx = tok(it["context"], add_special_tokens=False).input_ids
                full = tok(it["context"] + " " + ch, add_special_tokens=False).input_ids
                logp = torch.log_softmax(teacher(torch.tensor([full])).logits[0].float(), -1)
                lls.append(sum(logp[p - 1, full[p]].item() for p in range(len(ctx), len(full))))
            acc += int(max(range(4), key=lambda j: lls[j]) == it["gold"])
            acc_norm += int(max(range(4), key=lambda j: lls[j] / len(it["choices"][j])) == it["gold"])
    assert got["acc"] == acc / 12 and got["acc_norm"] == acc_norm / 12


def test_multiple_choice_formats(tmp_path):
    p = tmp_path / "piqa.jsonl"
    p.write_text(json.dumps({"goal": "open a jar", "sol1": "twist", "sol2": "pull", "label": 1}))
    assert load_multiple_choice(p)[0] == {"context": "Question: open a jar\nAnswer:", "choices": ["twist", "pull"], "gold": 1}
    h = tmp_path / "hs.jsonl"
    h.write_text(json.dumps({"ctx": "A man [title] sits.", "endings": ["a", "b [x]"], "label": 0, "activity_label": "Sit"}))
    it = load_multiple_choice(h)[0]
    assert it["context"] == "Sit: A man. sits." and it["choices"] == ["a", "b "]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="unknown multiple-choice format"):
        load_multiple_choice(bad)


def test_sbds_loss_matches_definition():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    fkl = (p * (p.log() - q.log())).sum(-1).mean()
    rkl = (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(sbds_logit_loss(s, t, 0.2, 0.7, chunk=4), 0.2 * fkl + 0.7 * rkl)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    p2, q2 = p[0, :2], q[0, :2]
    ref = (0.2 * (p2 * (p2.log() - q2.log())).sum(-1) + 0.7 * (q2 * (q2.log() - p2.log())).sum(-1)).mean()
    torch.testing.assert_close(sbds_logit_loss(s, t, 0.2, 0.7, mask=mask), ref)
    torch.testing.assert_close(sbds_logit_loss(s, t, 1, 0, temperature=2.0),
                               4 * (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean())


def _arc_file(path, n=6):
    items = []
    for i in range(n):
        items.append({"question": f"w{i} w{i + 1}", "choices": {"text": [f"w{i + 2}", f"w{i + 40}", f"w{i + 60}"],
                                                                  "label": ["A", "B", "C"]}, "answerKey": "A"})
    path.write_text("\n".join(json.dumps(d) for d in items) + "\n")
    return path


def test_gpu_style_run_with_budgets_eval_ablation_and_throughput(tmp_path, teacher_dir, data_file):
    """What the gpu preset adds, on a tiny teacher: a wall-time budget cuts Stage 2's steps, the
    report evaluates every model on --eval-data and --eval-multiple-choice, trains and reports a binary-neuron
    ablation, and times Stage 2 with the fused and the reference paths."""
    out = tmp_path / "run"
    arc = _arc_file(tmp_path / "arc.jsonl")
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir),
                 "--data", str(data_file), "--steps-2", "12", "--seconds-2", "1e-6", "--eval-data", str(data_file),
                 "--eval-max-tokens", "320", "--eval-multiple-choice", str(arc), "--ablation-neuron", "binary",
                 "--throughput-steps", "2", "--throughput-micro-batch", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["models"]) == {"teacher", "stage1_ssm", "spiking_before_stage2", "spiking_student",
                                  "ablation_binary"}
    for name, m in rep["models"].items():
        assert m["eval_perplexity"] > 1 and 0 <= m["arc_acc"] <= 1 and 0 <= m["arc_acc_norm"] <= 1
        assert (name == "teacher") == ("eval_kl_to_teacher" not in m)
    assert rep["evaluation"]["eval_data"]["tokens"] == 320 and rep["evaluation"]["tasks"]["arc"]["items"] == 6
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    from neuro_mar.refine.trainer import BUDGET_PROBE_STEPS

    assert max(r["step"] for r in recs if r["stage"] == "stage2") == BUDGET_PROBE_STEPS  # cut from 12
    assert max(r["step"] for r in recs if r["stage"] == "stage2-binary") == BUDGET_PROBE_STEPS
    tp = rep["throughput"]
    assert tp["fused"]["tokens_per_s"] > 0 and tp["reference"]["tokens_per_s"] > 0 and tp["speedup"] > 0
    assert 0 < rep["ablations"]["binary"]["mean_firing_rate"] < 1
    md = (out / "report.md").read_text()
    assert "ablation_binary" in md and "arc acc" in md and "Fused / reference" in md


def test_budget_survives_resume(tmp_path):
    """A budget-cut stage resumes with the cut step count, not the configured one."""
    from neuro_mar.refine.trainer import BUDGET_PROBE_STEPS

    rows = torch.randint(0, 50, (16, 8))
    model = torch.nn.Embedding(50, 4)
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    cfg = TrainConfig(steps=20, lr=1e-2, warmup=0, micro_batch=2, ckpt_every=1, max_seconds=1e-6)
    t = Trainer(model, loss, rows, cfg, tmp_path, "s", progress=False)
    t.run(stop_after=BUDGET_PROBE_STEPS + 1)
    assert cfg.steps == BUDGET_PROBE_STEPS and t.step == BUDGET_PROBE_STEPS
    cfg2 = TrainConfig(steps=20, lr=1e-2, warmup=0, micro_batch=2, ckpt_every=1, max_seconds=1e-6)
    t2 = Trainer(torch.nn.Embedding(50, 4), loss, rows, cfg2, tmp_path, "s", progress=False)
    assert t2.try_resume() and cfg2.steps == BUDGET_PROBE_STEPS
    assert len(t2.run()) == BUDGET_PROBE_STEPS


def test_budget_holds_the_wall_time_across_a_resume(tmp_path):
    """Steps of >= 40 ms under a 0.6 s budget: the stage stops when the budget is spent (within a
    few steps' time), also when it is interrupted before its first estimate and resumed (the time
    already spent is carried in the checkpoint)."""
    import time as _time

    rows = torch.randint(0, 50, (16, 8))

    def slow_loss(m, b):
        _time.sleep(0.04)
        return m(b).pow(2).mean()

    def trainer(path):
        cfg = TrainConfig(steps=500, lr=1e-2, warmup=0, micro_batch=2, ckpt_every=1, max_seconds=0.6)
        return Trainer(torch.nn.Embedding(50, 4), slow_loss, rows, cfg, path, "s", progress=False), cfg

    def used_the_budget(tr, cfg):
        step = max(r["seconds"] for r in tr.history)  # the slowest step (this machine's speed)
        return cfg.steps < 500 and abs(tr.budget_elapsed - 0.6) <= 3 * step, (cfg.steps, tr.budget_elapsed, step)

    t, cfg = trainer(tmp_path / "one")
    t.run()
    ok, info = used_the_budget(t, cfg)
    assert ok, info

    t, _ = trainer(tmp_path / "two")
    t.run(stop_after=3)
    t2, cfg2 = trainer(tmp_path / "two")
    assert t2.try_resume() and t2.budget_elapsed > 0.05
    t2.run()
    ok, info = used_the_budget(t2, cfg2)
    assert ok, info


def test_a_failing_evaluation_is_recorded_not_raised(tmp_path, teacher_dir, data_file, monkeypatch):
    """One evaluation that raises leaves the rest of the report intact, with the error recorded."""
    from neuro_mar.refine import report as report_mod

    calls = {"n": 0}
    real = report_mod.perplexity

    def flaky(m, rows, *a, **k):
        if rows.shape[0] == 10:  # --eval-data: 320 tokens in rows of 32 (the held-out split has 2 rows)
            calls["n"] += 1
            if calls["n"] == 1:  # the first model evaluated there: the teacher
                raise RuntimeError("CUDA out of memory (simulated)")
        return real(m, rows, *a, **k)

    monkeypatch.setattr(report_mod, "perplexity", flaky)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="simulated"):
        assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir),
                     "--data", str(data_file), "--eval-data", str(data_file), "--eval-max-tokens", "320"]) == 0
    rep = json.loads((out / "report.json").read_text())
    errors = [n for n, m in rep["models"].items() if "eval_perplexity_error" in m]
    assert errors == ["teacher"] and "simulated" in rep["models"]["teacher"]["eval_perplexity_error"]
    assert all("eval_perplexity" in m for n, m in rep["models"].items() if n != "teacher")


def test_report_leads_with_the_zero_shot_suite(tmp_path, teacher_dir, data_file):
    """--eval-suite-task: teacher, Stage-1 model, student and ablations are scored on the suite and
    report.md opens with its table (kept share of the teacher's margin per task)."""
    arc = _arc_file(tmp_path / "arc.jsonl")
    lam = tmp_path / "lambada.jsonl"
    lam.write_text("".join(json.dumps({"text": " ".join(WORDS[i:i + 8])}) + "\n" for i in range(0, 40, 8)))
    out = tmp_path / "run"
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
                 str(data_file), "--eval-suite-task", f"arc_easy={arc}", "--eval-suite-task", f"lambada_openai={lam}",
                 "--ablation-neuron", "binary"]) == 0
    rep = json.loads((out / "report.json").read_text())
    suite = rep["suite"]
    assert set(suite["results"]) == {"teacher", "stage1_ssm", "spiking_student", "ablation_binary"}
    assert suite["tasks"]["arc_easy"]["docs"] == 6 and suite["tasks"]["lambada_openai"]["docs"] == 5
    for res in suite["results"].values():
        assert 0 <= res["arc_easy"]["acc"] <= 1 and res["lambada_openai"]["perplexity"] > 1
    assert suite["kept"]["teacher"]["lambada_openai"] in (None, 1.0)
    md = (out / "report.md").read_text()
    assert md.index("Zero-shot suite") < md.index("Held-out split")
    assert "arc_easy (acc)" in md and "spiking_student kept" in md
    # every saved model carries a model card with its own scores next to the teacher's
    card = (out / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "spiking-neural-network" in card
    assert 'from_pretrained("student", trust_remote_code=True)' in card
    assert "| arc_easy (acc) |" in card and "spiking_student kept" in card and "ablation_binary" not in card
    assert f"Mean firing rate {rep['mean_firing_rate']:.3f}" in card and "45nm-fp32" in card
    s1 = (out / "stage1" / "README.md").read_text()
    assert "stage1_ssm kept" in s1 and "Spikes and energy" not in s1 and "spiking-neural-network" not in s1


def test_bad_suite_file_stops_before_anything_is_written(tmp_path, teacher_dir, data_file):
    bad = tmp_path / "piqa.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"error: evaluation suite: .*piqa.jsonl: unknown layout.*goal, sol1"):
        main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
              str(data_file), "--eval-suite-task", f"piqa={bad}"])
    assert not out.exists()
    with pytest.raises(SystemExit, match="needs --suite-dir"):
        main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
              str(data_file), "--eval-suite", "dev"])
    assert not out.exists()


def test_teacher_span_initialisation_runs_end_to_end(tmp_path, teacher_dir, data_file):
    """--dt-init teacher: each head's dt from the teacher's attention span; the run trains and reports."""
    out = tmp_path / "run"
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
                 str(data_file), "--dt-init", "teacher", "--normalize-memory", "--ssm-input-gain", "none"]) == 0
    cfg = json.loads((out / "refine_config.json").read_text())
    assert cfg["dt_init"] == "teacher" and cfg["normalize_memory"] is True
    with pytest.raises(SystemExit, match="add --ssm-input-gain none to use --normalize-memory"):
        main(["refine", "--out", str(tmp_path / "run2"), "--preset", "tiny", "--teacher", str(teacher_dir),
              "--data", str(data_file), "--normalize-memory"])
    assert not (tmp_path / "run2").exists()


def test_default_recipe_is_teacher_span_with_zoh_gain(tmp_path, teacher_dir, data_file):
    """The default run starts each mixer head from the teacher's span and normalises it with the
    input-dependent gain; the saved models carry the gain, so they load and score the same."""
    from neuro_mar.models import MARForCausalLM

    out = tmp_path / "run"
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
                 str(data_file)]) == 0
    cfg = json.loads((out / "refine_config.json").read_text())
    assert cfg["dt_init"] == "teacher" and cfg["ssm_input_gain"] == "zoh" and not cfg["normalize_memory"]
    for folder in ("stage1", "student"):
        m = MARForCausalLM.from_pretrained(out / folder)
        assert m.config.ssm_input_gain == "zoh" and all(l.mixer.input_gain == "zoh" for l in m.model.layers)
    assert json.loads((out / "report.json").read_text())["models"]["stage1_ssm"]["heldout_perplexity"] > 1


def test_set_trainable_groups():
    """Each group trains exactly its parameters: 'mixers' the SSM mixers and the spike thresholds,
    'blocks' the decoder blocks, 'all' everything; a bad name is refused."""
    student = llama_to_mar(tiny_llama())
    student.set_neurons("atmn")
    names = {n for n, _ in student.named_parameters()}

    def trained(group):
        n = student.set_trainable(group)
        got = {k for k, p in student.named_parameters() if p.requires_grad}
        assert n == sum(p.numel() for p in student.parameters() if p.requires_grad)
        return got

    assert trained("all") == names
    blocks = trained("blocks")
    assert blocks == {k for k in names if k.startswith("model.layers.")}
    mixers = trained("mixers")
    assert mixers and all(".mixer." in k or "_site." in k for k in mixers)
    assert any("mlp.in_site" in k for k in mixers) and not any("mlp.gate_proj" in k for k in mixers)
    assert {k for k in names if ".mixer." in k} <= mixers
    with pytest.raises(ValueError, match="one of all, blocks, mixers"):
        student.set_trainable("mlps")


def test_unknown_train_group_is_refused_before_anything_is_written(tmp_path, teacher_dir, data_file):
    from neuro_mar.refine import RefineError, run_refine

    cfg = RefineConfig(**{**PRESETS["tiny"], "teacher": str(teacher_dir), "data": [str(data_file)], "train_2": "mlps"})
    with pytest.raises(RefineError, match="train-2 must be one of all, blocks, mixers, got 'mlps'"):
        run_refine(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    for key, value, message in (("gen_cache", "paged", "--gen-cache must be auto, preallocated, static, dynamic, got 'paged'"),
                                ("gen_precision", "fp16", "--gen-precision must be auto, bf16 or fp32, got 'fp16'")):
        bad = RefineConfig(**{**PRESETS["tiny"], "teacher": str(teacher_dir), "data": [str(data_file)], key: value})
        with pytest.raises(RefineError, match=message):
            run_refine(bad, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_frozen_groups_stay_the_teachers(tmp_path, teacher_dir, data_file):
    """--train-1 mixers --train-2 mixers: the MLPs, norms and embeddings of both saved models are
    the teacher's to the bit, the mixers moved; the choice is recorded in refine_config.json."""
    from neuro_mar.models import MARForCausalLM

    out = tmp_path / "run"
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
                 str(data_file), "--train-1", "mixers", "--train-2", "mixers"]) == 0
    assert json.loads((out / "refine_config.json").read_text())["train_1"] == "mixers"
    from transformers import AutoModelForCausalLM

    init = llama_to_mar(AutoModelForCausalLM.from_pretrained(teacher_dir)).state_dict()
    for folder in ("stage1", "student"):
        sd = MARForCausalLM.from_pretrained(out / folder).state_dict()
        frozen = [k for k in init if ".mixer." not in k and "_site." not in k]
        assert frozen and all(torch.equal(sd[k], init[k]) for k in frozen), folder
        assert any(not torch.equal(sd[k], init[k]) for k in init if ".mixer." in k), folder


def test_keep_checkpoints_keeps_every_stage(tmp_path, teacher_dir, data_file):
    out = tmp_path / "run"
    assert main(["refine", "--out", str(out), "--preset", "tiny", "--teacher", str(teacher_dir), "--data",
                 str(data_file), "--keep-checkpoints"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage1a.pt", "stage1b.pt", "stage1c.pt",
                                                                        "stage2.pt"]
