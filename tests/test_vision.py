"""Images, PDFs and audio in chat requests: what reaches each dialect, what a route needs."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy import dialect, dialects
from proxy.errors import BadRequest
from tests.conftest import Proxy
from tests.fake_mistral import FakeMistral
from tests.test_dialects import MISTRAL, SELFHOSTED

PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4"
       "DwABBAEAghPYWQAAAABJRU5ErkJggg==")
PDF = "JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDwvVHlwZSAvQ2F0YWxvZz4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"


def ask(*parts: dict[str, Any]) -> dict[str, Any]:
    return dialect.chat({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]})


def test_image_parts_reach_a_mistral_route_intact() -> None:
    parts = [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg",
                                                 "detail": "high"}},
             {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
             {"type": "image_url", "image_url": "https://example.com/b.png"}]
    request = ask(*parts)
    assert dialect.needs(request, "chat") == {"chat", "vision"}
    sent = dialects.chat_body(request, MISTRAL)["messages"][0]["content"]
    assert sent[1:] == parts


def test_inline_pdf_becomes_a_mistral_document_and_needs_documents() -> None:
    request = ask({"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}",
                                            "filename": "terms.pdf"}},
                  {"type": "file", "file": {"file_data": PDF}})
    assert dialect.needs(request, "chat") == {"chat", "documents"}
    sent = dialects.chat_body(request, MISTRAL)["messages"][0]["content"]
    assert sent[1] == {"type": "document_url", "document_name": "terms.pdf",
                       "document_url": f"data:application/pdf;base64,{PDF}"}
    assert sent[2] == {"type": "document_url", "document_url": f"data:application/pdf;base64,{PDF}"}
    # The OpenAI dialect keeps OpenAI's own shape.
    assert dialects.chat_body(request, SELFHOSTED)["messages"][0]["content"][1]["type"] == "file"


def test_audio_becomes_mistrals_base64_string_and_needs_audio() -> None:
    request = ask({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})
    assert dialect.needs(request, "chat") == {"chat", "audio"}
    sent = dialects.chat_body(request, MISTRAL)["messages"][0]["content"][1]
    assert sent == {"type": "input_audio", "input_audio": "UklGRg=="}


@pytest.mark.parametrize(("part", "says"), [
    ({"type": "file", "file": {"file_id": "file-abc"}}, "file_id"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.jpg"}}, "image_url"),
    ({"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}}, "image_url"),
    ({"type": "input_audio", "input_audio": "UklGRg=="}, "input_audio"),
    ({"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}, "video_url"),
])
def test_parts_with_no_mistral_shape_are_a_clear_400(part: dict[str, Any], says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        ask(part)
    assert caught.value.status == 400 and caught.value.param == "messages[0].content[1]"
    assert says in caught.value.message


def test_images_only_in_user_messages() -> None:
    with pytest.raises(BadRequest, match="not supported in a system message"):
        dialect.chat({"model": "m", "messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": PNG}}]}]})


# -- end to end: the openai SDK -> euroute -> the fake ---------------------------------------


def test_images_reach_the_vision_route_intact(proxy: Proxy, app_key: str,
                                              fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    parts: list[Any] = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]
    fake.answer_next("Two images.", thinking="Look at both.")
    reply = client.chat.completions.create(model="magistral-small-2509",
                                           messages=[{"role": "user", "content": parts}])
    assert reply.choices[0].message.content == "Two images."
    assert fake.last.json["messages"][0]["content"] == parts


def test_documents_need_a_route_that_reads_them_and_file_ids_are_refused(
        proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    pdf = {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}",
                                    "filename": "terms.pdf"}}
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="magistral-small-2509", messages=[
            {"role": "user", "content": [{"type": "text", "text": "Summarise"}, pdf]}])
    assert {"route": "mistral-eu-magistral-small", "requirement": "capabilities",
            "message": "route lacks documents"} in denied.value.body["reasons"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="magistral-small-2509", messages=[
            {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}])
    assert "file_id" in refused.value.message
    assert fake.received == []
