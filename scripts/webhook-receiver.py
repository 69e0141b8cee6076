#!/usr/bin/env python3
"""A webhook endpoint for the integration tests: an independent verifier of the
signatures the worker sends, and a player of the faults a school's endpoint can
show.

Every POST to /<name> or /<name>/<anything> is recorded, its Standard Webhooks
signature checked with the reference library (standardwebhooks, installed by
scripts/ensure-webhook-receiver.sh) against each --secret, and answered by the
next action of that name's script:

  PUT    /_control/<name>   body "s500,s500,ok": the actions for the next
                            requests to <name>; the last one repeats forever.
                            Unknown names play "ok".
  GET    /_log[?name=X]     the recorded requests, as a JSON list.
  DELETE /_log              forget them.

Actions:
  ok                 204, no body
  sNNN               status NNN, short text body
  ra429:N, ra503:N   429 / 503 with Retry-After: N
  redirect           307 to http://127.0.0.1:<port>/<name>-redirected
  redirect-private   302 to http://169.254.169.254/latest/meta-data/
  hang               read the request, answer nothing for 120 s
  close              read the request, close the connection without an answer
  drip               status line and headers of a 200, one byte every 0.5 s
  big                200 with a 50 MB body
  slow:S             sleep S seconds (float), then 204

Run: $WEBHOOK_VENV/bin/python scripts/webhook-receiver.py --secret whsec_... \
         [--secret whsec_...] [--port 0]
It prints one line, "listening <port>", then serves until killed.
"""
import argparse
import http.server
import json
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
import urllib.parse

from standardwebhooks.webhooks import Webhook

ACTION = re.compile(r"^(ok|s[1-5][0-9][0-9]|ra(429|503):[0-9]+|redirect|redirect-private"
                    r"|hang|close|drip|big|slow:[0-9]+(\.[0-9]*)?)$")
BIG_SIZE = 50 * 1024 * 1024
CHUNK = 64 * 1024
DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

lock = threading.Lock()
log = []        # recorded requests, in arrival order
scripts = {}    # name -> {"actions": [...], "next": index of the next action}
secrets = []    # --secret values, in order


def next_action(name):
    with lock:
        script = scripts.setdefault(name, {"actions": ["ok"], "next": 0})
        actions = script["actions"]
        action = actions[min(script["next"], len(actions) - 1)]
        script["next"] += 1
        return action


