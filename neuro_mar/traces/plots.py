"""Pictures of a trace: a raster per site (tokens on the x axis, + red / - blue) and a heatmap of
firing rates (layer x site kind)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io_utils import atomic_savefig
from .sonata import Trace, read_trace


def plot_trace(trace: Trace | str | Path, out_dir: str | Path, max_tokens: int = 64, max_channels: int = 128) -> list[Path]:
    """Write ``raster_<pop>.png`` per population and ``firing_rates.png``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = trace if isinstance(trace, Trace) else read_trace(trace)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    total_tokens = int(tr.sequence_lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(tr.sequence_lengths)])
    for name, pop in tr.populations.items():
        seq, tok, step = tr.decode_time(pop.timestamps)
        x = offsets[seq] + tok + step / tr.T
        keep = (x < max_tokens) & (pop.node_ids < max_channels)
        fig, ax = plt.subplots(figsize=(10, 4))
        for sign, colour, label in ((1, "tab:red", "+1"), (-1, "tab:blue", "-1")):
            m = keep & (pop.polarity == sign)
            ax.scatter(x[m], pop.node_ids[m], s=2, c=colour, marker="|", label=label)
        ax.set_xlabel(f"token (each token spans T={tr.T} micro-steps)")
        ax.set_ylabel("channel")
        ax.set_xlim(0, min(max_tokens, total_tokens))
        ax.set_title(f"{name} ({pop.neuron}): first {min(max_tokens, total_tokens)} tokens, "
                     f"{min(max_channels, pop.channels)} of {pop.channels} channels", fontsize=9)
        ax.legend(loc="upper right", fontsize=8, markerscale=4)
        fig.tight_layout()
        p = out / f"raster_{name}.png"
        atomic_savefig(fig, p)
        plt.close(fig)
        paths.append(p)
    layers = sorted({p.layer for p in tr.populations.values()})
    kinds = ["mixer.in", "mixer.out", "mlp.in", "mlp.down"]
    rate = np.full((len(layers), len(kinds)), np.nan)
    for pop in tr.populations.values():
        rate[layers.index(pop.layer), kinds.index(pop.kind)] = len(pop.node_ids) / max(1, pop.channels * total_tokens * tr.T)
    fig, ax = plt.subplots(figsize=(5, 0.3 * len(layers) + 1.5))
    im = ax.imshow(rate, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_yticks(range(len(layers)), [f"L{l:02d}" for l in layers], fontsize=7)
    ax.set_title("firing rate (non-zero spikes / (channels x tokens x T))", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    p = out / "firing_rates.png"
    atomic_savefig(fig, p)
    plt.close(fig)
    paths.append(p)
    return paths
