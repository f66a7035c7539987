"""A minimal fake of the DANDI REST API, for tests and `zarrfs demo` only.

Owns: a stdlib `ThreadingHTTPServer` on 127.0.0.1 (free port) answering the few endpoints zarrfs
uses (see DANDI-FORMATS: The REST API): the DRF-paginated list of dandisets, the dandiset
(`most_recent_published_version`, `draft_version`), its versions, DRF-paginated asset rows per
version, and `GET /zarr/<id>/` reporting the draft state of each Zarr. Unknown ids answer 404
`{"detail": "Not found."}`. Every request path is recorded in `requests` so tests can assert what a
client asked for; `max_page_size` can be lowered so that a few dandisets take several pages;
`latency` (seconds, default 0) delays every response, as `LocalS3(latency=...)` does for S3, so that
benchmarks see a remote API (the delays of concurrent requests overlap).

Never does: S3, FUSE, writes, or anything a real mount depends on. Handlers run on server threads;
`zarrs` may be changed by a test (a Zarr edited in the draft) between requests, the rest is
immutable after construction, and `requests` is guarded by a lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

if TYPE_CHECKING:
    from zarrfs.demo.sample import SampleDandiset

log = logging.getLogger(__name__)

#: DRF page size when none is asked for, and the largest the archive allows.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_NOT_FOUND = {"detail": "Not found."}


def dandisets_from_sample(sample: SampleDandiset) -> dict[str, dict[str, Any]]:
    """The `dandisets` argument of `FakeDandiAPI` describing a `SampleDandiset`."""
    versions: dict[str, dict[str, Any]] = {}
    for version, state in sample.versions.items():
        versions[version] = {"metadata": state.metadata, "assets": state.asset_rows}
    return {
        sample.dandiset_id: {
            "most_recent_published_version": sample.most_recent_published_version,
            "versions": versions,
        }
    }


def zarrs_from_sample(sample: SampleDandiset) -> dict[str, dict[str, Any]]:
    """The `zarrs` argument of `FakeDandiAPI`: each Zarr as the API reports it (draft state)."""
    draft = sample.versions["draft"]
    out: dict[str, dict[str, Any]] = {}
    for path, zarr_id in draft.zarr_ids.items():
        checksum = draft.zarr_checksums[path]
        _md5, count, size = checksum.replace("--", "-").split("-")
        out[zarr_id] = {
            "name": path.rsplit("/", 1)[-1],
            "dandiset": sample.dandiset_id,
            "zarr_id": zarr_id,
            "status": "Complete",
            "checksum": checksum,
            "file_count": int(count),
            "size": int(size),
        }
    return out


def _version_summary(version: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    metadata = entry.get("metadata", {})
    rows = entry.get("assets", [])
    return {
        "version": version,
        "name": metadata.get("name", ""),
        "asset_count": len(rows),
        "size": sum(int(r.get("size", 0)) for r in rows),
        "status": "Valid" if version == "draft" else "Published",
        "created": metadata.get("dateCreated"),
        "modified": metadata.get("datePublished") or metadata.get("dateCreated"),
    }


class FakeDandiAPI:
    """The fake API server. Use as a context manager; `url` is like `http://127.0.0.1:PORT/api`.

    Built from a `SampleDandiset` (`FakeDandiAPI(sample)`), or from plain dicts. `dandisets`:
    id -> {"most_recent_published_version": str | None,
    "versions": {version: {"metadata": dict, "assets": [API rows]}}}.
    `zarrs`: zarr id -> the body of `GET /zarr/<id>/`. `latency`: seconds added to every response.
    """

    def __init__(
        self,
        dandisets: SampleDandiset | Mapping[str, Mapping[str, Any]],
        zarrs: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        more: SampleDandiset | Mapping[str, Mapping[str, Any]] | None = None,
        max_page_size: int = MAX_PAGE_SIZE,
        latency: float = 0.0,
    ) -> None:
        merged: dict[str, Mapping[str, Any]] = {}
        all_zarrs: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (zarrs or {}).items()}
        for part in (dandisets, more):
            if part is None:
                continue
            if not isinstance(part, Mapping):
                all_zarrs.update(zarrs_from_sample(part) if zarrs is None else {})
                part = dandisets_from_sample(part)
            merged.update(part)
        self.dandisets: Mapping[str, Mapping[str, Any]] = merged
        self.zarrs: dict[str, dict[str, Any]] = all_zarrs
        self.max_page_size = max_page_size
        self.latency = latency
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeDandiAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle's algorithm the body waits for
            # the client's delayed ACK of the headers, 40 ms per response on a kept-alive
            # connection, which no real API server charges.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                if api.latency > 0:
                    time.sleep(api.latency)
                status, body = api.handle(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("fake API: " + format, *args)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        host, port = server.server_address[:2]
        self.url = f"http://{host!s}:{port}/api"
        self._thread = threading.Thread(target=server.serve_forever, name="fake-dandi-api")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeDandiAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # routing (pure apart from recording the request) -------------------------------------------

    def handle(self, raw_path: str) -> tuple[int, Any]:
        """Answer one GET of `raw_path` (path and query): (HTTP status, JSON body)."""
        with self._lock:
            self.requests.append(raw_path)
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [p for p in split.path.split("/") if p]
        if not parts or parts[0] != "api":
            return HTTPStatus.NOT_FOUND, _NOT_FOUND
        parts = parts[1:]
        match parts:
            case ["dandisets"]:
                rows = [self._dandiset(i)[1] for i in sorted(self.dandisets)]
                return self._page(split.path, query, rows)
            case ["dandisets", dandiset_id]:
                return self._dandiset(dandiset_id)
            case ["dandisets", dandiset_id, "versions"]:
                return self._versions(dandiset_id)
            case ["dandisets", dandiset_id, "versions", version]:
                entry = self._version(dandiset_id, version)
                if entry is None:
                    return HTTPStatus.NOT_FOUND, _NOT_FOUND
                return HTTPStatus.OK, entry.get("metadata", {})
            case ["dandisets", dandiset_id, "versions", version, "assets"]:
                return self._assets(split.path, dandiset_id, version, query)
            case ["zarr", zarr_id]:
                if zarr_id not in self.zarrs:
                    return HTTPStatus.NOT_FOUND, _NOT_FOUND
                return HTTPStatus.OK, dict(self.zarrs[zarr_id])
        return HTTPStatus.NOT_FOUND, _NOT_FOUND

    def _version(self, dandiset_id: str, version: str) -> Mapping[str, Any] | None:
        dandiset = self.dandisets.get(dandiset_id)
        if dandiset is None:
            return None
        entry: Mapping[str, Any] | None = dandiset.get("versions", {}).get(version)
        return entry

    def _dandiset(self, dandiset_id: str) -> tuple[int, Any]:
        dandiset = self.dandisets.get(dandiset_id)
        if dandiset is None:
            return HTTPStatus.NOT_FOUND, _NOT_FOUND
        versions = dandiset.get("versions", {})
        latest: str | None = dandiset.get("most_recent_published_version")
        draft = versions.get("draft", {})
        return HTTPStatus.OK, {
            "identifier": dandiset_id,
            "created": draft.get("metadata", {}).get("dateCreated"),
            "modified": draft.get("metadata", {}).get("dateCreated"),
            "contact_person": "Doe, Jane",
            "embargo_status": "OPEN",
            "most_recent_published_version": (
                _version_summary(latest, versions[latest])
                if latest is not None and latest in versions
                else None
            ),
            "draft_version": _version_summary("draft", draft) if "draft" in versions else None,
        }

    def _versions(self, dandiset_id: str) -> tuple[int, Any]:
        dandiset = self.dandisets.get(dandiset_id)
        if dandiset is None:
            return HTTPStatus.NOT_FOUND, _NOT_FOUND
        results = [_version_summary(v, e) for v, e in dandiset.get("versions", {}).items()]
        return HTTPStatus.OK, {
            "count": len(results),
            "next": None,
            "previous": None,
            "results": results,
        }

    def _assets(
        self, path: str, dandiset_id: str, version: str, query: Mapping[str, str]
    ) -> tuple[int, Any]:
        entry = self._version(dandiset_id, version)
        if entry is None:
            return HTTPStatus.NOT_FOUND, _NOT_FOUND
        rows = sorted(entry.get("assets", []), key=lambda r: str(r["path"]))
        with_metadata = query.get("metadata", "").lower() in ("true", "1")
        if not with_metadata:
            rows = [{k: v for k, v in row.items() if k != "metadata"} for row in rows]
        return self._page(path, query, rows)

    def _page(self, path: str, query: Mapping[str, str], rows: list[Any]) -> tuple[int, Any]:
        """One DRF page of `rows`, with absolute `next`/`previous` links."""
        try:
            page_size = int(query.get("page_size", DEFAULT_PAGE_SIZE))
            page = int(query.get("page", 1))
        except ValueError:
            return HTTPStatus.NOT_FOUND, {"detail": "Invalid page."}
        page_size = max(1, min(page_size, self.max_page_size))
        pages = max(1, -(-len(rows) // page_size))
        if not 1 <= page <= pages:
            return HTTPStatus.NOT_FOUND, {"detail": "Invalid page."}
        chunk = rows[(page - 1) * page_size : page * page_size]

        def link(number: int) -> str | None:
            if not 1 <= number <= pages:
                return None
            params = dict(query)
            params["page"] = str(number)
            base = self.url.removesuffix("/api")
            return f"{base}{path}?{urlencode(sorted(params.items()))}"

        return HTTPStatus.OK, {
            "count": len(rows),
            "next": link(page + 1),
            "previous": link(page - 1),
            "results": chunk,
        }
