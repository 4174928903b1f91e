"""torchrun with frozen_features: each rank computes only its shard of the feature cache, the ranks
exchange them, and every rank ends with the cache a single process makes, computed once in total."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_domain

pytestmark = pytest.mark.slow


WORKER = """
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from thali.core.training.data import ImageDataset
from thali.core.training.features import compute_features, shard_features

data, out = Path(sys.argv[1]), Path(sys.argv[2])
samples = sorted((str(p), i) for i, c in enumerate(("blue", "green", "red")) for p in (data / c).iterdir())


def transform(image):  # deterministic, so that the shards must match one process exactly
    array = np.asarray(image, dtype=np.float32)[:16, :16] / 255.0
    return {"image": torch.from_numpy(array).permute(2, 0, 1).contiguous()}


def engine(images):  # a fixed "frozen prefix": (N, 3, 16, 16) -> (N, 3, 4, 4)
    return torch.nn.functional.avg_pool2d(images, 4) * 2.0


options = {"seed": 0, "batch_size": 4, "num_workers": 0, "progress": False, "desc": "t", "views": 2}
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cached, counts = shard_features(engine, ImageDataset(samples, transform), rank=rank, world=world, **options)
single = compute_features(engine, ImageDataset(samples, transform), **options) if rank == 0 else None
saved = {"cached": vars(cached), "counts": vars(counts), "single": single and vars(single)}
torch.save(saved, out / f"{rank}.pt")
dist.destroy_process_group()
"""


def _torchrun() -> str:
    torchrun = Path(sys.executable).parent / "torchrun"
    return str(torchrun if torchrun.exists() else shutil.which("torchrun") or "torchrun")


def test_two_ranks_compute_one_shard_each_and_hold_the_single_process_cache(
    tiny_data: Path, tmp_path: Path
) -> None:
    import torch

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [_torchrun(), "--standalone", "--nproc_per_node", "2", str(script), str(tiny_data), str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(tmp_path / "0.pt", weights_only=False)["single"]
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        cached, counts = saved["cached"], saved["counts"]
        # 30 photos + 1 broken file, 2 views: 16 files (one broken) on rank 0, 15 on rank 1
        assert counts["per_rank"] == [30, 30] and counts["total"] == 60 and counts["images"] == 31
        assert cached["skipped"] == single["skipped"] == 2
        for name in ("features", "labels", "indices", "views"):
            assert torch.equal(cached[name], single[name]), name


def test_torchrun_frozen_features_caches_once_and_only_rank_0_speaks(tmp_path: Path, tiny_data: Path) -> None:
    domain = write_tiny_domain(tmp_path / "cfg")
    run_dir = tmp_path / "ddp"
    result = subprocess.run(
        [
            _torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "thali.core.cli",
            "train", str(domain), "--data", str(tiny_data), "--run-dir", str(run_dir),
            "--set", "training.mode=frozen_features", "--set", "training.trainable_stages=1",
            "--set", "training.cache_views=3", "--set", "training.epochs=2",
            "--set", "training.device=cpu", "--no-progress",
        ],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    n_train = len(json.loads((run_dir / "split.json").read_text())["train"])
    pattern = r"train feature cache computed once across 2 ranks: (\S+) \+ (\S+) = (\S+) rows"
    line = re.search(pattern, result.stdout)
    assert line, result.stdout
    a, b, total = (int(x.replace(",", "")) for x in line.groups())
    assert a + b == total == 3 * n_train  # 3 views of every training photo, once
    assert abs(a - b) <= 3  # an even split of the images
    # rank 0's log line (stderr) and its closing note (stdout); rank 1 says nothing
    assert result.stdout.count("train feature cache computed once") == 1
    assert result.stderr.count("train feature cache computed once") == 1
    assert result.stdout.count("run: ") == 1 and "tiny: val top-1" in result.stdout
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["best.pt", "last.pt"]
