"""Checks a model folder passes before and after it is loaded: its weights files are whole, their
tensors have the shapes its ``config.json`` gives, and the loaded weights are finite.

``MARForCausalLM.from_pretrained`` runs all three; the CLI runs them on teacher folders too. Each
failure is a ``ValueError`` whose message names the folder or file, the tensors and the fix (the
CLI prints it as one ``error:`` line).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weights_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a local model folder (the shards its index names, or
    ``model.safetensors``); ``[]`` when it holds none (another format, left to the loader)."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            shards = sorted(set(data["weight_map"].values()))
            if not all(isinstance(s, str) for s in shards):
                raise TypeError("a shard name is not a string")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index}: not a readable safetensors index ({type(err).__name__}: {err}); the folder "
                             "was edited or damaged: re-save the model or copy the folder again") from None
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{f} is missing: {index.name} names it; the folder is incomplete: copy the "
                                 "folder again or re-save the model")
        return files
    single = folder / SAFETENSORS
    return [single] if single.is_file() else []


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the headers of safetensors files (no tensor data is read); a file
    that is truncated or not safetensors raises ``ValueError`` naming it."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    shapes[k] = tuple(fh.get_slice(k).get_shape())
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: the file is not whole
            raise ValueError(f"{f}: the weights file is damaged or incomplete ({type(err).__name__}: {err}); "
                             "re-save the model or copy the file again") from None
    return shapes


def expected_shapes(build: Callable[[], torch.nn.Module]) -> tuple[dict[str, tuple[int, ...]], str]:
    """Name -> shape of the state dict of the model ``build()`` makes, built on the meta device
    (no memory, no initialisation cost), and the model's ``base_model_prefix``."""
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, getattr(model, "base_model_prefix", "")


def check_weights_files(folder: str | Path, build: Callable[[], torch.nn.Module] | None = None, prefix: str | None = None,
                        expected: tuple[dict, str] | None = None) -> None:
    """Refuse a local folder whose safetensors files are damaged, or whose tensors have other
    shapes than the model its config makes (``build``). Tensors present on one side only are left
    to the loader (tied weights, renamed keys); ``prefix`` (default: the built model's
    ``base_model_prefix``) lets a base model loaded from a head model's folder, or the reverse,
    be compared too; ``expected``: :func:`expected_shapes`'s result, when the caller has it."""
    folder = Path(folder)
    files = weights_files(folder)
    if not files:
        return
    found = read_shapes(files)
    want, own_prefix = expected if expected is not None else expected_shapes(build)
    prefix = own_prefix if prefix is None else prefix
    where = files[0].name if len(files) == 1 else f"the {len(files)} shards of {SAFETENSORS_INDEX}"
    bad = []
    for key, shape in sorted(found.items()):
        name = key
        if name not in want and prefix:
            stripped = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
            name = stripped if stripped in want else f"{prefix}.{name}"
        if name in want and want[name] != shape:
            bad.append(f"{key} is {list(shape)} in {where} but {list(want[name])} by config.json")
    if bad:
        raise ValueError(f"{folder}: config.json does not match the weights: {len(bad)} tensor(s) of another "
                         f"shape ({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}): the config and the "
                         "weights are not from the same model; put back the config.json saved with these "
                         "weights (or re-save the model)")


def is_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. A finite sum proves it (a NaN or an infinity
    never sums back to a finite number) at a tenth of the cost of ``isfinite(t).all()``, which
    decides when the sum is not finite (a NaN, an infinity, or finite values that overflow it)."""
    t = t.detach()
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating parameters and buffers of ``model`` that hold a NaN or an infinity
    (tensors not materialised, on the meta device, are skipped). About 25 ms for 135M parameters
    on two CPU cores."""
    bad = []
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
            continue
        seen.add(id(t))
        if not is_finite(t):
            bad.append(name)
    return bad


def check_finite_weights(model: torch.nn.Module, where) -> None:
    """Refuse a model whose weights hold NaN or infinite values, naming the first tensors."""
    bad = non_finite_tensors(model)
    if bad:
        raise ValueError(f"{where}: the weights hold NaN or infinite values in {len(bad)} tensor(s) "
                         f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): the model is damaged (a "
                         "training run that diverged, or a corrupted file); use an earlier checkpoint or re-save "
                         "it from a good run")


