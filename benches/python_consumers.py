"""Python consumers of the bench feed, side by side, one per run.

usage: python_consumers.py CLIENT WS_URL WARMUP_SECONDS MEASURE_SECONDS

CLIENT is one of wirepool (raw codec: the same whole frames the plain clients get),
wirepool-json (json codec: the payload text), websockets, websocket-client, picows.
Each subscribes to channel c0 on WS_URL/feed, takes every message's payload as a
Python object and its length (the least work a consumer can do), and prints one JSON
line: messages per second over the measured window, and a gap check from the
sequence numbers of the window's first and last frames.
"""

import asyncio
import json
import os
import re
import sys
import time

SUBSCRIBE = '{"type":"subscribe","channel":"c0"}'
SEQ = re.compile(rb'"seq":(\d+)')
# The clock is read once per batch, and every 64 messages for per-message clients.
EVERY = 64


def seq_of(frame):
    if isinstance(frame, str):
        frame = frame.encode()
    match = SEQ.search(frame)
    return int(match.group(1)) if match else None


class Meter:
    """A warm-up, then a measured window opened and closed on batch boundaries."""

    def __init__(self, warmup, measure):
        self.warmup = warmup
        self.measure = measure
        self.first = None
        self.opened = None
        self.last = None
        self.counted = 0
        self.bytes = 0
        self.seq_opened = None
        self.seq_last = None

    def batch(self, count, last_frame=None):
        """Records `count` messages handed over now; True once the window is over."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if self.opened is None:
            if now - self.first >= self.warmup:
                self.opened = now
                if last_frame is not None:
                    self.seq_opened = seq_of(last_frame)
            return False
        self.counted += count
        self.last = now
        if now - self.opened >= self.measure:
            if last_frame is not None:
                self.seq_last = seq_of(last_frame)
            return True
        return False

    def result(self, name, **extra):
        seconds = (self.last - self.opened) if self.last and self.opened else 0.0
        out = {
            "measure": name,
            "msgs_per_s": round(self.counted / seconds) if seconds > 0 else 0,
            "messages": self.counted,
            "seconds": seconds,
        }
        if self.seq_opened is not None and self.seq_last is not None:
            out["gaps"] = (self.seq_last - self.seq_opened) - self.counted
        out.update(extra)
        return out


def run_wirepool(url, meter, codec):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
    import wirepool

    codec_config = {"builtin": codec}
    if codec == "raw":
        codec_config["config"] = {
            "subscribe_frame": SUBSCRIBE.replace("c0", "{channel}"),
            "unsubscribe_frame": SUBSCRIBE.replace("c0", "{channel}").replace("subscribe", "unsubscribe"),
        }
    config = {
        "servers": [{"url": url}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "codec": codec_config,
    }
    with wirepool.Pool(config) as pool:
        pool.wait_ready(30.0)
        pool.subscribe("c0")
        idle_since = time.perf_counter()
        size = 0
        while True:
            batch = pool.recv_many(4096, timeout=0.2)
            if not batch:
                if time.perf_counter() - idle_since > 15:
                    raise RuntimeError("no data for 15 s")
                continue
            idle_since = time.perf_counter()
            for message in batch:
                size += len(message.payload)
            last = batch[-1].payload if codec == "raw" else None
            if meter.batch(len(batch), last):
                break
        meter.bytes = size
        # Stop the feed and drain before closing, so the close handshake does not wait
        # behind a flood of data.
        pool.unsubscribe("c0")
        deadline = time.perf_counter() + 10
        while pool.recv_many(4096, timeout=0.3) and time.perf_counter() < deadline:
            pass
    return meter.result("python_wirepool" if codec == "raw" else "python_wirepool_json", version=getattr(wirepool, "__version__", None))


def run_websockets(url, meter):
    import websockets
    from websockets.asyncio.client import connect

    async def consume():
        async with connect(url, compression=None, max_size=None, ping_interval=None) as ws:
            await ws.send(SUBSCRIBE)
            size = 0
            count = 0
            while True:
                frame = await ws.recv(decode=False)
                size += len(frame)
                count += 1
                if count == EVERY:
                    count = 0
                    if meter.batch(EVERY, frame):
                        break
            meter.bytes = size

    asyncio.run(consume())
    return meter.result("python_websockets", version=websockets.__version__)


def run_websocket_client(url, meter):
    import websocket

    ws = websocket.create_connection(url, timeout=15)
    ws.send(SUBSCRIBE)
    size = 0
    count = 0
    while True:
        frame = ws.recv()
        size += len(frame)
        count += 1
        if count == EVERY:
            count = 0
            if meter.batch(EVERY, frame):
                break
    meter.bytes = size
    ws.close(timeout=1)
    return meter.result("python_websocket_client", version=websocket.__version__)


def run_picows(url, meter):
    import picows
    from picows import WSListener, WSMsgType, ws_connect

    class Listener(WSListener):
        def __init__(self):
            self.count = 0
            self.size = 0

        def on_ws_connected(self, transport):
            transport.send(WSMsgType.TEXT, SUBSCRIBE.encode())

        def on_ws_frame(self, transport, frame):
            if frame.msg_type != WSMsgType.TEXT:
                return
            payload = frame.get_payload_as_bytes()
            self.size += len(payload)
            self.count += 1
            if self.count == EVERY:
                self.count = 0
                if meter.batch(EVERY, payload):
                    transport.disconnect()

    async def consume():
        transport, listener = await ws_connect(Listener, url)
        await transport.wait_disconnected()
        meter.bytes = listener.size

    asyncio.run(consume())
    return meter.result("python_picows", version=picows.__version__ if hasattr(picows, "__version__") else None)


def main():
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    client, url, warmup, measure = sys.argv[1], sys.argv[2] + "/feed", float(sys.argv[3]), float(sys.argv[4])
    meter = Meter(warmup, measure)
    runners = {
        "wirepool": lambda: run_wirepool(url, meter, "raw"),
        "wirepool-json": lambda: run_wirepool(url, meter, "json"),
        "websockets": lambda: run_websockets(url, meter),
        "websocket-client": lambda: run_websocket_client(url, meter),
        "picows": lambda: run_picows(url, meter),
    }
    if client not in runners:
        print(f"unknown client {client}; expected one of {', '.join(runners)}", file=sys.stderr)
        return 2
    result = runners[client]()
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
