"""Other views of a trace: NWB (pynwb Units table) and NIR's ValuedEventData."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..io_utils import atomic_target
from .sonata import Trace, read_trace


def export_nwb(trace: Trace | str | Path, path: str | Path) -> Path:
    """Write the trace as an NWB file: one Units row per (population, channel) that spiked, spike
    times in seconds, ``polarity`` (+1/-1 per spike) and ``population``/``channel`` columns."""
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.file import Subject

    tr = trace if isinstance(trace, Trace) else read_trace(trace)
    path = Path(path)
    nwb = NWBFile(session_description=f"spike trace of the MAR model {tr.model or '(unnamed)'}: ternary spikes of "
                                      f"its spike sites, T={tr.T} micro-steps per token",
                  identifier=f"neuro-mar-{tr.path.stem}", session_start_time=datetime(2026, 1, 1, tzinfo=timezone.utc),
                  experimenter=["neuro-mar"], lab="neuro-mar", institution="neuro-mar",
                  experiment_description="in-silico recording of a spiking state-space language model",
                  subject=Subject(subject_id=str(tr.model or "model")[-60:] or "model",
                                  description="an in-silico spiking language model (not an animal)",
                                  age="P0D", sex="U", species="in silico"))
    nwb.add_unit_column("population", "spike site (layer and site kind)")
    nwb.add_unit_column("channel", "channel (node id) inside the site")
    nwb.add_unit_column("polarity", "sign of each spike (+1 or -1), aligned with spike_times", index=True)
    for name, pop in tr.populations.items():
        if not len(pop.node_ids):
            continue
        order = np.argsort(pop.node_ids, kind="stable")
        nid, ts, pol = pop.node_ids[order], pop.timestamps[order], pop.polarity[order]
        bounds = np.flatnonzero(np.diff(nid)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(nid)]):
            nwb.add_unit(spike_times=ts[lo:hi] / 1000.0, population=name, channel=int(nid[lo]),
                         polarity=pol[lo:hi].astype(np.int8).tolist())
    with atomic_target(path, suffix=".nwb") as tmp:
        with NWBHDF5IO(tmp, "w") as io:
            io.write(nwb)
    return path


def to_nir(trace: Trace | str | Path):
    """The trace as ``nir.NIRGraphData``: per population a ValuedEventData (samples = sequences,
    time in ms, value = polarity)."""
    import nir
    from nir.data_ir import NIRGraphData, NIRNodeData, ValuedEventData

    tr = trace if isinstance(trace, Trace) else read_trace(trace)
    S = len(tr.sequence_lengths)
    nodes = {}
    for name, pop in tr.populations.items():
        seq, _, _ = tr.decode_time(pop.timestamps)
        counts = np.bincount(seq, minlength=S) if len(seq) else np.zeros(S, dtype=np.int64)
        E = max(int(counts.max()) if S else 0, 1)
        idx = np.full((S, E), -1, dtype=np.int64)
        time = np.full((S, E), np.inf)
        value = np.zeros((S, E))
        offs = np.concatenate([[0], np.cumsum(counts)])
        for s in range(S):
            lo, hi = offs[s], offs[s + 1]
            idx[s, :hi - lo] = pop.node_ids[lo:hi]
            time[s, :hi - lo] = pop.timestamps[lo:hi]
            value[s, :hi - lo] = pop.polarity[lo:hi]
        nodes[name] = NIRNodeData({"spikes": ValuedEventData(idx=idx, time=time, value=value, n_neurons=pop.channels,
                                                             t_max=float(tr.L_max * tr.T * tr.dt_ms * max(S, 1)))})
    del nir
    return NIRGraphData(nodes)


def export_nir(trace: Trace | str | Path, path: str | Path) -> Path:
    import nir

    path = Path(path)
    with atomic_target(path, suffix=".nir") as tmp:
        nir.write_data(tmp, to_nir(trace))
    return path
