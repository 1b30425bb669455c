"""Hardware cost model: peer cross-checks, invariants, errors, report files."""
import json
import math

import pytest
import torch
from torch import nn

from neuro_mar.hardware_models import (TARGETS, estimate_energy, get_target, llama_rows, load_table,
                                       measure_energy, NVMLUnavailable, rows_energy, student_rows,
                                       synaptic_ops, totals)
from neuro_mar.convert import llama_to_mar
from neuro_mar.models import SITE_KINDS
from tiny import tiny_llama, tiny_mar


def test_synaptic_ops_equal_neurobench_effective_acs():
    """On a plain binary-spike SNN (Linear layers fed 0/1 spikes) our counts equal NeuroBench
    2.3.0's SynapticOperations (effective ACs) exactly, with and without zero weights."""
    from neurobench.metrics.utils.layers import single_layer_MACs

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30, bias=False), nn.Linear(30, 20, bias=False))
    with torch.no_grad():
        net[1].weight[net[1].weight.abs() < 0.05] = 0.0  # some pruned synapses
    for layer in net:
        spikes = (torch.rand(8, layer.in_features) < 0.3).float()
        ours = synaptic_ops(spikes, layer.weight, effective=True)
        theirs, spiking = single_layer_MACs(spikes, layer)
        assert spiking and ours == theirs
        total, _ = single_layer_MACs(spikes, layer, total=True)
        assert synaptic_ops(torch.ones_like(spikes), layer.weight, effective=False) == total


def test_dense_macs_equal_parameter_count():
    """Dense Stage-1 model and Transformer teacher: projection + head MACs per token equal the
    number of weights of their Linear layers (each weight used once per token)."""
    m = tiny_mar()
    rows = student_rows(m.config, None)
    proj = sum(r.get("mac") for r in rows if r.part in SITE_KINDS)
    linear_params = sum(mod.weight.numel() for n, mod in m.named_modules()
                        if isinstance(mod, nn.Linear) and n != "lm_head")
    assert proj == linear_params
    head = [r for r in rows if r.part == "head"][0]
    assert head.get("mac") == m.lm_head.weight.numel() + m.config.hidden_size
    t = tiny_llama()
    trows = llama_rows(t.config, context=16, mode="prefill")
    tproj = sum(r.get("mac") for r in trows if r.part in ("attn.proj", "mlp"))
    assert tproj == sum(mod.weight.numel() for n, mod in t.named_modules()
                        if isinstance(mod, nn.Linear) and n != "lm_head")


def test_attention_ops_grow_with_context():
    t = tiny_llama()
    cfg = t.config
    H, hd = cfg.num_attention_heads, cfg.head_dim
    for L in (1, 7, 100):
        dec = [r for r in llama_rows(cfg, L, "decode") if r.part == "attn.scores"][0]
        assert dec.get("mac") == 2 * H * hd * (L + 1)  # QK^T and AV over L+1 keys
        pre = [r for r in llama_rows(cfg, L, "prefill") if r.part == "attn.scores"][0]
        assert pre.get("mac") * L == 2 * H * hd * L * (L + 1) / 2


def _spiking_tiny():
    t = tiny_llama()
    s = llama_to_mar(t, neurons={k: "atmn" for k in SITE_KINDS})
    ids = torch.randint(3, 97, (2, 24))
    s.calibrate_thresholds([ids])
    return s, t, ids


def test_zero_spikes_zero_ac_energy_and_monotone_in_firing():
    s, _, ids = _spiking_tiny()
    rep = estimate_energy(s, [ids], targets=["45nm-fp32", "loihi"])
    assert rep.targets["45nm-fp32"]["components"]["synaptic AC"] > 0
    with torch.no_grad():
        for *_, site in s.spike_sites():
            site.neuron.a.fill_(20.0)  # V = e^20: nothing fires
    silent = estimate_energy(s, [ids], targets=["45nm-fp32", "loihi"])
    for name in ("45nm-fp32", "loihi"):
        assert silent.targets[name]["components"]["synaptic AC"] == 0.0
        assert silent.counts["student"]["ac_pos"] == 0 and silent.counts["student"]["ac_neg"] == 0
    energies = []
    for a in (3.0, 0.0, -2.0, -5.0):  # lower thresholds -> more spikes
        with torch.no_grad():
            for *_, site in s.spike_sites():
                site.neuron.a.fill_(a)
        r = estimate_energy(s, [ids], targets=["45nm-fp32"])
        energies.append((r.counts["student"]["ac_pos"] + r.counts["student"]["ac_neg"],
                         r.targets["45nm-fp32"]["student_J_per_token"]))
    assert all(e1[0] <= e2[0] and e1[1] <= e2[1] for e1, e2 in zip(energies, energies[1:]))
    assert energies[-1][0] > energies[0][0]


def test_doubling_context_doubles_ssm_prefill_but_more_than_doubles_teacher():
    s, t, ids = _spiking_tiny()
    e = {}
    for L in (512, 1024):
        rep = estimate_energy(s, [ids], targets=["45nm-fp32"], context=L)
        tg = rep.targets["45nm-fp32"]
        e[L] = (tg["student_J_per_token"] * L, tg["teacher_J_per_token"] * L)  # whole prefill
    assert math.isclose(e[1024][0], 2 * e[512][0], rel_tol=1e-12)
    assert e[1024][1] > 2 * e[512][1]


def test_gpu_target_gets_no_sparsity_gain():
    s, _, ids = _spiking_tiny()
    rep = estimate_energy(s, [ids], targets=["h200-bf16"])
    tg = rep.targets["h200-bf16"]
    # the spiking student pays the dense matmuls plus its neuron updates
    assert tg["student_J_per_token"] >= tg["stage1_J_per_token"]


def test_teacher_config_is_saved_by_conversion():
    s, t, _ = _spiking_tiny()
    assert s.config.teacher_config["num_key_value_heads"] == t.config.num_key_value_heads
    rows = llama_rows(s.config.teacher_config, 64)
    assert rows_energy(rows, get_target("45nm-fp32")) == rows_energy(llama_rows(t.config, 64), get_target("45nm-fp32"))


def test_mapping_reports_fit_and_precision():
    s, _, _ = _spiking_tiny()
    from neuro_mar.hardware_models import map_model

    m = map_model(s.config, get_target("loihi"))
    assert m["applicable"] and m["cores"] > 0 and m["chips"] == 1 and m["fits_one_chip"]
    assert m["weights_must_be_quantised"] and "quantised from 16 to 8 bits" in m["message"]
    big = s.config.__class__(**{**s.config.to_dict(), "hidden_size": 4096, "intermediate_size": 16384,
                                "num_hidden_layers": 32, "n_qk_heads": 32, "n_v_heads": 32, "d_state": 128})
    mb = map_model(big, get_target("odin"))
    assert mb["chips"] > 1 and not mb["fits_one_chip"] and "does NOT fit one chip" in mb["message"]
    assert not map_model(s.config, get_target("45nm-fp32"))["applicable"]


def test_bad_targets_and_tables(tmp_path):
    with pytest.raises(ValueError, match="registered"):
        get_target("loihi3")
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        get_target(str(bad))
    bad.write_text(json.dumps({"name": "x", "kind": "digital", "e_ac": 1, "e_mac": 1, "e_mul": 1, "e_add": 1}))
    with pytest.raises(ValueError, match="source"):
        load_table(bad)
    good = {"name": "mychip", "kind": "neuromorphic", "source": "datasheet v1", "scope": "synop only",
            "e_ac": 2.0, "e_mac": 2.0, "e_mul": 2.0, "e_add": 2.0, "dense_fallback": "45nm-int8"}
    bad.write_text(json.dumps({**good, "e_ac": -1}))
    with pytest.raises(ValueError, match="e_ac"):
        load_table(bad)
    bad.write_text(json.dumps({**good, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown field"):
        load_table(bad)
    toml = tmp_path / "chip.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in good.items()))
    assert load_table(toml).e_ac == 2.0
    with pytest.raises(FileNotFoundError):
        get_target(str(tmp_path / "missing.toml"))


def test_report_files_and_cli(tmp_path):
    s, _, ids = _spiking_tiny()
    rep = estimate_energy(s, [ids], targets=["45nm-fp32", "truenorth"], memory=True)
    paths = rep.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data["targets"]) == {"45nm-fp32", "truenorth"}
    assert paths["png"].stat().st_size > 1000 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "target,layer,part" in paths["csv"].read_text().splitlines()[0]
    assert "truenorth" in rep.table()
    assert rep.counts["student"]["mem_bytes"] > 0
    # every registered table carries a source and a scope
    assert all(t.source and t.scope for t in TARGETS.values())


def test_measure_mode_is_guarded_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU check")
    with pytest.raises(NVMLUnavailable, match="GPU"):
        measure_energy(lambda: None, tokens=1)


def test_energy_cli_on_a_saved_checkpoint(tmp_path, capsys):
    from neuro_mar.cli import main

    s, _, _ = _spiking_tiny()
    s.save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(97)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text(" ".join(f"w{i % 97}" for i in range(300)))
    assert main(["energy", str(tmp_path / "m"), "--data", str(data), "--target", "45nm-fp32",
                 "--context", "64", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "energy_ctx64.json").is_file()
    assert "45nm-fp32" in capsys.readouterr().out
    # the other commands on the same checkpoint: trace (+ NWB view) and simulate
    assert main(["trace", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "t.nwb"),
                 "--format", "nwb", "--sites", "L01.*"]) == 0
    assert (tmp_path / "t.nwb").is_file() and (tmp_path / "t.sonata.h5").is_file()
    with pytest.raises(SystemExit, match="exactly one"):
        main(["trace", str(tmp_path / "m"), "--out", str(tmp_path / "x.h5")])
    assert main(["simulate", str(tmp_path / "m"), "--text", "w1 w2 w3 w4", "--target", "loihi", "--quantize",
                 "--out", str(tmp_path / "sim")]) == 0
    assert (tmp_path / "sim" / "simulate.json").is_file() and (tmp_path / "sim" / "core_map.png").is_file()
    with pytest.raises(SystemExit, match="quantise"):
        main(["simulate", str(tmp_path / "m"), "--text", "w1 w2", "--target", "loihi"])
    with pytest.raises(SystemExit, match="unknown target"):
        main(["energy", str(tmp_path / "m"), "--data", str(data), "--target", "nope"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["energy", str(tmp_path / "m"), "--data", str(tmp_path / "none.txt")])
