"""Recording the spikes of a MAR model's sites while it runs, streamed to disk in chunks."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import torch

from .sonata import SonataWriter


def population_name(layer: int, kind: str) -> str:
    return f"L{layer:02d}.{kind}"


def select_sites(model, pattern: str | None = "*"):
    """``[(population, layer, kind, site)]`` of the spiking sites whose population name
    (``L03.mlp.down``) or qualified module name matches the fnmatch ``pattern``."""
    out = []
    for layer, kind, qual, site in model.spike_sites():
        pop = population_name(layer, kind)
        if site.is_dense:
            continue
        if pattern in (None, "*") or fnmatch.fnmatchcase(pop, pattern) or fnmatch.fnmatchcase(qual, pattern):
            out.append((pop, layer, kind, site))
    return out


@torch.no_grad()
def record_trace(model, batches, path: str | Path, sites: str | None = "*", dt_ms: float = 1.0,
                 model_name: str = "", progress: bool = False) -> Path:
    """Run ``model`` on ``batches`` (a list of input_ids tensors ``[B, L]``, one sequence per row)
    and write the spikes of the selected sites to a SONATA file at ``path``.

    Memory stays bounded by one batch's spikes whatever the number of tokens: each forward's
    events are appended to compressed HDF5 datasets and dropped. Returns the final path.
    """
    batches = [b if b.dim() == 2 else b.unsqueeze(0) for b in batches]
    if not batches:
        raise ValueError("record_trace: no input batches")
    chosen = select_sites(model, sites)
    if not chosen:
        names = ", ".join(population_name(l, k) for l, k, _, s in model.spike_sites() if not s.is_dense) or "none"
        raise ValueError(f"record_trace: no spiking site matches {sites!r}; spiking sites: {names}")
    T = {s.T for *_, s in chosen}
    if len(T) != 1:
        raise ValueError(f"record_trace: selected sites use different T {sorted(T)}; select sites with one T")
    L_max = max(b.shape[1] for b in batches)
    writer = SonataWriter(path, T=T.pop(), L_max=L_max, dt_ms=dt_ms, model_name=model_name)
    handles = []
    state = {"offset": 0}
    try:
        for pop, layer, kind, site in chosen:
            writer.add_population(pop, layer, kind, site.neuron.registry_name or type(site.neuron).__name__,
                                  site.neuron.channels or 1, site.neuron.threshold.detach().float().cpu().numpy())

            def rec(s_, spikes, pop=pop):
                sp = spikes.permute(1, 2, 0, 3)  # [B, L, T, C]: nonzero() then walks in time order
                nz = sp.nonzero()
                if nz.numel() == 0:
                    return
                pol = sp[nz[:, 0], nz[:, 1], nz[:, 2], nz[:, 3]].cpu().numpy()
                nz = nz.cpu().numpy()
                writer.append(pop, nz[:, 0] + state["offset"], nz[:, 1], nz[:, 2], nz[:, 3], pol)

            handles.append(site.add_recorder(rec))
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="recording", unit="batch")
        was_training = model.training
        model.eval()
        for ids in iterator:
            model(input_ids=ids.to(model.device))
            for row in ids:
                writer.add_sequence(row.cpu().numpy())
            state["offset"] += ids.shape[0]
        model.train(was_training)
    except BaseException:
        writer.abort()
        raise
    finally:
        for h in handles:
            h.remove()
    return writer.close()
