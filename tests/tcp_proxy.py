"""A TCP proxy on 127.0.0.1 that can break a connection right after the server answered a request.

That is the failure a client cannot see through: the server ran the command, the reply was lost.
`cut_after(marker)` arms it: the next request containing `marker` is forwarded, and when the server
answers, both sides of that connection are closed instead of passing the answer on. `go_down()` plays
a server restart: every connection breaks and new ones are closed at once, until `come_back()`.
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cuts = 0  # answers dropped so far
        self._marker: bytes | None = None
        self._down = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut_after(self, marker: bytes) -> None:
        self._marker = marker

    async def go_down(self) -> None:
        self._down = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def come_back(self) -> None:
        self._down = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._down:
            client_w.close()
            return
        server_r, server_w = await asyncio.open_connection(*self.target)
        doomed = asyncio.Event()  # set once this connection forwarded the marked request
        pumps = [
            asyncio.create_task(self._requests(client_r, server_w, doomed)),
            asyncio.create_task(self._answers(server_r, client_w, doomed)),
        ]
        self._tasks.update(pumps)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()
        self._tasks.difference_update(pumps)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, doomed: asyncio.Event) -> None:
        while data := await reader.read(65536):
            if self._marker is not None and self._marker in data:
                self._marker = None
                doomed.set()
            writer.write(data)
            await writer.drain()

    async def _answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, doomed: asyncio.Event) -> None:
        while data := await reader.read(65536):
            if doomed.is_set():
                self.cuts += 1
                return
            writer.write(data)
            await writer.drain()
