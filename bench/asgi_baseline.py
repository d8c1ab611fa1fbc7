"""A framework-free ASGI receiver, as people run one under uvicorn: read the body, gunzip when needed,
append it to one file (no fsync), answer 200.  The output file is $BENCH_OUTPUT."""

import gzip
import os

OUTPUT = os.environ.get("BENCH_OUTPUT", "Data.txt")


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    with open(OUTPUT, "ab") as handle:
        handle.write(body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
