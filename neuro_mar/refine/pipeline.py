"""The MAR refinement pipeline (MAR, arXiv 2601.21503).

Stage 1 (attention -> SSM), from ``llama_to_mar(teacher)``:
  1a matrix orientation (optional): each mixer's materialised mixing matrix -> the layer's
     attention matrix (MSE), per layer, on the teacher's inputs to that layer;
  1b per-layer hidden-state alignment: each student block, fed the teacher's input to that layer,
     learns the teacher layer's output (MSE; layers independent);
  1c end-to-end distillation on logits (forward KL).
Stage 2: the chosen neuron (default ``atmn``) at the four sites, thresholds calibrated on a batch,
then SBDS from the Stage-1 model (or the original teacher).

Each sub-stage has its own step budget; 0 skips it. Output folder: ``stage1/`` and ``student/``
(Hugging Face checkpoints with the tokenizer), ``report.md``, ``report.json``, plots,
``metrics.jsonl``, ``checkpoints/`` (resume with the same command plus ``--resume``).
``from_stage1`` (``--from-stage1 DIR``) skips Stage 1: Stage 2 starts from a saved Stage-1 model
(a run's ``stage1/``), which is checked against the teacher and not copied into the run folder.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..convert import llama_to_mar
from ..io_utils import atomic_write_text, make_temp
from ..models.checks import expected_shapes, read_config
from ..models.configuration_mar import SSM_INPUT_GAINS
from ..models.modeling_mar import TRAINABLE_GROUPS
from ..ssm.discrete_mamba2 import mixing_matrix
from .clean import removable_checkpoints, run_is_complete
from .data import (GEN_CACHES, DataError, clean_documents, read_texts, split_heldout, teacher_generated_texts,
                   tokenize_and_pack)
from .losses import feature_loss, firing_rate_penalty, sbds_logit_loss, site_firing_rates
from .trainer import TrainConfig, Trainer, init_distributed, shutdown_distributed, world


@dataclass
class RefineConfig:
    teacher: str = "smollm2-135m"
    data: list = field(default_factory=list)
    text_field: str = "text"
    generated_tokens: int = 16384  # teacher-generated default data (and added to --data when > 0 and --mix)
    mix_generated: bool = False
    # teacher sampling: tokens per sample, sequences per batch (0: 1024 on a GPU, 16 on a CPU), the
    # share of prompts that are openings of --data paragraphs (the rest: built-in instructions),
    # temperature and nucleus, the KV cache and the precision ("auto": a dynamic cache, and bf16 on
    # a GPU, fp32 elsewhere: on the H200 6x the tokens/s of a static cache in fp32 at 256 per batch,
    # docs/quality.md)
    gen_max_new: int = 256
    gen_batch: int = 0
    gen_continuation_share: float = 0.75
    gen_temperature: float = 1.0
    gen_top_p: float = 0.95
    gen_top_k: int = 50
    gen_cache: str = "auto"
    gen_precision: str = "auto"
    detokenize: str = "auto"  # auto | wikitext | none: undo WikiText's tokenisation of --data (data.clean_documents)
    # mixer initialisation: each head's dt from the teacher head's attention span ("teacher") or
    # log-uniform in dt_range ("range"); the mixer's input gain "zoh" scales x_t by 1 - exp(-dt_t)
    # (MARConfig.ssm_input_gain) so a long memory starts and stays a normalised moving average.
    # "teacher" + "zoh" keeps the most of the teacher on the dev suite in Stage 1 and Stage 2
    # (docs/quality.md, ablation 2); normalize_memory is the older gain fixed at initialisation,
    # whose students collapsed, kept for comparison
    dt_init: str = "teacher"
    dt_range: tuple = (0.3, 3.0)
    normalize_memory: bool = False
    ssm_input_gain: str = "zoh"
    # what trains (MARForCausalLM.set_trainable): "all", "blocks" (not the embeddings / LM head) or
    # "mixers" (the SSM mixers and spike thresholds; the teacher's MLPs, norms and embeddings frozen)
    train_1: str = "all"
    train_2: str = "all"
    seq_len: int = 128
    max_tokens: int | None = None
    heldout_fraction: float = 0.1
    # Stage 2 only: start from this saved Stage-1 model (a run's stage1/ folder) instead of training
    # Stage 1; the Stage-1 options are then unused
    from_stage1: str | None = None
    neuron: str = "atmn"
    neuron_options: dict = field(default_factory=dict)
    calib_percentile: float = 99.9
    stage2_teacher: str = "stage1"  # or "teacher"
    alpha: float = 0.2
    beta: float = 0.7
    gamma: float = 0.0
    temperature: float = 1.0
    features: str = "pre"
    ce_weight: float = 0.0
    # Stage 2's activity regulariser: rate_weight x the mean over spiking sites of (rate - rate_target)^2,
    # or with rate_target 0 the mean rate (rate: non-zero spikes / (elements x T)); 0 = off
    rate_weight: float = 0.0
    rate_target: float = 0.0
    steps_1a: int = 0
    # matrix orientation aligns every layer's and head's l x l mixing matrix at once: on the first
    # seq_len_1a tokens of each row (memory grows with its square)
    seq_len_1a: int = 256
    steps_1b: int = 30
    steps_1c: int = 20
    steps_2: int = 40
    lr_1a: float = 1e-3
    lr_1b: float = 1e-3
    lr_1c: float = 3e-4
    lr_2: float = 3e-4
    micro_batch: int = 4
    grad_accum: int = 1
    warmup: int = 5
    seed: int = 0
    ckpt_every: int = 10
    eval_rows: int = 16
    energy_contexts: tuple = (512, 4096)
    fsdp: bool = False
    # wall-time budgets per sub-stage in seconds (0 = none): after a few timed steps the stage's
    # step count is cut to what fits, and its cosine schedule follows
    seconds_1a: float = 0.0
    seconds_1b: float = 0.0
    seconds_1c: float = 0.0
    seconds_2: float = 0.0
    seconds_ablation: float = 0.0  # each ablation's Stage 2; 0: as seconds_2
    # evaluation beyond the held-out split: a text file for perplexity / KL / agreement (e.g.
    # WikiText-2 valid) and zero-shot multiple-choice jsonl files (ARC, PIQA, HellaSwag)
    eval_data: str | None = None
    eval_max_tokens: int = 65536  # 0: all of it
    eval_tasks: list = field(default_factory=list)
    # the zero-shot suite (neuro_mar.evaluation) the report leads with: a suite name with the folder
    # holding its files, and/or NAME=FILE tasks; documents per task (0 = all); model window
    eval_suite: str | None = None
    eval_suite_dir: str | None = None
    eval_suite_tasks: list = field(default_factory=list)
    eval_limit: int = 0
    eval_max_length: int = 2048
    # Stage 2 again, from the same Stage-1 model, with these neurons (reported as ablations)
    ablation_neurons: list = field(default_factory=list)
    # > 0: time this many Stage-2 training steps with the fused kernels and with the PyTorch
    # reference paths (same trainer, same batch)
    throughput_steps: int = 0
    throughput_micro_batch: int = 8
    # keep every stage's checkpoint; by default those of Stage 1 go once stage1/ is saved (a resume
    # loads stage1/; each checkpoint holds the weights and AdamW state, about 1.6 GB for SmolLM2-135M)
    keep_checkpoints: bool = False


PRESETS = {
    # a fresh 2-core CPU machine, about 20 minutes with the default teacher (setup included)
    "quick": dict(seq_len=128, generated_tokens=12288, steps_1a=0, steps_1b=24, steps_1c=16, steps_2=30,
                  micro_batch=4, ckpt_every=10, eval_rows=12),
    # one H200 within about 20 minutes: bf16 autocast and the fused kernels on CUDA; each stage
    # stops at its wall-time budget (13 min of training; loading, generation, kernel compilation
    # and evaluation take the rest); WikiText-2 valid and ARC come in through --eval-data/--eval-multiple-choice.
    # 32 x 1024 tokens per step: at 16 the host, not the GPU, set the pace (about 47k tokens/s in
    # Stage 1c against 104k at 32), and in the same wall time 32 kept more of the teacher than 16 or
    # 64 (docs/quality.md, ablation 3); learning rates scaled by the square root of the batch
    # 1M tokens of teacher text: with the preallocated sampler about half a minute on an H200, and
    # Stage 1c then passes over its data about 10 times instead of 13
    "gpu": dict(seq_len=1024, generated_tokens=1048576, mix_generated=True, steps_1a=0, steps_1b=4000,
                steps_1c=8000, steps_2=8000, seconds_1b=90, seconds_1c=330, seconds_2=300, seconds_ablation=60,
                micro_batch=32, grad_accum=1, ckpt_every=100, eval_rows=32, lr_1b=1.4e-3, lr_1c=4.2e-4, lr_2=2.8e-4,
                warmup=30, eval_max_tokens=0, ablation_neurons=["binary"], throughput_steps=6),
    # the smallest end-to-end run (tests, smoke checks)
    "tiny": dict(seq_len=32, generated_tokens=2048, steps_1a=2, steps_1b=3, steps_1c=3, steps_2=3, micro_batch=2,
                 ckpt_every=2, eval_rows=2, energy_contexts=(64,)),
}


class RefineError(ValueError):
    pass


#: RefineConfig fields whose command-line flag is not the field's name (``neuro-mar refine``'s
#: flags say what they are across subcommands: --eval-X as ``eval --X``, --gen-X as ``generate --X``)
FLAG_NAMES = {"temperature": "--distill-temperature", "gen_max_new": "--gen-max-new-tokens",
              "eval_tasks": "--eval-multiple-choice", "eval_suite_tasks": "--eval-suite-task",
              "ablation_neurons": "--ablation-neuron", "neuron_options": "--neuron-option"}


def option_flag(field: str) -> str:
    """The ``neuro-mar refine`` flag of the RefineConfig field ``field``."""
    return FLAG_NAMES.get(field) or "--" + field.replace("_", "-")


#: (fields, test, what the value must be) for every numeric option of RefineConfig
_RANGES = [
    (("steps_1a", "steps_1b", "steps_1c", "steps_2", "warmup", "generated_tokens", "eval_limit", "eval_max_tokens",
      "throughput_steps"), lambda v: v >= 0, "an integer >= 0"),
    (("micro_batch", "grad_accum", "ckpt_every", "eval_rows", "gen_max_new", "throughput_micro_batch"),
     lambda v: v >= 1, "an integer >= 1"),
    (("seq_len", "seq_len_1a", "eval_max_length"), lambda v: v >= 2, "an integer >= 2"),
    (("lr_1a", "lr_1b", "lr_1c", "lr_2", "temperature", "gen_temperature"), lambda v: v > 0, "a number > 0"),
    (("alpha", "beta", "gamma", "ce_weight", "seconds_1a", "seconds_1b", "seconds_1c", "seconds_2",
      "seconds_ablation", "rate_weight"), lambda v: v >= 0, "a number >= 0"),
    (("rate_target",), lambda v: 0 <= v <= 1, "a firing rate in [0, 1]"),
    (("calib_percentile",), lambda v: 0 < v <= 100, "a percentile in (0, 100]"),
    (("heldout_fraction",), lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    (("gen_top_p",), lambda v: 0 < v <= 1, "a probability in (0, 1]"),
    (("gen_continuation_share",), lambda v: 0 <= v <= 1, "a share in [0, 1]"),
    (("gen_batch",), lambda v: v >= 0, "an integer >= 0 (0: automatic)"),
    (("gen_top_k",), lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
]


def validate_config(cfg: RefineConfig) -> None:
    """Every option's type and range, checked before anything is loaded or written; raises
    :class:`RefineError` naming the option and what it must be."""
    for keys, ok, what in _RANGES:
        for key in keys:
            v = getattr(cfg, key)
            integer = what.startswith("an integer")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) \
                    or not math.isfinite(v) or not ok(v):
                raise RefineError(f"{option_flag(key)} must be {what}, got {v!r}")
    if cfg.from_stage1 is not None and not isinstance(cfg.from_stage1, str):
        raise RefineError(f"--from-stage1 must be a folder path, got {cfg.from_stage1!r}")
    if cfg.max_tokens is not None and (not isinstance(cfg.max_tokens, int) or cfg.max_tokens < cfg.seq_len):
        raise RefineError(f"--max-tokens must be an integer >= --seq-len ({cfg.seq_len}), got {cfg.max_tokens!r}")
    lo, hi = cfg.dt_range
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise RefineError(f"--dt-range must be two numbers 0 < MIN <= MAX, got {lo!r} {hi!r}")
    if cfg.alpha + cfg.beta + cfg.gamma + cfg.ce_weight == 0 and cfg.steps_2 > 0:
        raise RefineError("--alpha, --beta, --gamma and --ce-weight are all 0: Stage 2 would have no loss")
    if cfg.stage2_teacher not in ("stage1", "teacher"):
        raise RefineError(f"--stage2-teacher must be stage1 or teacher, got {cfg.stage2_teacher!r}")
    if cfg.features not in ("pre", "post", "both"):
        raise RefineError(f"--features must be pre, post or both, got {cfg.features!r}")
    if cfg.gen_cache not in ("auto", *GEN_CACHES):
        raise RefineError(f"--gen-cache must be auto, {', '.join(GEN_CACHES)}, got {cfg.gen_cache!r}")
    if cfg.gen_precision not in ("auto", "bf16", "fp32"):
        raise RefineError(f"--gen-precision must be auto, bf16 or fp32, got {cfg.gen_precision!r}")
    if cfg.dt_init not in ("teacher", "range"):
        raise RefineError(f"--dt-init must be teacher or range, got {cfg.dt_init!r}")
    if cfg.ssm_input_gain not in SSM_INPUT_GAINS:
        raise RefineError(f"--ssm-input-gain must be one of {', '.join(SSM_INPUT_GAINS)}, got {cfg.ssm_input_gain!r}")
    if cfg.normalize_memory and cfg.ssm_input_gain != "none":
        raise RefineError("--normalize-memory and --ssm-input-gain zoh (the default) both normalise the mixer's "
                          "memory: add --ssm-input-gain none to use --normalize-memory, or drop it")
    for key in ("train_1", "train_2"):
        if getattr(cfg, key) not in TRAINABLE_GROUPS:
            raise RefineError(f"{option_flag(key)} must be one of {', '.join(TRAINABLE_GROUPS)}, got {getattr(cfg, key)!r}")
    if cfg.detokenize not in ("auto", "wikitext", "none"):
        raise RefineError(f"--detokenize must be auto, wikitext or none, got {cfg.detokenize!r}")


# ---------------------------------------------------------------------------------------------
# stage losses
# ---------------------------------------------------------------------------------------------
def _teacher_layer_io(teacher, ids):
    """[(input, output)] of every teacher decoder layer (pre-norm residual stream)."""
    io, hooks = [], []
    for layer in teacher.model.layers:
        hooks.append(layer.register_forward_hook(
            lambda mod, args, out: io.append((args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach()))))
    try:
        with torch.no_grad():
            teacher(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return io


def loss_1a(student, teacher, ids, window: int | None = None):
    """Matrix orientation: MSE between each mixer's mixing matrix and the layer's attention matrix,
    on the first ``window`` tokens of each row (all of them without one). The teacher runs with
    eager attention for it (the one implementation that returns the probabilities)."""
    from ..teachers import eager_attention

    ids = ids[:, :window] if window else ids
    with torch.no_grad(), eager_attention(teacher):
        out = teacher(input_ids=ids, output_attentions=True, output_hidden_states=True)
    terms = []
    for l, layer in enumerate(student.model.layers):
        u = layer.input_layernorm(out.hidden_states[l])
        terms.append(F.mse_loss(mixing_matrix(layer.mixer, u), out.attentions[l].float()))
    return torch.stack(terms).mean()


def make_loss_1a(cfg: RefineConfig):
    return functools.partial(loss_1a, window=cfg.seq_len_1a)


def loss_1b(student, teacher, ids):
    """Per-layer alignment: each block maps the teacher's layer input to the teacher's layer output.
    Each layer's squared error is relative to the size of what the block adds (||y - x||^2), so
    layers count alike whatever the scale of the residual stream (SmolLM2's reaches the thousands)."""
    io = _teacher_layer_io(teacher, ids)
    terms = []
    for layer, (x, y) in zip(student.model.layers, io):
        err = (layer(x)[0].float() - y.float()).pow(2).mean()
        terms.append(err / (y.float() - x.float()).pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def logit_sbds(student, teacher, ids, alpha: float, beta: float, temperature: float = 1.0, hidden: bool = False):
    """``(loss, student outputs, teacher outputs)`` of SBDS on the logits: through the fused linear op
    on CUDA (outputs of ``.model``: hidden states, no logits), else on materialised logits."""
    if _use_fused_sbds(ids.device):  # logits never materialised for the whole batch
        from ..kernels.sbds import fused_linear_sbds

        with torch.no_grad():
            t = teacher.model(input_ids=ids, output_hidden_states=hidden)
        s = student.model(input_ids=ids, output_hidden_states=hidden)
        return fused_linear_sbds(s.last_hidden_state, student.lm_head.weight, t.last_hidden_state,
                                 teacher.lm_head.weight, alpha=alpha, beta=beta, temperature=temperature), s, t
    with torch.no_grad():
        t = teacher(input_ids=ids, output_hidden_states=hidden)
    s = student(input_ids=ids, output_hidden_states=hidden)
    return sbds_logit_loss(s.logits, t.logits, alpha, beta, temperature), s, t


def loss_1c(student, teacher, ids):
    """End-to-end forward KL on the logits."""
    return logit_sbds(student, teacher, ids, alpha=1.0, beta=0.0)[0]


def _use_fused_sbds(device: torch.device) -> bool:
    """Whether the SBDS logit loss on ``device`` runs through the fused op (kernel backend knob)."""
    from ..kernels import atmn_ops

    backend = atmn_ops.get_backend()
    return backend != "torch" and atmn_ops.triton_available() and (device.type == "cuda" or backend == "triton")


def _check_ce_weight(cfg: RefineConfig, device: torch.device) -> None:
    if cfg.ce_weight and _use_fused_sbds(device):
        raise RefineError("--ce-weight needs materialised logits, which the fused SBDS loss never forms: "
                          "run with NEURO_MAR_KERNELS=torch or drop --ce-weight")


def make_loss_2(cfg: RefineConfig):
    """Stage 2's loss ``fn(student, teacher, ids [b, l]) -> scalar``: SBDS on the logits, plus
    ``gamma`` x the feature term, ``ce_weight`` x next-token cross-entropy and ``rate_weight`` x
    the firing-rate penalty of the student's spiking sites (:func:`~neuro_mar.refine.losses.firing_rate_penalty`,
    on rates recorded with gradient during the same forward)."""
    def loss_2(student, teacher, ids):
        want_h = cfg.gamma > 0
        _check_ce_weight(cfg, ids.device)
        with site_firing_rates(student, enabled=cfg.rate_weight > 0) as rates:
            loss, s, t = logit_sbds(student, teacher, ids, cfg.alpha, cfg.beta, cfg.temperature, hidden=want_h)
        if cfg.rate_weight > 0:
            loss = loss + cfg.rate_weight * firing_rate_penalty(rates, cfg.rate_target)
        if want_h:
            L = len(student.model.layers)
            norms = {l: (student.model.layers[l].input_layernorm, teacher.model.layers[l].input_layernorm)
                     for l in range(1, L)}
            loss = loss + cfg.gamma * feature_loss(s.hidden_states, t.hidden_states, list(range(1, L)), cfg.features, norms)
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * F.cross_entropy(s.logits[:, :-1].reshape(-1, s.logits.shape[-1]).float(),
                                                          ids[:, 1:].reshape(-1))
        return loss
    return loss_2


class _Bound(torch.nn.Module):
    """Pairs a student with a frozen teacher so the Trainer sees one module (DDP wraps the student)."""

    def __init__(self, student, teacher, fn):
        super().__init__()
        self.student = student
        self.fn = fn
        object.__setattr__(self, "teacher", teacher)  # not a submodule: frozen, not checkpointed

    def forward(self, ids):
        return self.fn(self.student, self.teacher, ids)


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
def prepare(cfg: RefineConfig, progress: bool = True):
    """Load the teacher and the data and check everything before anything is written.
    Returns (teacher, tokenizer, train rows, held-out rows)."""
    from ..teachers import load_teacher

    from .evaluate import load_multiple_choice

    validate_config(cfg)
    check_neurons(cfg)
    if cfg.from_stage1 is not None:
        check_stage1_folder(cfg.from_stage1)  # the files; the shapes once the teacher is loaded (load_stage1)
    for p in cfg.data:
        read_texts(p, cfg.text_field)  # raises DataError with the file name
    if cfg.eval_data:
        read_texts(cfg.eval_data, cfg.text_field)
    for p in cfg.eval_tasks:
        try:
            load_multiple_choice(p)
        except (FileNotFoundError, ValueError) as err:
            raise RefineError(f"{option_flag('eval_tasks')}: {err}") from None
    suite_entries(cfg)  # every suite file read and checked now, not after training
    try:
        teacher, tok = load_teacher(cfg.teacher)
    except FileNotFoundError as err:
        raise RefineError(str(err)) from None
    try:
        llama_to_mar(teacher)  # refuses a teacher that is not Llama-shaped, before anything is written
    except ValueError as err:
        raise RefineError(str(err)) from None
    texts = []
    for p in cfg.data:
        texts += read_texts(p, cfg.text_field)
    texts = clean_documents(texts, cfg.detokenize)
    if not cfg.data or cfg.mix_generated:
        on_gpu = torch.cuda.is_available()
        if on_gpu:  # generate on the GPU; the teacher stays there for training (run_refine moves it anyway)
            teacher.to(torch.device("cuda", torch.cuda.current_device()))
        texts += teacher_generated_texts(teacher, tok, cfg.generated_tokens, progress=progress, seed=cfg.seed,
                                         batch=cfg.gen_batch or (1024 if on_gpu else 16), max_new=cfg.gen_max_new,
                                         texts=texts or None, continuation_share=cfg.gen_continuation_share,
                                         temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, top_k=cfg.gen_top_k,
                                         cache=cfg.gen_cache,
                                         bf16=cfg.gen_precision == "bf16" or (cfg.gen_precision == "auto" and on_gpu))
    rows = tokenize_and_pack(texts, tok, cfg.seq_len, cfg.max_tokens)
    vocab = teacher.get_input_embeddings().weight.shape[0]
    if rows.numel() and int(rows.max()) >= vocab:
        raise RefineError(f"the tokenizer gives token id {int(rows.max())} (it has {len(tok)} tokens) but the "
                          f"teacher's embedding has {vocab} rows: the tokenizer is not the teacher's; give the "
                          "teacher folder with its own tokenizer")
    train, held = split_heldout(rows, cfg.heldout_fraction)
    if train.shape[0] < cfg.micro_batch:
        raise DataError(f"{train.shape[0]} training sequences of {cfg.seq_len} tokens are fewer than one micro-batch "
                        f"({cfg.micro_batch}); give more data or a smaller --seq-len")
    return teacher.float(), tok, train, held[: cfg.eval_rows]


def check_neurons(cfg: RefineConfig) -> None:
    """Every configured neuron (``neuron`` with ``neuron_options``, the ablations with their
    defaults) is in the registry and builds with its options; :class:`RefineError` naming it."""
    neurons = __import__("neuro_mar").neurons
    for name in [cfg.neuron, *cfg.ablation_neurons]:
        if name not in neurons.available():
            raise RefineError(f"unknown neuron {name!r}; see `neuro-mar neurons`")
        try:  # one neuron of each configured kind, with its options, before anything trains
            neurons.create(name, channels=4, **(cfg.neuron_options if name == cfg.neuron else {}))
        except (TypeError, ValueError) as err:
            raise RefineError(f"neuron {name!r} with options {cfg.neuron_options}: {err}") from None


def check_stage1_folder(path: str | Path) -> dict:
    """The ``config.json`` of a ``--from-stage1`` folder, checked without reading weights: a
    folder holding a MAR model whose sites are all dense (a Stage-1 model, as a run's ``stage1/``).
    :class:`RefineError` naming the problem and the fix otherwise."""
    flag = option_flag("from_stage1")
    p = Path(path).expanduser()
    give = "give the stage1/ folder of a neuro-mar refine run (RUN/stage1)"
    if not p.exists():
        raise RefineError(f"{flag} {path} does not exist; {give}")
    if not p.is_dir():
        raise RefineError(f"{flag} {path} is a file, not a model folder; {give}")
    if not (p / "config.json").is_file():
        hint = (f"; it is a run folder: give {p / 'stage1'}" if (p / "stage1" / "config.json").is_file()
                else f"; {give}")
        raise RefineError(f"{flag} {path} holds no config.json, so it is not a saved model{hint}")
    try:
        config = read_config(p)
    except ValueError as err:
        raise RefineError(f"{flag}: {err}") from None
    if config.get("model_type") != "neuro_mar":
        raise RefineError(f"{flag} {path} is not a MAR model (model_type {config.get('model_type')!r}): Stage 2 "
                          f"starts from a Stage-1 model; {give}, or drop {flag} to run Stage 1 from the teacher")
    spiking = sorted({n for n in (config.get("neurons") or {}).values() if n != "dense"}
                     | {s.get("name") for s in (config.get("site_neurons") or {}).values()
                        if isinstance(s, dict) and s.get("name") != "dense"})
    if spiking:
        raise RefineError(f"{flag} {path} is a spiking model ({', '.join(map(str, spiking))} neurons), not a Stage-1 "
                          "model: Stage 2 starts from the dense Stage-1 model; give RUN/stage1, not RUN/student")
    return config


def load_stage1(cfg: RefineConfig, teacher, identity: dict):
    """The ``--from-stage1`` model, loaded with ``MARForCausalLM.from_pretrained``'s checks (weights
    whole, of ``config.json``'s shapes, finite) and checked against ``teacher``: every tensor of
    the shape ``llama_to_mar(teacher)`` gives it, and, when the folder sits in a run folder with a
    ``run_identity.json``, made from the same teacher weights and tokenizer (``identity``:
    :func:`run_identity` of this run). :class:`RefineError` naming the problem and the fix."""
    from ..convert import mar_config_from_llama
    from ..models import MARForCausalLM

    flag = option_flag("from_stage1")
    path = Path(cfg.from_stage1).expanduser()
    check_stage1_folder(path)
    try:
        model = MARForCausalLM.from_pretrained(path)
    except (ValueError, OSError) as err:
        raise RefineError(f"{flag}: {err}") from None
    other = (f"it was made from another teacher: give the --teacher its run used (RUN/refine_config.json), or "
             f"drop {flag} to run Stage 1 from --teacher {cfg.teacher}")
    want, _ = expected_shapes(lambda: MARForCausalLM(mar_config_from_llama(teacher.config)))
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [f"{k} is {list(have[k])} there but {list(want[k])} for this teacher" for k in sorted(want)
           if k in have and have[k] != want[k]]
    bad += [f"{k} missing" for k in sorted(set(want) - set(have))]
    bad += [f"{k} unexpected" for k in sorted(set(have) - set(want))]
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        raise RefineError(f"{flag} {cfg.from_stage1} does not have the shapes of a Stage-1 model of --teacher "
                          f"{cfg.teacher} ({len(bad)} tensor(s): {shown}); {other}")
    record = path.parent / "run_identity.json"
    if record.is_file():  # the run that made it says which teacher (a folder copied elsewhere: shapes only)
        try:
            made_by = json.loads(record.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            made_by = None
        if isinstance(made_by, dict):
            differ = [k.replace("_", " ") for k in ("teacher_weights", "tokenizer")
                      if made_by.get(k) is not None and made_by[k] != identity[k]]
            if differ:
                raise RefineError(f"{flag} {cfg.from_stage1}: the {' and '.join(differ)} of --teacher {cfg.teacher} "
                                  f"differ from those of the run that made it ({record}); {other}")
    return model


def init_student(cfg: RefineConfig, teacher, rows: torch.Tensor):
    """``llama_to_mar(teacher)`` with the configured mixer initialisation; ``dt_init="teacher"``
    measures each attention head's span on up to 4 of ``rows`` (at most 512 tokens each)."""
    memory = None
    if cfg.dt_init == "teacher":
        from ..evaluation.probes import attention_span

        ids = rows[:4, :512].to(next(teacher.parameters()).device)
        memory, _ = attention_span(teacher, ids, min_position=ids.shape[1] // 2)
    return llama_to_mar(teacher, dt_init_range=tuple(cfg.dt_range), head_memory=memory,
                        normalize_memory=cfg.normalize_memory, ssm_input_gain=cfg.ssm_input_gain)


#: options that may change on ``--resume``: they only decide what is evaluated after training, or
#: (the teacher and the data, which may be given by another path) are checked by content instead,
#: through the run's ``run_identity.json`` (``from_stage1`` too, see :func:`_differs`)
RESUME_FREE_PREFIXES = ("eval_", "keep_checkpoints", "data", "teacher")


def read_run_record(path: Path) -> dict:
    """A run folder's JSON record (``refine_config.json``, ``run_identity.json``) for ``--resume``;
    :class:`RefineError` naming the file when it is missing, damaged or not a JSON object."""
    what = "restore it from a copy of the run folder or use a new --out"
    if not path.is_file():
        raise RefineError(f"--resume: {path} is missing, so the run cannot be checked against what it was started "
                          f"with; {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RefineError(f"--resume: {path} is damaged (not JSON: {err}); {what}") from None
    if not isinstance(data, dict):
        raise RefineError(f"--resume: {path} holds {type(data).__name__}, not a JSON object; {what}")
    return data


def config_changes(saved: dict, cfg: RefineConfig) -> list[str]:
    """``["--option OLD -> NEW", ...]`` for every training option in which ``cfg`` differs from a
    run's recorded ``refine_config.json`` (evaluation options may differ)."""
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as the file holds them
    defaults = json.loads(json.dumps(asdict(RefineConfig())))
    keys = sorted(k for k in set(saved) | set(now) if not k.startswith(RESUME_FREE_PREFIXES)
                  and not (k not in saved and now.get(k) == defaults.get(k)))  # an option newer than the run
    return [f"{option_flag(k)} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys
            if _differs(k, saved.get(k), now.get(k))]


def _differs(key: str, old, new) -> bool:
    """Whether a recorded option changed for ``--resume``: ``from_stage1`` only when it is given or
    dropped (another path to it is checked by content: ``stage1_weights`` in run_identity.json)."""
    if key == "from_stage1":
        return (old is None) != (new is None)
    return old != new


def _sha256_tensors(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(teacher, tok, train: torch.Tensor) -> dict:
    """Fingerprints of what a run trains from: the teacher's weights, the tokenizer (vocabulary,
    merges and special tokens) and the packed training rows (data, cleaning, generated text and
    sequence length together), each a sha256."""
    import hashlib

    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    special = json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())})
    return {"teacher_weights": _sha256_tensors(sorted(teacher.state_dict().items())),
            "tokenizer": hashlib.sha256((vocab + special).encode()).hexdigest(),
            "training_rows": _sha256_tensors([("rows", train)])}


def suite_entries(cfg: RefineConfig) -> list:
    """The evaluation suite's entries (files read and checked), [] when none is configured."""
    from ..evaluation import TaskFileError, load_suite

    if not cfg.eval_suite and not cfg.eval_suite_tasks:
        return []
    try:
        return load_suite(cfg.eval_suite, cfg.eval_suite_dir, cfg.eval_suite_tasks, cfg.eval_limit or None)
    except TaskFileError as err:
        raise RefineError(f"evaluation suite: {err}") from None


def _tcfg(cfg: RefineConfig, steps: int, lr: float, seconds: float = 0.0) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, warmup=min(cfg.warmup, max(steps - 1, 0)), micro_batch=cfg.micro_batch,
                       grad_accum=cfg.grad_accum, seed=cfg.seed, ckpt_every=cfg.ckpt_every, fsdp=cfg.fsdp,
                       max_seconds=seconds)


def make_trainer(cfg: RefineConfig, name: str, model, teacher_model, fn, steps: int, lr: float, seconds: float,
                 train: torch.Tensor, out: Path, device, progress: bool = True, trainable: str = "all") -> Trainer:
    """The Trainer of one sub-stage: ``fn(model, teacher_model, ids)`` is its loss, ``train [n, L]``
    its rows, ``trainable`` the parameter group of ``model`` it trains (``set_trainable``);
    checkpoints and metrics go to ``out`` under ``name``."""
    model.set_trainable(trainable)
    return Trainer(_Bound(model, teacher_model, fn), lambda m, b: m(b), train, _tcfg(cfg, steps, lr, seconds), out,
                   name, progress=progress, device=device, shard_units=lambda bound: list(bound.student.model.layers))


def _save_model(model, tok, path: Path) -> None:
    """save_pretrained into a temporary folder, then rename (atomic)."""
    tmp = make_temp(path, folder=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_refine(cfg: RefineConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Run Stage 1 (or take ``cfg.from_stage1``'s model) and Stage 2, evaluate, and write the report.
    Returns the report dict."""
    out = Path(out)
    distributed = init_distributed()
    rank, _ = world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    _check_ce_weight(cfg, device)  # before Stage 1, not at Stage 2's first step
    if out.exists() and any(out.iterdir()) and not resume:
        raise RefineError(f"output folder {out} exists and is not empty; pass --resume to continue it or choose a new --out")
    lock = RunLock(out) if rank == 0 else None  # one writer per run folder
    try:
        return _run_locked(cfg, out, resume, progress, distributed, rank, device)
    finally:
        if lock is not None:
            lock.release()


class RunLock:
    """An exclusive lock on ``out/.lock`` (flock; released when the process ends, however it ends):
    a second ``refine`` into the same folder stops instead of interleaving its files."""

    NAME = ".lock"

    def __init__(self, out: Path):
        import fcntl

        self.path = out / self.NAME
        if not out.exists():
            out.mkdir(parents=True)
            self.created = out
        else:
            self.created = None
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise RefineError(f"{out} is being written by another refine (pid {holder}); wait for it to end or "
                              "choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()

    def release(self) -> None:
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        self.path.unlink(missing_ok=True)
        if self.created is not None and not any(self.created.iterdir()):
            self.created.rmdir()  # a run refused before its first write leaves nothing behind


def _run_locked(cfg: RefineConfig, out: Path, resume: bool, progress: bool, distributed: bool, rank: int, device):
    from ..models import MARForCausalLM
    from .report import build_report

    recorded_cfg = out / "refine_config.json"
    recorded_id = out / "run_identity.json"
    saved_id = None
    if resume and not recorded_cfg.is_file():  # nothing to check a resume against: only an empty folder starts
        held = sorted(p.name for p in out.iterdir() if p.name != RunLock.NAME) if out.is_dir() else []
        if held:
            raise RefineError(f"--resume: {out} holds files ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) "
                              f"but no refine_config.json: it is not a refine run, or the run's record was deleted, "
                              "so nothing can be checked; restore refine_config.json or use a new --out")
    if resume and recorded_cfg.is_file():  # a resumed run continues the same configuration, or nothing
        saved_id = read_run_record(recorded_id)  # written with refine_config.json; checked once prepared
        changed = config_changes(read_run_record(recorded_cfg), cfg)
        if changed:
            raise RefineError(f"--resume: {out} was started with other options ({'; '.join(changed)}); resume "
                              "with the options it was started with (its refine_config.json) or use a new --out")
    if resume and run_is_complete(out) and not (out / "checkpoints" / "stage2.pt").is_file():
        raise RefineError(f"--resume: {out} is complete (student/ and report.json are written) and its Stage-2 "
                          "checkpoints were removed (neuro-mar clean), so there is nothing to continue; use a new --out "
                          "to train again, or neuro-mar eval to score the saved student")
    t_start = time.time()
    teacher, tok, train, held = prepare(cfg, progress=progress and rank == 0)
    identity = run_identity(teacher, tok, train)
    given_stage1 = None
    if cfg.from_stage1 is not None:  # checked against the teacher; its weights join the run's fingerprints
        given_stage1 = load_stage1(cfg, teacher, identity)
        identity["stage1_weights"] = _sha256_tensors(sorted(given_stage1.state_dict().items()))
    if saved_id is not None:
        changed = [k for k in identity if saved_id.get(k) != identity[k]]
        if changed:
            raise RefineError(f"--resume: the {', '.join(k.replace('_', ' ') for k in changed)} differ from those "
                              f"{out} was started with (run_identity.json); resume with the same teacher and data "
                              f"{'(and --from-stage1 model) ' if given_stage1 is not None else ''}or use a new --out")
    torch.manual_seed(cfg.seed)
    student = init_student(cfg, teacher, train) if given_stage1 is None else given_stage1
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (resume and recorded_cfg.is_file()):  # written once, after every check
            atomic_write_text(recorded_cfg, json.dumps(asdict(cfg), indent=2))
            atomic_write_text(recorded_id, json.dumps(identity, indent=2))
    if distributed:
        torch.distributed.barrier()
    teacher.to(device).requires_grad_(False)
    student.to(device)
    times_file = out / "stage_times.json"  # completed stages' wall time and tokens, kept across --resume
    recorded = json.loads(times_file.read_text()) if resume and times_file.is_file() else {}
    timings = {k: v["seconds"] for k, v in recorded.items()}
    tokens = {k: v["tokens"] for k, v in recorded.items()}
    wall_file = out / "wall_time.json"  # earlier invocations' wall time, up to their last completed stage
    wall_before = json.loads(wall_file.read_text())["seconds"] if resume and wall_file.is_file() else 0.0

    def wall() -> float:
        """Wall seconds of the whole run: earlier invocations (to their last completed stage) + this one."""
        return wall_before + time.time() - t_start

    def stage(name, model, teacher_model, fn, steps, lr, seconds=0.0):
        """Train ``model`` for one sub-stage; returns it (an unsharded copy after FSDP)."""
        if steps <= 0:
            return model
        t0 = time.time()
        trainable = cfg.train_2 if name.startswith("stage2") else cfg.train_1
        trainer = make_trainer(cfg, name, model, teacher_model, fn, steps, lr, seconds, train, out, device, progress,
                               trainable=trainable)
        tcfg = trainer.cfg
        if resume:
            trainer.try_resume()
        done_before = trainer.step
        trainer.run()
        if trainer.step > done_before or name not in timings:  # a stage finished in an earlier run keeps its time
            timings[name] = time.time() - t0
            tokens[name] = tcfg.steps * cfg.micro_batch * cfg.grad_accum * train.shape[1] * world()[1]
            if rank == 0:
                atomic_write_text(times_file, json.dumps({k: {"seconds": timings[k], "tokens": tokens[k]}
                                                          for k in timings}, indent=2))
                atomic_write_text(wall_file, json.dumps({"seconds": wall()}))
        return trainer.result().student

    stage1_dir = out / "stage1"
    if given_stage1 is not None:
        pass  # Stage 1 is the --from-stage1 model, left where it is (not copied into the run folder)
    elif resume and (stage1_dir / "config.json").is_file():
        student = MARForCausalLM.from_pretrained(stage1_dir).to(device)
    else:
        student = stage("stage1a", student, teacher, make_loss_1a(cfg), cfg.steps_1a, cfg.lr_1a, cfg.seconds_1a)
        student = stage("stage1b", student, teacher, loss_1b, cfg.steps_1b, cfg.lr_1b, cfg.seconds_1b)
        student = stage("stage1c", student, teacher, loss_1c, cfg.steps_1c, cfg.lr_1c, cfg.seconds_1c)
        if rank == 0:
            _save_model(student, tok, stage1_dir)
    if rank == 0 and not cfg.keep_checkpoints:  # what a resume needs from Stage 1 is stage1/
        for p in removable_checkpoints(out, finished_too=False):
            p.unlink(missing_ok=True)
    stage1 = student.eval()
    stage1.requires_grad_(False)
    stage2_teacher = stage1 if cfg.stage2_teacher == "stage1" else teacher
    calib = train[: cfg.micro_batch].to(device)

    def spiking_from_stage1(neuron):
        m = copy.deepcopy(stage1).requires_grad_(True)
        m.set_neurons(neuron, **(cfg.neuron_options if neuron == cfg.neuron else {}))
        m.to(device)  # the new neurons' thresholds are created on the CPU
        m.calibrate_thresholds([calib], percentile=cfg.calib_percentile)
        return m

    spiking = spiking_from_stage1(cfg.neuron)
    before = copy.deepcopy(spiking).eval()
    spiking = stage("stage2", spiking, stage2_teacher, make_loss_2(cfg), cfg.steps_2, cfg.lr_2, cfg.seconds_2)
    spiking.eval()
    ablations = {}
    for neuron in cfg.ablation_neurons:
        m = stage(f"stage2-{neuron}", spiking_from_stage1(neuron), stage2_teacher, make_loss_2(cfg), cfg.steps_2,
                  cfg.lr_2, cfg.seconds_ablation or cfg.seconds_2)
        ablations[neuron] = m.eval()
    throughput = None
    if cfg.throughput_steps > 0 and not distributed:
        from .throughput import stage2_throughput

        throughput = stage2_throughput(cfg, stage2_teacher, before, train, device, make_loss_2(cfg))
    report = None
    if rank == 0:
        _save_model(spiking, tok, out / "student")
        report = build_report(cfg, out, teacher, stage1, before, spiking, tok, held, timings, tokens,
                              wall(), ablations=ablations, throughput=throughput, progress=progress)
        atomic_write_text(wall_file, json.dumps({"seconds": report["wall_seconds"]}))
    if distributed:
        shutdown_distributed()
    return report
