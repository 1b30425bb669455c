"""Every registry entry inside a SpikeSite, the site's counters and recorders, swapping."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neuro_mar
from neuro_mar.neurons import SpikeSite, available, create, swap_neurons

SPIKING = [n for n in available() if n != "dense"]
LEVELS = {"ternary": {-1.0, 0.0, 1.0}, "binary": {0.0, 1.0}}


def test_available_lists_every_entry_with_description():
    names = available()
    assert {"atmn", "binary", "sj-if", "sj-lif", "sj-ternary-if", "sj-ternary-lif", "snntorch-leaky",
            "si-lif", "dense"} <= set(names)
    assert all(isinstance(d, str) and d for d in names.values())


@pytest.mark.parametrize("name", list(available()))
def test_entry_forward_backward_in_site(name):
    site = SpikeSite(create(name, channels=8))
    x = (torch.randn(2, 5, 8) * 2).requires_grad_()
    y = site(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    a = getattr(site.neuron, "a", None)
    if name != "dense":
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
        spikes = site.neuron.encode(x.detach())
        assert set(spikes.unique().tolist()) <= LEVELS[site.neuron.spike_levels]
    stats = site.stats()
    assert stats["elements"] == x.numel() and stats["calls"] == 1


@pytest.mark.parametrize("name", SPIKING)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.05, 20.0))
def test_entry_decoding_identity(name, seed, scale):
    """x = V * (sum_t w_t s_t + w_{T-1} * residual) for every spiking entry."""
    n = create(name, channels=4).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n.a.copy_(torch.randn(4, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64) * scale
    s = n.encode(x)
    w = n.step_weights().view(-1, 1, 1)
    recon = n.threshold * ((w * s).sum(0) + w[-1] * n.residual(x))
    torch.testing.assert_close(recon, x, rtol=1e-9, atol=1e-9 * scale)


def test_site_counters_match_spikes_and_reset():
    site = SpikeSite(create("atmn", channels=6))
    xs = [torch.randn(3, 6) * 2 for _ in range(3)]
    pos = neg = 0
    for x in xs:
        s = site.neuron.encode(x)
        pos += int((s > 0).sum())
        neg += int((s < 0).sum())
        site(x)
    st_ = site.stats()
    assert (st_["positive"], st_["negative"], st_["elements"], st_["calls"], st_["T"]) == (pos, neg, 54, 3, 4)
    assert st_["firing_rate"] == pytest.approx((pos + neg) / (54 * 4))
    site.reset_counters()
    assert site.stats()["positive"] == 0 and site.stats()["calls"] == 0


def test_site_recorder_only_when_asked():
    site = SpikeSite(create("atmn", channels=6))
    got = []
    h = site.add_recorder(lambda s, spikes: got.append(spikes))
    x = torch.randn(2, 3, 6) * 2
    site(x)
    assert len(got) == 1 and got[0].dtype == torch.int8 and got[0].shape == (4, 2, 3, 6)
    torch.testing.assert_close(got[0].float(), site.neuron.encode(x))
    h.remove()
    site(x)
    assert len(got) == 1
    # nothing is kept by the site between calls
    assert not any(isinstance(v, torch.Tensor) and v.dim() > 1 for v in vars(site).values())


def test_site_preserves_dtype_half():
    site = SpikeSite(create("atmn", channels=8))
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert site(x).dtype == torch.bfloat16


def test_create_errors_list_what_exists():
    with pytest.raises(ValueError, match="available: atmn"):
        create("nope", channels=4)
    with pytest.raises(ValueError, match="accepts"):
        create("atmn", channels=4, bogus=1)
    with pytest.raises(ValueError, match="surrogate"):
        create("atmn", channels=4, surrogate="nope")
    with pytest.raises(ValueError):
        create("snntorch-leaky", channels=4, beta=1.5)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_site = SpikeSite(create("atmn", channels=8))
        self.proj = nn.Linear(8, 8)
        self.mlp = nn.Module()
        self.mlp.down_site = SpikeSite(create("atmn", channels=8))

    def forward(self, x):
        return self.mlp.down_site(self.proj(self.in_site(x)))


def test_swap_round_trip_keeps_trained_threshold():
    m = _Tiny()
    with torch.no_grad():
        m.in_site.neuron.a.copy_(torch.randn(8))
    trained = m.in_site.neuron.a.detach().clone()
    with pytest.warns(UserWarning, match=r"2 site\(s\) changed from atmn to sj-lif.*recalibrate"):
        summary = swap_neurons(m, "sj-lif")
    assert summary.changed == 2 and all(r["threshold_carried"] for r in summary.rows)
    assert type(m.in_site.neuron).__name__ == "SpikingJellyInputOnce"
    m(torch.randn(2, 8)).sum().backward()
    with pytest.warns(UserWarning, match="not yet usable"):
        summary = neuro_mar.swap_neurons(m, "atmn", keep_threshold=True)
    torch.testing.assert_close(m.in_site.neuron.a.detach(), trained)
    assert "in_site" in str(summary)
    # not asked: a fresh threshold
    with pytest.warns(UserWarning):
        swap_neurons(m, "sj-if", keep_threshold=False)
    assert torch.all(m.in_site.neuron.a == 0)


def test_swap_pattern_and_options():
    m = _Tiny()
    with pytest.warns(UserWarning, match="1 site"):
        summary = swap_neurons(m, "binary", pattern="mlp.*", T=6)
    assert [r["site"] for r in summary.rows] == ["mlp.down_site"]
    assert m.mlp.down_site.neuron.T == 6 and m.mlp.down_site.neuron.spike_levels == "binary"
    assert m.in_site.neuron.spike_levels == "ternary"
    with pytest.raises(ValueError, match="available"):
        swap_neurons(m, "nope")
    with pytest.raises(ValueError, match="no SpikeSite"):
        swap_neurons(nn.Linear(2, 2), "atmn")
    summary = swap_neurons(m, "dense")
    assert summary.changed == 2 and not any(r["threshold_carried"] for r in summary.rows)
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), m.mlp.down_site(m.proj(x)))


def test_swap_on_a_model_recalibrates_when_given_batches_and_warns_otherwise():
    """A trained spiking MAR model swapped to another type: with calibrate_on the swapped sites'
    thresholds come from the dense activations (as calibrate_thresholds sets them) and nothing
    warns; without it a warning says the model must be recalibrated and distilled again. Swaps from
    dense (the Stage-1 model) or to the same type do not warn."""
    import warnings

    from tiny import tiny_mar

    batch = [torch.randint(3, 97, (2, 8))]
    m = tiny_mar(neurons={k: "atmn" for k in ("mixer.in", "mixer.out", "mlp.in", "mlp.down")})
    m.calibrate_thresholds(batch)
    with torch.no_grad():
        for *_, s in m.spike_sites():
            s.neuron.a.add_(1.5)  # "trained" thresholds, away from the calibrated ones
    ref = tiny_mar(neurons={k: "sj-lif" for k in ("mixer.in", "mixer.out", "mlp.in", "mlp.down")})
    ref.load_state_dict(m.state_dict(), strict=False)
    ref.calibrate_thresholds(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.set_neurons("sj-lif", calibrate_on=batch)
    for (*_, s), (*_, r) in zip(m.spike_sites(), ref.spike_sites()):
        torch.testing.assert_close(s.neuron.a, r.neuron.a)
    with pytest.warns(UserWarning, match=r"set_neurons: 2 site\(s\) changed from sj-lif to atmn"):
        m.set_neurons("atmn", kinds="mlp.in")
    only = {q for _, k, q, _ in m.spike_sites() if k == "mlp.down"}
    before = {q: s.neuron.a.clone() for *_, q, s in m.spike_sites()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_neurons(m, "binary", pattern="*.mlp.down_site", calibrate_on=batch)
        m.set_neurons("binary", kinds="mlp.down")  # same type: nothing stale
        tiny_mar().set_neurons("sj-lif")  # from dense: thresholds are fresh anyway
    for *_, q, s in m.spike_sites():
        assert torch.equal(s.neuron.a, before[q]) != (q in only), q
    with pytest.raises(TypeError, match="calibrate_on needs a MAR model"):
        swap_neurons(_Tiny(), "dense", calibrate_on=batch)


@pytest.mark.parametrize("name", available())
def test_every_entry_survives_save_and_load(name, tmp_path):
    """A model whose sites hold any registry entry (options away from the defaults where it has
    some) saves and loads back with the same neurons, thresholds and logits."""
    from tiny import tiny_mar

    from neuro_mar import MARForCausalLM

    m = tiny_mar()
    m.set_neurons(name, **{"dense": {}, "si-lif": {"D": 3}}.get(name, {"T": 3}))
    m.calibrate_thresholds([torch.randint(3, 97, (2, 8))])
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        want = m(ids).logits
    m.save_pretrained(tmp_path)
    back = MARForCausalLM.from_pretrained(tmp_path).eval()
    for (*_, s), (*_, t) in zip(m.spike_sites(), back.spike_sites()):
        assert type(t.neuron) is type(s.neuron) and t.neuron.config() == s.neuron.config()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=0)


def test_cli_neurons_table(capsys):
    from neuro_mar.cli import main

    assert main(["neurons"]) == 0
    out = capsys.readouterr().out
    for name in available():
        assert name in out


@pytest.mark.parametrize("var, module", [("NEURO_MAR_SSM_BACKEND", "neuro_mar.ssm"),
                                         ("NEURO_MAR_KERNELS", "neuro_mar.kernels"),
                                         ("NEURO_MAR_FAST_LAUNCH", "neuro_mar.kernels.launch")])
def test_a_mistyped_knob_in_the_environment_stops_with_the_choices(var, module):
    """A misspelt value used to mean the default silently; now the import says which variable,
    which value and what it accepts."""
    if module.endswith("launch"):
        pytest.importorskip("triton")
    env = {**os.environ, var: "fastest"}
    out = subprocess.run([sys.executable, "-P", "-c", f"import {module}"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode != 0
    assert f"unknown {var} 'fastest' (from the environment); choose one of" in out.stderr
