"""/docs in a real browser with the network off: headless Chromium (Debian's `chromium`,
installed by `make install`) renders Swagger UI from this server's own assets, the predict
operation included, and the page asks no other host for anything."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

from conftest import listening, make_settings

CHROMIUM = shutil.which("chromium") or "chromium"
# Every host name fails to resolve but 127.0.0.1, and whatever still tries to go out (an IP
# address) is sent to a proxy on the discard port, where nothing listens.
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9")
# The operation's row as Swagger UI's JavaScript renders it from /openapi.json: a POST whose
# summary path is the route's.
OPERATION = r'opblock-summary-method">POST</span>(?:(?!opblock-summary-method).)*?data-path="{}"'


def render(url: str, profile: Path) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran (15 s of virtual time: timers run at once), and
    the URLs the page itself requested (Chromium's net log: requests the page initiated;
    the browser's own background requests are not the page's)."""
    log = profile / "net-log.json"
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",  # as root (CI's containers) Chromium refuses to start with it
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile / 'profile'}",
        *OFFLINE,
        f"--log-net-log={log}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    events = json.loads(log.read_text())
    start_job = events["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    origin = re.match(r"https?://[^/]+", url)[0]  # type: ignore[index]
    starts = [e.get("params", {}) for e in events["events"] if e["type"] == start_job]
    requested = [p["url"] for p in starts if p.get("initiator") == origin or p.get("url") == url]
    return done.stdout, requested


def test_docs_renders_the_predict_operation_in_chromium_with_the_network_off(
    model_dir: Path, tmp_path: Path
) -> None:
    with listening(make_settings(model_dir)) as address:
        base = f"http://{address}"
        with urllib.request.urlopen(f"{base}/docs", timeout=10) as page:
            served = page.read().decode()
        dom, requested = render(f"{base}/docs", tmp_path)
    assert "data-path=" not in served  # the operations below exist only once the JS ran
    for path in ("/v1/models/{name}:predict", "/v2/models/{name}/infer"):
        assert re.search(OPERATION.format(re.escape(path)), dom, re.DOTALL), path
    assert f"{base}/openapi.json" in requested and f"{base}/docs" in requested, requested
    assert any(url.endswith("/swagger-ui-bundle.js") for url in requested), requested
    assert all(url.startswith(f"{base}/") for url in requested), requested


def test_the_browser_really_is_offline(model_dir: Path, tmp_path: Path) -> None:
    """The same server by name (localhost, which would reach it on a machine's own network)
    is not loaded: the flags above leave the browser no way to any host but 127.0.0.1."""
    with listening(make_settings(model_dir)) as address:
        port = address.rsplit(":", 1)[1]
        dom, requested = render(f"http://localhost:{port}/docs", tmp_path)
    assert "swagger-ui" not in dom and "openapi.json" not in dom
    assert requested == [f"http://localhost:{port}/docs"]  # tried, and nothing came of it
