#!/usr/bin/env python3
"""The compose stack's notification receiver: Alertmanager's webhook target, so the stack runs without the pager's
and chat's secret files (deploy/alertmanager/compose.yml routes exactly as alertmanager.yml, to here).

Every notification is printed as one line per alert (`docker compose logs -f receiver` shows pages arriving) and
the last 100 are served as JSON on GET / (`curl 127.0.0.1:9095/`). Bounded: bodies over 1 MiB are refused, each
connection times out after 10 s, and only the newest 100 notifications are kept. Standard library only.

usage: receiver.py [--listen HOST:PORT]     (default 0.0.0.0:8080; port 0 picks a free port)
"""
import argparse
import collections
import datetime
import http.server
import json
import signal
import sys
import threading

MAX_BODY = 1 << 20
KEEP = 100

received = collections.deque(maxlen=KEEP)
lock = threading.Lock()


def describe(receiver, payload):
    """One line per alert of an Alertmanager webhook payload (version 4)."""
    lines = []
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        summary = alert.get("annotations", {}).get("summary", "")
        scenario = alert.get("annotations", {}).get("scenario")
        words = [
            "PAGE" if receiver == "pager" else "NOTE",
            f"{receiver}:",
            str(alert.get("status", payload.get("status", "?"))).upper(),
            labels.get("alertname", "?"),
        ]
        words += [f"{key}={labels[key]}" for key in ("exchange", "severity", "instance") if key in labels]
        text = " ".join(words)
        if summary:
            text += f": {summary}"
        if scenario:
            text += f" (scenario {scenario})"
        lines.append(text)
    return lines


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10
    server_version = "exwatch-receiver"

    def do_POST(self):
        try:
            length = int(self.headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.answer(413, {"error": f"body must be 0 to {MAX_BODY} bytes"})
            return
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            self.answer(400, {"error": f"not an Alertmanager webhook payload: {error}"})
            return
        receiver = self.path.strip("/") or payload.get("receiver", "?")
        for line in describe(receiver, payload):
            print(line, flush=True)
        entry = {
            "received_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "receiver": receiver,
            "status": payload.get("status"),
            "alerts": payload.get("alerts", []),
        }
        with lock:
            received.append(entry)
        self.answer(200, {"status": "received"})

    def do_GET(self):
        with lock:
            self.answer(200, list(received))

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        # One line per alert is printed above; the access log would only repeat it.
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="0.0.0.0:8080")
    host, _, port = parser.parse_args().listen.rpartition(":")
    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    # As a container's PID 1 the default SIGTERM would be ignored: stop at once instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"receiver listening on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
