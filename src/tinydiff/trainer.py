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
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from tinydiff.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from tinydiff.model import DiffusionModel

__all__ = ["Callback", "Trainer", "warmup_cosine"]

#: ``fn(trainer, step)``, called after optimizer step number ``step`` (1-based)
Callback = Callable[["Trainer", int], None]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` times the base LR at ``total_steps`` (Loshchilov & Hutter 2017).

    Step it once per optimizer step.
    """
    if warmup_steps < 0 or total_steps < 1 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(
            "need warmup_steps >= 0, total_steps >= 1 and 0 <= min_lr_ratio <= 1, got "
            f"{warmup_steps}, {total_steps}, {min_lr_ratio}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


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
        lr: learning rate of the default optimizer.
        optimizer: an optimizer over ``model.parameters()``; default
            ``AdamW(lr=lr, weight_decay=0)``.
        lr_scheduler: a scheduler, or a function ``optimizer -> scheduler``; stepped once
            per optimizer step (see :func:`warmup_cosine`).
        grad_clip: max gradient norm (``clip_grad_norm_``), or None.
        callbacks: ``(every_n_steps, fn)`` pairs; ``fn(trainer, step)`` runs after steps
            that are multiples of ``every_n_steps``.
        checkpoint_path: file for periodic checkpoints (``*.safetensors``).
        checkpoint_every: save every n steps (and at the end of :meth:`fit`).
        seed: seeds the trainer's ``data`` and ``noise`` generators.
        device: where batches go (default: ``cuda:LOCAL_RANK`` under NCCL, else the
            model's parameters' device).
        progress: tqdm bar with the running loss (rank 0 only).

    Attributes:
        step: optimizer steps done.
        history: the loss of every step (floats; the mean over ranks when distributed).
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
        lr: float = 1e-3,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        grad_clip: float | None = 1.0,
        callbacks: Sequence[tuple[int, Callback]] = (),
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, DiffusionModel):
            raise TypeError(f"model must be a tinydiff.DiffusionModel, got {type(model).__name__}")
        self.model = model
        self.rank, self.world_size = _join_process_group()
        self.is_main_process = self.rank == 0
        if device is not None:
            self.device = torch.device(device)
        elif self.world_size > 1 and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = _module_device(model)
        if self.world_size > 1:
            model.to(self.device)
        self.cond_key = cond_key
        if isinstance(data, Tensor):
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self.data: Tensor | None = data
            self.loader: Iterable[Any] | None = None
            if isinstance(cond, Tensor):
                cond = {cond_key: cond}
            for key, value in (cond or {}).items():
                if not isinstance(value, Tensor) or value.shape[:1] != data.shape[:1]:
                    raise ValueError(
                        f"cond[{key!r}] must be a tensor with leading dim N = {data.shape[0]}"
                    )
            self.cond = cond
        else:
            if cond is not None:
                raise ValueError("with a data loader, yield (x, cond) batches instead of cond=")
            self.data, self.loader, self.cond = None, data, None
            if self.world_size > 1:
                self.loader = _shard_loader(data, self.rank, self.world_size, seed)
        self.batch_size = batch_size
        # the network DDP wraps: DiffusionModel.forward is its loss
        self._forward: torch.nn.Module = model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._forward = DistributedDataParallel(model, device_ids=ids)
        self._loader_epoch = 0
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
        self.scheduler = (
            lr_scheduler(self.optimizer)
            if callable(lr_scheduler) and not hasattr(lr_scheduler, "state_dict")
            else lr_scheduler
        )
        self.grad_clip = grad_clip
        self.callbacks = list(callbacks)
        for every, fn in self.callbacks:
            if not isinstance(every, int) or every < 1 or not callable(fn):
                raise ValueError("callbacks must be (every_n_steps >= 1, fn(trainer, step)) pairs")
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
        self.progress = progress and self.is_main_process
        # the data order is shared by all ranks; t and eps are drawn per rank
        self.data_generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator(self.device).manual_seed(
            seed + 1 + (self.rank << 32)
        )
        self.step = 0
        self.history: list[float] = []
        self._perm: Tensor | None = None
        self._pos = 0
        self._loader_iter: Iterator[Any] | None = None

    # -- data ------------------------------------------------------------------------------
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
                batch = next(self._loader_iter)
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
        """One optimizer step; returns the batch loss."""
        self.model.train()
        x, cond = self._next_batch()
        loss = self._forward(x, cond=cond, generator=self.noise_generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the ranks here
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.model.ema is not None and self.is_main_process:
            self.model.update_ema()
        self.step += 1
        loss = loss.detach()
        if self.world_size > 1:
            dist.all_reduce(loss)
            loss = loss / self.world_size
        value = float(loss)
        self.history.append(value)
        return value

    def fit(self, num_steps: int) -> list[float]:
        """Train until ``self.step == num_steps`` (a total, so a resumed run continues).

        Returns:
            the loss history of all steps so far.
        """
        bar = tqdm(total=num_steps, initial=self.step, disable=not self.progress, desc="training")
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
        }
        if self.world_size > 1:  # every rank's own RNG states, rows indexed by rank
            states = [torch.get_rng_state(), self.noise_generator.get_state()]
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, states)
            extra["world_size"] = self.world_size
            extra["rank_rng"] = torch.stack([g[0] for g in gathered])
            extra["rank_noise"] = torch.stack([g[1] for g in gathered])
        return extra

    def _check_world_size(self, extra: dict[str, Any]) -> None:
        saved_world = int(extra.get("world_size", 1))
        if saved_world != self.world_size:
            raise ValueError(
                f"this checkpoint was written by {saved_world} process(es) and this run has "
                f"world_size={self.world_size}; exact resume needs the same number of processes "
                f"(relaunch with --nproc_per_node={saved_world}), or load only the weights "
                "with tinydiff.load_checkpoint"
            )

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self._check_world_size(extra)
        self.history = [float(v) for v in extra["history"].tolist()]
        self._perm = extra["perm"]
        self._pos = int(extra["pos"])
        self._loader_epoch = int(extra.get("loader_epoch", 0))
        self._loader_iter = None
        if self.world_size > 1:
            torch.set_rng_state(extra["rank_rng"][self.rank].clone())
            self.noise_generator.set_state(extra["rank_noise"][self.rank].clone())

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
        """Restore :meth:`state_dict`'s output."""
        self.model.load_state_dict(state["model"])
        if state["ema"] is not None:
            self.model.load_ema_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        self.data_generator.set_state(state["generators"]["data"])
        self.noise_generator.set_state(state["generators"]["noise"])
        self._load_extra(state)

    def _generators(self) -> dict[str, torch.Generator]:
        return {"data": self.data_generator, "noise": self.noise_generator}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint (atomic; see :mod:`tinydiff.checkpoint`).

        When distributed, call it on every rank (it gathers their RNG states); rank 0 writes
        the file and the others wait until it is complete.
        """
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

        When distributed, every rank reads the file (it must be on a shared file system) and
        restores its own RNG states; the world size must be the one that wrote it.
        """
        extra = read_checkpoint(path)["extra"]
        self._check_world_size(extra)  # before anything is overwritten
        self.step = load_checkpoint(
            path, self.model, self.optimizer, self.scheduler, generators=self._generators()
        )
        self._load_extra(extra)
        return self.step


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
