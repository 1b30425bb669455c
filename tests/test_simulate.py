"""Event-driven simulation: logits equal the model's, events equal the cost model's counts, a
hand-computed tiny case, and clear errors when a model does not fit."""
import pytest
import torch

from neuro_mar.hardware_models import measure_site_activity, site_fanout
from neuro_mar.hardware_models.targets import CostTable
from neuro_mar.models import SITE_KINDS
from neuro_mar.simulate import EventDrivenExecutor, MappingError, map_onto_cores
from tiny import tiny_mar


def _spiking(neuron="atmn", seed=0):
    m = tiny_mar(seed=seed, neurons={k: neuron for k in SITE_KINDS}).double()
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(seed))
    m.calibrate_thresholds([ids])
    return m, ids


@pytest.mark.parametrize("neuron", ["atmn", "binary"])
def test_executor_logits_equal_model_and_events_equal_cost_model(neuron):
    m, ids = _spiking(neuron)
    ex = EventDrivenExecutor(m, "loihi", model_weight_bits=8)  # declared 8-bit: fits, runs unquantised
    logits = ex.run(ids[0])
    torch.testing.assert_close(logits, m(ids).logits[0], rtol=1e-10, atol=1e-10)
    act = measure_site_activity(m, [ids])
    fan = site_fanout(m.config)
    analytic = sum((v["positive"] + v["negative"]) * fan[k[1]][1] for k, v in act.items() if isinstance(k, tuple))
    assert ex.report()["synaptic_events_per_token"] == pytest.approx(analytic, rel=0, abs=1e-9)
    assert ex.counters.synaptic_events.sum() == round(analytic * ids.shape[1])


