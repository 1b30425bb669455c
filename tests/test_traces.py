"""Spike traces: exact round trips through our reader, libsonata, NWB (nwbinspector) and NIR;
bounded memory while recording; clear errors on bad files; plots."""
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from neuro_mar.models import SITE_KINDS
from neuro_mar.traces import (TraceFormatError, export_nir, export_nwb, plot_trace, read_trace,
                              record_trace, to_nir)
from tiny import tiny_mar


def _model(seed=0):
    m = tiny_mar(seed=seed, neurons={k: "atmn" for k in SITE_KINDS})
    m.calibrate_thresholds([torch.randint(3, 97, (2, 16))])
    return m


def _capture(model, batches):
    """The spikes each site emits, gathered the plain way: {pop: [T, tokens, C]}."""
    got = {}
    hs = []
    for layer, kind, _, site in model.spike_sites():
        pop = f"L{layer:02d}.{kind}"
        hs.append(site.add_recorder(lambda s, sp, pop=pop: got.setdefault(pop, []).append(
            sp.reshape(sp.shape[0], -1, sp.shape[-1]).clone())))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hs:
        h.remove()
    return {k: torch.cat(v, 1).numpy() for k, v in got.items()}


def test_round_trip_is_exact_and_libsonata_reads_it(tmp_path):
    m = _model()
    batches = [torch.randint(3, 97, (2, 12)), torch.randint(3, 97, (3, 12))]
    ref = _capture(m, batches)
    path = record_trace(m, batches, tmp_path / "t.h5", model_name="tiny")
    tr = read_trace(path)
    assert tr.T == 4 and tr.L_max == 12 and list(tr.sequence_lengths) == [12] * 5
    np.testing.assert_array_equal(tr.token_ids, torch.cat(batches).numpy())
    assert set(tr.populations) == set(ref)
    for pop, dense in ref.items():
        np.testing.assert_array_equal(tr.dense(pop), dense)

    import libsonata

    reader = libsonata.SpikeReader(str(path))
    assert set(reader.get_population_names()) == set(ref)
    for pop, dense in ref.items():
        p = reader[pop]
        assert p.sorting == "by_time"
        spikes = np.array(p.get(), dtype=object)
        nnz = int((dense != 0).sum())
        assert len(spikes) == nnz
        ids = np.array([s[0] for s in spikes], dtype=np.int64)
        ts = np.array([s[1] for s in spikes])
        # positions equal: rebuild the dense occupancy from libsonata's (node, time) pairs
        idx = np.rint(ts).astype(np.int64)
        occ = np.zeros(dense.shape, dtype=bool)
        occ[idx % tr.T, (idx // tr.T) % tr.L_max + (idx // (tr.T * tr.L_max)) * tr.L_max, ids] = True
        np.testing.assert_array_equal(occ, dense != 0)


def test_site_pattern_selects_populations(tmp_path):
    m = _model()
    path = record_trace(m, [torch.randint(3, 97, (1, 8))], tmp_path / "t.h5", sites="*.mlp.*")
    assert set(read_trace(path).populations) == {"L00.mlp.in", "L00.mlp.down", "L01.mlp.in", "L01.mlp.down"}
    with pytest.raises(ValueError, match="no spiking site matches"):
        record_trace(m, [torch.randint(3, 97, (1, 8))], tmp_path / "u.h5", sites="L09.*")
    assert not (tmp_path / "u.h5").exists()


def test_nwb_export_passes_nwbinspector_and_nir_view(tmp_path):
    m = _model()
    batches = [torch.randint(3, 97, (2, 10))]
    ref = _capture(m, batches)
    path = record_trace(m, batches, tmp_path / "t.h5")
    nwb = export_nwb(path, tmp_path / "t.nwb")
    from nwbinspector import Importance, inspect_nwbfile

    issues = [i for i in inspect_nwbfile(nwbfile_path=str(nwb)) if i.importance in (Importance.CRITICAL, Importance.ERROR)]
    assert not issues, issues
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(nwb), "r") as io:
        units = io.read().units.to_dataframe()
    total = sum(int((d != 0).sum()) for d in ref.values())
    assert sum(len(st) for st in units["spike_times"]) == total
    assert all(set(np.unique(p)) <= {-1, 1} for p in units["polarity"])
    g = to_nir(path)
    ev = g.nodes["L00.mixer.in"].observables["spikes"]
    assert int((ev.idx >= 0).sum()) == int((ref["L00.mixer.in"] != 0).sum())
    assert export_nir(path, tmp_path / "t.nir").is_file()


def test_bad_files_give_clear_errors(tmp_path):
    m = _model()
    path = record_trace(m, [torch.randint(3, 97, (1, 8))], tmp_path / "t.h5")
    # truncated
    data = path.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(TraceFormatError):
        read_trace(tmp_path / "trunc.h5")
    # garbage
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(TraceFormatError, match="not a readable HDF5"):
        read_trace(tmp_path / "junk.h5")
    # another tool's SONATA file (no neuro-mar metadata)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs.create("magic", 0x0A7A, dtype=np.uint32)
        f.create_dataset("spikes/pop/timestamps", data=np.zeros(3))
        f.create_dataset("spikes/pop/node_ids", data=np.zeros(3, dtype=np.uint64))
    with pytest.raises(TraceFormatError, match="not written by neuro-mar"):
        read_trace(tmp_path / "other.h5")
    # tampered: a polarity outside {-1, +1}, datasets of different lengths
    import shutil

    shutil.copy(path, tmp_path / "bad.h5")
    with h5py.File(tmp_path / "bad.h5", "a") as f:
        pop = next(iter(f["spikes"]))
        f["spikes"][pop]["polarity"][0] = 3
        del f["spikes"][pop]["polarity"].attrs["sha256"]  # the structural check, past the checksum
    with pytest.raises(TraceFormatError, match="polarity"):
        read_trace(tmp_path / "bad.h5")
    shutil.copy(path, tmp_path / "short.h5")
    with h5py.File(tmp_path / "short.h5", "a") as f:
        pop = next(iter(f["spikes"]))
        f["spikes"][pop]["node_ids"].resize((0,))
        del f["spikes"][pop]["node_ids"].attrs["sha256"]
    with pytest.raises(TraceFormatError, match="different lengths"):
        read_trace(tmp_path / "short.h5")


def test_crash_leaves_no_file(tmp_path):
    m = _model()

    class Boom(RuntimeError):
        pass

    def bad_batches():
        yield torch.randint(3, 97, (1, 8))

    site = m.model.layers[1].mlp.down_site
    h = site.add_recorder(lambda s, sp: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        record_trace(m, list(bad_batches()), tmp_path / "t.h5")
    h.remove()
    assert not (tmp_path / "t.h5").exists() and not list(tmp_path.glob(".t.h5*"))


def test_recording_100k_tokens_keeps_memory_bounded(tmp_path):
    """Resident memory (VmRSS, measured in a fresh process) grows by far less than the events
    written: the recorder streams."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
from tiny import tiny_mar
from neuro_mar.models import SITE_KINDS
from neuro_mar.traces import record_trace, read_trace
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
m = tiny_mar(neurons={{k: 'atmn' for k in SITE_KINDS}})
m.calibrate_thresholds([torch.randint(3, 97, (2, 64))])
gen = torch.Generator().manual_seed(0)
def batches(n):
    return [torch.randint(3, 97, (8, 500), generator=gen) for _ in range(n)]
record_trace(m, batches(5), {str(tmp_path / 'warm.h5')!r}, sites='L00.*')  # allocator pools grown
r0 = rss()
record_trace(m, batches(25), {str(tmp_path / 'big.h5')!r}, sites='L00.*')  # 25 x 8 x 500 = 100k tokens
r1 = rss()
import h5py
with h5py.File({str(tmp_path / 'big.h5')!r}) as f:
    events = sum(f['spikes'][p]['timestamps'].shape[0] for p in f['spikes'])
print(r0, r1, events)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1, events = map(int, out.stdout.split()[-3:])
    print(f"recorded {events} events of 100k tokens: RSS {r0 / 2**20:.1f} MiB -> {r1 / 2**20:.1f} MiB")
    event_bytes = events * 17  # float64 + uint64 + int8 per event, if it were all held
    assert events > 1_000_000
    # buffering the events would take all of event_bytes (~250 MB); allocator noise is tens of MB
    assert r1 - r0 < 0.25 * event_bytes and r1 - r0 < 96 * 2**20, (r0, r1, events)


def test_plots_and_cli(tmp_path, capsys):
    m = _model()
    path = record_trace(m, [torch.randint(3, 97, (2, 20))], tmp_path / "t.h5")
    paths = plot_trace(path, tmp_path / "png")
    assert {p.name for p in paths} >= {"raster_L00.mixer.in.png", "firing_rates.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    from neuro_mar.cli import main

    assert main(["plot-trace", str(path), "--out", str(tmp_path / "png2")]) == 0
    with pytest.raises(SystemExit, match="error"):
        main(["plot-trace", str(tmp_path / "nope.h5")])


@pytest.mark.parametrize("dataset", ["timestamps", "node_ids"])
def test_a_flipped_bit_in_an_event_chunk_never_reads_as_another_trace(tmp_path, dataset):
    """A single-bit flip (bit 4 of one byte, at 48 places across the stored first chunk of
    timestamps or node_ids) either fails the read with TraceFormatError (the sha256 of the bytes written) or
    leaves the decoded trace exactly as written (a bit the compression does not use)."""
    m = _model()
    path = record_trace(m, [torch.randint(3, 97, (2, 12))], tmp_path / "t.h5")
    good = read_trace(path)
    with h5py.File(path, "r") as f:
        name = max(f["spikes"], key=lambda n: len(f["spikes"][n]["timestamps"]))
        ds = f["spikes"][name][dataset]
        assert "sha256" in ds.attrs and len(ds) > 0
        info = ds.id.get_chunk_info(0)
    data = path.read_bytes()
    caught = 0
    for i in np.linspace(info.byte_offset, info.byte_offset + info.size - 1, 48).astype(int).tolist():
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        (tmp_path / "flip.h5").write_bytes(bytes(flipped))
        try:
            tr = read_trace(tmp_path / "flip.h5")
        except TraceFormatError:
            caught += 1
            continue
        pop, ref = tr.populations[name], good.populations[name]
        assert np.array_equal(pop.timestamps, ref.timestamps) and np.array_equal(pop.node_ids, ref.node_ids), i
    assert caught > 0


@pytest.mark.parametrize("edit,match", [
    (lambda f: f["neuro_mar"].attrs.__setitem__("T", 0), "T and dt_ms must be positive"),
    (lambda f: f["neuro_mar"]["sequence_lengths"].__setitem__(0, 999), r"sequence_lengths outside \[0, L_max"),
    (lambda f: f["neuro_mar"]["sequence_lengths"].__setitem__(0, 3), "padding does not match sequence_lengths"),
])
def test_inconsistent_metadata_is_refused(tmp_path, edit, match):
    import shutil

    m = _model()
    path = record_trace(m, [torch.randint(3, 97, (2, 8))], tmp_path / "t.h5")
    shutil.copy(path, tmp_path / "bad.h5")
    with h5py.File(tmp_path / "bad.h5", "a") as f:
        edit(f)
    with pytest.raises(TraceFormatError, match="checksum mismatch" if "sequence_lengths" in match else match):
        read_trace(tmp_path / "bad.h5")  # the checksum catches an edited dataset first
    with h5py.File(tmp_path / "bad.h5", "a") as f:  # without checksums, the consistency checks
        for d in ("token_ids", "sequence_lengths"):
            f["neuro_mar"][d].attrs.pop("sha256", None)
    with pytest.raises(TraceFormatError, match=match):
        read_trace(tmp_path / "bad.h5")