def verify(body, headers):
    """Indexes of the secrets the signature verifies with, and the first secret's error."""
    verified_by, first_error = [], None
    for index, secret in enumerate(secrets):
        try:
            # json_parse=False: verify() would otherwise json-parse the body after a
            # good signature and fail on a body that isn't JSON.
            Webhook(secret).verify(body, headers, json_parse=False)
            verified_by.append(index)
        except Exception as e:  # noqa: BLE001 - any failure is a verification failure
            if index == 0:
                first_error = str(e) or type(e).__name__
    return verified_by, first_error


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "webhook-receiver"
    sys_version = ""

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    # -- plumbing

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def answer(self, status, body=b"", headers=(), content_type="text/plain; charset=utf-8"):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if status in (204, 304) or status < 200:
            body = b""
        else:
            if body:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def answer_json(self, value):
        self.answer(200, json.dumps(value).encode(), content_type="application/json")

    def split_path(self):
        parsed = urllib.parse.urlsplit(self.path)
        return parsed.path, urllib.parse.parse_qs(parsed.query)

    # -- control

    def do_GET(self):
        path, query = self.split_path()
        if path != "/_log":
            self.answer(404, b"not found\n")
            return
        names = query.get("name")
        with lock:
            entries = [e for e in log if names is None or e["name"] in names]
        self.answer_json(entries)

    def do_DELETE(self):
        path, _ = self.split_path()
        self.read_body()
        if path != "/_log":
            self.answer(404, b"not found\n")
            return
        with lock:
            log.clear()
        self.answer(204)

    def do_PUT(self):
        path, _ = self.split_path()
        body = self.read_body()
        match = re.fullmatch(r"/_control/([^/]+)", path)
        if not match:
            self.answer(404, b"not found\n")
            return
        name = urllib.parse.unquote(match.group(1))
        actions = [a.strip() for a in body.decode("utf-8", "replace").split(",") if a.strip()]
        bad = [a for a in actions if not ACTION.match(a)]
        if bad:
            self.answer(400, f"unknown actions: {', '.join(bad)}\n".encode())
            return
        with lock:
            scripts[name] = {"actions": actions or ["ok"], "next": 0}
        self.answer(204)

    # -- webhooks

    def do_POST(self):
        path, _ = self.split_path()
        name = urllib.parse.unquote(path.lstrip("/").split("/", 1)[0])
        body = self.read_body()
        action = next_action(name)

        header = self.headers.get
        sig_headers = {k: header(k) for k in ("webhook-id", "webhook-timestamp", "webhook-signature")
                       if header(k) is not None}
        verified_by, verify_error = verify(body, sig_headers)
        try:
            skew = time.time() - int(header("webhook-timestamp"))
        except (TypeError, ValueError):
            skew = None
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        signature = header("webhook-signature")
        entry = {
            "name": name,
            "path": self.path,
            "action": action,
            "received_at": time.time(),
            "webhook_id": header("webhook-id"),
            "webhook_timestamp": header("webhook-timestamp"),
            "webhook_signature": signature,
            "signatures": len(signature.split(" ")) if signature is not None else 0,
            "verified_by": verified_by,
            "verify_error": verify_error,
            "timestamp_skew": skew,
            "content_type": header("Content-Type"),
            "user_agent": header("User-Agent"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": parsed,
            "body_bytes": len(body),
        }
        with lock:
            log.append(entry)

        try:
            self.play(name, action)
        except DISCONNECTED:
            self.close_connection = True

    def play(self, name, action):
        kind, _, arg = action.partition(":")
        if kind == "ok":
            self.answer(204)
        elif re.fullmatch(r"s[0-9]{3}", kind):
            status = int(kind[1:])
            self.answer(status, f"status {status}\n".encode())
        elif kind in ("ra429", "ra503"):
            status = int(kind[2:])
            self.answer(status, f"status {status}, retry after {arg} s\n".encode(),
                        headers=[("Retry-After", arg)])
        elif kind == "redirect":
            port = self.server.server_address[1]
            self.answer(307, headers=[("Location", f"http://127.0.0.1:{port}/{name}-redirected")])
        elif kind == "redirect-private":
            self.answer(302, headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        elif kind == "hang":
            self.close_connection = True
            time.sleep(120)
        elif kind == "close":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.connection.close()
        elif kind == "drip":
            self.close_connection = True
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 3\r\nConnection: close\r\n\r\n")
            for i in range(len(head)):
                self.wfile.write(head[i:i + 1])
                time.sleep(0.5)
            self.wfile.write(b"ok\n")
        elif kind == "big":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(BIG_SIZE))
            self.end_headers()
            chunk = b"\0" * CHUNK
            for _ in range(BIG_SIZE // CHUNK):
                self.wfile.write(chunk)
        elif kind == "slow":
            time.sleep(float(arg))
            self.answer(204)
        else:  # the control endpoint only lets known actions in
            self.answer(500, f"unknown action {action}\n".encode())


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # Skip HTTPServer's reverse lookup of the host name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], DISCONNECTED + (socket.timeout,)):
            traceback.print_exc(file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secret", action="append", default=[],
                        help="a whsec_ secret to verify with (repeatable; indexes in verified_by)")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()
    secrets.extend(args.secret)
    for secret in secrets:
        Webhook(secret)  # a malformed secret fails here, not on every request

    server = Server(("127.0.0.1", args.port), Handler)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
