"""``thali predict DOMAIN[@REF] SOURCE... --out FILE``: classify photos in bulk with the server's own
torch-free path (the package's :class:`Preprocessor`, a serving backend, :func:`predictions`), micro-
batched, decoding on ``threads`` threads while the engine runs.

SOURCE is a folder (recursive), a glob, an fsspec URL (``s3://bucket/prefix/``, listed with ``find``) or
a ``.txt``/``.csv`` file listing paths (one a line; a CSV's ``path`` column, else its first). One row per
photo: ``path``, ``top{i}_label`` / ``top{i}_probability``, ``unknown``, ``unknown_score``,
``model_version``, ``variant`` and ``error`` (a photo that could not be read is a row with its reason,
never a stop). ``.csv`` and ``.jsonl`` are appended a batch at a time and flushed, so a killed run leaves a
readable file (a torn last line is dropped when the run resumes); ``.parquet`` is written as parts in
``FILE.parts/`` (each a whole Parquet file) and joined into ``FILE`` at the end. ``resume`` skips photos
already in the output. Only the output (and its parts folder) is written."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.errors import ConfigError, DataError
from thali.core.export import FEATURES, LOGITS, STAGE_FEATURES
from thali.core.images import accepted_suffixes
from thali.core.manifest import ModelPackage
from thali.core.registry import Registries

from .backend import load_backend
from .evaluate import image_limits
from .postprocess import predictions
from .preprocess import Preprocessor
from .unknown import load_spec

FORMATS = (".csv", ".jsonl", ".parquet")
MAX_LIST_BYTES = 64 * 1024 * 1024
GLOB_CHARS = frozenset("*?[")


# -- sources ------------------------------------------------------------------------------------------


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def list_sources(sources: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every photo the sources name, in order, each once."""
    suffixes = {f".{s}" for s in accepted_suffixes()}
    found: dict[str, None] = {}

    def add(path: str) -> None:
        if os.path.splitext(path)[1].lower() in suffixes:
            found.setdefault(path, None)

    for source in sources:
        if _is_url(source):
            import fsspec

            fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
            protocol = source.split("://", 1)[0]
            names = fs.glob(root) if GLOB_CHARS & set(root) else fs.find(root)
            for name in sorted(names):
                add(f"{protocol}://{name}")
        elif GLOB_CHARS & set(source):
            for name in sorted(glob.glob(source, recursive=True)):
                if Path(name).is_file():
                    add(name)
        elif Path(source).is_dir():
            for path in sorted(Path(source).rglob("*")):
                if path.is_file():
                    add(str(path))
        elif Path(source).is_file() and Path(source).suffix.lower() in (".txt", ".csv"):
            for name in _listed(Path(source)):
                found.setdefault(name, None)
        elif Path(source).is_file():
            add(source)
        else:
            raise DataError(f"{source}: no such folder, file, glob match or URL")
    return list(found)


def _listed(path: Path) -> list[str]:
    """Paths a list file names: a CSV's ``path`` column (else its first), or one a line."""
    if path.stat().st_size > MAX_LIST_BYTES:
        raise DataError(f"{path}: a list of paths over {MAX_LIST_BYTES:,} bytes; split it")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        column = rows[0].index("path") if "path" in rows[0] else 0
        body = rows[1:] if "path" in rows[0] else rows
        return [r[column].strip() for r in body if len(r) > column and r[column].strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _reader(storage_options: dict[str, Any] | None, limit: int) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        if _is_url(path):
            import fsspec

            with fsspec.open(path, "rb", **(storage_options or {})) as handle:
                data = handle.read(limit + 1)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
        if len(data) > limit:
            raise DataError(f"image is over the limit of {limit:,} bytes")
        return data

    return read


# -- output -------------------------------------------------------------------------------------------


def columns(top_k: int) -> list[str]:
    tops = [c for i in range(1, top_k + 1) for c in (f"top{i}_label", f"top{i}_probability")]
    return ["path", *tops, "unknown", "unknown_score", "model_version", "variant", "error"]


class Output:
    """The rows written so far, and a writer that leaves a readable file after every batch."""

    def __init__(self, path: Path, top_k: int, resume: bool) -> None:
        self.path, self.kind = path, path.suffix.lower()
        if self.kind not in FORMATS:
            raise ConfigError(f"--out {path}: the file must end in {', '.join(FORMATS)}")
        self.columns = columns(top_k)
        self.parts = path.with_name(path.name + ".parts")
        self.done: set[str] = set()
        if not resume:
            if path.exists() or self.parts.exists():
                raise ConfigError(f"--out {path} exists: pass --resume to continue it, or another file")
        elif self.kind == ".parquet":
            self.done = {
                p for part in sorted(self.parts.glob("part-*.parquet")) for p in _parquet_paths(part)
            }
            if path.is_file():
                self.done |= set(_parquet_paths(path))
        elif path.is_file():
            self.done = self._resume_lines()
        path.parent.mkdir(parents=True, exist_ok=True)

    def _resume_lines(self) -> set[str]:
        """The paths of the complete lines; a torn last line (a killed run) is cut off."""
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(keep))
        text = keep.decode("utf-8")
        if self.kind == ".jsonl":
            return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}
        rows = list(csv.reader(io.StringIO(text)))
        return {r[0] for r in rows[1:] if r}

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.kind == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.parts.mkdir(parents=True, exist_ok=True)
            number = len(list(self.parts.glob("part-*.parquet")))
            target = self.parts / f"part-{number:06d}.parquet"
            temporary = target.with_suffix(".tmp")
            pq.write_table(pa.Table.from_pylist(rows), temporary)
            os.replace(temporary, target)  # a part is whole or absent
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            if self.kind == ".jsonl":
                handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            else:
                writer = csv.DictWriter(handle, fieldnames=self.columns, lineterminator="\n")
                if new:
                    writer.writeheader()
                writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        self.done.update(r["path"] for r in rows)

    def finish(self) -> None:
        """Parquet: the parts joined into the output file (atomically), the parts folder removed."""
        if self.kind != ".parquet":
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p in sorted(self.parts.glob("*.parquet"))]
        if self.path.is_file():
            tables.insert(0, pq.read_table(self.path))
        if not tables:
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(pa.concat_tables(tables, promote_options="default"), temporary)
        os.replace(temporary, self.path)
        for part in self.parts.iterdir():
            part.unlink()
        self.parts.rmdir()


