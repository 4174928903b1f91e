"""The trainer: one domain config in, a run directory out.

``run_dir`` holds ``config.yaml`` (resolved), ``split.json``, ``last.pt`` (every epoch), ``best.pt``,
``metrics.json`` (top-1, top-5, per-class precision/recall, confusion matrix, ECE before and after
temperature scaling; with a cross-collection split also ``val_cross``, the same on the held-out
collections alone), ``calibration.json`` and TensorBoard events under ``tb/``. With a cross-collection
split the held-out collections are only measured: the best epoch, early stopping and the temperature
read the other validation images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
import yaml
from torch import nn

from thali.core.config import DomainConfig, EarlyStoppingConfig
from thali.core.errors import DataError
from thali.core.files import write_atomic
from thali.core.metrics import calibrated_summary, summarize, topk_accuracy
from thali.core.quiet import no_update_checks, quiet
from thali.core.registry import Registries
from thali.core.samples import report_problems

from . import checkpoint as ckpt
from .data import (
    ImageDataset,
    as_torch_dataset,
    make_loader,
    make_split,
    read_samples,
    read_split,
    resolve_data_roots,
    write_split,
)
from .evaluate import cross_line, cross_summary
from .features import CachedFeatures, compute_features, make_engine, shard_features
from .logbook import write_epoch
from .loss import build_loss
from .mix import mix_batch
from .model import Classifier, build_classifier
from .optim import ModelEma, build_optimizer, build_scheduler
from .transforms import eval_transform, train_transform

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("thali.train")


@dataclass
class TrainOptions:
    run_dir: Path
    data: str | list[str] | None = None  # one data root, or several (merged by class name)
    resume: bool = False
    stop_after_epochs: int | None = None  # end this invocation early; continue later with resume
    progress: bool = True


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


class StopStep(NamedTuple):
    """What one epoch's validation metric did: beat the best so far, and whether training stops now."""

    improved: bool
    stop: bool


@dataclass
class EarlyStopping:
    """The best epoch and early stopping, on one validation metric.

    ``step(value)`` after each epoch: the value improves on ``best`` when it is better by more than
    ``min_delta`` (higher for ``val_top1``, lower for ``val_loss``), or when there is no best yet;
    ``patience`` epochs in a row without one stop training (when ``enabled``; disabled, the best epoch
    is still tracked). ``best`` and ``bad_epochs`` are what ``last.pt`` carries for ``--resume``."""

    metric: Literal["val_top1", "val_loss"]
    patience: int
    min_delta: float = 0.0
    enabled: bool = True
    best: float | None = None
    bad_epochs: int = 0

    @classmethod
    def from_config(cls, config: EarlyStoppingConfig) -> EarlyStopping:
        return cls(config.metric, config.patience, config.min_delta, config.enabled)

    def step(self, value: float) -> StopStep:
        sign = 1.0 if self.metric == "val_top1" else -1.0
        improved = self.best is None or sign * (value - self.best) > self.min_delta
        if improved:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return StopStep(improved, self.enabled and self.bad_epochs >= self.patience)


