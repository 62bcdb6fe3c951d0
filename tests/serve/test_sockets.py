"""The server's listening socket, accepted by a real asyncio loop as uvicorn accepts it."""

import asyncio
import socket

from gptkit.serve.http import bind


def test_served_connections_send_small_writes_at_once():
    """Nagle's algorithm is off on every accepted connection: a streamed chunk written right
    after the response headers must not wait for the client's delayed ACK (it cost up to 40 ms
    per first token on kept-alive connections)."""
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def main():
        listener = bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
