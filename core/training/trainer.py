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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from thali.core.config import DomainConfig
from thali.core.errors import DataError
from thali.core.files import write_atomic
from thali.core.quiet import no_update_checks, quiet
from thali.core.registry import Registries

from . import checkpoint as ckpt
from .data import (
    ImageDataset,
    make_loader,
    make_split,
    read_samples,
    read_split,
    report_problems,
    resolve_data_root,
    write_split,
)
from .evaluate import cross_line, cross_summary
from .features import compute_features, make_engine, shard_features
from .logbook import write_epoch
from .loss import build_loss
from .metrics import calibrated_summary, summarize, topk_accuracy
from .mix import mix_batch
from .model import Classifier, build_classifier
from .optim import ModelEma, build_optimizer, build_scheduler
from .transforms import eval_transform, train_transform

log = logging.getLogger("thali.train")


@dataclass
class TrainOptions:
    run_dir: Path
    data: str | None = None
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
        root = resolve_data_root(self.config, self.options.data)
        if self.options.resume and split_file.is_file():
            self.split = read_split(split_file, root)
            return
        samples, problems = read_samples(
            self.registries, self.config, root, progress=self.options.progress and self.dist.main
        )
        if message := report_problems(problems):
            self.notes.append(message)
            if self.dist.main:
                write_atomic(self.run_dir / "problems.txt", "".join(f"{p}\t{why}\n" for p, why in problems))
        self.split, notes = make_split(self.config, root, samples)
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
        common = {
            "batch_size": max(t.batch_size, 32),
            "num_workers": t.num_workers,
            "progress": self.options.progress and self.dist.main,
        }
        limits = self.config.dataset.image_limits()
        train_ds = ImageDataset(
            self.split.train, train_transform(self.config.augmentation, self.preprocess), limits=limits
        )
        val_ds = ImageDataset(self.split.val, eval_transform(self.preprocess), limits=limits)
        started = time.perf_counter()
        for part, dataset, views in (("train", train_ds, t.cache_views), ("val", val_ds, 1)):
            options = {"views": views, "seed": t.seed, "desc": f"caching {part} ({engine.name})", **common}
            if self.dist.world > 1:  # each rank its shard, then exchanged: computed once in total
                cached, counts = shard_features(
                    engine, dataset, rank=self.dist.rank, world=self.dist.world, **options
                )
                self.notes.append(counts.line(part))
                if self.dist.main:
                    log.info("%s", counts.line(part))
            else:
                cached = compute_features(engine, dataset, **options)
            setattr(self, f"{part}_feats", cached)
        self.cache_seconds = time.perf_counter() - started
        self.notes.append(f"cached frozen features with {engine.name} in {self.cache_seconds:.0f} s")

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
        sampler = None
        if self.dist.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=t.seed, drop_last=True)
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
        t = self.config.training
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        fresh = missing[-1] if missing else None  # the highest folder this call creates
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.options.resume:
                self._write_config()
            ckpt.seed_everything(t.seed)
            self._data()
            self._model()
            if self.cached:
                self._cache()
        except BaseException:  # a run that never started leaves no folder behind (bad data path, …)
            if fresh is not None and self.dist.main:
                shutil.rmtree(fresh, ignore_errors=True)
            raise
        optimizer = build_optimizer(self.model, self.config.optimizer)
        steps = self._steps_per_epoch()
        scheduler = build_scheduler(
            optimizer, self.config.schedule, steps, t.epochs, self.config.optimizer.lr
        )
        amp_dtype, use_scaler = _autocast(self.device, t.mixed_precision)
        scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        ema = ModelEma(self.model, t.ema.decay) if t.ema.enabled else None
        parts = ckpt.TrainingParts(self.model, optimizer, scheduler, scaler, ema)
        state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "history": []}
        if self.options.resume:
            state = parts.restore(self.run_dir / "last.pt")
            self._write_config()  # only now: a resume that fails leaves the run's config.yaml as it was
        writer = None
        if self.dist.main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tb"))
        self.skipped = 0
        started, ran = time.perf_counter(), 0
        images_seen, train_seconds = 0, 0.0
        for epoch in range(state["epoch"], t.epochs):
            if self.options.stop_after_epochs is not None and ran >= self.options.stop_after_epochs:
                break
            loss_sum, correct, seen, seconds = self._train_epoch(
                epoch, optimizer, scheduler, scaler, ema, amp_dtype
            )
            images_seen += seen
            train_seconds += seconds
            ran += 1
            eval_model = ema.module if ema else self.model
            logits, labels, indices = self._predict_indexed(eval_model, "val")
            chooses = self._chooses(indices)
            # the best epoch and early stopping read only the photos that choose; held-out ones are scored
            val = summarize(logits[chooses], labels[chooses], self.classes)
            record = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(1, seen),
                "train_top1": correct / max(1, seen),
                "val_loss": val["nll"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen / max(seconds, 1e-9),
            }
            if not chooses.all():
                record["val_cross_top1"] = topk_accuracy(logits[~chooses], labels[~chooses], 1)
            record = ckpt.plain(record)
            state["history"].append(record)
            metric, stop = record[t.early_stopping.metric], t.early_stopping
            sign = 1.0 if stop.metric == "val_top1" else -1.0
            better = state["best"] is None or sign * (metric - state["best"]) > stop.min_delta
            if better:
                state.update(best=metric, best_epoch=epoch + 1, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            if self.dist.main:
                write_epoch(writer, record, val, self.classes)
                # best.pt first: a kill between the two writes then replays this epoch on --resume
                if better:
                    best = {
                        "model": eval_model.state_dict(),
                        "classes": list(self.classes),
                        "preprocess": ckpt.plain(self.preprocess),
                        "epoch": epoch + 1,
                    }
                    ckpt.save_atomic(best, self.run_dir / "best.pt")
                parts.save(
                    self.run_dir / "last.pt", state, classes=list(self.classes), preprocess=self.preprocess
                )
                log.info("%s", epoch_line(record, t.epochs, better))
            if t.early_stopping.enabled and state["bad_epochs"] >= t.early_stopping.patience:
                self.notes.append(f"early stop after epoch {epoch + 1} (best epoch {state['best_epoch']})")
                state["epoch"] = t.epochs
                break
        if writer:
            writer.close()
        finished = state["epoch"] >= t.epochs
        result: dict[str, Any] = {"finished": finished, "epochs_run": ran, "state": state}
        result["train_images_per_s"] = images_seen / train_seconds if train_seconds else None
        result["wall_seconds"] = time.perf_counter() - started
        if finished and self.dist.main:
            result.update(self._final_metrics())
        if self.skipped:
            self.notes.append(f"skipped {self.skipped} images that failed to decode during training")
        result["notes"] = self.notes
        if self.dist.world > 1:
            torch.distributed.barrier()
        return result

    def _step(self, optimizer: Any, scheduler: Any, scaler: Any, ema: ModelEma | None) -> None:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema:
            ema.update(self.model)

    def _train_epoch(
        self, epoch: int, optimizer: Any, scheduler: Any, scaler: Any, ema: ModelEma | None, amp_dtype: Any
    ) -> tuple[float, int, int, float]:
        """One pass over the training data; returns (loss sum, correct, images, seconds)."""
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
        autocast = torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype))
        for i, (images, labels) in enumerate(self._train_batches(epoch)):
            images = images.to(self.device, memory_format=torch.channels_last)
            labels = labels.to(self.device)
            inputs, target = mix_batch(images, labels, len(self.classes), self.config.augmentation, mix_gen)
            with autocast:
                logits = self.wrapped(inputs)
                loss = self.loss_fn(logits.float(), target) / t.grad_accum_steps
            scaler.scale(loss).backward()
            if (i + 1) % t.grad_accum_steps == 0:
                self._step(optimizer, scheduler, scaler, ema)
            loss_sum += float(loss.detach()) * t.grad_accum_steps * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.update(len(labels))
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", ips=f"{rate:.1f}")
        if any(p.grad is not None for p in self.model.parameters()):  # a partial accumulation
            self._step(optimizer, scheduler, scaler, ema)
        bar.close()
        return loss_sum, correct, seen, time.perf_counter() - started

    # --- evaluation -------------------------------------------------------------------------------

    def _predict(self, model: nn.Module, which: str) -> tuple[np.ndarray, np.ndarray]:
        logits, labels, _ = self._predict_indexed(model, which)
        return logits, labels

    @torch.no_grad()
    def _predict_indexed(self, model: nn.Module, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
