"""A compact training loop for :class:`tinydiff.DiffusionModel`.

Users with their own loop only need ``model.loss(x, cond=...).mean()``; the :class:`Trainer`
adds the usual parts: shuffled minibatches, AdamW, an optional LR schedule, gradient
clipping, EMA updates, periodic callbacks, checkpoints and exact resume.

Reproducibility: with tensor data every random draw of the loop comes from two generators
owned by the trainer (``data``: the shuffling; ``noise``: t, eps and the conditioning dropout
of :meth:`DiffusionModel.loss`). Their states, torch's global RNG state (dropout inside the
network), the optimizer, scheduler, EMA, the position in the current epoch and the loss
history are all checkpointed, so a run resumed from a checkpoint reproduces the loss curve of
an uninterrupted run bitwise (same device and build). With a ``DataLoader`` the loader's own
order is not checkpointed: a resumed run restarts its iterator.

Distributed training. Under ``torchrun`` or ``accelerate launch`` (or any launcher that sets
``WORLD_SIZE``, ``RANK`` and ``MASTER_ADDR``/``MASTER_PORT``) the trainer runs unchanged: it
joins the process group (initialising it, NCCL on GPUs and gloo on CPUs, if the script has
not), puts the model on ``cuda:LOCAL_RANK`` under NCCL, wraps it in
``DistributedDataParallel`` and shards the data. ``batch_size`` is per process (the DDP
convention): with tensor data every rank draws the same permutation per epoch and takes its
own ``batch_size`` slice of each global batch of ``world_size * batch_size``, so a run equals
single-process training on the combined batch; a ``DataLoader`` without a
``DistributedSampler`` is rebuilt with one. Each rank draws its own t and eps (the ``noise``
generator is seeded per rank), the EMA is updated on rank 0 only, and rank 0 alone writes
checkpoints, which hold every rank's RNG states, so :meth:`Trainer.resume` with the same
world size continues exactly. ``history`` holds the loss averaged over the ranks.

Non-finite steps. A step whose loss or gradient norm is NaN or inf is *skipped*: the
optimizer, the LR scheduler and the EMA are not updated, so the weights stay those of the last
good step (as ``torch.amp.GradScaler`` does). Its loss still goes into ``history`` and its
number into ``skipped_steps``. After ``max_consecutive_skips`` skipped steps in a row (the run
has diverged: a NaN weight, an infinite learning rate) `Trainer.fit` stops with a
``FloatingPointError``. The check costs no extra host synchronisation: the loss and the
gradient norm are read back together, once per step, as the loss alone was for the history.
A checkpoint is never written from non-finite state: `Trainer.save` first checks the
weights, the EMA and the optimizer state and raises ``FloatingPointError`` instead of
replacing the last good checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from tinydiff._progress import progress_bar
from tinydiff._safetensors import SerializationError
from tinydiff._validation import check_device, check_int, check_number
from tinydiff.checkpoint import _holds_state, restore_checkpoint, save_checkpoint
from tinydiff.model import DiffusionModel

__all__ = ["Callback", "Trainer", "warmup_cosine"]

#: ``fn(trainer, step)``, called after optimizer step number ``step`` (1-based)
Callback = Callable[["Trainer", int], None]

#: the fields of a checkpoint's ``extra`` section that `Trainer.save` writes
_EXTRA_REQUIRED = ("history", "perm", "pos")
_EXTRA_OPTIONAL = ("loader_epoch", "skipped_steps", "world_size", "rank_rng", "rank_noise")


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` times the base LR at ``total_steps`` (Loshchilov & Hutter 2017).

    Step it once per optimizer step. Its settings are saved with the scheduler's state.
    """
    if warmup_steps < 0 or total_steps < 1 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(
            "need warmup_steps >= 0, total_steps >= 1 and 0 <= min_lr_ratio <= 1, got "
            f"{warmup_steps}, {total_steps}, {min_lr_ratio}"
        )
    return LambdaLR(optimizer, _WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


class _WarmupCosine:
    """The LR factor of `warmup_cosine`: a callable object, so ``LambdaLR.state_dict`` saves
    its fields (a plain function's would be lost). ``total_steps=None``: warm-up, then 1."""

    def __init__(self, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


#: the ``lr_scheduler`` names `Trainer` plans itself over the steps of `Trainer.fit`
_PLANNED = ("default", "warmup_cosine")


def _warmup_steps(total_steps: int) -> int:
    """Warm-up length of the planned schedule: 10% of the steps, at most 1000."""
    return min(1000, max(1, total_steps // 10))


class Trainer:
    """Train a :class:`DiffusionModel`.

    Args:
        model: the diffusion model (its EMA, if enabled, is updated after each step).
        data: a tensor (N, *input_shape), drawn in shuffled minibatches of ``batch_size``
            (one permutation per epoch, from the ``data`` generator), or an iterable of
            batches (e.g. a ``DataLoader``) yielding x, (x, cond_dict) or (x, labels).
        cond: with tensor data, optional conditioning aligned with it: a dict of tensors
            with leading dim N, or a tensor (N, ...) used as ``{cond_key: tensor}``.
        cond_key: the network keyword for a bare conditioning tensor.
        batch_size: minibatch size for tensor data, per process when distributed.
        lr: (peak) learning rate of the default optimizer; default 2e-3 with the named
            schedule (its mean over a run is 1e-3), else 1e-3 (0.2's default).
        optimizer: an optimizer over ``model.parameters()``; default
            ``AdamW(lr=lr, weight_decay=0)``.
        lr_scheduler: ``"default"`` or ``"warmup_cosine"``: linear warm-up over 10% of the
            steps (at most 1000), then cosine decay to 0 at the step count of the first
            `fit` call (planned there; a later `fit` to more steps stretches the decay and
            warns). ``"default"`` is that schedule and warns (FutureWarning) that it replaced
            0.2's constant LR; None (or ``"constant"``) keeps the LR constant. Or a scheduler,
            or a function ``optimizer -> scheduler``; stepped once per optimizer step (see
            :func:`warmup_cosine`).
        grad_clip: max gradient norm (``clip_grad_norm_``), or None.
        callbacks: ``(every_n_steps, fn)`` pairs; ``fn(trainer, step)`` runs after steps
            that are multiples of ``every_n_steps``.
        checkpoint_path: file for periodic checkpoints (``*.safetensors``).
        checkpoint_every: save every n steps (and at the end of :meth:`fit`).
        seed: seeds the trainer's ``data`` and ``noise`` generators (an int64).
        device: where batches go (default: ``cuda:LOCAL_RANK`` under NCCL, else the
            model's parameters' device).
        progress: a progress bar with the running loss (rank 0 only; throttled in logs).
        max_consecutive_skips: how many steps in a row may be skipped for a non-finite loss
            or gradient (module docstring) before `fit` raises ``FloatingPointError``;
            0 raises at the first.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (each is
            checked here, before anything is built).

    Attributes:
        step: training steps done (skipped ones included).
        history: the loss of every step (floats; the mean over ranks when distributed;
            NaN or inf for skipped steps).
        skipped_steps: the numbers of the steps skipped for a non-finite loss or gradient.
        rank, world_size: this process's rank and the number of processes (0 and 1 when
            not distributed).
        is_main_process: ``rank == 0``: the process that updates the EMA and writes
            checkpoints.
    """

    def __init__(
        self,
        model: DiffusionModel,
        data: Tensor | Iterable[Any],
        *,
        cond: dict[str, Tensor] | Tensor | None = None,
        cond_key: str = "class_labels",
        batch_size: int = 128,
        lr: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = "default",
        grad_clip: float | None = 1.0,
        callbacks: Sequence[tuple[int, Callback]] = (),
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = True,
        max_consecutive_skips: int = 10,
    ) -> None:
        if not isinstance(model, DiffusionModel):
            raise TypeError(f"model must be a tinydiff.DiffusionModel, got {type(model).__name__}")
        _check_arguments(
            data,
            cond,
            cond_key,
            batch_size,
            lr,
            optimizer,
            grad_clip,
            callbacks,
            checkpoint_path,
            checkpoint_every,
            seed,
            device,
            progress,
        )
        self.max_consecutive_skips = check_int(
            "max_consecutive_skips", max_consecutive_skips, min=0, owner="Trainer"
        )
        self.model = model
        self.rank, self.world_size = _join_process_group()
        self.is_main_process = self.rank == 0
        self.device = _resolve_device(device, model, self.world_size)
        if self.world_size > 1:
            model.to(self.device)
        self.cond_key = cond_key
        self.data: Tensor | None
        self.loader: Iterable[Any] | None
        self.cond: dict[str, Tensor] | None
        self.data, self.loader, self.cond = self._place_data(data, cond, batch_size, seed)
        self.batch_size = batch_size
        # the network DDP wraps: DiffusionModel.forward is its loss
        self._forward: torch.nn.Module = model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._forward = DistributedDataParallel(model, device_ids=ids)
        self._loader_epoch = 0
        if lr is None:
            lr = 2e-3 if isinstance(lr_scheduler, str) and lr_scheduler in _PLANNED else 1e-3
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
        self._planned = isinstance(lr_scheduler, str) and lr_scheduler in _PLANNED
        self.scheduler = _build_scheduler(lr_scheduler, self.optimizer)
        self.grad_clip = grad_clip
        self.callbacks = list(callbacks)
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.progress = progress and self.is_main_process
        # the data order is shared by all ranks; t and eps are drawn per rank
        self.data_generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator(self.device).manual_seed(
            seed + 1 + (self.rank << 32)
        )
        self.step = 0
        self.history: list[float] = []
        self.skipped_steps: list[int] = []
        self._perm: Tensor | None = None
        self._pos = 0
        self._loader_iter: Iterator[Any] | None = None

    # -- data ------------------------------------------------------------------------------
    def _place_data(
        self, data: Tensor | Iterable[Any], cond: Any, batch_size: int, seed: int
    ) -> tuple[Tensor | None, Iterable[Any] | None, dict[str, Tensor] | None]:
        """``(data, loader, cond)`` of the constructor's data, checked against each other."""
        if isinstance(data, Tensor):
            if batch_size * self.world_size > data.shape[0]:
                raise ValueError(
                    f"batch_size * world_size = {batch_size} * {self.world_size} exceeds the "
                    f"{data.shape[0]} training samples; lower batch_size"
                )
            if isinstance(cond, Tensor):
                cond = {self.cond_key: cond}
            for key, value in (cond or {}).items():
                if not isinstance(value, Tensor) or value.shape[:1] != data.shape[:1]:
                    raise ValueError(
                        f"cond[{key!r}] must be a tensor with leading dim N = {data.shape[0]}"
                    )
            return data, None, cond
        if cond is not None:
            raise ValueError("with a data loader, yield (x, cond) batches instead of cond=")
        if self.world_size > 1:
            return None, _shard_loader(data, self.rank, self.world_size, seed), None
        return None, data, None

    def _next_batch(self) -> tuple[Tensor, dict[str, Any] | None]:
        if self.data is not None:
            n = self.data.shape[0]
            global_batch = self.batch_size * self.world_size
            if global_batch > n:
                raise ValueError(
                    f"batch_size * world_size = {self.batch_size} * {self.world_size} = "
                    f"{global_batch} exceeds the {n} training samples; lower batch_size"
                )
            if self._perm is None or self._pos + global_batch > n:
                self._perm = torch.randperm(n, generator=self.data_generator)
                self._pos = 0
            start = self._pos + self.rank * self.batch_size
            idx = self._perm[start : start + self.batch_size]
            self._pos += global_batch
            x = self.data[idx]
            cond = None if self.cond is None else {k: v[idx] for k, v in self.cond.items()}
        else:
            assert self.loader is not None
            if self._loader_iter is None:
                self._loader_iter = self._new_epoch(self.loader)
            try:
                batch = next(self._loader_iter)
            except StopIteration:
                self._loader_iter = self._new_epoch(self.loader)
                try:
                    batch = next(self._loader_iter)
                except StopIteration:
                    raise ValueError(
                        "the data loader yielded no batches (an empty dataset, or drop_last=True "
                        "with fewer samples than batch_size); give the Trainer data"
                    ) from None
            x, cond = self._split_batch(batch)
        x = x.to(self.device)
        if cond is not None:
            cond = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in cond.items()}
        return x, cond

    def _new_epoch(self, loader: Iterable[Any]) -> Iterator[Any]:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self._loader_epoch)  # a new order each epoch, the same on all ranks
        self._loader_epoch += 1
        return iter(loader)

    def _split_batch(self, batch: Any) -> tuple[Tensor, dict[str, Any] | None]:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, c = batch
            if isinstance(c, dict):
                return x, c
            if isinstance(c, Tensor):
                return x, {self.cond_key: c}
        raise TypeError(
            "loader batches must be x, (x, cond_dict) or (x, cond_tensor); got "
            f"{type(batch).__name__}"
        )

    # -- loop ------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One training step; returns the batch loss.

        A non-finite loss or gradient norm skips the update (module docstring) and raises
        ``FloatingPointError`` once more than ``max_consecutive_skips`` steps in a row were
        skipped.
        """
        self.model.train()
        x, cond = self._next_batch()
        step = {"step": self.step} if getattr(self.model.objective, "uses_step", False) else {}
        loss = self._forward(x, cond=cond, generator=self.noise_generator, **step).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the ranks here
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = _grad_norm(params, loss)
        # the one host sync of a step (the history needs the loss anyway): the loss and the
        # gradient norm together; averaged gradients make the norm the same on every rank
        stats = torch.stack([loss.detach().float(), norm.detach().float().to(loss.device)])
        if self.world_size > 1:
            dist.all_reduce(stats)
        value, grad_norm = stats.tolist()
        value /= self.world_size
        self.step += 1
        self.history.append(value)
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps.append(self.step)
            if self._consecutive_skips() > self.max_consecutive_skips:
                raise FloatingPointError(
                    f"training diverged: the loss or its gradient was NaN or inf in the last "
                    f"{self._consecutive_skips()} steps (up to step {self.step}; loss {value}, "
                    f"gradient norm {grad_norm}), more than max_consecutive_skips="
                    f"{self.max_consecutive_skips}. The weights are those of the last good step "
                    "and no checkpoint was written from non-finite state. Check the data for "
                    "NaN/inf or huge values, lower the learning rate, or set grad_clip."
                )
            return value
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.model.ema is not None and self.is_main_process:
            self.model.update_ema()
        return value

    def _consecutive_skips(self) -> int:
        """How many of the last steps, up to the current one, were skipped."""
        n = 0
        for s in reversed(self.skipped_steps):
            if s != self.step - n:
                break
            n += 1
        return n

    def fit(self, num_steps: int) -> list[float]:
        """Train until ``self.step == num_steps`` (a total, so a resumed run continues).

        Returns:
            the loss history of all steps so far.

        Raises:
            FloatingPointError: training diverged (see ``max_consecutive_skips``), or a
                checkpoint would have been written from non-finite weights.
        """
        num_steps = check_int("num_steps", num_steps, min=0, max=2**63 - 1, owner="fit")
        if self._planned and self.scheduler is not None and num_steps > self.step:
            _plan(self.scheduler, num_steps)
        bar = progress_bar(
            total=num_steps, initial=self.step, enabled=self.progress, desc="training"
        )
        try:
            while self.step < num_steps:
                loss = self.train_step()
                bar.update(1)
                if self.step % 10 == 0 or self.step == num_steps:
                    bar.set_postfix(loss=f"{loss:.4f}")
                for every, fn in self.callbacks:
                    if self.step % every == 0:
                        fn(self, self.step)
                if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
                    self.save(self.checkpoint_path)  # type: ignore[arg-type]
        finally:
            bar.close()
        if self.checkpoint_path is not None and self.checkpoint_every is not None:
            self.save(self.checkpoint_path)
        return list(self.history)

    # -- state -----------------------------------------------------------------------------
    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "history": torch.tensor(self.history, dtype=torch.float64),
            "perm": self._perm,
            "pos": self._pos,
            "loader_epoch": self._loader_epoch,
            "skipped_steps": list(self.skipped_steps),
        }
        if self.world_size > 1:  # every rank's own RNG states, rows indexed by rank
            states = [torch.get_rng_state(), self.noise_generator.get_state()]
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, states)
            extra["world_size"] = self.world_size
            extra["rank_rng"] = torch.stack([g[0] for g in gathered])
            extra["rank_noise"] = torch.stack([g[1] for g in gathered])
        return extra

    def _parse_extra(self, extra: Any, step: int, where: str) -> dict[str, Any]:
        """Check every field of a checkpoint's ``extra`` section against this trainer, before
        anything is restored; returns the values to restore (see `_apply_extra`)."""
        _check_extra_fields(extra, where)
        _check_world_size(extra.get("world_size", 1), self.world_size, where)
        history = extra["history"]
        _check_history(history, step, where)
        perm, pos = extra["perm"], extra["pos"]
        _check_data_order(perm, pos, None if self.data is None else int(self.data.shape[0]), where)
        loader_epoch = extra.get("loader_epoch", 0)
        if not _is_int(loader_epoch) or loader_epoch < 0:
            raise SerializationError(
                f"{where}: loader_epoch must be an int >= 0, got {loader_epoch!r:.40}"
            )
        skipped = extra.get("skipped_steps", [])
        _check_skipped_steps(skipped, step, where)
        out = {
            "history": [float(v) for v in history.tolist()],
            "perm": perm,
            "pos": pos,
            "loader_epoch": loader_epoch,
            "skipped_steps": list(skipped),
        }
        if self.world_size > 1:
            out.update(self._parse_rank_states(extra, where))
        return out

    def _parse_rank_states(self, extra: dict[str, Any], where: str) -> dict[str, Tensor]:
        """This rank's rows of the per-rank RNG states of a distributed run's ``extra``."""
        out = {}
        for key, like in (
            ("rank_rng", torch.get_rng_state()),
            ("rank_noise", self.noise_generator.get_state()),
        ):
            value = extra.get(key)
            if (
                not isinstance(value, Tensor)
                or value.dtype != torch.uint8
                or value.shape != (self.world_size, like.numel())
            ):
                raise SerializationError(
                    f"{where}: {key} must be a uint8 tensor of one RNG state per rank"
                )
            out[key] = value[self.rank].clone()
        return out

    def _apply_extra(self, parsed: dict[str, Any]) -> None:
        self.history = parsed["history"]
        self.skipped_steps = parsed["skipped_steps"]
        self._perm = parsed["perm"]
        self._pos = parsed["pos"]
        self._loader_epoch = parsed["loader_epoch"]
        self._loader_iter = None
        if self.world_size > 1:
            torch.set_rng_state(parsed["rank_rng"])
            self.noise_generator.set_state(parsed["rank_noise"])

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy) of everything needed to resume: model, EMA, optimizer,
        scheduler, step, RNG states, data order, loss history."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "ema": None if self.model.ema is None else self.model.ema_state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "step": self.step,
                "rng": torch.get_rng_state(),
                "generators": {
                    "data": self.data_generator.get_state(),
                    "noise": self.noise_generator.get_state(),
                },
                **self._extra(),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s output (its data-order fields are checked first)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from Trainer.state_dict(), got {state!r:.60}")
        if self._planned and self.scheduler is not None and state.get("scheduler") is None:
            self._drop_planned_schedule("the trainer state")
        if (state.get("scheduler") is None) != (self.scheduler is None):
            raise ValueError(
                "the state has "
                + ("no " if state.get("scheduler") is None else "")
                + "LR scheduler state and this Trainer has "
                + ("none" if self.scheduler is None else "one")
                + "; build the Trainer with the same lr_scheduler as the one that saved it"
            )
        step: Any = state.get("step")
        if not _is_int(step) or step < 0:
            raise ValueError(f"state['step'] must be an int >= 0, got {step!r:.40}")
        keys = _EXTRA_REQUIRED + _EXTRA_OPTIONAL
        parsed = self._parse_extra(
            {k: v for k, v in state.items() if k in keys}, step, "the trainer state"
        )
        self.model.load_state_dict(state["model"])
        if state["ema"] is not None:
            self.model.load_ema_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = step
        torch.set_rng_state(state["rng"])
        self.data_generator.set_state(state["generators"]["data"])
        self.noise_generator.set_state(state["generators"]["noise"])
        self._apply_extra(parsed)

    def _drop_planned_schedule(self, where: str) -> None:
        """Resume state saved without a scheduler (by tinydiff 0.2's default Trainer, or with
        ``lr_scheduler=None``) into a Trainer with the named schedule: keep training as that
        run did, at a constant LR, and say so (the scheduler state is not restored)."""
        warnings.warn(
            f"{where} was trained at a constant LR (it holds no LR scheduler state, as tinydiff "
            "0.2's Trainer wrote by default); resuming it at a constant LR instead of the "
            "warm-up + cosine schedule. Pass lr_scheduler=None to say so and silence this.",
            UserWarning,
            stacklevel=3,
        )
        self.scheduler = None
        self._planned = False

    def _generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator, "noise": self.noise_generator}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint (atomic; see :mod:`tinydiff.checkpoint`).

        When distributed, call it on every rank (it gathers their RNG states); rank 0 writes
        the file and the others wait until it is complete.

        Raises:
            FloatingPointError: the weights, the EMA or the optimizer state hold NaN or inf;
                nothing is written, so the last good checkpoint stays.
        """
        _check_path(path, "path")
        bad = _first_non_finite(self)
        if self.world_size > 1:  # every rank raises, or none: no rank waits at a barrier
            flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
            dist.all_reduce(flag)
            if bad is None and flag.item() > 0:
                bad = "the state of another rank"
        if bad is not None:
            raise FloatingPointError(
                f"refusing to write a checkpoint at step {self.step}: {bad} holds NaN or inf "
                "(the run diverged; the last checkpoint written stays as it was). Lower the "
                "learning rate, check the data, or resume from the last checkpoint."
            )
        extra = self._extra()
        if self.is_main_process:
            save_checkpoint(
                path,
                self.model,
                self.optimizer,
                self.scheduler,
                step=self.step,
                extra=extra,
                generators=self._generators(),
            )
        if self.world_size > 1:
            dist.barrier()

    def resume(self, path: str | os.PathLike[str]) -> int:
        """Restore a checkpoint written by :meth:`save`; returns the step.

        Atomic: the file (opened once) and every field of it, the data order and loss history
        included, are checked before the model, optimizer, scheduler, RNG states or step
        change; on any error nothing was restored. LR scheduler state must be present exactly
        when this Trainer has a scheduler.

        When distributed, every rank reads the file (it must be on a shared file system) and
        restores its own RNG states; the world size must be the one that wrote it.

        Raises:
            FileNotFoundError: no such file.
            SerializationError: a file that is not a valid checkpoint, or does not match
                this trainer (model, EMA, optimizer, scheduler, data); a ValueError.
            ValueError: another world size.
        """
        _check_path(path, "path")
        where = f"checkpoint {os.fspath(path)}"
        if self._planned and self.scheduler is not None and not _holds_state(path, "scheduler"):
            self._drop_planned_schedule(where)
        step, parsed = restore_checkpoint(
            path,
            self.model,
            self.optimizer,
            self.scheduler,
            generators=self._generators(),
            exact=True,
            check_extra=lambda extra, step: self._parse_extra(extra, step, where),
        )
        self.step = step
        self._apply_extra(parsed)
        return self.step


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- the fields of a checkpoint's extra section (Trainer._parse_extra) ---------------------------


def _check_extra_fields(extra: Any, where: str) -> None:
    """``extra`` is a dict with the fields `Trainer.save` writes, and no others."""
    if not isinstance(extra, dict):
        raise SerializationError(f"{where}: extra must be a dict, got {type(extra).__name__}")
    missing = [k for k in _EXTRA_REQUIRED if k not in extra]
    unknown = sorted(k for k in extra if k not in _EXTRA_REQUIRED + _EXTRA_OPTIONAL)
    if missing or unknown:
        raise SerializationError(
            f"{where} was not written by Trainer.save: its extra section lacks "
            f"{missing or 'nothing'} and has unknown fields {unknown or 'none'}; restore "
            "weights only with tinydiff.load_checkpoint"
        )


def _check_world_size(saved_world: Any, world_size: int, where: str) -> None:
    """The saved world size is valid and the one of this run."""
    if not _is_int(saved_world) or saved_world < 1:
        raise SerializationError(f"{where}: world_size must be an int >= 1, got {saved_world!r}")
    if saved_world != world_size:
        raise ValueError(
            f"this checkpoint was written by {saved_world} process(es) and this run has "
            f"world_size={world_size}; exact resume needs the same number of processes "
            f"(relaunch with --nproc_per_node={saved_world}), or load only the weights "
            "with tinydiff.load_checkpoint"
        )


def _check_history(history: Any, step: int, where: str) -> None:
    """``history`` is a float64 tensor of one loss per step."""
    if (
        not isinstance(history, Tensor)
        or history.dtype != torch.float64
        or history.dim() != 1
        or history.numel() != step
    ):
        got = (
            f"{history.dtype} {list(history.shape)}"
            if isinstance(history, Tensor)
            else type(history).__name__
        )
        raise SerializationError(
            f"{where}: history must be a float64 tensor of one loss per step ({step}), got "
            f"{got}; the file is corrupt"
        )


def _check_data_order(perm: Any, pos: Any, n: int | None, where: str) -> None:
    """``perm`` (None or a permutation of the ``n`` samples; ``n`` is None for a loader) and
    ``pos``, the position in it."""
    if perm is not None:
        if n is None:
            raise ValueError(
                f"{where} was written by a Trainer on tensor data (it holds the data order); "
                "this one reads a data loader: resume it with the same kind of data"
            )
        if (
            not isinstance(perm, Tensor)
            or perm.dtype != torch.int64
            or perm.shape != (n,)
            or not torch.equal(perm.sort().values, torch.arange(n))
        ):
            raise SerializationError(
                f"{where}: perm must be a permutation of the {n} training samples; the "
                "checkpoint was written for other data, or is corrupt"
            )
    limit = 0 if perm is None else n
    if not _is_int(pos) or not 0 <= pos <= limit:  # type: ignore[operator]
        raise SerializationError(
            f"{where}: pos (the position in the epoch) must be an int in 0..{limit}, got "
            f"{pos!r:.40}; the checkpoint was written for other data, or is corrupt"
        )


def _check_skipped_steps(skipped: Any, step: int, where: str) -> None:
    """``skipped`` is a list of increasing step numbers in 1..step."""
    if (
        not isinstance(skipped, list)
        or not all(_is_int(s) and 1 <= s <= step for s in skipped)
        or any(a >= b for a, b in itertools.pairwise(skipped))
    ):
        raise SerializationError(
            f"{where}: skipped_steps must be increasing step numbers in 1..{step}, got "
            f"{skipped!r:.80}"
        )


def _check_path(path: Any, name: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")


def _grad_norm(params: list[torch.nn.Parameter], loss: Tensor) -> Tensor:
    """The 2-norm of all gradients (a tensor: no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return loss.new_zeros(())
    norms = [torch.linalg.vector_norm(g.detach()).to(loss.device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def _first_non_finite(trainer: Trainer) -> str | None:
    """The name of the first floating-point tensor of the state a checkpoint would hold
    (weights, EMA, optimizer state) that has a NaN or inf; None if all are finite."""
    named: list[tuple[str, Tensor]] = [
        (f"model weight {k!r}", v) for k, v in trainer.model.state_dict().items()
    ]
    if trainer.model.ema is not None:
        named += [(f"EMA tensor {k!r}", v) for k, v in trainer.model.ema_state_dict().items()]
    for i, state in enumerate(trainer.optimizer.state.values()):
        named += [
            (f"optimizer state {k!r} of parameter {i}", v)
            for k, v in state.items()
            if isinstance(v, Tensor)
        ]
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel() > 0]
    if not named:
        return None
    ok = torch.stack([t.detach().isfinite().all().cpu() for _, t in named])
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


def _resolve_device(
    device: torch.device | str | None, model: DiffusionModel, world_size: int
) -> torch.device:
    """``device``; by default ``cuda:LOCAL_RANK`` under NCCL, else the model's device."""
    if device is not None:
        return torch.device(device)
    if world_size > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return _module_device(model)


def _build_scheduler(lr_scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """The scheduler that ``lr_scheduler`` gives (a name, itself, or a function's result),
    checked. The named schedule starts unplanned (warm-up 0, no decay): `Trainer.fit` plans it."""
    if isinstance(lr_scheduler, str):
        if lr_scheduler == "constant":
            return None
        if lr_scheduler not in _PLANNED:
            raise ValueError(
                "lr_scheduler must be 'default', 'warmup_cosine', 'constant', None, a scheduler "
                f"or a function optimizer -> scheduler; got {lr_scheduler!r}"
            )
        if lr_scheduler == "default":
            warnings.warn(
                "Trainer's default lr_scheduler is now a warm-up + cosine decay over the steps "
                "of fit() from a peak lr of 2e-3 (tinydiff 0.3; 0.2 kept lr=1e-3 constant): "
                "measured on the toy sets and digits it trains a better model in the same "
                "steps. Pass lr_scheduler='warmup_cosine' to keep it and silence this warning, "
                "or lr_scheduler=None for 0.2's constant 1e-3.",
                FutureWarning,
                stacklevel=3,
            )
        return LambdaLR(optimizer, _WarmupCosine(0, None, 0.0))
    scheduler = (
        lr_scheduler(optimizer)
        if callable(lr_scheduler) and not hasattr(lr_scheduler, "state_dict")
        else lr_scheduler
    )
    if scheduler is not None and not all(
        callable(getattr(scheduler, m, None)) for m in ("step", "state_dict", "load_state_dict")
    ):
        raise TypeError(
            "lr_scheduler must be None, an LR scheduler (with step, state_dict and "
            "load_state_dict) or a function optimizer -> scheduler; got "
            f"{type(scheduler).__name__}"
        )
    return scheduler


def _plan(scheduler: LambdaLR, total_steps: int) -> None:
    """Plan the Trainer's named schedule over ``total_steps`` (or stretch it, with a warning),
    and set the optimizer's LR to the planned value at the scheduler's current step."""
    fn = scheduler.lr_lambdas[0]
    assert isinstance(fn, _WarmupCosine)
    if fn.total_steps is not None and total_steps <= fn.total_steps:
        return
    step = scheduler.last_epoch
    before = fn(step)
    if fn.total_steps is None:
        fn.warmup_steps = _warmup_steps(total_steps)
    else:
        warnings.warn(
            f"the LR schedule was planned for {fn.total_steps} steps (the first fit() call); "
            f"fit({total_steps}) stretches its cosine decay to {total_steps} steps, so the LR "
            f"factor at step {step} rises from {before:.3g} to "
            f"{_WarmupCosine(fn.warmup_steps, total_steps, fn.min_lr_ratio)(step):.3g}. Call "
            "fit() once with the total, or pass your own lr_scheduler.",
            UserWarning,
            stacklevel=3,
        )
    fn.total_steps = total_steps
    lrs = [base * fn(step) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def _check_arguments(
    data: Any,
    cond: Any,
    cond_key: Any,
    batch_size: Any,
    lr: Any,
    optimizer: Any,
    grad_clip: Any,
    callbacks: Any,
    checkpoint_path: Any,
    checkpoint_every: Any,
    seed: Any,
    device: Any,
    progress: Any,
) -> None:
    """Every Trainer argument but the model and the scheduler, before anything is built."""
    owner = "Trainer"
    if isinstance(data, Tensor):
        if data.dim() < 1 or data.shape[0] < 1:
            raise ValueError(
                f"data must be a tensor (N, *input_shape) with N >= 1 samples, got shape "
                f"{list(data.shape)}"
            )
        if not data.is_floating_point():
            raise TypeError(f"data must be a floating-point tensor, got {data.dtype}")
    elif not isinstance(data, Iterable) or isinstance(data, (str, bytes, dict)):
        raise TypeError(
            "data must be a tensor (N, *input_shape) or an iterable of batches (e.g. a "
            f"DataLoader), got {type(data).__name__}"
        )
    if not isinstance(cond_key, str):
        raise TypeError(f"cond_key must be a str, got {type(cond_key).__name__}")
    if cond is not None and not isinstance(cond, (Tensor, dict)):
        raise TypeError(
            f"cond must be None, a tensor or a dict of tensors, got {type(cond).__name__}"
        )
    if isinstance(cond, dict) and not all(isinstance(k, str) for k in cond):
        raise TypeError("cond must have str keys (the network's keyword arguments)")
    check_int("batch_size", batch_size, min=1, owner=owner)
    if lr is not None and check_number("lr", lr, min=0.0, owner=owner) == 0.0:
        raise ValueError(f"{owner} lr must be > 0, got {lr!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if grad_clip is not None and check_number("grad_clip", grad_clip, owner=owner) <= 0:
        raise ValueError(
            f"{owner} grad_clip must be a max gradient norm > 0 (or None: no clipping), got "
            f"{grad_clip!r}; a norm <= 0 would freeze or reverse training"
        )
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        raise TypeError("callbacks must be a sequence of (every_n_steps, fn) pairs")
    for item in callbacks:
        if (
            not isinstance(item, (tuple, list))
            or len(item) != 2
            or not _is_int(item[0])
            or item[0] < 1
            or not callable(item[1])
        ):
            raise ValueError(
                f"callbacks must be (every_n_steps >= 1, fn(trainer, step)) pairs, got {item!r:.80}"
            )
    if checkpoint_path is not None:
        _check_path(checkpoint_path, "checkpoint_path")
        if os.path.isdir(checkpoint_path):
            raise ValueError(
                f"checkpoint_path {os.fspath(checkpoint_path)} is a directory; give a file path "
                "(e.g. run.safetensors)"
            )
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, min=1, owner=owner)
        if checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
    check_int("seed", seed, min=-(2**63), max=2**63 - 1, owner=owner)
    check_device(device)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")


# -- distributed helpers ----------------------------------------------------------------------


def _module_device(model: DiffusionModel) -> torch.device:
    """The device of the network's first floating-point parameter or buffer (CPU if none)."""
    for p in [*model.nn_module.parameters(), *model.nn_module.buffers()]:
        if p.is_floating_point():
            return p.device
    return torch.device("cpu")


def _join_process_group() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, or by initialising one when a
    launcher (torchrun, accelerate launch) set ``WORLD_SIZE`` > 1; (0, 1) otherwise."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or accelerate "
                "launch, or call torch.distributed.init_process_group() before the Trainer"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _shard_loader(loader: Iterable[Any], rank: int, world: int, seed: int) -> Iterable[Any]:
    """A DataLoader rebuilt with a DistributedSampler (unless it has one); other iterables
    are assumed to be sharded by the caller."""
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError(
            "a DataLoader with batch_size=None (a custom batch_sampler) cannot be sharded "
            "automatically; give it a DistributedSampler yourself"
        )
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,  # type: ignore[arg-type]
        num_replicas=world,
        rank=rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )
