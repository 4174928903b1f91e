"""What a conformance check reports, and the report a person reads."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

STATUSES = ("passed", "failed", "skipped")
MARKS = {"passed": "✓", "failed": "✗", "skipped": "-"}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one component.

    ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"``; ``detail`` is one line (what was
    measured, why it failed, or why it did not run); ``seconds`` is the check's wall time.
    ``distribution`` is the installed distribution (and version) that brought the plugin, when known.
    """

    component_kind: str
    component_name: str
    plugin: str
    check: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    distribution: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_result(result: CheckResult) -> str:
    """One line: ``✓ kind name: check (0.12 s) — detail``; a failed line also names the plugin and its
    distribution, so that it stands on its own when copied out of the report."""
    line = f"{MARKS.get(result.status, '?')} {result.component_kind} {result.component_name}: {result.check}"
    line += f" ({result.seconds:.2f} s)"
    if result.detail:
        line += f" — {result.detail}"
    if result.failed and f"plugin {result.plugin!r}" not in result.detail:  # thali's own errors name it
        line += f" [plugin {result.plugin!r}, {result.distribution or 'distribution unknown'}]"
    return line


def plugin_header(result: CheckResult) -> str:
    """The line that opens a plugin's block in a report."""
    return f"{result.plugin}  [{result.distribution or 'distribution unknown'}]"


def format_report(results: Iterable[CheckResult]) -> str:
    """One line per check, under one header line per plugin (in the order the results came)."""
    lines: list[str] = []
    current: tuple[str, str | None] | None = None
    for result in results:
        if (result.plugin, result.distribution) != current:
            current = (result.plugin, result.distribution)
            lines.append(plugin_header(result))
        lines.append("  " + format_result(result))
    return "\n".join(lines)


def counts(results: Iterable[CheckResult]) -> dict[str, int]:
    """How many checks passed, failed and were skipped."""
    tally = dict.fromkeys(STATUSES, 0)
    for result in results:
        tally[result.status] = tally.get(result.status, 0) + 1
    return tally


def summary(results: Iterable[CheckResult]) -> str:
    """``N passed, M failed, K skipped``."""
    tally = counts(results)
    return f"{tally['passed']} passed, {tally['failed']} failed, {tally['skipped']} skipped"


def assert_conformant(results: Sequence[CheckResult]) -> None:
    """Raise :class:`AssertionError` with the whole report when any check failed (for a plugin's own
    pytest suite); skipped checks do not fail."""
    results = list(results)
    failed = [r for r in results if r.failed]
    if failed:
        names = sorted({f"{r.component_kind} {r.component_name}" for r in failed})
        raise AssertionError(
            f"{len(failed)} conformance check(s) failed ({', '.join(names)}); {summary(results)}\n"
            + format_report(results)
        )
