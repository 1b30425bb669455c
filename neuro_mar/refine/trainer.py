"""A small, exact trainer: AdamW with warm-up and cosine decay, gradient accumulation, bf16
autocast on GPU, seeded data order, atomic checkpoints and bit-exact resume, progress bar with
tokens/s, JSON-lines metrics, and data parallelism through torch.distributed (torchrun).

Data order: epoch e visits the rows in ``randperm(n, seed + e)``; a global batch is
``micro_batch * grad_accum * world_size`` consecutive rows of that order, rank r taking its slice,
so the order is a function of (seed, step) alone and a resumed run sees exactly what an
uninterrupted one would.
"""
from __future__ import annotations

import functools
import gc
import json
import math
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..io_utils import atomic_torch_save, atomic_write_text


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 3e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    micro_batch: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    ckpt_every: int = 50
    bf16: bool = True  # autocast on CUDA only
    fsdp: bool = False  # shard parameters, gradients and optimizer state across processes (FSDP2)
    max_seconds: float = 0.0  # > 0: cut `steps` to what fits this wall time (see Trainer._budget_tick)

    def budgeted(self) -> bool:
        return self.max_seconds > 0

    def validate(self) -> None:
        for k in ("steps", "micro_batch", "grad_accum", "ckpt_every"):
            if getattr(self, k) < (0 if k == "steps" else 1):
                raise ValueError(f"TrainConfig.{k} must be positive, got {getattr(self, k)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.max_seconds < 0:
            raise ValueError(f"TrainConfig.max_seconds must be >= 0, got {self.max_seconds}")


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was not finite: the stage stopped before the update, and the
    last checkpoint written (if any) holds the last good weights."""


#: steps timed before a time budget first fixes the number of steps (the first one, which compiles
#: kernels and warms caches, is not counted); the estimate is renewed every BUDGET_RECHECK steps
BUDGET_PROBE_STEPS = 4
BUDGET_RECHECK = 10


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        span = max(1, cfg.steps - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown_distributed() -> None:
    """Destroy the process group (a gloo group left alive can abort the process at exit).

    Release every Trainer first: a DistributedDataParallel wrapper that outlives the group aborts
    the process at exit ("terminate called without an active exception", about one run in five with
    gloo); unreachable ones are collected here before the group goes."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


@functools.lru_cache(maxsize=8)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def batch_rows(n_rows: int, step: int, micro: int, cfg: TrainConfig, rank: int, world_size: int) -> torch.Tensor:
    """Row indices of micro-batch ``micro`` of ``step`` for ``rank`` (see module docstring)."""
    per_step = cfg.micro_batch * cfg.grad_accum * world_size
    start = step * per_step + (micro * world_size + rank) * cfg.micro_batch
    idx = []
    for pos in range(start, start + cfg.micro_batch):
        epoch, off = divmod(pos, n_rows)
        idx.append(int(_epoch_order(n_rows, cfg.seed, epoch)[off]))
    return torch.tensor(idx, dtype=torch.long)


#: what every checkpoint the trainer writes holds
CHECKPOINT_KEYS = frozenset({"step", "module", "opt", "sched", "cfg", "history", "rng"})


class Trainer:
    """Trains ``module`` (its parameters with requires_grad) on ``rows [n, L]`` by minimising
    ``loss_fn(module, batch) -> scalar``. One trainer per stage; ``name`` names its checkpoint.

    With several processes the module is wrapped in DistributedDataParallel, or with
    ``cfg.fsdp`` sharded with FSDP2 (``fully_shard`` on each of ``shard_units`` and the root);
    :meth:`result` then returns an unsharded copy holding the trained weights."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable, rows: torch.Tensor, cfg: TrainConfig,
                 out_dir: Path | None, name: str, progress: bool = True, device=None, shard_units=None):
        cfg.validate()
        self.module, self.loss_fn, self.rows, self.cfg, self.name = module, loss_fn, rows, cfg, name
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rank, self.world = world()
        self.device = device or next(module.parameters()).device
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"stage {name}: nothing to train (no parameter requires grad)")
        self.model = module
        self.sharded = cfg.fsdp and self.world > 1
        self._plain = None
        if self.sharded:
            import copy

            from torch.distributed.fsdp import fully_shard

            self._plain = copy.deepcopy(module)  # receives the full weights at the end
            for unit in (shard_units(module) if shard_units else []):
                fully_shard(unit)
            fully_shard(module)
        elif self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # one fused kernel per step on a GPU instead of the foreach default's several per group of
        # tensors (benchmarks/stage2_profile.py); FSDP2's sharded parameters keep the foreach path
        fused = self.device.type == "cuda" and not self.sharded
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                     fused=fused or None)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        self.budget_elapsed = 0.0  # wall seconds of this stage counted against cfg.max_seconds
        self.progress = progress and self.rank == 0
        self.history: list[dict] = []

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path | None:
        return self.out_dir / "checkpoints" / f"{self.name}.pt" if self.out_dir else None

    def _full_state(self, every_rank: bool = False):
        """(model, optimizer) state dicts, gathered in full when sharded: on rank 0 only (offloaded to
        CPU) or, with ``every_rank``, on every rank."""
        if not self.sharded:
            return self.module.state_dict(), self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        return (get_model_state_dict(self.module, options=opts),
                get_optimizer_state_dict(self.module, self.opt, options=opts))

    def result(self) -> torch.nn.Module:
        """The trained module, unsharded (the module itself unless FSDP sharded it)."""
        if not self.sharded:
            return self.module
        model_sd, _ = self._full_state(every_rank=True)
        self._plain.load_state_dict({k: v.detach().cpu() for k, v in model_sd.items()})
        self._plain.to(self.device)
        return self._plain

    def save(self) -> None:
        if self.ckpt_path is None:
            return
        model_sd, opt_sd = self._full_state()  # collective when sharded: every rank takes part
        if self.rank != 0:
            return
        atomic_torch_save({"step": self.step, "budget_elapsed": self.budget_elapsed, "module": model_sd, "opt": opt_sd,
                           "sched": self.sched.state_dict(), "history": self.history,
                           "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                   "numpy": _numpy_state(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                           "cfg": asdict(self.cfg)}, self.ckpt_path)

    def try_resume(self) -> bool:
        p = self.ckpt_path
        if p is None or not p.is_file():
            return False
        try:  # tensors and plain containers only: a checkpoint never runs code when it is loaded
            state = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's own text would advise weights_only=False: never do that
            raise ValueError(f"checkpoint {p} cannot be read as plain weights: it holds more than tensors and plain "
                             "containers, so it is not a checkpoint this trainer wrote, or it was tampered with; it "
                             "is not loaded: delete it to restart the stage, or use a new --out") from None
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError... on a damaged file
            raise ValueError(f"checkpoint {p} cannot be read as plain weights ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); it is damaged or not one this "
                             f"trainer wrote: delete it to restart the stage, or use a new --out") from None
        damaged = (f"checkpoint {p} is not one this trainer wrote or is damaged ({{}}); delete it to restart the "
                   "stage, or use a new --out")
        if not isinstance(state, dict):
            raise ValueError(damaged.format(f"it holds {type(state).__name__}"))
        missing = sorted(CHECKPOINT_KEYS - set(state))
        if missing:
            raise ValueError(damaged.format(f"no {', '.join(missing)}"))
        if not isinstance(state["module"], dict) or not isinstance(state["cfg"], dict):
            raise ValueError(damaged.format("its weights or configuration are not a mapping"))
        from ..models.checks import is_finite

        bad = [k for k, t in state["module"].items() if not isinstance(t, torch.Tensor)
               or (t.is_floating_point() and not is_finite(t))]
        if bad:  # a diverged or tampered state would train on, or be saved as the result
            raise ValueError(damaged.format(f"{len(bad)} weight tensor(s) not finite or not tensors: "
                                            f"{', '.join(bad[:3])}"))
        saved, mine = dict(state["cfg"]), asdict(self.cfg)
        if self.cfg.budgeted():  # the budget may have cut the steps: take the checkpoint's
            saved_steps = saved.pop("steps")
            mine.pop("steps")
        if saved != mine:
            raise ValueError(f"checkpoint {p} was written with a different training configuration "
                             f"({state['cfg']}); resume with the same options or use a new --out")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.module, state["module"], options=opts)
            set_optimizer_state_dict(self.module, self.opt, state["opt"], options=opts)
        else:
            self.module.load_state_dict(state["module"])
            self.opt.load_state_dict(state["opt"])
        if self.cfg.budgeted():
            self.cfg.steps = saved_steps
        self.sched.load_state_dict(state["sched"])
        self.step, self.history = state["step"], state["history"]
        self._drop_metrics_after(self.step)
        self.budget_elapsed = state.get("budget_elapsed", 0.0)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        _set_numpy_state(state["rng"]["numpy"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return True

    def _drop_metrics_after(self, step: int) -> None:
        """Remove this stage's metric rows past ``step`` (written after the checkpoint resumed
        from), so the resumed steps are logged once."""
        path = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        if self.rank != 0 or path is None or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill: dropped
                continue
            if not (rec.get("stage") == self.name and rec.get("step", 0) > step):
                keep.append(line if line.endswith("\n") else line + "\n")
        if keep != lines:
            atomic_write_text(path, "".join(keep))

    # -- training ---------------------------------------------------------------------------------
    def _check_finite(self, loss: float, grad_norm: float | None) -> None:
        """Stop before the update when the step's loss or gradient norm is NaN or infinite (every
        rank sees the same reduced values, so every rank stops)."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return
        p = self.ckpt_path
        kept = (f"the last good checkpoint {p} is kept" if p is not None and p.is_file()
                else "no checkpoint of this stage had been written")
        raise TrainingDiverged(f"stage {self.name} diverged at step {self.step + 1}: loss {loss}, gradient norm "
                               f"{grad_norm} ({kept}); start a new run (a new --out: a --resume keeps the options "
                               f"it was started with) with a lower learning rate, or check the loss options "
                               f"(temperature, weights) and the data")

    def _metrics(self, rec: dict) -> None:
        self.history.append(rec)
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def run(self, stop_after: int | None = None) -> list[dict]:
        """Train until ``cfg.steps`` (or ``stop_after`` more steps, for tests of resume)."""
        cfg = self.cfg
        self.module.train()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True)
        autocast = self.device.type == "cuda" and cfg.bf16
        target = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        self._session_start, self._mark = self.step, None
        while self.step < target:
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=self.device)
            tokens = 0
            for micro in range(cfg.grad_accum):
                idx = batch_rows(self.rows.shape[0], self.step, micro, cfg, self.rank, self.world)
                batch = self.rows[idx].to(self.device)
                tokens += batch.numel() * self.world
                sync = micro == cfg.grad_accum - 1 or self.world == 1
                if self.sharded:
                    self.module.set_requires_gradient_sync(sync)
                ctx = self.model.no_sync() if (self.world > 1 and not sync and not self.sharded) else _null()
                with ctx, torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = self.loss_fn(self.model, batch) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if self.world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= self.world
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            if norm is not None and hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            self._check_finite(float(loss_sum), None if norm is None else float(norm))
            self.opt.step()
            self.sched.step()
            self.step += 1
            dt = time.perf_counter() - t0
            rec = {"stage": self.name, "step": self.step, "loss": float(loss_sum), "lr": self.sched.get_last_lr()[0],
                   "tokens": tokens, "tokens_per_s": tokens / dt, "seconds": dt,
                   "grad_norm": float(norm) if norm is not None else None}
            self._metrics(rec)
            if cfg.budgeted():
                target = self._budget_tick(target, stop_after, bar)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        if bar is not None:
            bar.close()
        return self.history

    def _budget_tick(self, target: int, stop_after: int | None, bar) -> int:
        """Account the wall time of the step just taken against ``cfg.max_seconds`` and, after
        BUDGET_PROBE_STEPS steps of this process and every BUDGET_RECHECK steps after, cut
        ``cfg.steps`` to what still fits at this process's mean wall seconds per step (checkpoint
        writes included; each process's first step, which compiles kernels, is not counted).
        Steps are only ever cut; the cosine schedule follows; all ranks agree (rank 0's figure is
        broadcast); the time spent survives a resume through the checkpoint."""
        now = time.perf_counter()
        done = self.step - self._session_start
        if self._mark is None:
            self._mark = self._last = now
            return target
        self.budget_elapsed += now - self._last
        self._last = now
        if done < BUDGET_PROBE_STEPS or (done - BUDGET_PROBE_STEPS) % BUDGET_RECHECK:
            return target
        per_step = (now - self._mark) / (done - 1)
        remaining = self.cfg.max_seconds - self.budget_elapsed
        steps = min(self.cfg.steps, self.step + max(0, int(remaining / max(per_step, 1e-9))))
        if self.world > 1:
            t = torch.tensor([steps], device=self.device)
            dist.broadcast(t, 0)
            steps = int(t)
        self.cfg.steps = steps
        if bar is not None:
            bar.total = steps
            bar.refresh()
        return steps if stop_after is None else min(steps, target)


def _numpy_state() -> dict:
    """NumPy's global RNG state as tensors and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(s: dict) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
