"""Keep third-party chatter out of the user's terminal.

``with quiet("ONNX export"): ...`` around a call into torch.onnx, onnxscript or ONNX Runtime hides
what those libraries print while it runs, however they print it:

* their loggers' records (``onnxscript``, ``onnx_ir``, ``torch.onnx``, …) are held back instead of
  reaching any handler, and so are records logged straight on the root logger (ONNX Runtime's
  quantisation calls ``logging.info``);
* Python warnings are recorded instead of shown;
* ``sys.stdout`` / ``sys.stderr`` and file descriptors 1 and 2 point at a buffer and a temporary file,
  so ``print`` and C++ writes (ONNX Runtime's own log) are captured too.

Nothing useful is lost: the captured output, held records and warnings go to the ``thali.quiet`` logger
at DEBUG, and when the call raises, the tail of what it wrote is logged there before the error goes on.
Our own records (``thali.*`` loggers) logged inside the block, e.g. by a calibration reader ONNX Runtime
calls back, are not hidden: they are written to their console handlers as soon as the block ends.
Progress bars created before the block write to the same streams as before and render after it.

Blocks nest (and may overlap across threads): the first one in starts capturing, the last one out stops.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("thali.quiet")

#: Loggers of the libraries whose INFO/WARNING output is noise to a user of thali.
THIRD_PARTY_LOGGERS = (
    "onnx",
    "onnx_ir",
    "onnxscript",
    "onnxruntime",
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "torch._functorch",
    "torch._subclasses",
    "torch.fx",
)
#: How much of the captured output a failed call logs at DEBUG.
TAIL_CHARS = 4000

_lock = threading.RLock()
_depth = 0
_capture: _Capture | None = None


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "thali" or record.name.startswith("thali.")


def _flush_all() -> None:
    """Flush Python's and C's buffered output, so it lands on the side of the switch it was written on."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is None:  # sys.__stdout__ and sys.__stderr__ are None without a console (pythonw)
            continue
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _console(handler: logging.Handler) -> bool:
    """True for a handler that writes to the terminal (fd 1 or 2), where the capture would take it."""
    stream = getattr(handler, "stream", None)
    if stream is None:
        return False
    if stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        return True
    try:
        return stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):
        return False


