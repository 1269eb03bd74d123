"""Load for `test_serve_robust`: N clients streaming completions for S seconds from this separate process
(a client load inside the server's own process would compete with it for the GIL, unlike real clients).
Usage: python stream_clients.py URL N SECONDS; prints `chunks TOTAL`."""

from __future__ import annotations

import asyncio
import sys

import httpx


async def _client(c: httpx.AsyncClient, url: str, i: int, end: float) -> int:
    chunks = 0
    while asyncio.get_running_loop().time() < end:
        body = {"prompt": f"Client {i} says", "max_tokens": 100, "stream": True}
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                chunks += line.startswith("data:")
    return chunks


async def main(url: str, n: int, seconds: float) -> None:
    end = asyncio.get_running_loop().time() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n + 4)) as c:
        counts = await asyncio.gather(*[_client(c, url, i, end) for i in range(n)])
    print("chunks", sum(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
