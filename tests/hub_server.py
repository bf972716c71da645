"""A loopback stand-in for the Hugging Face Hub: serves one directory as a model repository in the
hub's URL scheme (resolve/ downloads with the headers huggingface_hub reads, and paths-info), and
records which files were downloaded."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, repo_id: str, root: Path):
        self.repo_id, self.root = repo_id, root
        self.downloaded: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _file(self) -> Path | None:
                prefix = f"/{server.repo_id}/resolve/"
                path = unquote(self.path.split("?")[0])
                if not path.startswith(prefix):
                    return None
                name = path[len(prefix):].split("/", 1)[1]
                file = server.root / name
                return file if file.is_file() else None

            def _head(self, file: Path | None) -> None:
                if file is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(file.read_bytes()).hexdigest()}"')
                self.send_header("Content-Length", str(file.stat().st_size))
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._head(self._file())

            def do_GET(self) -> None:  # noqa: N802
                file = self._file()
                self._head(file)
                if file is not None:
                    server.downloaded.append(file.name)
                    self.wfile.write(file.read_bytes())

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                paths = parse_qs(body).get("paths", [])
                info = [{"type": "file", "path": p, "size": (server.root / p).stat().st_size,
                         "oid": hashlib.sha1((server.root / p).read_bytes()).hexdigest()}
                        for p in paths if (server.root / p).is_file()]
                data = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()
