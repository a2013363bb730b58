"""``cloudtrail-sink mappings watch``: keep a compiled mappings file in step with its YAML sources.

Contract:

* ``MappingsWatch(paths, output, build=..., clock=time.monotonic, debounce=0.5,
  poll_seconds=5.0, out=sys.stderr)``. ``build(paths)`` returns the compiled ``Built`` or
  raises ``CompileError`` (``mappings.build.build`` with the command's options).
* ``step()`` compares the sources' fingerprint (names and bytes) with the one last attempted:
  unchanged -> ``"unchanged"``. Otherwise it builds: a good build is written to ``output``
  atomically (``"published"``); a failing one prints every ``FILE:LINE: FIELD: MESSAGE`` and
  leaves ``output`` exactly as it was, the last good rules (``"failed"``). A given content is
  built once: a broken edit is reported once, not at every event. If ``output`` cannot be
  written, that is printed and the next step (event or poll) tries again (``"failed"``).
  Any other exception (a bug, a file that breaks a library) is printed once and also leaves
  ``output`` as it was (``"failed"``): the watch itself never stops because of a source; the
  same content is not built again, a changed one is.
* ``poke()`` (from any thread): a source may have changed; the build runs once no further event
  came for ``debounce`` seconds (an editor's save is several events).
* ``due(now) -> bool``: whether a step should run at ``now``: the debounce has passed, or
  ``poll_seconds`` passed since the last step (a backstop for file systems whose events do not
  reach us, e.g. some bind mounts; reading a few YAML files is cheap).
* ``run(stop)``: one step at once, then a watchdog observer on the folders of ``paths`` (every
  event counts: kubelet updates a ConfigMap volume by swapping a ``..data`` symlink, never by
  writing the ``*.yaml`` names) and steps whenever ``due``, until ``stop`` is set.
"""

from __future__ import annotations

import pathlib
import sys
import threading
import time
from typing import Callable, TextIO

from .build import Built, fingerprint, write_atomic
from .compiler import CompileError


class MappingsWatch:
    def __init__(self, paths: list[str], output: str, build: Callable[[list[str]], Built],
                 clock: Callable[[], float] = time.monotonic, debounce: float = 0.5,
                 poll_seconds: float = 5.0, out: TextIO | None = None) -> None:
        self.paths = list(paths)
        self.output = output
        self.build = build
        self.clock = clock
        self.debounce = debounce
        self.poll_seconds = poll_seconds
        self.out = out or sys.stderr
        self._attempted: str | None = None
        self._last_error: str | None = None
        self._due: float | None = None
        self._next_poll = clock() + poll_seconds
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def step(self) -> str:
        self._next_poll = self.clock() + self.poll_seconds
        try:
            return self._step()
        except Exception as exc:  # noqa: BLE001 - a bug or an odd file must not end the watch
            message = (f"{self.output}: unexpected error while building "
                       f"({type(exc).__name__}: {exc}); {self._kept()}")
            if message != self._last_error:  # once per distinct error, not at every poll
                self._say(message)
            self._last_error = message
            return "failed"

    def _step(self) -> str:
        fp = fingerprint(self.paths)
        if fp == self._attempted:
            return "unchanged"
        self._attempted = fp
        self._last_error = None
        try:
            built = self.build(self.paths)
        except CompileError as exc:
            for problem in exc.problems:
                self._say(problem)
            self._say(f"{self.output}: {len(exc.problems)} problem(s); {self._kept()}")
            return "failed"
        try:
            write_atomic(self.output, built.text)
        except OSError as exc:
            self._attempted = None  # the sources are fine: try again at the next step
            self._say(f"{self.output}: cannot write: {exc.strerror or exc}")
            return "failed"
        self._say(f"{self.output}: published {built.rules} rules from {built.files} file(s), "
                  f"{built.examples} examples passed")
        return "published"

    def _kept(self) -> str:
        return ("kept the last good file" if pathlib.Path(self.output).exists()
                else "nothing published yet")

    def poke(self) -> None:
        with self._lock:
            self._due = self.clock() + self.debounce
        self._wake.set()

    def due(self, now: float) -> bool:
        with self._lock:
            if self._due is not None and now >= self._due:
                self._due = None
                return True
        return now >= self._next_poll

    def _timeout(self, now: float) -> float:
        with self._lock:
            wake = self._next_poll if self._due is None else min(self._due, self._next_poll)
        return max(0.0, wake - now)

    def folders(self) -> list[str]:
        out = []
        for p in self.paths:
            path = pathlib.Path(p)
            folder = str(path if path.is_dir() else path.parent)
            if folder not in out:
                out.append(folder)
        return out

    def run(self, stop: threading.Event) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watch = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # noqa: D401 - watchdog's hook
                if event.event_type not in ("opened", "closed_no_write"):
                    watch.poke()

        self.step()
        observer = Observer()
        for folder in self.folders():
            try:
                observer.schedule(Handler(), folder, recursive=False)
            except OSError as exc:  # gone or not watchable: the poll still covers it
                self._say(f"{folder}: cannot watch ({exc.strerror or exc}); polling every "
                          f"{self.poll_seconds:g} s")
        observer.start()
        try:
            while not stop.is_set():
                self._wake.wait(self._timeout(self.clock()))
                self._wake.clear()
                if stop.is_set():
                    break
                if self.due(self.clock()):
                    self.step()
        finally:
            observer.stop()
            observer.join(timeout=10)

    def stop_waiting(self) -> None:
        """Wake ``run`` at once (after setting its ``stop``)."""
        self._wake.set()
