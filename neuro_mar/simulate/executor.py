"""Event-driven execution of a spiking MAR model, token by token, on mapped cores.

For each spike site and micro-step t, every non-zero spike s (+1 or -1) of input channel i adds
(or subtracts) one column of the following projection's weight, with the neuron's threshold V_i
folded into that column; the step's partial sum is scaled by the step weight w_t (tau^t for
ATMN). Spiking projections are thus accumulations only; the scan, conv, norms, gating and the LM
head run as in the model. The sequence is processed one token at a time with the recurrent state.

While executing, per core: synaptic events (one per synapse a spike reaches: the core's output
group size), neuron updates (site neurons, one per channel per micro-step), spike messages (one
per spike and destination core) and their hops on the 2-D mesh; per link: messages between core
pairs. Energy then comes from these counts and the target's per-event costs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..hardware_models.targets import CostTable, get_target
from ..io_utils import atomic_savefig
from ..ssm.discrete_mamba2 import MixerState, scan_input
from .mapping import Mapping, map_onto_cores

#: Loihi's routing costs (Davies et al., IEEE Micro 2018, Table 2): spike within a tile, per tile hop
LOIHI_SPIKE_PJ = 1.7
LOIHI_HOP_PJ = 3.5  # mean of the published 3.0 (east-west) and 4.0 (north-south) pJ


@dataclass
class Counters:
    synaptic_events: np.ndarray
    neuron_updates: np.ndarray
    messages: np.ndarray
    hops: np.ndarray
    links: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, n):
        z = lambda: np.zeros(n, dtype=np.int64)  # noqa: E731
        return cls(z(), z(), z(), z(), {})


def _quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-row quantisation to ``bits`` (the weights a chip would store)."""
    qmax = 2 ** (bits - 1) - 1 if bits > 1 else 1
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return (w / scale).round().clamp(-qmax, qmax) * scale


