"""A local stand-in for the Hub's HTTP API (repo creation and commits), recording what was uploaded.

Serves 127.0.0.1 only, in a thread, for the duration of a `with FakeHub() as hub:` block.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """`gate`: while it is given and not set, commits wait (to observe uploads in flight)."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.repos: set[str] = set()
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.requests: list[str] = []

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                path = self.path.split("?")[0]
                hub.requests.append(f"POST {path}")
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request['organization']}/{request['name']}" if request.get("organization") \
                        else request["name"]
                    hub.repos.add(repo)
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                parts = path.strip("/").split("/")
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    if hub.gate is not None:
                        hub.gate.wait(timeout=60)
                    if repo not in hub.repos:
                        return self._reply(404, {"error": f"Repository {repo} not found"})
                    commit = {"repo": repo, "revision": parts[5], "files": {}}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            commit["summary"] = item["value"]["summary"]
                        elif item["key"] == "file":
                            commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        else:
                            return self._reply(400, {"error": f"unsupported commit operation {item['key']}"})
                    hub.commits.append(commit)
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "commitOid": oid,
                                             "pullRequestUrl": None})
                return self._reply(404, {"error": f"not handled by FakeHub: POST {path}"})

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                return self._reply(404, {"error": f"not handled by FakeHub: GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def snapshot(self, repo: str, folder, prefix: str = "") -> None:
        """Download: write the repository's files under `prefix` (latest version of each) into `folder`."""
        from pathlib import Path

        latest = {}
        for commit in self.commits:
            if commit["repo"] == repo:
                latest.update(commit["files"])
        for path, content in latest.items():
            if path.startswith(prefix):
                target = Path(folder) / path[len(prefix):].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
