"""The policy set in force, swapped whole when the files change, on SIGHUP, or at midnight UTC
(contracts start and end on dates). A request keeps the set it started with; an invalid new
set is refused and the old one stays, with the error logged and exposed."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from proxy.policy.load import PolicyError, PolicySet, read

log = logging.getLogger("euroute.policy")


def _signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                            for p in directory.glob("*.yaml")))
    except OSError:
        return ()


class LivePolicies:
    def __init__(self, directory: Path,
                 environment: Callable[[], Mapping[str, str]] = lambda: os.environ) -> None:
        self.directory = directory
        # Where routes' base URLs and keys come from (Settings.environment: env over .env).
        self.environment = environment
        self._signature = _signature(directory)
        self.current: PolicySet = read(directory, env=environment())  # PolicyError: no start
        self.error: str | None = None
        self.reloads = 0
        self.failed_reloads = 0
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> bool:
        self._signature = _signature(self.directory)
        try:
            fresh = read(self.directory, env=self.environment())
        except PolicyError as exc:
            self.error = str(exc)
            self.failed_reloads += 1
            log.error("policy reload refused, keeping version %s:\n%s",
                      self.current.version[:12], exc)
            return False
        if fresh.version != self.current.version or fresh.today != self.current.today:
            log.info("policies now at version %s (was %s)", fresh.version[:12],
                     self.current.version[:12])
        self.current, self.error = fresh, None
        self.reloads += 1
        return True

    def start(self, poll_s: float) -> None:
        if poll_s > 0:
            self._task = asyncio.create_task(self._watch(poll_s), name="euroute-policy-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _watch(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            if (_signature(self.directory) != self._signature
                    or dt.datetime.now(dt.UTC).date() != self.current.today):
                self.reload()