class EventDrivenExecutor:
    """Runs ``model`` (a MARForCausalLM with spiking sites) as synaptic events on ``target``'s cores."""

    def __init__(self, model, target: str | CostTable = "loihi", max_chips: int | None = None,
                 quantize: bool = False, model_weight_bits: int | None = None):
        self.model = model.eval()
        self.table = get_target(target) if isinstance(target, str) else target
        bits = model_weight_bits or (32 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 16)
        self.mapping: Mapping = map_onto_cores(model, self.table, max_chips=max_chips, model_weight_bits=bits,
                                               quantize=quantize)
        self.quantize = quantize
        self.counters = Counters.zeros(len(self.mapping.cores))
        self.tokens = 0
        self._weights = {}
        for layer, kind, _, site in model.spike_sites():
            if site.is_dense:
                continue
            W = self._projection_weight(layer, kind)
            if quantize and self.mapping.weight_bits:
                W = _quantize(W, self.mapping.weight_bits)
            self._weights[(layer, kind)] = W * site.neuron.threshold.detach().to(W.dtype)[None, :]  # V folded in

    def _projection_weight(self, layer, kind) -> torch.Tensor:
        blk = self.model.model.layers[layer]
        if kind == "mixer.in":
            return blk.mixer.in_proj.weight.detach()
        if kind == "mixer.out":
            return blk.mixer.out_proj.weight.detach()
        if kind == "mlp.in":
            return torch.cat([blk.mlp.gate_proj.weight.detach(), blk.mlp.up_proj.weight.detach()])
        return blk.mlp.down_proj.weight.detach()

    # -- one spiking projection as events -----------------------------------------------------------
    def _project(self, layer: int, kind: str, site, x: torch.Tensor) -> torch.Tensor:
        """``x [d_in]`` (one token) -> projection output ``[d_out]`` by accumulating weight columns."""
        spikes = site.neuron.encode(x.unsqueeze(0))[:, 0]  # [T, d_in]
        w = site.neuron.step_weights().to(x.dtype)
        W = self._weights[(layer, kind)]
        out = torch.zeros(W.shape[0], dtype=W.dtype)
        c = self.counters
        syn = self.mapping.synapse_cores(layer, kind)
        neu = self.mapping.neuron_cores(layer, kind)
        for core in neu:
            c.neuron_updates[core.index] += (core.in_hi - core.in_lo) * spikes.shape[0]
        for t in range(spikes.shape[0]):
            s = spikes[t]
            pos = torch.nonzero(s > 0).flatten()
            neg = torch.nonzero(s < 0).flatten()
            partial = W[:, pos].sum(1) - W[:, neg].sum(1)  # additions and subtractions only
            out += w[t] * partial
            active = torch.cat([pos, neg]).tolist()
            if not active:
                continue
            act = np.asarray(active)
            for src in neu:
                n_src = int(((act >= src.in_lo) & (act < src.in_hi)).sum())
                if not n_src:
                    continue
                for dst in syn:
                    n = int(((act >= max(src.in_lo, dst.in_lo)) & (act < min(src.in_hi, dst.in_hi))).sum())
                    if not n:
                        continue
                    c.synaptic_events[dst.index] += n * dst.fan_out
                    c.messages[src.index] += n
                    h = self.mapping.hops(src.index, dst.index)
                    c.hops[src.index] += n * h
                    key = (src.index, dst.index)
                    c.links[key] = c.links.get(key, 0) + n
        return out

    # -- the model, token by token ----------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """``input_ids [L]`` -> logits ``[L, vocab]``, one token at a time with the recurrent state.
        ``progress``: a tqdm bar over the tokens on stderr (shown once the run takes over 2 s)."""
        m = self.model.model
        states = [layer.mixer.empty_state(1, dtype=next(self.model.parameters()).dtype) for layer in m.layers]
        logits = []
        tokens = input_ids.tolist()
        if progress:
            from tqdm.auto import tqdm

            tokens = tqdm(tokens, desc=f"simulating on {self.table.name}", unit="tok", leave=False, delay=2.0)
        for tok in tokens:
            h = m.embed_tokens.weight[tok]
            for i, blk in enumerate(m.layers):
                h, states[i] = self._block(i, blk, h, states[i])
            logits.append(self.model.lm_head(m.norm(h)))
            self.tokens += 1
        return torch.stack(logits)

    def _linear(self, layer, kind, site, x, dense_linear):
        return dense_linear(x) if site.is_dense else self._project(layer, kind, site, x)

    def _block(self, i, blk, h, state):
        mix = blk.mixer
        u = blk.input_layernorm(h)
        proj = self._linear(i, "mixer.in", mix.in_site, u, mix.in_proj)
        if mix.in_proj.bias is not None and not mix.in_site.is_dense:
            proj = proj + mix.in_proj.bias
        xBC, z, A_log = torch.split(proj, [mix.conv_dim, mix.d_inner, mix.n_v_heads])
        window = torch.cat([state.conv[0], xBC[:, None]], dim=-1)  # [conv_dim, d_conv]
        conv = (window * mix.conv1d.weight[:, 0, :]).sum(-1)
        if mix.conv1d.bias is not None:
            conv = conv + mix.conv1d.bias
        xBC = F.silu(conv)
        x, B, C = torch.split(xBC, [mix.d_inner, mix.n_qk_heads * mix.d_state, mix.n_qk_heads * mix.d_state])
        H, P, N = mix.n_v_heads, mix.headdim, mix.d_state
        rep = H // mix.n_qk_heads
        B = B.view(mix.n_qk_heads, N).repeat_interleave(rep, 0)
        C = C.view(mix.n_qk_heads, N).repeat_interleave(rep, 0)
        x = x.view(H, P)
        dt = F.softplus(A_log.to(state.ssm.dtype) + mix.dt_bias.to(state.ssm.dtype))
        xs = scan_input(x[None, None], dt[None, None], mix.input_gain)[0, 0]
        S = torch.exp(-dt)[:, None, None] * state.ssm[0] + xs.to(state.ssm.dtype)[:, :, None] * B.to(state.ssm.dtype)[:, None, :]
        y = (S * C.to(state.ssm.dtype)[:, None, :]).sum(-1).to(x.dtype) + mix.D.to(x.dtype)[:, None] * x
        g = y.reshape(-1) * F.silu(z + mix.z_bias)
        out = self._linear(i, "mixer.out", mix.out_site, g, mix.out_proj)
        if mix.out_proj.bias is not None and not mix.out_site.is_dense:
            out = out + mix.out_proj.bias
        h = h + out
        v = blk.post_attention_layernorm(h)
        mlp = blk.mlp
        f = mlp.gate_proj.out_features
        if mlp.in_site.is_dense:
            gu = torch.cat([mlp.gate_proj(v), mlp.up_proj(v)])
        else:
            gu = self._project(i, "mlp.in", mlp.in_site, v)
            if mlp.gate_proj.bias is not None:
                gu = gu + torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
        a = F.silu(gu[:f]) * gu[f:]
        d = self._linear(i, "mlp.down", mlp.down_site, a, mlp.down_proj)
        if mlp.down_proj.bias is not None and not mlp.down_site.is_dense:
            d = d + mlp.down_proj.bias
        return h + d, MixerState(window[None, :, 1:], S[None])

    # -- results -------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Per-layer and total counts per token, core count, traffic, and energy per token from the
        counted events, beside the analytic estimate (synaptic ops and neuron updates only)."""
        c, mp, t = self.counters, self.mapping, max(self.tokens, 1)
        per_layer = {}
        for core in mp.cores:
            d = per_layer.setdefault(core.layer, {"synaptic_events": 0, "neuron_updates": 0, "messages": 0, "hops": 0,
                                                  "cores": 0})
            d["synaptic_events"] += int(c.synaptic_events[core.index])
            d["neuron_updates"] += int(c.neuron_updates[core.index])
            d["messages"] += int(c.messages[core.index])
            d["hops"] += int(c.hops[core.index])
            d["cores"] += 1
        tab = self.table
        syn, nu = int(c.synaptic_events.sum()), int(c.neuron_updates.sum())
        msgs, hops = int(c.messages.sum()), int(c.hops.sum())
        e_syn = syn * tab.e_ac
        e_nu = nu * tab.neuron_update()
        e_route = msgs * LOIHI_SPIKE_PJ + hops * LOIHI_HOP_PJ if tab.name == "loihi" else 0.0
        return {
            "target": tab.name, "tokens": self.tokens, "cores": len(mp.cores), "chips": mp.chips,
            "mesh_width": mp.mesh_width, "weights_quantised_to_bits": mp.weight_bits if self.quantize else None,
            "per_layer_per_token": {str(k): {kk: vv / t for kk, vv in v.items() if kk != "cores"} | {"cores": v["cores"]}
                                    for k, v in sorted(per_layer.items())},
            "synaptic_events_per_token": syn / t, "neuron_updates_per_token": nu / t,
            "messages_per_token": msgs / t, "hops_per_token": hops / t,
            "busiest_links": sorted(((f"{a}->{b}", n / t) for (a, b), n in c.links.items()), key=lambda kv: -kv[1])[:10],
            "energy_pJ_per_token": {"synaptic": e_syn / t, "neuron_updates": e_nu / t, "routing": e_route / t,
                                    "total": (e_syn + e_nu + e_route) / t},
            "analytic_pJ_per_token": (e_syn + e_nu) / t,
            "difference": "the counted energy adds routing (spike messages within tiles and mesh hops, Loihi's "
                          "published per-hop costs) that the analytic per-operation estimate does not see; the "
                          "synaptic-operation and neuron-update terms are the same events counted two ways",
        }

    def plot_core_map(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mp = self.mapping
        w = mp.mesh_width
        rows = (len(mp.cores) + w - 1) // w
        grid = np.full((rows, w), np.nan)
        for core in mp.cores:
            x, y = mp.xy(core.index)
            grid[y, x] = self.counters.synaptic_events[core.index] / max(self.tokens, 1)
        fig, ax = plt.subplots(figsize=(7, 6))
        im = ax.imshow(grid, cmap="magma")
        ax.set_title(f"{mp.target}: {len(mp.cores)} cores, synaptic events per token per core", fontsize=9)
        ax.set_xlabel("mesh x")
        ax.set_ylabel("mesh y")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        atomic_savefig(fig, path)
        plt.close(fig)
