"""The static page server behind `kvgraph web`: the example web page (examples/web), its driver and exports, on
127.0.0.1. The export runs in the browser (onnxruntime-web, WebGPU or WebAssembly); this server only hands out
files. It sends the cross-origin isolation headers that let WebAssembly use several threads, and the MIME types
browsers insist on for modules and .wasm files.

    /web/      the page (examples/web, with its node_modules from `npm ci`)
    /js/       the contract driver it imports (examples/js/kvgraph.js)
    /export/   the export directory
    /vectors/  golden vectors to check in the page (--vectors)
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from urllib.parse import unquote

from kvgraph.graphs.errors import KvgraphError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # a source checkout (pip install -e .); a wheel has none
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".onnx": "application/octet-stream", ".data": "application/octet-stream", ".jinja": "text/plain; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".css": "text/css", ".png": "image/png", ".map": "application/json"}
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-cache"}


class PageHandler(http.server.SimpleHTTPRequestHandler):
    """Files under the server's mounts (URL prefix -> directory) and nothing else: no listings, no path outside them."""

    def __init__(self, *args, mounts: dict[str, Path], **kwargs) -> None:
        self.mounts = mounts
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        path = unquote(path.split("?", 1)[0].split("#", 1)[0])
        for prefix, root in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if path.startswith(prefix):
                target = (root / path[len(prefix):]).resolve()
                if target == root or root in target.parents:
                    return str(target / "index.html" if target.is_dir() else target)
        return str(Path("/nonexistent"))

    def list_directory(self, path):
        self.send_error(404, "no listing")
        return None

    def guess_type(self, path) -> str:
        return TYPES.get(Path(str(path)).suffix, "application/octet-stream")

    def end_headers(self) -> None:
        for name, value in ISOLATION.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format, *args) -> None:  # quiet: the page reports what it loads
        pass


class PageServer:
    """The page, the driver and any number of exports (mounted at /export/ or under other prefixes), in a thread."""

    def __init__(self, exports: dict[str, Path], host: str = "127.0.0.1", port: int = 0, page: Path = EXAMPLES) -> None:
        page = Path(page)
        self.mounts = {"/web/": (page / "web").resolve(), "/js/": (page / "js").resolve()}
        for prefix, directory in exports.items():
            self.mount(prefix, directory)
        handler = functools.partial(PageHandler, mounts=self.mounts)
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    def mount(self, prefix: str, directory: Path) -> None:
        self.mounts[f"/{prefix.strip('/')}/"] = Path(directory).resolve()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> PageServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="kvgraph-web", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def check_page(page: Path) -> None:
    """The page's files and its npm packages are there, or a KvgraphError saying what to do."""
    if not (page / "web" / "index.html").is_file() or not (page / "js" / "kvgraph.js").is_file():
        raise KvgraphError(f"{page}: the web page is not here (it ships in the kvgraph repository's examples/, not in the wheel); "
                           "pass --page EXAMPLES_DIR")
    if not (page / "web" / "node_modules" / "onnxruntime-web").is_dir():
        raise KvgraphError(f"{page / 'web'}: its packages are not installed; run `npm ci` there first")
