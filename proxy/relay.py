"""Relaying an upstream `Answer` to the client: a JSON body whole, a stream event by event.

Bytes go on as they came unless they must change (a provider credential scrubbed, the
embeddings encoding, a dialect's shape folded into the client's API). A stream that fails
after its first byte can no longer change its status: it ends with the surface's error event
(proxy/surfaces/) instead of its normal end.
"""

from __future__ import annotations

import orjson

from proxy import dialect
from proxy.asgi import SSE, Send, send_json
from proxy.errors import EurouteError, UpstreamUnavailable
from proxy.scrub import Scrubber
from proxy.surfaces import Relay
from proxy.upstream import Answer

Headers = list[tuple[bytes, bytes]]


async def relay_json(send: Send, answer: Answer, base64: bool, headers: Headers,
                     scrub: Scrubber) -> None:
    raw = answer.body or b""
    if base64:  # OpenAI's SDK asks embeddings in base64; Mistral answers floats
        raw = orjson.dumps(dialect.embeddings_answer(answer.json or {}, "base64"))
    await send_json(send, 200, scrub(raw), headers)


async def relay_stream(send: Send, answer: Answer, relay: Relay,
                       headers: Headers) -> EurouteError | None:
    """Relays every event; returns what cut the stream short, or None when it ended well.

    Raises before the first byte is sent when the first events are unusable already.
    """
    if answer.events is None:
        raise TypeError("relay_stream needs a streamed answer")
    events = answer.events
    try:
        first = relay.relay(answer.first)
    except EurouteError:
        await events.aclose()
        raise
    await send({"type": "http.response.start", "status": 200,
                "headers": [SSE, (b"cache-control", b"no-cache"), *headers]})
    failure: EurouteError | None = None
    try:
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        if not relay.done:
            async for batch in events:
                out = relay.relay(batch)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if relay.done:
                    break
            else:
                failure = UpstreamUnavailable("upstream stream ended before [DONE]",
                                              code="stream_cut")
    except EurouteError as exc:
        failure = exc
    finally:
        await events.aclose()
    if failure is not None:
        await send({"type": "http.response.body", "body": relay.fail(failure),
                    "more_body": True})
    return failure
