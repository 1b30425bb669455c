"""ATMN as a SpikingJelly 2.0 neuron: step modes, reset_net, monitors, store_v_seq."""
import torch
from torch import nn

from neuro_mar.neurons import ATMN
from spikingjelly.activation_based import functional, layer, monitor


def test_single_step_mode_accumulates_and_reset_net_clears():
    net = nn.Sequential(layer.Linear(4, 6), ATMN(channels=6, tau=1.0))
    x = torch.randn(3, 4)
    s1 = net(x)
    v_after_one = net[1].v.clone()
    assert isinstance(net[1].v, torch.Tensor) and v_after_one.shape == (3, 6)
    s2 = net(x)  # state carries over: second step charges on top of the residual
    assert not torch.equal(net[1].v, v_after_one) or not torch.equal(s1, s2)
    functional.reset_net(net)
    assert net[1].v == 0.0
    torch.testing.assert_close(net(x), s1)


def test_set_step_mode_multi_step_matches_single_steps():
    n = ATMN(channels=5, tau=0.5)
    x_seq = torch.randn(6, 2, 5) * 2
    singles = torch.stack([n(x) for x in x_seq])
    functional.reset_net(n)
    functional.set_step_mode(n, "m")
    assert n.step_mode == "m"
    multi = n(x_seq)
    torch.testing.assert_close(multi, singles)
    assert set(multi.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_output_monitor_records_spikes():
    net = nn.Sequential(layer.Linear(4, 6, step_mode="m"), ATMN(channels=6, step_mode="m"))
    mon = monitor.OutputMonitor(net, ATMN)
    x_seq = torch.randn(4, 3, 4) * 3
    out = net(x_seq)
    assert len(mon.records) == 1
    torch.testing.assert_close(mon.records[0], out)
    mon.remove_hooks()


def test_store_v_seq_in_both_modes():
    n = ATMN(channels=3, tau=0.5, step_mode="m", store_v_seq=True)
    x = torch.randn(2, 3) * 2
    seq = torch.cat([x.unsqueeze(0), torch.zeros(3, 2, 3)])
    n(seq)
    assert n.v_seq.shape == (4, 2, 3)
    # the last stored potential is the input-once residual (u_{T-1}), in units of V times V
    ref = ATMN(channels=3, tau=0.5, T=4)
    ref.load_state_dict(n.state_dict())
    torch.testing.assert_close(n.v_seq[-1], ref.residual(x) * ref.threshold)
    functional.reset_net(n)
    assert n.v_seq is None
    functional.set_step_mode(n, "s")
    for t in range(4):
        n(seq[t])
    assert n.v_seq.shape == (4, 2, 3)


def test_encode_does_not_touch_membrane_memory():
    n = ATMN(channels=3)
    n(torch.ones(2, 3) * 0.3)
    v = n.v.clone()
    n.encode(torch.randn(2, 3))
    torch.testing.assert_close(n.v, v)


def _mar(neuron):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_mar

    m = tiny_mar(neurons={k: neuron for k in ("mixer.in", "mixer.out", "mlp.in", "mlp.down")})
    m.calibrate_thresholds([torch.randint(3, 97, (2, 8))])
    return m


def test_output_monitor_on_a_mar_model_records_every_sites_spikes():
    """OutputMonitor(model, ATMN) on a MAR model: one record per site call, the site's own spikes
    [T, batch, length, channels] (what its recorder sees), ternary."""
    from neuro_mar.neurons import ATMN as _ATMN

    m = _mar("atmn")
    mon = monitor.OutputMonitor(m, _ATMN)
    inp = monitor.InputMonitor(m, _ATMN)
    seen = []
    handles = [s.add_recorder(lambda site, spikes: seen.append(spikes)) for *_, s in m.spike_sites()]
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        m(ids)
    sites = len(list(m.spike_sites()))
    assert len(mon.records) == len(inp.records) == len(seen) == sites == 4 * len(m.model.layers)
    for rec, own, x in zip(mon.records, seen, inp.records):
        assert rec.shape == (4, 2, 7, x.shape[-1]) and set(rec.unique().tolist()) <= {-1.0, 0.0, 1.0}
        torch.testing.assert_close(rec.to(torch.int8), own)
    for h in handles:
        h.remove()
    mon.remove_hooks()
    inp.remove_hooks()


def test_reset_net_and_set_step_mode_reach_every_registry_neuron():
    """Every registry entry is a SpikingJelly MemoryModule (reset_net reaches it without its
    'not a MemoryModule' warning); set_step_mode(model, 'm') is refused with the reason, 's' is
    accepted; an adapter called as a step-mode neuron says what to use instead."""
    import warnings

    import pytest
    from spikingjelly.activation_based.base import MemoryModule

    from neuro_mar.neurons import available, create

    for name in available():
        n = create(name, channels=4)
        assert isinstance(n, MemoryModule), name
        m = _mar(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            functional.reset_net(m)
        functional.set_step_mode(m, "s")
        with pytest.raises(ValueError, match=r"model.layers.0.mixer.in_site: step mode 'm' does not apply"):
            functional.set_step_mode(m, "m")
    with pytest.raises(TypeError, match="runs in MAR's input-once form only"):
        create("sj-lif", channels=4)(torch.randn(2, 4))
