"""A WebSocket client written on a bare TCP socket, for frames no well-behaved library sends:
fragments, binary, bad UTF-8, unmasked, lying lengths, continuation without a start."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from dataclasses import dataclass

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True,
                 declared: int | None = None) -> bytes:
    """One frame as a client sends it (masked), or as a broken one might."""
    length = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class Received:
    texts: list[str]
    close_code: int | None  # None: the connection ended without a close frame


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, receive_buffer: int | None = None) -> RawClient:
        """``receive_buffer``: the socket's, in bytes, set before connecting so that the TCP
        window stays that small (a client that stops reading then stalls the server soon)."""
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert response.startswith(b"HTTP/1.1 101"), response
        return cls(reader, writer)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def read_frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(length)

    async def text(self, wait: float = 10.0) -> str:
        """The next text frame (control frames are skipped)."""
        async with asyncio.timeout(wait):
            while True:
                opcode, payload = await self.read_frame()
                if opcode == TEXT:
                    return payload.decode()
                assert opcode != CLOSE, payload

    async def until_close(self, wait: float = 15.0) -> Received:
        """Every text frame until the server's close frame (or the end of the connection)."""
        texts: list[str] = []
        try:
            async with asyncio.timeout(wait):
                while True:
                    opcode, payload = await self.read_frame()
                    if opcode == TEXT:
                        texts.append(payload.decode())
                    elif opcode == CLOSE:
                        code = int.from_bytes(payload[:2], "big") if payload else 1005
                        return Received(texts, code)
        except (asyncio.IncompleteReadError, ConnectionError):
            return Received(texts, None)
        finally:
            self.writer.transport.abort()

    def abort(self) -> None:
        self.writer.transport.abort()
