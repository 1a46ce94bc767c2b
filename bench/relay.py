"""The relay's own cost per stream event, in process: `proxy.surfaces.Relay` on a 20-event
stream (plain text chunks, then usage, then [DONE]), one event per call as a network read
delivers them, provider-key scrubbing on (proxy/scrub.py).

    python bench/relay.py              # a few seconds
    python bench/relay.py --smoke      # once through, no numbers worth reading

Cases: the chat surface relaying chunks as they came; the same with the words streamed as
one tool call's arguments; the chat surface folding Magistral's thinking chunks (every event
re-encoded); the Responses surface (every event rendered). Each with a Mistral-style key
(32 random characters) and an `sk-` key, whose first character ends many English words and so
sends more events down the slower path.
"""

from __future__ import annotations

import argparse
import functools
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import sse
from proxy.dialects import mistral
from proxy.scrub import Scrubber
from proxy.surfaces import Relay, chat, responses

KEYS = {"Mistral-style key": "Xq7Lm2Vb9Rt4Zp8Kc3Wn6Yh1Jd5Fg0Ts", "sk- key": "sk-upstream-test"}
WORDS = ("The provider keys are scrubbed from every stream event, and the thinking too; this "
         "answer has twenty pieces of ordinary text, as models send them.").split(" ")
HEAD = {"id": "cmpl-5b1c9a8e7d6f4e3a", "object": "chat.completion.chunk", "created": 1733000000,
        "model": "magistral-small-2509"}
USAGE = {"prompt_tokens": 7, "completion_tokens": 19, "total_tokens": 26}


def events(kind: str) -> list[list[sse.Event]]:
    def event(delta: dict[str, Any], **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if extra else None}
        return b"data: " + orjson.dumps({**HEAD, "choices": [choice], **extra}) + b"\n\n"

    def piece(word: str) -> dict[str, Any]:
        if kind == "thinking":
            return {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": word}]}]}
        if kind == "tool":
            return {"tool_calls": [{"index": 0, "function": {"arguments": word}}]}
        return {"content": word}

    raw = [event({"role": "assistant", "content": ""})]
    raw += [event(piece(" " + w)) for w in WORDS[:18]]
    raw += [event({"content": ""}, usage=USAGE), b"data: [DONE]\n\n"]
    parser = sse.Parser(1 << 20)
    return [parser.feed(r) for r in raw]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run each case once")
    smoke = parser.parse_args().smoke
    plain, tool, thinking = events("text"), events("tool"), events("thinking")
    cases = [("chat, as it came", plain, lambda: chat.ChatStream(False, False)),
             ("chat, tool arguments", tool, lambda: chat.ChatStream(False, False)),
             ("chat, thinking folded", thinking, lambda: chat.ChatStream(False, False)),
             ("responses", plain, lambda: responses.ResponsesStream(responses.parse(
                 {"model": "m", "input": "hi", "stream": True}, {})))]
    n_events = len(plain) - 1  # [DONE] counted in the time, not as an event
    for label, key in KEYS.items():
        scrub = Scrubber([key])  # built once per policy set, as the gateway does
        for name, stream, make in cases:
            number = 1 if smoke else 1000
            best = min(timeit.repeat(functools.partial(relay, stream, make, scrub),
                                     number=number, repeat=1 if smoke else 7))
            print(f"{label:18s} {name:22s} {best / number / n_events * 1e6:6.2f} us/event")


def relay(stream: list[list[sse.Event]], surface: Callable[[], Any], scrub: Scrubber) -> None:
    relay = Relay(surface(), mistral.chunk, scrub)
    for batch in stream:
        relay.relay(batch)


if __name__ == "__main__":
    main()
