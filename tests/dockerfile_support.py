"""The repository's Dockerfile as Docker's own parser reads it (PyPI ``dockerfile`` wraps BuildKit's
parser), split into its stages; and the image's environment rebuilt outside Docker, the way the
Dockerfile builds it, for the tests that run the image's entry command."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import REPO

DOCKERFILE = REPO / "Dockerfile"
VENV = "/opt/venv"  # where the Dockerfile builds the environment


@dataclass
class Stage:
    name: str
    base: str
    commands: list[Any] = field(default_factory=list)

    def all(self, instruction: str) -> list[Any]:
        return [c for c in self.commands if c.cmd == instruction]

    def one(self, instruction: str) -> Any:
        found = self.all(instruction)
        assert len(found) == 1, f"stage {self.name}: {len(found)} {instruction} instructions"
        return found[0]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for command in self.all("ENV"):
            pairs = command.value
            values.update(zip(pairs[0::2], pairs[1::2], strict=True))
        return values

    def args(self) -> dict[str, str]:
        return dict(a.value[0].partition("=")[::2] for a in self.all("ARG"))


def parse() -> tuple[dict[str, str], list[Stage]]:
    """(global ARGs before the first FROM, stages in order)."""
    import dockerfile

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            value = command.value
            assert len(value) == 3 and value[1].upper() == "AS", f"unnamed stage: {command.original}"
            stages.append(Stage(name=value[2], base=value[0]))
        elif not stages:
            assert command.cmd == "ARG", f"{command.cmd} before the first FROM"
            key, _, default = command.value[0].partition("=")
            global_args[key] = default
        else:
            stages[-1].commands.append(command)
    return global_args, stages


def stage(name: str) -> Stage:
    found = [s for s in parse()[1] if s.name == name]
    assert found, f"no stage {name!r} in the Dockerfile"
    return found[0]


def copy_context(build: Stage, dest: Path) -> None:
    """The build stage's ``COPY`` sources, from the checkout, into ``dest`` (its WORKDIR)."""
    for command in build.all("COPY"):
        assert not command.flags, f"build stage copies from another stage: {command.original}"
        *sources, target = command.value
        for source in sources:
            src = REPO / source
            out = dest / target / src.name if target.endswith("/") else dest / target
            if src.is_dir():
                shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)


def build_like_the_dockerfile(where: Path) -> Path:
    """Run the build stage's ``RUN`` lines with ``/opt/venv`` mapped to ``where/venv``, in a build
    context made of its ``COPY`` sources, with the stage's ARG defaults; returns the venv folder."""
    build = stage("build")
    context = where / "src"
    context.mkdir(parents=True)
    copy_context(build, context)
    venv = where / "venv"
    env = {**os.environ, **build.args()}
    env.pop("PIP_NO_CACHE_DIR", None)  # the image build downloads everything; here the local cache serves
    env.pop("VIRTUAL_ENV", None)
    for command in build.all("RUN"):
        script = command.value[0].replace(VENV, str(venv))
        done = subprocess.run(
            ["sh", "-c", script], cwd=context, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{command.original[:200]}\n{done.stderr[-3000:]}"
    return venv
