"""A small HTTP reward server on 127.0.0.1 for the tests, speaking ``reward.http``'s schema
(docs/your-problem.md), whose behaviour the test switches: it answers, hangs, fails with 500,
returns garbage or a wrong number of rewards, or dies (stops listening)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RewardServer:
    """``mode``: ``ok`` (reward = the completion's share of the letter 'a', plus a component),
    ``hang``, ``500``, ``garbage``, ``short`` (one reward too few), ``413`` (more than one
    sample is too large). ``die_after``: requests
    answered before the server stops listening."""

    def __init__(self, mode: str = "ok", die_after: int | None = None):
        self.mode, self.die_after = mode, die_after
        self.requests = 0
        self.samples: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                    server.samples.extend(body["samples"])
                    number = server.requests
                try:
                    self._answer(body["samples"], number)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, samples, number):
                if server.mode == "hang":
                    time.sleep(30)
                    return
                if server.mode == "500":
                    self.send_error(500, "reward model exploded")
                    return
                if server.mode == "413" and len(samples) > 1:
                    self.send_error(413, "one sample at a time")
                    return
                if server.mode == "garbage":
                    payload = b"<html>not json</html>"
                else:
                    rewards = [{"reward": s["completion"].count("a") / max(1, len(s["completion"])), "length": len(s["completion"])} for s in samples]
                    payload = json.dumps({"rewards": rewards[:-1] if server.mode == "short" else rewards}).encode()
                time.sleep(0.05)  # long enough for concurrent requests to overlap
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                if server.die_after is not None and number >= server.die_after:
                    threading.Thread(target=server.stop, daemon=True).start()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.alive = True

    def stop(self) -> None:
        if self.alive:
            self.alive = False
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