def test_hand_computed_per_core_events():
    """A one-layer model on a chip of 16-neuron, 16-axon cores: each core's events are the spikes
    of its input group times its output group size, computed here from recorded spikes."""
    m = tiny_mar(num_hidden_layers=1, neurons={k: "atmn" for k in SITE_KINDS}).double()
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    m.calibrate_thresholds([ids])
    chip = CostTable("toy", "neuromorphic", "test", "test", e_ac=1, e_mac=1, e_mul=1, e_add=1, e_neuron_update=1,
                     neurons_per_core=16, fanin_per_core=16, weight_bits=8, cores_per_chip=1000,
                     dense_fallback="45nm-fp32")
    ex = EventDrivenExecutor(m, chip, model_weight_bits=8)
    ex.run(ids[0])
    spikes = {}  # the spikes of the ordinary forward (fp64: the same as the executor's)
    for _, kind, _, site in m.spike_sites():
        site.add_recorder(lambda s, sp, kind=kind: spikes.setdefault(kind, []).append(sp.reshape(sp.shape[0], -1, sp.shape[-1])))
    with torch.no_grad():
        m(ids)
    for kind in SITE_KINDS:
        sp = torch.cat(spikes[kind], 1)  # [T, tokens, d_in], one entry per token of the executor's run
        din, dout = site_fanout(m.config)[kind]
        syn = ex.mapping.synapse_cores(0, kind)
        assert len(syn) == -(-din // 16) * -(-dout // 16)
        for core in syn:
            expected = int((sp[..., core.in_lo:core.in_hi] != 0).sum()) * (core.out_hi - core.out_lo)
            assert ex.counters.synaptic_events[core.index] == expected, (kind, core)
        for core in ex.mapping.neuron_cores(0, kind):
            assert ex.counters.neuron_updates[core.index] == (core.in_hi - core.in_lo) * sp.shape[0] * ids.shape[1]


def test_models_that_do_not_fit_say_so():
    m, _ = _spiking()
    with pytest.raises(MappingError, match="quantise"):
        map_onto_cores(m, __import__("neuro_mar").hardware_models.get_target("loihi"), model_weight_bits=16)
    with pytest.raises(MappingError, match=r"needs \d+ cores = \d+ chips.*would fit"):
        map_onto_cores(m, __import__("neuro_mar").hardware_models.get_target("odin"), max_chips=1, quantize=True)
    with pytest.raises(MappingError, match="no core limits"):
        map_onto_cores(m, __import__("neuro_mar").hardware_models.get_target("45nm-fp32"))


def test_quantised_run_and_report_files(tmp_path):
    m, ids = _spiking()
    ex = EventDrivenExecutor(m, "loihi", quantize=True, model_weight_bits=16)
    logits = ex.run(ids[0])
    ref = m(ids).logits[0]
    assert (logits - ref).abs().max() < 0.2 * ref.abs().max()  # 8-bit weights: close, not equal
    rep = ex.report()
    assert rep["weights_quantised_to_bits"] == 8 and rep["energy_pJ_per_token"]["routing"] > 0
    ex.plot_core_map(tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("neuron", ["atmn", "binary"])
def test_converted_smollm2_executor_equals_model(neuron):
    from neuro_mar.convert import llama_to_mar
    from neuro_mar.teachers import load_teacher

    teacher, tok = load_teacher("smollm2-135m")
    m = llama_to_mar(teacher, neurons={k: neuron for k in SITE_KINDS}).double().eval()
    ids = tok("The river rises in the hills to the north of the town.", return_tensors="pt").input_ids[:, :8]
    m.calibrate_thresholds([ids])
    ex = EventDrivenExecutor(m, "loihi", model_weight_bits=8)
    logits = ex.run(ids[0])
    with torch.no_grad():
        ref = m(ids).logits[0]
    torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    act = measure_site_activity(m, [ids])
    fan = site_fanout(m.config)
    analytic = sum((v["positive"] + v["negative"]) * fan[k[1]][1] for k, v in act.items() if isinstance(k, tuple))
    assert ex.counters.synaptic_events.sum() == round(analytic * ids.shape[1])


@pytest.mark.parametrize("target", ["loihi", "truenorth", "spinnaker2", "odin", "synapse-memory-bound"])
def test_energy_report_and_simulator_count_the_same_cores(target):
    """One partition rule: map_model's cores (energy report, chips, static energy) equal the cores the
    simulator places, also where synapse memory, not the neuron count, bounds a core (where the
    old analytic count, d_in * d_out * bits / memory, was below what rectangles can realise)."""
    from neuro_mar.hardware_models import get_target, map_model

    m, _ = _spiking()
    if target == "synapse-memory-bound":
        table = CostTable("toy", "neuromorphic", "test", "test", e_ac=1, e_mac=1, e_mul=1, e_add=1,
                          e_neuron_update=1, neurons_per_core=48, fanin_per_core=40, synapse_bits_per_core=40 * 8 * 7,
                          weight_bits=8, cores_per_chip=1000, dense_fallback="45nm-fp32")
    else:
        table = get_target(target)
    placed = map_onto_cores(m, table, quantize=True)
    counted = map_model(m.config, table)
    assert counted["cores"] == len(placed.cores)
    assert counted["chips"] == placed.chips
    if target == "synapse-memory-bound":  # by hand: mixer.in is 32 -> 100; one input group of 32 axons,
        # output groups of 2240 // (32 * 8) = 8 neurons -> 13 synapse cores, plus 1 neuron core
        # (the memory lower bound is ceil(32 * 100 * 8 / 2240) = 12 synapse cores)
        assert site_fanout(m.config)["mixer.in"] == (32, 100)
        assert counted["per_layer"]["mixer.in"]["cores"] == 14


def test_executor_follows_the_zoh_input_gain():
    from neuro_mar.hardware_models.counting import student_rows

    m = tiny_mar(seed=2, neurons={k: "atmn" for k in SITE_KINDS}, ssm_input_gain="zoh").double()
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    m.calibrate_thresholds([ids])
    logits = EventDrivenExecutor(m, "loihi", model_weight_bits=8).run(ids[0])
    torch.testing.assert_close(logits, m(ids).logits[0], rtol=1e-10, atol=1e-10)
    plain = tiny_mar(seed=2).config
    scan = lambda cfg: [r for r in student_rows(cfg) if r.part == "scan"][0]  # noqa: E731
    h, p = plain.n_v_heads, plain.expand * plain.hidden_size // plain.n_v_heads
    assert scan(m.config).get("mul") - scan(plain).get("mul") == h * p
    assert scan(m.config).get("act") - scan(plain).get("act") == h
