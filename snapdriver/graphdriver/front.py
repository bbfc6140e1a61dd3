"""The graphdriver front as a daemon: resume the recorded Init, serve the app, close."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from snapdriver import metrics
from snapdriver.graphdriver.app import create_app
from snapdriver.graphdriver.driver import GraphDriver
from snapdriver.graphdriver.serve import SPEC_DIR, Listen, TLSFiles, serving


@dataclass
class GraphDriverFront:
    """What ``snapdriver --backend NAME`` runs: one :class:`GraphDriver` on one listener."""

    driver: GraphDriver
    name: str
    listen: Listen
    group: int | None = None
    tls: TLSFiles | None = None
    spec_dir: Path = SPEC_DIR

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Resume, then serve until the block exits; the app's clean-up closes the record."""
        metrics.observe_resumed(await self.driver.resume())
        app = create_app(self.driver)
        async with serving(
            app, self.name, self.listen, group=self.group, tls=self.tls, spec_dir=self.spec_dir
        ) as where:
            yield f"{where} (state in {self.driver.state_dir})"
