"""Spike traces in the SONATA-compatible HDF5 layout.

    /                       attrs: magic = uint32 0x0A7A, version = [uint32 0, uint32 1]
    /spikes/<pop>           attrs: sorting = HDF5 enum {none: 0, by_id: 1, by_time: 2} (int8 base)
    /spikes/<pop>/timestamps  float64, units "ms": t = ((sequence * L_max + token) * T + step) * dt_ms
    /spikes/<pop>/node_ids    uint64: the channel inside the site
    /spikes/<pop>/polarity    int8: +1 / -1 (the sign SONATA has no place for)
    /neuro_mar/             run metadata: attrs (model, T, dt_ms, L_max, format version);
                            token_ids [S, L_max] int64 (-1 padding), sequence_lengths [S];
                            /neuro_mar/populations/<pop>: attrs layer, kind, neuron, channels, T;
                            dataset threshold [channels] float32

One population per spike site, named ``L03.mixer.in`` etc. Events are appended per forward call
in time order (sequence, token, step, then node), so ``sorting = by_time``. The file is written
under a temporary name and renamed when closed: a crash never leaves a half file under the final
name. Every dataset carries the sha256 of the bytes written (attribute ``sha256``,
checked on read) and the metadata is checked for consistency on read. Datasets are chunked and compressed with HDF5's built-in scale-offset filter, lossless here
(integers; integer-valued timestamps when dt_ms is a whole number): libsonata's HDF5 has no zlib,
so a gzip-compressed file would not open there. ``compression="gzip"`` trades that for size.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..io_utils import make_temp

SONATA_MAGIC = 0x0A7A
FORMAT = "neuro-mar-trace/1"
SORTING = h5py.enum_dtype({"none": 0, "by_id": 1, "by_time": 2}, basetype="i1")
CHUNK = 1 << 16


EVENT_DATASETS = ("timestamps", "node_ids", "polarity")


def _sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def _verified(path, d) -> np.ndarray:
    """The dataset's values, checked against the sha256 of the bytes written (attribute
    ``sha256``; files written before it existed carry none and are read as they are)."""
    data = d[()]
    want = d.attrs.get("sha256")
    if want is not None and _sha256(data) != (want.decode() if isinstance(want, bytes) else str(want)):
        raise TraceFormatError(f"{path}: {d.name}: checksum mismatch: the file was changed or damaged after it "
                               "was written")
    return data


class TraceFormatError(ValueError):
    """The file is not a readable neuro-mar spike trace (corrupt, truncated, or another tool's)."""


class SonataWriter:
    """Streams events into a SONATA spike file. Use as a context manager; ``close()`` renames."""

    def __init__(self, path: str | Path, T: int, L_max: int, dt_ms: float = 1.0, model_name: str = "",
                 compression: str = "scaleoffset"):
        if compression not in ("scaleoffset", "gzip", "none"):
            raise ValueError(f"compression must be scaleoffset, gzip or none, got {compression!r}")
        self.compression = compression
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = make_temp(self.path, ".part")
        self.f = h5py.File(self.tmp, "w")
        self.f.attrs.create("magic", SONATA_MAGIC, dtype=np.uint32)
        self.f.attrs.create("version", np.array([0, 1], dtype=np.uint32))
        self.f.create_group("spikes")
        meta = self.f.create_group("neuro_mar")
        meta.attrs.update({"format": FORMAT, "model": model_name, "T": T, "dt_ms": dt_ms, "L_max": L_max})
        meta.create_group("populations")
        self.T, self.L_max, self.dt_ms = T, L_max, dt_ms
        self._tokens: list[np.ndarray] = []
        self._sums: dict = {}  # dataset path -> running sha256 of the bytes appended
        self._closed = False

    def add_population(self, name: str, layer: int, kind: str, neuron: str, channels: int, threshold) -> None:
        g = self.f["spikes"].create_group(name)
        g.attrs.create("sorting", 2, dtype=SORTING)
        for ds, dt in (("timestamps", np.float64), ("node_ids", np.uint64), ("polarity", np.int8)):
            d = g.create_dataset(ds, shape=(0,), maxshape=(None,), dtype=dt, chunks=(CHUNK,), **self._filters(ds))
            if ds == "timestamps":
                d.attrs["units"] = "ms"
        p = self.f["neuro_mar/populations"].create_group(name)
        p.attrs.update({"layer": layer, "kind": kind, "neuron": neuron, "channels": channels, "T": self.T})
        p.create_dataset("threshold", data=np.asarray(threshold, dtype=np.float32))

    def _filters(self, ds: str) -> dict:
        if self.compression == "gzip":
            return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        if self.compression == "none":
            return {}
        if ds == "timestamps":  # D-scale with 0 decimals: lossless only for whole-number timestamps
            return {"scaleoffset": 0} if float(self.dt_ms).is_integer() else {}
        return {"scaleoffset": 0}  # integers: minimum bits, lossless

    def append(self, name: str, sequence: np.ndarray, token: np.ndarray, step: np.ndarray, node: np.ndarray,
               polarity: np.ndarray) -> None:
        """Append events (arrays of equal length, already in time order)."""
        if len(sequence) == 0:
            return
        t = ((sequence.astype(np.float64) * self.L_max + token) * self.T + step) * self.dt_ms
        g = self.f["spikes"][name]
        n0 = g["timestamps"].shape[0]
        for ds, data in (("timestamps", t), ("node_ids", node.astype(np.uint64)), ("polarity", polarity.astype(np.int8))):
            g[ds].resize((n0 + len(t),))
            g[ds][n0:] = data
            self._sums.setdefault(g[ds].name, hashlib.sha256()).update(np.ascontiguousarray(data).tobytes())

    def add_sequence(self, token_ids: np.ndarray) -> None:
        self._tokens.append(np.asarray(token_ids, dtype=np.int64))

    def close(self) -> Path:
        if self._closed:
            return self.path
        meta = self.f["neuro_mar"]
        S = len(self._tokens)
        ids = np.full((S, self.L_max), -1, dtype=np.int64)
        for i, t in enumerate(self._tokens):
            ids[i, :len(t)] = t
        meta.create_dataset("token_ids", data=ids, **({"scaleoffset": 0} if ids.size else {}))
        meta.create_dataset("sequence_lengths", data=np.array([len(t) for t in self._tokens], dtype=np.int64))
        for name, g in self.f["spikes"].items():
            for ds in EVENT_DATASETS:
                d = g[ds]
                d.attrs["sha256"] = self._sums[d.name].hexdigest() if d.name in self._sums else _sha256(d[()])
        for d in (meta["token_ids"], meta["sequence_lengths"], *(p["threshold"] for p in meta["populations"].values())):
            d.attrs["sha256"] = _sha256(d[()])
        self.f.close()
        os.replace(self.tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class Population:
    name: str
    timestamps: np.ndarray
    node_ids: np.ndarray
    polarity: np.ndarray
    layer: int
    kind: str
    neuron: str
    channels: int
    threshold: np.ndarray


@dataclass
class Trace:
    path: Path
    T: int
    L_max: int
    dt_ms: float
    model: str
    token_ids: np.ndarray
    sequence_lengths: np.ndarray
    populations: dict

    def decode_time(self, timestamps: np.ndarray):
        """(sequence, token, step) of each timestamp."""
        idx = np.rint(timestamps / self.dt_ms).astype(np.int64)
        return idx // (self.T * self.L_max), (idx // self.T) % self.L_max, idx % self.T

    def dense(self, name: str) -> np.ndarray:
        """The site's ternary spikes as int8 ``[T, tokens, channels]`` (tokens of all sequences in
        order, padding excluded) - exactly what the model emitted."""
        pop = self.populations[name]
        seq, tok, step = self.decode_time(pop.timestamps)
        offsets = np.concatenate([[0], np.cumsum(self.sequence_lengths)])
        out = np.zeros((self.T, int(offsets[-1]), pop.channels), dtype=np.int8)
        out[step, offsets[seq] + tok, pop.node_ids.astype(np.int64)] = pop.polarity
        return out


def _check_metadata(tr: Trace) -> None:
    """The run metadata is consistent: T, L_max and dt_ms positive, one length per token row,
    lengths within [0, L_max] and the rows padded with -1 exactly past their lengths."""
    where = f"{tr.path}: /neuro_mar"
    if tr.T < 1 or tr.L_max < 0 or not (np.isfinite(tr.dt_ms) and tr.dt_ms > 0):
        raise TraceFormatError(f"{where}: T = {tr.T}, L_max = {tr.L_max}, dt_ms = {tr.dt_ms}: T and dt_ms must be "
                               "positive, L_max >= 0")
    lengths, ids = tr.sequence_lengths, tr.token_ids
    if ids.ndim != 2 or len(lengths) != ids.shape[0] or (ids.size and ids.shape[1] != tr.L_max):
        raise TraceFormatError(f"{where}: token_ids {ids.shape} and sequence_lengths {lengths.shape} disagree "
                               f"(expected [{len(lengths)}, {tr.L_max}])")
    if len(lengths) and (lengths.min() < 0 or lengths.max() > tr.L_max):
        raise TraceFormatError(f"{where}: sequence_lengths outside [0, L_max = {tr.L_max}]")
    if ids.size and not np.array_equal(ids >= 0, np.arange(ids.shape[1])[None, :] < lengths[:, None]):
        raise TraceFormatError(f"{where}: token_ids padding does not match sequence_lengths")


def read_trace(path: str | Path) -> Trace:
    """Read a neuro-mar SONATA trace; anything else raises :class:`TraceFormatError` (never a
    wrong trace)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise TraceFormatError(f"{path}: not a readable HDF5 file (corrupt or truncated?): {err}") from None
    with f:
        try:
            if int(f.attrs.get("magic", -1)) != SONATA_MAGIC or "spikes" not in f:
                raise TraceFormatError(f"{path}: not a SONATA spike file (missing magic 0x0A7A or /spikes)")
            if "neuro_mar" not in f or f["neuro_mar"].attrs.get("format") != FORMAT:
                raise TraceFormatError(f"{path}: a SONATA file, but not written by neuro-mar (no /neuro_mar "
                                       f"metadata of format {FORMAT}); read it with libsonata instead")
            meta = f["neuro_mar"]
            tr = Trace(path, int(meta.attrs["T"]), int(meta.attrs["L_max"]), float(meta.attrs["dt_ms"]),
                       str(meta.attrs["model"]), _verified(path, meta["token_ids"]),
                       _verified(path, meta["sequence_lengths"]), {})
            _check_metadata(tr)
            for name, g in f["spikes"].items():
                ts, nid, pol = (_verified(path, g[ds]) for ds in EVENT_DATASETS)
                if not (len(ts) == len(nid) == len(pol)):
                    raise TraceFormatError(f"{path}: population {name}: datasets of different lengths (truncated?)")
                if len(pol) and not np.isin(pol, (-1, 1)).all():
                    raise TraceFormatError(f"{path}: population {name}: polarity values outside {{-1, +1}}")
                p = meta["populations"][name]
                if len(nid) and int(nid.max()) >= int(p.attrs["channels"]):
                    raise TraceFormatError(f"{path}: population {name}: node id beyond its {p.attrs['channels']} channels")
                tr.populations[name] = Population(name, ts, nid, pol, int(p.attrs["layer"]), str(p.attrs["kind"]),
                                                  str(p.attrs["neuron"]), int(p.attrs["channels"]),
                                                  _verified(path, p["threshold"]))
            return tr
        except TraceFormatError:
            raise
        except (KeyError, OSError, ValueError) as err:
            raise TraceFormatError(f"{path}: damaged neuro-mar trace ({type(err).__name__}: {err})") from None
