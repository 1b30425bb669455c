"""MARForCausalLM: HF integration, cached generation, save/load, hidden states, neurons."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from neuro_mar import MARConfig, MARForCausalLM
from neuro_mar.models import SITE_KINDS
from tiny import tiny_mar

SPIKING = {"mixer.in": "atmn", "mixer.out": "atmn", "mlp.in": "atmn", "mlp.down": "binary"}


@pytest.mark.parametrize("neurons", [None, SPIKING])
def test_cached_token_by_token_equals_full_forward(neurons):
    m = tiny_mar(neurons=neurons).double()
    ids = torch.randint(3, 97, (2, 19))
    full = m(ids).logits
    cache = None
    steps = []
    out = m(ids[:, :5], use_cache=True)  # prefill
    cache = out.cache_params
    steps.append(out.logits)
    sizes = set()
    for t in range(5, 19):
        out = m(ids[:, t:t + 1], cache_params=cache, use_cache=True)
        cache = out.cache_params
        sizes.add(cache.nbytes())
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    assert len(sizes) == 1  # the state does not grow with context
    assert cache.seen_tokens == 19


def test_generate_uses_cache_and_matches_full_forward_greedy():
    m = tiny_mar(neurons=SPIKING).double()
    ids = torch.randint(3, 97, (1, 6))
    out = m.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                     pad_token_id=0, eos_token_id=None)
    seq = out.sequences
    assert seq.shape == (1, 14)
    full = m(seq).logits
    for i, score in enumerate(out.scores):
        torch.testing.assert_close(score[0].double(), full[0, 5 + i], rtol=1e-6, atol=1e-6)  # generate casts scores to fp32
        assert int(seq[0, 6 + i]) == int(full[0, 5 + i].argmax())


def test_hidden_states_are_the_prenorm_residual_stream():
    m = tiny_mar()
    ids = torch.randint(3, 97, (2, 7))
    out = m(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == m.config.num_hidden_layers + 1
    torch.testing.assert_close(hs[0], m.model.embed_tokens(ids))
    h1, _ = m.model.layers[0](hs[0])
    torch.testing.assert_close(hs[1], h1)
    torch.testing.assert_close(m.lm_head(m.model.norm(hs[-1])), out.logits)


def test_save_load_round_trip_with_neurons_and_thresholds(tmp_path):
    m = tiny_mar(neurons=SPIKING)
    with torch.no_grad():
        for *_, site in m.spike_sites():
            site.neuron.a.copy_(torch.randn_like(site.neuron.a))
    m.set_neurons("sj-lif", kinds="mlp.in")
    m.set_neurons("si-lif", pattern="model.layers.1.mixer.out_site", D=3)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "neuro_mar" and cfg["neurons"]["mlp.in"] == "sj-lif"
    assert cfg["site_neurons"]["model.layers.1.mixer.out_site"]["name"] == "si-lif"
    m2 = MARForCausalLM.from_pretrained(tmp_path).eval()
    for (_, _, q, s1), (_, _, _, s2) in zip(m.spike_sites(), m2.spike_sites()):
        assert type(s1.neuron) is type(s2.neuron), q
        assert s1.neuron.registry_name == s2.neuron.registry_name
        torch.testing.assert_close(s1.neuron.a, s2.neuron.a)
    ids = torch.randint(3, 97, (2, 9))
    torch.testing.assert_close(m(ids).logits, m2(ids).logits)
    m3 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(m3, MARForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MARConfig)


def test_auto_model_in_fresh_process(tmp_path):
    m = tiny_mar(neurons=SPIKING)
    m.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (1, 5))
    expected = m(ids).logits[0, -1].tolist()
    code = (
        "import sys, json, torch, neuro_mar\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "print(json.dumps(m(ids).logits[0, -1].tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_dense_model_has_no_spikes_and_spiking_model_counts():
    dense = tiny_mar()
    assert not dense.config.is_spiking
    ids = torch.randint(3, 97, (2, 6))
    dense(ids)
    assert all(s.stats()["positive"] == 0 for *_, s in dense.spike_sites())
    sp = tiny_mar(neurons=SPIKING)
    sp.calibrate_thresholds([ids])
    sp.reset_spike_counters()
    sp(ids)
    kinds = {k for _, k, _, s in sp.spike_sites() if s.stats()["positive"] + s.stats()["negative"] > 0}
    assert kinds == set(SITE_KINDS)


def test_calibrated_spiking_model_is_close_to_dense():
    dense = tiny_mar(seed=1)
    sp = tiny_mar(seed=1, neurons={k: "atmn" for k in SITE_KINDS}, neuron_options={k: {"T": 8} for k in SITE_KINDS})
    sp.load_state_dict(dense.state_dict(), strict=False)
    ids = torch.randint(3, 97, (4, 16))
    before = (sp(ids).logits - dense(ids).logits).abs().mean()
    sp.calibrate_thresholds([ids])
    after = (sp(ids).logits - dense(ids).logits).abs().mean()
    assert after < before and after < 0.2 * dense(ids).logits.abs().mean()


def test_config_errors():
    with pytest.raises(ValueError, match="site kind"):
        MARConfig(neurons={"attn": "atmn"})
    with pytest.raises(ValueError, match="available"):
        tiny_mar(neurons={"mlp.in": "nope"})
    m = tiny_mar()
    with pytest.raises(ValueError, match="site kind"):
        m.set_neurons("atmn", kinds="attn")


def test_remote_code_loads_without_importing_neuro_mar(tmp_path):
    """A saved model carries auto_map and one-line remote-code modules: a fresh process that never
    imports neuro_mar loads it through AutoModelForCausalLM(trust_remote_code=True), batched and
    padded, with the same logits."""
    import os

    m = tiny_mar(neurons=SPIKING)
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mar.MARForCausalLM"
    assert (tmp_path / "m" / "modeling_mar.py").is_file() and (tmp_path / "m" / "configuration_mar.py").is_file()
    ids = torch.randint(3, 97, (1, 5))
    expected = m(ids).logits[0, -1].tolist()
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "padded = torch.cat([torch.full((1, 3), 7), ids], 1)\n"
        "mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)\n"
        "print(json.dumps([type(m).__name__, m(ids).logits[0, -1].tolist(),\n"
        "                  m(padded, attention_mask=mask).logits[0, -1].tolist()]))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    name, got, padded = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "MARForCausalLM"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(padded), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    plain = subprocess.run([sys.executable, "-c", code.replace(", trust_remote_code=True", "")],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert plain.returncode != 0 and "trust_remote_code" in plain.stderr  # HF's own refusal, as for any remote code


def test_lm_eval_cli_scores_a_checkpoint_through_remote_code(tmp_path):
    """lm-eval's own command line, offline, with the repository's local ARC task file and
    --model hf ...,trust_remote_code=True (nothing of neuro_mar imported by hand): it loads the
    checkpoint, batches and pads requests, and reports acc for every question."""
    import os
    import shutil
    from pathlib import Path

    pytest.importorskip("lm_eval")
    from test_refine import _tokenizer

    m = tiny_mar(neurons=SPIKING)
    m.save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "arc").mkdir()
    rows = [{"id": f"q{i}", "question": f"w{i} w{i + 1} w{i + 2}",
             "choices": {"text": [f"w{i + 3}", f"w{i + 4} w5", f"w{i + 7}"], "label": ["A", "B", "C"]},
             "answerKey": "ABC"[i % 3]} for i in range(7)]
    (tmp_path / "arc" / "ARC-Easy-validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_eval_tasks"
    shutil.copy(tasks / "arc_easy_local.yaml", tmp_path / "arc_easy_local.yaml")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={tmp_path / 'm'},trust_remote_code=True,dtype=float32", "--include_path", str(tmp_path),
           "--tasks", "arc_easy_local", "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    r = results["results"]["arc_easy_local"]
    assert 0 <= r["acc,none"] <= 1 and results["n-samples"]["arc_easy_local"]["effective"] == 7