#: what to do about a damaged config.json / tokenizer file
_CONFIG_FIX = ("the model folder's config.json is truncated or edited: restore it (copy the folder again or re-save "
               "the model)")
_TOKENIZER_FIX = "the tokenizer files are truncated or edited: copy them again from the model they belong to"


def _json_object(p: Path, fix: str) -> dict | None:
    """The JSON object in file ``p``, None when there is no such file; a file that is not a JSON
    object raises ``ValueError`` naming it, with ``fix``."""
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{p}: is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: holds {type(data).__name__}, not a JSON object; {fix}")
    return data


def read_config(folder) -> dict | None:
    """``folder/config.json`` as a dict, None when there is none; a file that is not a JSON
    object raises ``ValueError`` naming it."""
    return _json_object(Path(folder).expanduser() / "config.json", _CONFIG_FIX)


def refuse_custom_code(folder, files=("config.json", "tokenizer_config.json")) -> None:
    """Refuse a local folder whose ``files`` name code of their own (``auto_map``): neuro-mar
    loads models and tokenizers with the classes transformers ships, and never runs a folder's
    Python files (nor asks on stdin whether to). A damaged file raises as :func:`read_config`."""
    for name in files:
        p = Path(folder).expanduser() / name
        data = _json_object(p, _CONFIG_FIX if name == "config.json" else _TOKENIZER_FIX)
        if data and data.get("auto_map"):
            if name == "config.json" and data.get("model_type") == "neuro_mar":
                continue  # a MAR folder's own auto_map names the installed package's classes
            raise ValueError(f"{p} names custom code (auto_map {data['auto_map']}); neuro-mar never runs a model "
                             "folder's own Python code: use a folder whose model and tokenizer are classes "
                             "transformers ships (remove auto_map only if you know the classes it names are those)")


def load_tokenizer(folder):
    """The tokenizer of a local model folder, with no code of the folder's own run; a missing or
    damaged tokenizer file raises ``ValueError`` naming the folder."""
    from transformers import AutoTokenizer

    refuse_custom_code(folder, ("tokenizer_config.json",))
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - tokenizers and transformers raise many kinds
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{folder}: the tokenizer cannot be loaded ({type(err).__name__}: {first}); its tokenizer "
                         "files (tokenizer.json, tokenizer_config.json, ...) are missing or damaged: copy them again "
                         "from the model they belong to") from None


def check_loading_info(info: dict, where, fix: str) -> None:
    """Refuse what ``from_pretrained(..., output_loading_info=True)`` reports: tensors missing
    from the weights, unexpected in them or of another shape, named (``fix``: what to do)."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of another shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or [])
        if names:
            problems.append(f"{len(names)} {what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    if problems:
        raise ValueError(f"{where}: the weights do not match config.json: {'; '.join(problems)}; the folder was "
                         f"edited or damaged: {fix}")


def load_weights(load: Callable, folder):
    """``load()`` (a ``from_pretrained`` call) with its weights-file failures as one ``ValueError``
    naming ``folder``: a pickle that is more than plain tensors (never loaded), a damaged file."""
    import pickle

    from safetensors import SafetensorError

    try:
        return load()
    except pickle.UnpicklingError:
        raise ValueError(f"{folder}: its weights file cannot be read as plain weights: it holds more than tensors "
                         "and plain containers, so it may run code when unpickled; it is not loaded: use the model "
                         "saved as model.safetensors") from None
    except SafetensorError as err:
        raise ValueError(f"{folder}: a weights file is damaged or incomplete (SafetensorError: {err}); re-save the "
                         "model or copy it again") from None


__all__ = ["read_config", "refuse_custom_code", "load_tokenizer", "check_loading_info", "load_weights",
           "weights_files", "read_shapes", "expected_shapes", "check_weights_files", "is_finite", "non_finite_tensors",
           "check_finite_weights"]