def _line(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:  # a library's bad format arguments: keep what there is
        message = str(record.msg)
    return f"{record.levelname} {record.name}: {message}"


class _Hold(logging.Handler):
    """Takes a library logger's records (as text) instead of its own handlers and its ancestors'."""

    def __init__(self, held: list[str]) -> None:
        super().__init__()
        self.held = held

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(_line(record))


class _HoldRoot(logging.Filter):
    """On the root logger: records logged straight on it (by libraries; thali never does) are held."""

    def __init__(self, held: list[str]) -> None:
        super().__init__()
        self.held = held

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(_line(record))
        return False


class _Defer(logging.Filter):
    """On a console handler: our own records wait for the end of the block instead of being captured."""

    def __init__(self, handler: logging.Handler, deferred: list[tuple[logging.Handler, Any]]) -> None:
        super().__init__()
        self.handler, self.deferred = handler, deferred

    def filter(self, record: logging.LogRecord) -> bool:
        if _ours(record):
            self.deferred.append((self.handler, record))
            return False
        return True


class _Capture:
    """The process-wide capture while at least one :func:`quiet` block is open."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="thali-quiet-")  # noqa: SIM115 (closed by quiet())
        self.buffer = io.StringIO()  # what Python code writes to sys.stdout / sys.stderr
        self.saved_fds: dict[int, int] = {}
        self.saved_streams = (sys.stdout, sys.stderr)
        self.loggers: dict[str, tuple[bool, list[logging.Handler]]] = {}
        self.held: list[str] = []  # library log records, as text
        self.deferred: list[tuple[logging.Handler, Any]] = []
        self.hold = _Hold(self.held)
        self.hold_root = _HoldRoot(self.held)
        self.defers: list[tuple[logging.Handler, _Defer]] = []

    def start(self) -> None:
        for name in self._library_loggers():
            logger = logging.getLogger(name)
            self.loggers[name] = (logger.propagate, logger.handlers)
            logger.handlers, logger.propagate = [self.hold], False
        root = logging.getLogger()
        root.addFilter(self.hold_root)
        for handler in _console_handlers():
            defer = _Defer(handler, self.deferred)
            handler.addFilter(defer)
            self.defers.append((handler, defer))
        _flush_all()
        for fd in (1, 2):
            try:
                self.saved_fds[fd] = os.dup(fd)
            except OSError:  # closed: nothing reaches a terminal through it anyway
                continue
            os.dup2(self.file.fileno(), fd)
        sys.stdout = sys.stderr = self.buffer

    @staticmethod
    def _library_loggers() -> list[str]:
        """The libraries' top loggers, and those of their descendants that have handlers of their own
        (torch gives ``torch._dynamo`` and others a stderr handler and turns their propagation off)."""
        names = list(THIRD_PARTY_LOGGERS)
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if (
                isinstance(logger, logging.Logger)
                and logger.handlers
                and any(name.startswith(top + ".") for top in THIRD_PARTY_LOGGERS)
            ):
                names.append(name)
        return list(dict.fromkeys(names))

    def stop(self) -> None:
        _flush_all()
        sys.stdout, sys.stderr = self.saved_streams
        for fd, saved in self.saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.saved_fds.clear()
        for handler, defer in self.defers:
            handler.removeFilter(defer)
        logging.getLogger().removeFilter(self.hold_root)
        for name, (propagate, handlers) in self.loggers.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        for handler, record in self.deferred:  # our own records, now on the real terminal
            handler.handle(record)
        self.deferred.clear()

    def text(self, limit: int | None = None) -> str:
        """What was captured so far: held log records, Python-level output, then fd-level output."""
        _flush_all()
        parts = ["\n".join(self.held), self.buffer.getvalue(), self._file_text(limit)]
        text = "\n".join(p.rstrip("\n") for p in parts if p.strip())
        return text[-limit:] if limit else text

    def _file_text(self, limit: int | None) -> str:
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no os.pread on Windows
            size = os.fstat(self.file.fileno()).st_size
            start = max(0, size - limit) if limit else 0
            return os.pread(self.file.fileno(), size - start, start).decode("utf-8", "replace")
        return ""

    def close(self) -> None:
        self.file.close()


def _console_handlers() -> list[logging.Handler]:
    """Console handlers a ``thali.*`` record can reach: the root's, those of thali's own loggers, and
    logging's last resort (stderr, when no handler is configured at all)."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        lg
        for name, lg in list(logging.Logger.manager.loggerDict.items())
        if isinstance(lg, logging.Logger) and (name == "thali" or name.startswith("thali."))
    ]
    handlers = [h for lg in loggers for h in lg.handlers if _console(h)]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    return list(dict.fromkeys(handlers))


@contextlib.contextmanager
def quiet(what: str = "third-party call") -> Iterator[None]:
    """Run the block with third-party output captured (see the module docstring); ``what`` names the
    call in the DEBUG log."""
    global _capture, _depth
    with _lock:
        if _depth == 0:
            _capture = _Capture()
            try:
                _capture.start()
            except BaseException:
                _capture.stop()
                _capture.close()
                _capture = None
                raise
        _depth += 1
        capture = _capture
    assert capture is not None
    failed, tail = False, ""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    except BaseException:
        failed = True
        raise
    finally:
        with _lock:
            if failed:
                tail = capture.text(TAIL_CHARS)
            _depth -= 1
            last = _depth == 0
            if last:
                capture.stop()
                _capture = None
        try:
            for w in caught:
                log.debug("%s: %s: %s", what, w.category.__name__, w.message)
            if failed:
                if tail:
                    log.debug("%s failed; the end of what it wrote:\n%s", what, tail)
            elif last and log.isEnabledFor(logging.DEBUG) and (text := capture.text()):
                log.debug("%s wrote:\n%s", what, text)
        finally:
            if last:
                capture.close()


def no_update_checks() -> None:
    """Stop libraries from checking online for newer versions on import (albumentations warns, and
    waits for the network, on every run otherwise). A value the user set is kept."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