@dataclass
class TrainState:
    """The loop state: epochs done, the best epoch, one record per epoch, and early stopping's best and
    bad epochs. In ``last.pt`` (and the trainer's result) it is the plain dict ``to_dict`` makes, with
    the keys ``checkpoint.STATE_KEYS``."""

    stopping: EarlyStopping
    epoch: int = 0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def restored(cls, saved: dict[str, Any], stopping: EarlyStopping) -> TrainState:
        """The state a checkpoint saved (``TrainingParts.restore`` checked its keys), continued with
        ``stopping``'s metric, patience and min_delta (those of the config in force)."""
        stopping.best, stopping.bad_epochs = saved["best"], saved["bad_epochs"]
        return cls(stopping, saved["epoch"], saved["best_epoch"], saved["history"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best": self.stopping.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.stopping.bad_epochs,
            "history": self.history,
        }


@dataclass
class Optimisation:
    """What the training steps use: the optimiser, its per-step schedule, the AMP scaler and autocast
    dtype, the weight EMA, and those whose state ``--resume`` restores as the checkpoint's parts."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: ModelEma[Classifier] | None
    amp_dtype: torch.dtype | None
    parts: ckpt.TrainingParts


class TrainedEpoch(NamedTuple):
    """One pass over the training data: loss sum, correct predictions, images and seconds."""

    loss_sum: float
    correct: int
    seen: int
    seconds: float


@dataclass
class Totals:
    """The epochs this call ran, and the images and seconds of their training passes."""

    ran: int = 0
    images: int = 0
    seconds: float = 0.0

    def add(self, epoch: TrainedEpoch) -> None:
        self.images += epoch.seen
        self.seconds += epoch.seconds
        self.ran += 1


def _init_distributed(device_hint: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() and device_hint != "cpu" else "gloo"
    if backend == "nccl":  # one GPU per rank, also for the collectives that are not DDP's own
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def _device(choice: str, dist: Dist) -> torch.device:
    if choice == "auto":
        return torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _autocast(device: torch.device, choice: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None, False
    if choice == "fp16" or (choice == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16, device.type == "cuda"
    return torch.bfloat16, False


class CachedHead(nn.Module):
    """The trainable part of a frozen-features model as a module of its own (for DDP)."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_cached(features)


class Trainer:
    def __init__(self, config: DomainConfig, registries: Registries, options: TrainOptions) -> None:
        self.config, self.registries, self.options = config, registries, options
        self.run_dir = Path(options.run_dir)
        self.dist = _init_distributed(config.training.device)
        self.device = _device(config.training.device, self.dist)
        self.classes = config.class_names
        self.notes: list[str] = []

    # --- setup ------------------------------------------------------------------------------------

    def _data(self) -> None:
        split_file = self.run_dir / "split.json"
        roots = resolve_data_roots(self.config, self.options.data)
        root = roots[0]  # the split file's paths are relative to the first; a later root's are absolute
        if self.options.resume and split_file.is_file():
            self.split = read_split(split_file, root)
            return
        samples, problems = read_samples(
            self.registries, self.config, roots, progress=self.options.progress and self.dist.main
        )
        if message := report_problems(problems):
            self.notes.append(message)
            if self.dist.main:
                write_atomic(self.run_dir / "problems.txt", "".join(f"{p}\t{why}\n" for p, why in problems))
        self.split, notes = make_split(self.config, roots, samples)
        self.notes += notes
        if not self.split.train or not self.split.val:
            raise DataError(f"{root}: too few images for a train/val split ({len(samples)} readable)")
        if self.dist.main:
            write_split(split_file, self.split, root, self.classes)

    def _model(self) -> None:
        self.model: Classifier = build_classifier(self.config, self.registries)
        if self.config.training.init_from and not self.options.resume:
            start = Path(self.config.training.init_from) / "best.pt"
            try:  # plain data only (weights_only), a mismatch one line
                ckpt.load_weights(self.model, ckpt.load(start)["model"], start)
            except DataError as exc:
                raise DataError(f"training.init_from: {exc.message}") from None
            self.notes.append(f"training.init_from: started from {start}")
        self.model = self.model.to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = self.model.preprocess
        counts = self.split.class_counts(len(self.classes))
        self.loss_fn = build_loss(self.config, self.registries, counts).to(self.device)
        self.cached = self.config.training.mode == "frozen_features"
        if self.cached and self.model.cache_depth == 0:
            self.cached = False
            self.notes.append(
                f"training.mode frozen_features: nothing of {self.config.model.backbone} is frozen "
                f"(trainable_stages {self.config.training.trainable_stages} covers all its "
                f"{len(self.model.backbone.stages)} stage(s)), so it trains in full mode"
            )
        self.wrapped: nn.Module = CachedHead(self.model) if self.cached else self.model
        if self.dist.world > 1:  # DDP must see the forward that runs, to synchronise gradients
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.wrapped, device_ids=ids)

    def _cache(self) -> None:
        t = self.config.training
        prefix = self.model.prefix()
        size = self.preprocess["input_size"]
        with quiet("frozen-part engine"):  # ONNX export and ONNX Runtime session; our fallback note stays
            engine = make_engine(prefix, torch.zeros(2, *size), self.device, t.feature_engine)
        limits = self.config.dataset.image_limits()
        train_ds = ImageDataset(
            self.split.train, train_transform(self.config.augmentation, self.preprocess), limits=limits
        )
        val_ds = ImageDataset(self.split.val, eval_transform(self.preprocess), limits=limits)
        started = time.perf_counter()
        self.train_feats = self._cache_part(engine, "train", train_ds, t.cache_views)
        self.val_feats = self._cache_part(engine, "val", val_ds, 1)
        self.cache_seconds = time.perf_counter() - started
        self.notes.append(f"cached frozen features with {engine.name} in {self.cache_seconds:.0f} s")

    def _cache_part(self, engine: Any, part: str, dataset: ImageDataset, views: int) -> CachedFeatures:
        """The frozen prefix's features of one split part, ``views`` augmented views of each image."""
        t = self.config.training
        batch_size, progress = max(t.batch_size, 32), self.options.progress and self.dist.main
        desc = f"caching {part} ({engine.name})"
        options: dict[str, Any] = {
            "views": views,
            "seed": t.seed,
            "desc": desc,
            "batch_size": batch_size,
            "num_workers": t.num_workers,
            "progress": progress,
        }
        if self.dist.world <= 1:
            return compute_features(engine, dataset, **options)
        # each rank its shard, then exchanged: computed once in total
        cached, counts = shard_features(
            engine, dataset, rank=self.dist.rank, world=self.dist.world, **options
        )
        self.notes.append(counts.line(part))
        if self.dist.main:
            log.info("%s", counts.line(part))
        return cached

    # --- batches ----------------------------------------------------------------------------------

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        t = self.config.training
        seed = t.seed + epoch
        if self.cached:
            cache = self.train_feats
            g = torch.Generator().manual_seed(seed)
            # one random cached view per image and epoch
            choice = torch.randint(t.cache_views, (len(self.split.train),), generator=g)
            rows = torch.nonzero(cache.views == choice[cache.indices]).flatten()
            rows = rows[torch.randperm(len(rows), generator=g)]
            if self.dist.world > 1:
                rows = rows[self.dist.rank :: self.dist.world]
            for start in range(0, len(rows), t.batch_size):
                r = rows[start : start + t.batch_size]
                yield cache.features[r].float(), cache.labels[r]
            return
        dataset = ImageDataset(
            self.split.train,
            train_transform(self.config.augmentation, self.preprocess),
            limits=self.config.dataset.image_limits(),
        )
        sampler: torch.utils.data.distributed.DistributedSampler[Any] | None = None
        if self.dist.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(
                as_torch_dataset(dataset), seed=t.seed, drop_last=True
            )
            sampler.set_epoch(epoch)
        loader = make_loader(
            dataset, t.batch_size, shuffle=True, seed=seed, num_workers=t.num_workers, sampler=sampler
        )
        for batch in loader:
            self.skipped += batch["skipped"]
            if batch["images"] is not None:
                yield batch["images"], batch["labels"]

    def _steps_per_epoch(self) -> int:
        t = self.config.training
        batches = math.ceil(len(self.split.train) / max(1, self.dist.world) / t.batch_size)
        return max(1, math.ceil(batches / t.grad_accum_steps))

    # --- loop -------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        if self.dist.main:
            text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
            write_atomic(self.run_dir / "config.yaml", text)

    def fit(self) -> dict[str, Any]:
        """Set up, run the epochs (to the end, an early stop or ``stop_after_epochs``), and with the
        last epoch done score ``best.pt``; returns what ``thali train`` reports."""
        self._set_up()
        opt = self._optimisation()
        state = self._start_state(opt.parts)
        writer = self._open_writer()
        self.skipped = 0
        started = time.perf_counter()
        totals = self._run_epochs(opt, state, writer)
        if writer:
            writer.close()
        return self._result(state, totals, started)

    def _set_up(self) -> None:
        """Config, data, model and (frozen features) the cache; a run that never started leaves no
        folder behind (bad data path, ...)."""
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        fresh = missing[-1] if missing else None  # the highest folder this call creates
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.options.resume:
                self._write_config()
            ckpt.seed_everything(self.config.training.seed)
            self._data()
            self._model()
            if self.cached:
                self._cache()
        except BaseException:
            if fresh is not None and self.dist.main:
                shutil.rmtree(fresh, ignore_errors=True)
            raise

    def _optimisation(self) -> Optimisation:
        t = self.config.training
        optimizer = build_optimizer(self.model, self.config.optimizer)
        steps = self._steps_per_epoch()
        scheduler = build_scheduler(
            optimizer, self.config.schedule, steps, t.epochs, self.config.optimizer.lr
        )
        amp_dtype, use_scaler = _autocast(self.device, t.mixed_precision)
        scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        ema = ModelEma(self.model, t.ema.decay) if t.ema.enabled else None
        parts = ckpt.TrainingParts(self.model, optimizer, scheduler, scaler, ema)
        return Optimisation(optimizer, scheduler, scaler, ema, amp_dtype, parts)

    def _start_state(self, parts: ckpt.TrainingParts) -> TrainState:
        """A fresh state, or with ``--resume`` the one ``last.pt`` saved (the parts restored with it)."""
        stopping = EarlyStopping.from_config(self.config.training.early_stopping)
        if not self.options.resume:
            return TrainState(stopping)
        state = TrainState.restored(parts.restore(self.run_dir / "last.pt"), stopping)
        self._write_config()  # only now: a resume that fails leaves the run's config.yaml as it was
        return state

    def _open_writer(self) -> SummaryWriter | None:
        """TensorBoard events under ``tb/`` (the main rank only)."""
        if not self.dist.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"))

    def _run_epochs(self, opt: Optimisation, state: TrainState, writer: SummaryWriter | None) -> Totals:
        """Train, validate and checkpoint epoch by epoch from ``state.epoch``."""
        t = self.config.training
        totals = Totals()
        for epoch in range(state.epoch, t.epochs):
            if self.options.stop_after_epochs is not None and totals.ran >= self.options.stop_after_epochs:
                break
            trained = self._train_epoch(epoch, opt)
            totals.add(trained)
            eval_model = opt.ema.module if opt.ema else self.model
            record, val = self._validate(eval_model, epoch, trained, opt.optimizer)
            state.history.append(record)
            step = state.stopping.step(record[t.early_stopping.metric])
            if step.improved:
                state.best_epoch = epoch + 1
            state.epoch = epoch + 1
            if self.dist.main:
                self._save_epoch(writer, record, val, step.improved, eval_model, opt.parts, state)
            if step.stop:
                self.notes.append(f"early stop after epoch {epoch + 1} (best epoch {state.best_epoch})")
                state.epoch = t.epochs
                break
        return totals

    def _validate(
        self, eval_model: Classifier, epoch: int, trained: TrainedEpoch, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The epoch's history record (plain numbers) and the validation summary of the photos that
        choose."""
        logits, labels, indices = self._predict_indexed(eval_model, "val")
        chooses = self._chooses(indices)
        # the best epoch and early stopping read only the photos that choose; held-out ones are scored
        val = summarize(logits[chooses], labels[chooses], self.classes)
        seen = trained.seen
        record = {
            "epoch": epoch + 1,
            "train_loss": trained.loss_sum / max(1, seen),
            "train_top1": trained.correct / max(1, seen),
            "val_loss": val["nll"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / max(trained.seconds, 1e-9),
        }
        if not chooses.all():
            record["val_cross_top1"] = topk_accuracy(logits[~chooses], labels[~chooses], 1)
        return ckpt.plain(record), val

    def _save_epoch(
        self,
        writer: SummaryWriter | None,
        record: dict[str, Any],
        val: dict[str, Any],
        improved: bool,
        eval_model: Classifier,
        parts: ckpt.TrainingParts,
        state: TrainState,
    ) -> None:
        """TensorBoard, ``best.pt`` (when improved), ``last.pt`` and the epoch's log line."""
        write_epoch(writer, record, val, self.classes)
        # best.pt first: a kill between the two writes then replays this epoch on --resume
        if improved:
            best = {
                "model": eval_model.state_dict(),
                "classes": list(self.classes),
                "preprocess": ckpt.plain(self.preprocess),
                "epoch": record["epoch"],
            }
            ckpt.save_atomic(best, self.run_dir / "best.pt")
        parts.save(
            self.run_dir / "last.pt", state.to_dict(), classes=list(self.classes), preprocess=self.preprocess
        )
        log.info("%s", epoch_line(record, self.config.training.epochs, improved))

    def _result(self, state: TrainState, totals: Totals, started: float) -> dict[str, Any]:
        """What ``fit`` returns; a finished run's final metrics (``metrics.json``) are made here."""
        finished = state.epoch >= self.config.training.epochs
        result: dict[str, Any] = {"finished": finished, "epochs_run": totals.ran, "state": state.to_dict()}
        result["train_images_per_s"] = totals.images / totals.seconds if totals.seconds else None
        result["wall_seconds"] = time.perf_counter() - started
        if finished and self.dist.main:
            result.update(self._final_metrics())
        if self.skipped:
            self.notes.append(f"skipped {self.skipped} images that failed to decode during training")
        result["notes"] = self.notes
        if self.dist.world > 1:
            torch.distributed.barrier()
        return result

    def _step(self, opt: Optimisation) -> None:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scheduler.step()
        if opt.ema:
            opt.ema.update(self.model)

    def _train_epoch(self, epoch: int, opt: Optimisation) -> TrainedEpoch:
        """One pass over the training data."""
        from tqdm import tqdm

        t = self.config.training
        ckpt.seed_everything(t.seed + epoch)  # an epoch depends on (seed, epoch) only: exact resume
        self.wrapped.train()
        mix_gen = torch.Generator().manual_seed(t.seed * 7919 + epoch)
        started = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            total=len(self.split.train) // self.dist.world,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            unit="img",
            disable=not (self.options.progress and self.dist.main),
            leave=False,
        )
        amp_dtype = opt.amp_dtype
        autocast = torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype))
        for i, (images, labels) in enumerate(self._train_batches(epoch)):
            images = images.to(self.device, memory_format=torch.channels_last)
            labels = labels.to(self.device)
            inputs, target = mix_batch(images, labels, len(self.classes), self.config.augmentation, mix_gen)
            with autocast:
                logits = self.wrapped(inputs)
                loss = self.loss_fn(logits.float(), target) / t.grad_accum_steps
            opt.scaler.scale(loss).backward()
            if (i + 1) % t.grad_accum_steps == 0:
                self._step(opt)
            loss_sum += float(loss.detach()) * t.grad_accum_steps * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.update(len(labels))
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", ips=f"{rate:.1f}")
        if any(p.grad is not None for p in self.model.parameters()):  # a partial accumulation
            self._step(opt)
        bar.close()
        return TrainedEpoch(loss_sum, correct, seen, time.perf_counter() - started)

    # --- evaluation -------------------------------------------------------------------------------

    def _predict(self, model: Classifier, which: str) -> tuple[np.ndarray, np.ndarray]:
        logits, labels, _ = self._predict_indexed(model, which)
        return logits, labels

    @torch.no_grad()
    def _predict_indexed(self, model: Classifier, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits and labels of the readable images of a split part, and each one's index in it."""
        model.eval()
        out, labels, indices = [], [], []
        if self.cached and which == "val":
            cache = self.val_feats
            for start in range(0, len(cache.labels), 256):
                chunk = cache.features[start : start + 256].float().to(self.device)
                out.append(model.forward_cached(chunk).float().cpu())
            return torch.cat(out).numpy(), cache.labels.numpy(), cache.indices.numpy()
        samples = getattr(self.split, which)
        loader = make_loader(
            ImageDataset(samples, eval_transform(self.preprocess), limits=self.config.dataset.image_limits()),
            self.config.training.batch_size,
            shuffle=False,
            seed=0,
            num_workers=self.config.training.num_workers,
        )
        for batch in loader:
            if batch["images"] is not None:
                out.append(
                    model(batch["images"].to(self.device, memory_format=torch.channels_last)).float().cpu()
                )
                labels.append(batch["labels"])
                indices.append(batch["indices"])
        return torch.cat(out).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()

    def _chooses(self, indices: np.ndarray) -> np.ndarray:
        """Which validation images (by index in the split) may choose: the best epoch, early stopping and
        the temperature. With a cross-collection split, not the held-out collections' images: they are
        the measurement and are only scored (all images, if the held-out ones were all there is)."""
        chooses = ~np.isin(indices, np.asarray(self.split.val_cross, dtype=np.int64))
        return chooses if chooses.any() else np.ones(len(indices), dtype=bool)

    def _final_metrics(self) -> dict[str, Any]:
        best = ckpt.load(self.run_dir / "best.pt", ("model", "epoch"))
        ckpt.load_weights(self.model, best["model"], self.run_dir / "best.pt")
        logits, labels, indices = self._predict_indexed(self.model, "val")
        chooses = self._chooses(indices)
        calibrated, calibration = calibrated_summary(logits, labels, self.classes, chooses)
        temperature = calibration["temperature"]
        metrics: dict[str, Any] = {
            "domain": self.config.name,
            "best_epoch": best["epoch"],
            "val": calibrated,
            "calibration": calibration,
        }
        if self.split.val_cross:  # the held-out collections alone: images of sources never trained on
            cross = cross_summary(
                logits, labels, indices, self.split.val_cross, self.split.groups, self.classes, temperature
            )
            if cross:
                metrics["val_cross"] = cross
                self.notes.append(cross_line(cross))
        if self.split.test:
            test_logits, test_labels = self._predict(self.model, "test")
            metrics["test"] = summarize(test_logits, test_labels, self.classes, temperature)
        write_atomic(self.run_dir / "metrics.json", json.dumps(metrics, indent=1))
        write_atomic(self.run_dir / "calibration.json", json.dumps({"temperature": temperature}, indent=1))
        return {"metrics": metrics}


def epoch_line(record: dict[str, Any], epochs: int, best: bool) -> str:
    """One aligned, readable line per epoch (the machine form is in TensorBoard and ``--json``)."""
    width = len(str(epochs))
    return (
        f"epoch {record['epoch']:>{width}}/{epochs}  "
        f"train loss {record['train_loss']:.3f} acc {100 * record['train_top1']:5.1f} %  "
        f"val loss {record['val_loss']:.3f} top-1 {100 * record['val_top1']:5.1f} % "
        f"top-5 {100 * record['val_top5']:5.1f} %  "
        + (f"held-out top-1 {100 * record['val_cross_top1']:5.1f} %  " if "val_cross_top1" in record else "")
        + f"lr {record['lr']:.1e}  {record['images_per_s']:6.0f} img/s"
        + ("  best" if best else "")
    )


def train(config: DomainConfig, registries: Registries, options: TrainOptions) -> dict[str, Any]:
    """Train ``config`` into ``options.run_dir``; see :class:`Trainer`."""
    no_update_checks()
    return Trainer(config, registries, options).fit()
