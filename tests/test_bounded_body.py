"""What the gateway reads of a request before its routes do: the body, bounded in size and time, as uvicorn drives
it (messages from `receive`, answers through `send`), and the field names a refusal may show."""

import asyncio

from starlette.types import Message, Receive, Scope, Send

from gateway.app import BoundedBody, field_name


def run(middleware: BoundedBody, messages: list[Message], headers: list[tuple[bytes, bytes]],
        send_delay: float = 0.0) -> list[Message]:
    sent: list[Message] = []
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # the client sends nothing more
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        await asyncio.sleep(send_delay)  # e.g. the answer waiting for its audit commit
        sent.append(message)

    scope: Scope = {"type": "http", "path": "/v1/classify", "headers": headers, "state": {}}
    asyncio.run(middleware(scope, receive, send))
    return sent


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_a_body_is_passed_on_whole_refused_past_the_limit_and_timed_out_when_dripped() -> None:
    bounded = BoundedBody(echo, limit=10, timeout=0.3)
    whole = run(bounded, [{"type": "http.request", "body": b"12345", "more_body": True},
                          {"type": "http.request", "body": b"678", "more_body": False}], [])
    assert [m.get("status") for m in whole] == [200, None] and whole[1]["body"] == b"12345678"
    declared = run(bounded, [], [(b"content-length", b"1000000")])
    assert declared[0]["status"] == 413  # refused before a byte is read
    streamed = run(bounded, [{"type": "http.request", "body": b"x" * 8, "more_body": True},
                             {"type": "http.request", "body": b"x" * 8, "more_body": True}], [])
    assert streamed[0]["status"] == 413
    dripped = run(bounded, [{"type": "http.request", "body": b"{", "more_body": True}], [])
    assert dripped[0]["status"] == 408 and b"limits.request_timeout" in dripped[1]["body"]
    # a refusal that takes long to send (its audit commit waits) is still the refusal, sent once
    slow = run(bounded, [{"type": "http.request", "body": b"x" * 11, "more_body": True}], [], send_delay=0.5)
    assert [m.get("status") for m in slow] == [413, None]


def test_a_refusal_names_the_field_and_never_a_key_that_is_client_text() -> None:
    assert field_name(("body", "messages", 0, "role")) == "messages.0.role"
    assert field_name(("body", "stream_options", "Jane Roe, MRN 12345")) == "stream_options.<key>"
    assert field_name(("body", "\ud800")) == "<key>" and field_name(("body", "k" * 65)) == "<key>"