def _parquet_paths(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [str(p) for p in pq.read_table(path, columns=["path"]).column("path").to_pylist()]


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Engine:
    """The package's preprocessing, backend and postprocessing: what the server runs, in this process."""

    package: ModelPackage
    variant: str
    top_k: int
    backend: Any
    preprocessor: Preprocessor
    wanted: frozenset[str]
    unknown: Any

    @classmethod
    def load(
        cls, package: ModelPackage, registries: Registries, variant: str, top_k: int, threads: int | None
    ) -> Engine:
        backend = load_backend(
            registries,
            "onnxruntime",
            package.model_path(variant),
            variant=variant,
            package=package,
            registries=registries,
            **({"threads": threads} if threads else {}),
        )
        unknown = load_spec(package.calibration)
        wanted: set[str] = set()
        if unknown is not None and FEATURES in backend.capabilities:
            wanted.add(FEATURES)
            if unknown.layers and STAGE_FEATURES in backend.capabilities:
                wanted.add(STAGE_FEATURES)
        elif unknown is not None:
            unknown = None
        preprocessor = Preprocessor(package.preprocess, image_limits(package.manifest))
        return cls(package, variant, top_k, backend, preprocessor, frozenset(wanted), unknown)

    def rows(self, paths: list[str], images: list[np.ndarray | str]) -> list[dict[str, Any]]:
        """One row per path: its answer, or its ``error``."""
        good = [i for i, x in enumerate(images) if isinstance(x, np.ndarray)]
        answers: dict[int, Any] = {}
        if good:
            outputs = self.backend.run(np.stack([images[i] for i in good]), self.wanted)
            results = predictions(
                outputs[LOGITS],
                self.package.labels.get("classes", []),
                self.package.calibration,
                self.top_k,
                features=outputs.get(FEATURES),
                stage_features=outputs.get(STAGE_FEATURES),
                unknown_score=self.unknown,
            )
            answers = dict(zip(good, results, strict=True))
        rows = []
        for i, path in enumerate(paths):
            row: dict[str, Any] = {c: None for c in columns(self.top_k)}
            row.update(path=path, model_version=self.package.version, variant=self.variant)
            if i in answers:
                result = answers[i]
                for n, top in enumerate(result.top, 1):
                    row[f"top{n}_label"], row[f"top{n}_probability"] = top["label"], top["probability"]
                row["unknown"], row["unknown_score"] = result.unknown, result.score
            else:
                row["error"] = images[i]
            rows.append(row)
        return rows


def predict(
    package: ModelPackage,
    registries: Registries,
    sources: Sequence[str],
    out: Path,
    *,
    variant: str = "fp32",
    top_k: int = 5,
    batch_size: int = 32,
    threads: int | None = None,
    resume: bool = False,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Classify every photo of ``sources`` into ``out``; a summary (photos, errors, skipped, photos/s)."""
    from tqdm import tqdm

    output = Output(Path(out), top_k, resume)
    paths = [p for p in list_sources(sources, storage_options) if p not in output.done]
    skipped = len(output.done)
    engine = Engine.load(package, registries, variant, top_k, threads)
    read = _reader(storage_options, engine.preprocessor.limits.max_bytes)

    def prepare(path: str) -> np.ndarray | str:
        return _prepared(engine.preprocessor, read, path)

    started, errors = time.perf_counter(), 0
    bar = tqdm(
        total=len(paths), unit="photo", disable=not progress, desc=f"{package.domain} v{package.version}"
    )
    batches = list(_chunks(paths, batch_size))
    with ThreadPoolExecutor(max_workers=max(1, threads or os.cpu_count() or 1)) as pool:
        # the next batch decodes on the pool while the engine runs this one
        pending = [pool.submit(prepare, p) for p in batches[0]] if batches else []
        for n, batch in enumerate(batches):
            images = [future.result() for future in pending]
            pending = [pool.submit(prepare, p) for p in batches[n + 1]] if n + 1 < len(batches) else []
            rows = engine.rows(batch, images)
            output.write(rows)
            errors += sum(1 for r in rows if r["error"])
            bar.update(len(batch))
    bar.close()
    output.finish()
    took = time.perf_counter() - started
    return {
        "out": str(out),
        "photos": len(paths),
        "errors": errors,
        "skipped_already_done": skipped,
        "seconds": round(took, 2),
        "photos_per_s": round(len(paths) / took, 1) if took > 0 and paths else None,
        "model": f"{package.domain} v{package.version} {variant}",
    }


def _prepared(preprocessor: Preprocessor, read: Callable[[str], bytes], path: str) -> np.ndarray | str:
    """The model's input for the photo at ``path``, or why it could not be read (an error row)."""
    try:
        return preprocessor(read(path))
    except DataError as exc:
        return exc.message
    except OSError as exc:
        return f"could not be read ({type(exc).__name__}: {str(exc)[:200]})"


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


# -- Ray Data -----------------------------------------------------------------------------------------


class RayPredictor:
    """One actor of the Ray Data pool: its own verified copy of the package (resolved from the registry
    in the actor, checksums and signature checked there) and an engine on ``threads`` threads."""

    def __init__(
        self,
        registry: str,
        domain: str,
        version: int,
        variant: str,
        top_k: int,
        threads: int,
        trusted_keys: list[str] | None,
        storage_options: dict[str, Any] | None,
    ) -> None:
        from thali.core import build_plugin_manager
        from thali.registry import ModelRegistry

        package = ModelRegistry(registry, trusted_keys=trusted_keys).resolve(domain, version)
        self.engine = Engine.load(package, build_plugin_manager().registries, variant, top_k, threads)
        self.read = _reader(storage_options, self.engine.preprocessor.limits.max_bytes)
        self.columns = columns(top_k)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        paths = [str(p) for p in batch["path"]]
        images = [_prepared(self.engine.preprocessor, self.read, path) for path in paths]
        rows = self.engine.rows(paths, images)
        return {column: [row[column] for row in rows] for column in self.columns}


def predict_ray(
    package: ModelPackage,
    registry: str,
    sources: Sequence[str],
    out: Path,
    *,
    variant: str = "fp32",
    top_k: int = 5,
    batch_size: int = 32,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    address: str | None = None,
    resume: bool = False,
    trusted_keys: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`predict` on Ray Data: ``map_batches`` through an actor pool of ONNX Runtime sessions (one
    package copy each, ``cpus_per_actor`` threads each), written as Parquet parts and joined into ``out``
    (a ``.parquet`` file). A local Ray by default; an existing cluster at ``address`` (or ``RAY_ADDRESS``)."""
    import ray

    if Path(out).suffix.lower() != ".parquet":
        raise ConfigError(f"--out {out}: --engine ray writes Parquet (FILE.parquet)")
    output = Output(Path(out), top_k, resume)
    paths = [p for p in list_sources(sources, storage_options) if p not in output.done]
    skipped = len(output.done)
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        import logging

        if address:
            ray.init(
                address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
            )
        else:  # a local Ray of this machine's CPUs, with a small object store (rows are small)
            ray.init(
                num_cpus=os.cpu_count() or 1,
                object_store_memory=256 * 1024**2,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    total = int(ray.cluster_resources().get("CPU", 1))
    actors = actors or max(1, total // max(1, cpus_per_actor))
    say(
        f"ray: {actors} actor(s) x {cpus_per_actor} CPU each "
        f"({total} CPUs in the {'cluster' if address else 'local Ray'})"
    )
    started = time.perf_counter()
    if paths:
        dataset = ray.data.from_items([{"path": p} for p in paths])
        predicted = dataset.map_batches(
            RayPredictor,
            fn_constructor_kwargs={
                "registry": registry,
                "domain": package.domain,
                "version": package.version,
                "variant": variant,
                "top_k": top_k,
                "threads": cpus_per_actor,
                "trusted_keys": trusted_keys,
                "storage_options": storage_options,
            },
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=actors,
            num_cpus=cpus_per_actor,
        )
        output.parts.mkdir(parents=True, exist_ok=True)
        predicted.write_parquet(str(output.parts))  # whole files, each written by its actor's task
    output.finish()
    took = time.perf_counter() - started
    errors = 0
    if paths:
        import pyarrow.parquet as pq

        table = pq.read_table(out, columns=["path", "error"]).to_pylist()
        asked = set(paths)
        errors = sum(1 for r in table if r["path"] in asked and r["error"])
    return {
        "out": str(out),
        "photos": len(paths),
        "errors": errors,
        "skipped_already_done": skipped,
        "seconds": round(took, 2),
        "photos_per_s": round(len(paths) / took, 1) if took > 0 and paths else None,
        "model": f"{package.domain} v{package.version} {variant}",
        "actors": actors,
        "cpus_per_actor": cpus_per_actor,
    }
