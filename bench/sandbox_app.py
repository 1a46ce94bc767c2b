"""uvicorn factory for the benchmark's upstream: `uvicorn sandbox_app:create --factory`.

`proxy.sandbox.create_sandbox` takes keyword arguments; the uvicorn command line cannot pass
them, so they come from the environment here.
"""

from __future__ import annotations

import os

from proxy.sandbox import create_sandbox


def create():  # type: ignore[no-untyped-def]
    return create_sandbox(api_key=os.environ.get("BENCH_UPSTREAM_KEY") or None,
                          stream_chunks=int(os.environ.get("BENCH_CHUNKS", "20")))
