"""Hub adapters are downloaded only where the operator allowed it: a real server process with
`--adapter-download-allow 'hub-org/*'` fetches from a real HTTP hub on loopback (HF_ENDPOINT),
and refuses, without any network request, an id the pattern does not match."""
from __future__ import annotations

import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_adapters import COS, cosine, make_adapter, mean_pool_reference, tokenize  # noqa: E402
from reference import minilm_dir  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["What is the statute of limitations for a contract claim?", "Hello world!"]
SHA = "0123456789abcdef0123456789abcdef01234567"


class Hub(ThreadingHTTPServer):
    """The two routes snapshot_download uses: repo info, then HEAD/GET of each file."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _HubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append(path)
        for repo, folder in self.server.repos.items():
            if path.startswith(f"/api/models/{repo}/revision/"):
                files = sorted(p.name for p in folder.iterdir())
                data = json.dumps({"id": repo, "sha": SHA,
                                   "siblings": [{"rfilename": f} for f in files]}).encode()
                return self._reply(data, "application/json", body)
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                name = path[len(prefix):].split("/", 1)[1]
                file = folder / name
                if file.is_file():
                    return self._reply(file.read_bytes(), "application/octet-stream", body)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _reply(self, data: bytes, kind: str, body: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", SHA)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    src = tmp_path_factory.mktemp("hub")
    made = make_adapter(minilm_dir(), src / "legal", r=4, targets=["query", "value", "dense"],
                        seed=11)
    want = mean_pool_reference(made["merged"], tokenize(minilm_dir(), TEXTS, 256))
    server = Hub({"hub-org/legal": src / "legal", "other-org/legal": src / "legal"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, want
    server.shutdown()


def test_download_only_where_allowed(hub, start_server, tmp_path):
    from sie_sdk import SIEClient
    from sie_sdk.errors import SIEServerError

    fake_hub, want = hub
    server = start_server(["--model", f"{MODEL}={minilm_dir()}", "--default-model", MODEL,
                           "--adapter-download-allow", "hub-org/*"],
                          env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub.url,
                               "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"})
    with SIEClient(server.url) as client:
        with pytest.raises(SIEServerError) as err:
            client.encode(MODEL, TEXTS, options={"lora_id": "other-org/legal"})
        assert err.value.status == 404 and err.value.code == "LORA_NOT_FOUND"
        assert "--adapter-download-allow" in err.value.message, err.value.message
        assert not [p for p in fake_hub.requests if "other-org" in p]  # never asked the hub

        got = client.encode(MODEL, TEXTS, options={"lora_id": "hub-org/legal"})
        assert any("hub-org/legal" in p for p in fake_hub.requests)
        assert all(cosine(r["dense"], w) >= COS for r, w in zip(got, want))
        assert (tmp_path / "hf/hub/models--hub-org--legal").is_dir()  # in the cache now
