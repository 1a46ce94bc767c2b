"""`euroute demo`: the whole path on this machine, no API key, no internet.

A Mistral-compatible sandbox and the proxy run on loopback; an allowed, a streamed and a
denied request go through the proxy over HTTP; then the ledger is summed and verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import uvicorn
from pydantic import SecretStr

from proxy import keys, report
from proxy.app import create_app
from proxy.ledger import queries
from proxy.ledger.db import make_engine, migrate
from proxy.sandbox import create_sandbox
from proxy.settings import Settings

SANDBOX_KEY = "sandbox-upstream-key"


@contextlib.asynccontextmanager
async def serving(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run `app` under uvicorn on a free loopback port, in this event loop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           **config))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


async def run(settings: Settings, database_url: str | None = None) -> int:
    """The demo on `database_url`, else on a temporary SQLite database deleted afterwards (its
    keys are real keys: they must not land in the operator's ledger by accident)."""
    with tempfile.TemporaryDirectory(prefix="euroute-demo-") as scratch:
        url = database_url or f"sqlite+aiosqlite:///{scratch}/demo.db"
        # The demo's pseudonyms need no stable key: nothing will be erased from this ledger.
        key = settings.pseudonym_key or SecretStr(secrets.token_urlsafe(32))
        return await _run(settings.model_copy(update={"database_url": url,
                                                      "pseudonym_key": key}))


async def _run(settings: Settings) -> int:
    async with serving(create_sandbox(api_key=SANDBOX_KEY, stream_chunks=8),
                       lifespan="off") as sandbox:
        os.environ["MISTRAL_BASE_URL"] = f"{sandbox}/v1"
        os.environ["MISTRAL_API_KEY"] = SANDBOX_KEY
        _say(f"sandbox Mistral upstream on {sandbox}/v1")
        engine = make_engine(settings.database_url)
        await migrate(engine)
        standard, _ = await keys.create(engine, app="demo", policy="eu-standard", role="app",
                                        actor="cli")
        strict, _ = await keys.create(engine, app="hr-assistant", policy="eu-strict", role="app",
                                      actor="cli")
        async with serving(create_app(settings.model_copy(update={"migrate_on_start": False})),
                           lifespan="on") as proxy, httpx.AsyncClient(base_url=f"{proxy}/v1") as http:
            _say(f"euroute on {proxy}/v1, ledger "
                 f"{engine.url.render_as_string(hide_password=True)}\n")
            question = {"model": "magistral-small-2509",
                        "messages": [{"role": "user", "content": "Where is my data processed?"}]}

            _say("1. app 'demo' (policy eu-standard), a plain chat completion")
            r = await http.post("/chat/completions", json=question,
                                headers={"authorization": f"Bearer {standard}"})
            answer = r.json()
            content = answer["choices"][0]["message"]["content"]
            text = content if isinstance(content, str) else "".join(
                part.get("text", "") for part in content if part.get("type") == "text")
            _say(f"   HTTP {r.status_code} via route {r.headers['x-euroute-route']}, "
                 f"decision {r.headers['x-euroute-decision-id']}")
            _say(f"   answer: {text[:70]!r}; usage {answer['usage']}\n")

            _say("2. the same app, streamed (SSE relayed event by event)")
            events = 0
            async with http.stream("POST", "/chat/completions",
                                   json={**question, "stream": True,
                                         "stream_options": {"include_usage": True}},
                                   headers={"authorization": f"Bearer {standard}"}) as s:
                usage = None
                async for line in s.aiter_lines():
                    if line.startswith("data: {"):
                        events += 1
                        usage = orjson.loads(line[6:]).get("usage") or usage
            _say(f"   HTTP {s.status_code}, {events} events then [DONE]; usage {usage}\n")

            _say("3. app 'hr-assistant' (policy eu-strict): ZDR required, no ZDR contract signed")
            r = await http.post("/chat/completions", json=question,
                                headers={"authorization": f"Bearer {strict}"})
            error = r.json()["error"]
            _say(f"   HTTP {r.status_code} {error['code']}: {error['message']}")
            for reason in error["reasons"]:
                _say(f"   - {reason['route']}: {reason['requirement']}: {reason['message']}")
            _say(f"   nothing was sent upstream; the ledger holds decision {error['decision_id']}"
                 " (`euroute demo --database-url URL` keeps the ledger to look it up)\n")
        # Leaving the proxy flushed its ledger writer.
        _say("ledger, usage by app (euroute audit usage):")
        _say(report.table(await queries.usage(engine, group_by="app")))
        verdict = await queries.verify(engine, settings.keyring())
        _say(f"\nhash chains (euroute audit verify): "
             f"{'OK' if verdict['ok'] else 'FAILED'}, {verdict['rows']} rows")
        await engine.dispose()
        return 0 if verdict["ok"] and r.status_code == 403 else 1
