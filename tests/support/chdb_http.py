"""A ClickHouse HTTP interface over chDB: a modern ClickHouse engine (chdb-core from PyPI,
ClickHouse 26.x run in-process) behind the part of ClickHouse's HTTP protocol that
engagement-cdc and its tests use. docs/testing.md says what is emulated here and what is
the real engine.

    python chdb_http.py --port PORT --path DATA_DIR

Emulated (this file): the HTTP server, `/ping`, where the query is read from (the `query`
URL parameter and/or the body, chunked or not), the `database` parameter, settings given
as URL parameters (applied with SET), one user `default` without a password, and the
error answer (HTTP 500 with `Code: N. DB::Exception: …` and `X-ClickHouse-Exception-Code`).
An INSERT's data is written to a file and read by the engine with `FROM INFILE … FORMAT`.

The real engine: parsing and running every statement, the table engines (MergeTree,
ReplacingMergeTree and FINAL), types (DateTime64, LowCardinality, Nullable, …), the
RowBinary input and output formats, system tables, error codes and messages.
"""

import argparse
import base64
import os
import re
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from chdb import session

# URL parameters of the HTTP interface that are not settings.
NOT_SETTINGS = {
    "query",
    "database",
    "user",
    "password",
    "default_format",
    "query_id",
    "session_id",
    "session_timeout",
    "compress",
    "decompress",
    "wait_end_of_query",
    "buffer_size",
}

INSERT_FORMAT = re.compile(r"^(\s*INSERT\b.*)\bFORMAT\s+(\w+)\s*;?\s*$", re.I | re.S)
ERROR_CODE = re.compile(r"Code:\s*(\d+)")


class Engine:
    """One chDB session (a data directory) used by one request at a time."""

    def __init__(self, path):
        self.session = session.Session(path)
        self.lock = threading.Lock()
        self.version = self.session.query("SELECT version()", "TabSeparated").bytes().decode().strip()
        self.tmp = tempfile.mkdtemp(prefix="chdb-http-")

    def run(self, sql, database, settings, data, fmt):
        with self.lock:
            self.session.query(f"USE `{database or 'default'}`")
            for name, value in settings:
                if not re.fullmatch(r"\w+", name):
                    raise QueryError(115, f"Unknown setting {name!r}")
                self.session.query(f"SET {name} = '{value}'")
            if data is not None:
                return self._insert(sql, data)
            return self.session.query(sql, fmt).bytes()

    def _insert(self, sql, data):
        found = INSERT_FORMAT.match(sql)
        if not found:
            raise QueryError(62, "an INSERT with data in the body must end in FORMAT <name>")
        path = os.path.join(self.tmp, "insert.bin")
        with open(path, "wb") as f:
            f.write(data)
        head, fmt = found.group(1), found.group(2)
        self.session.query(f"{head} FROM INFILE '{path}' FORMAT {fmt}")
        return b""


class QueryError(Exception):
    def __init__(self, code, message):
        super().__init__(f"Code: {code}. DB::Exception: {message}")
        self.code = code


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in ("/ping", "/"):
            if url.path == "/ping" or not url.query:
                return self.answer(200, b"Ok.\n")
        self.handle_query(url, b"")

    def do_POST(self):
        url = urlsplit(self.path)
        self.handle_query(url, self.read_body())

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    # Trailer lines up to the empty one.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def credentials(self, params):
        user = self.headers.get("X-ClickHouse-User") or params.get("user")
        password = self.headers.get("X-ClickHouse-Key") or params.get("password") or ""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return user or "default", password

    def handle_query(self, url, body):
        pairs = parse_qsl(url.query, keep_blank_values=True)
        params = dict(pairs)
        try:
            user, password = self.credentials(params)
            if user != "default" or password != "":
                raise QueryError(
                    516,
                    f"{user}: Authentication failed: password is incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)",
                )
            settings = [(k, v) for k, v in pairs if k not in NOT_SETTINGS and not k.startswith("param_")]
            query = params.get("query")
            data = None
            if query is None:
                query = body.decode()
            elif body:
                if INSERT_FORMAT.match(query):
                    data = body
                else:
                    query = query + "\n" + body.decode()
            if not query.strip():
                raise QueryError(62, "Empty query. (SYNTAX_ERROR)")
            fmt = params.get("default_format") or "TabSeparated"
            out = self.engine.run(query, params.get("database"), settings, data, fmt)
            self.answer(200, out)
        except QueryError as e:
            self.error(e.code, str(e))
        except Exception as e:  # chDB's own error: the real engine's code and message.
            text = str(e)
            code = ERROR_CODE.search(text)
            self.error(int(code.group(1)) if code else 1000, text)

    def error(self, code, text):
        body = f"{text} (version {self.engine.version})\n".encode()
        self.answer(500, body, {"X-ClickHouse-Exception-Code": str(code)})

    def answer(self, status, body, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True, help="data directory of the chDB session")
    args = p.parse_args()
    Handler.engine = Engine(args.path)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"chdb-http: ClickHouse {Handler.engine.version} on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
