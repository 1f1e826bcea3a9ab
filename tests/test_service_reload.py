"""Models on the fly: hot reload under load, refused checkpoints, polling, Triton's
repository extension, admin gating and paths that try to leave the model directory."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import http.client
import json
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import (
    listening,
    listening_app,
    make_settings,
    metric_value,
    regression_manifest,
    regression_model,
    serve,
    tamper,
)

from service.app import create_app
from training.checkpoint import MANIFEST, WEIGHTS, save_checkpoint

PREDICT = "/v1/models/reg:predict"
BODY = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"num_samples": 20, "seed": 1}}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A model directory of its own (tests here change it): reg v1."""
    root = tmp_path / "models"
    save_checkpoint(regression_model(0), root, "reg", regression_manifest())
    return root


def new_version(root: Path, seed: int) -> Path:
    return save_checkpoint(regression_model(seed), root, "reg", regression_manifest())


def truncated_but_listed(version_dir: Path) -> None:
    """Cut the weights in half and rewrite the manifest's hash to match: the hashes pass,
    so only reading the weights (and the test forward pass) can refuse it."""
    weights = version_dir / WEIGHTS
    data = weights.read_bytes()[: weights.stat().st_size // 2]
    weights.write_bytes(data)
    manifest = json.loads((version_dir / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (version_dir / MANIFEST).write_text(json.dumps(manifest))


def reloads(metrics: str, outcome: str) -> float:
    return metric_value(metrics, "credence_model_reloads_total", model="reg", outcome=outcome)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


class Load:
    """Threads posting predictions in a loop until stopped; every answer is kept."""

    def __init__(self, base: str, threads: int = 4):
        self.base, self.stop = base, threading.Event()
        self.answers: list[tuple[float, int, int | None]] = []  # (sent at, status, version)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            while not self.stop.is_set():
                sent = time.monotonic()
                response = http.post(PREDICT, json=BODY)
                version = response.json().get("model_version") if response.is_success else None
                with self.lock:
                    self.answers.append((sent, response.status_code, version))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def since(self, moment: float) -> list[tuple[float, int, int | None]]:
        with self.lock:
            return [a for a in self.answers if a[0] > moment]


def test_hot_reload_under_load_serves_every_request_and_refuses_bad_checkpoints(models: Path):
    app = create_app(make_settings(models, admin_without_keys=True))
    with listening_app(app) as address, Load(f"http://{address}") as load:
        http = httpx.Client(base_url=f"http://{address}", timeout=60)
        wait_until(lambda: len(load.answers) > 20)
        v1 = app.state.registry.resolve("reg", 1)
        v1_model = weakref.ref(v1.model)
        v1_batcher = weakref.ref(app.state.batchers["reg", 1])
        del v1

        new_version(models, 1)  # v2, dropped in whole (save_checkpoint renames it in)
        reloaded = http.post("/v1/models/reg:reload")
        swapped = time.monotonic()
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json() == {
            "name": "reg",
            "default_version": 2,
            "loaded": [2],
            "unchanged": [1],
            "unloaded": [],
        }
        wait_until(lambda: len(load.since(swapped)) > 20)
        assert {v for _, _, v in load.since(swapped)} == {2}

        tamper(new_version(models, 2))  # v3: a bit flipped in its weights
        truncated_but_listed(new_version(models, 3))  # v4: half its weights, hashes updated
        refused = http.post("/v1/models/reg:reload")
        after_refusal = time.monotonic()
        assert refused.status_code == 422
        details = refused.json()["error"]["details"]
        assert [d["location"] for d in details] == [["versions", 3], ["versions", 4]]
        assert all(d["code"] == "checkpoint_refused" for d in details)
        assert "v2 keeps serving" in details[0]["message"]
        assert "sha256" in details[0]["message"]
        assert "v4" in details[1]["message"]
        wait_until(lambda: len(load.since(after_refusal)) > 20)
        assert {v for _, _, v in load.since(after_refusal)} == {2}

        shutil.rmtree(models / "reg" / "1")  # v1 gone from disk: unloaded, memory freed
        gone = http.post("/v1/models/reg:reload")
        assert gone.status_code == 422  # v3 and v4 are refused again
        listed = http.get("/v1/models/reg").json()
        metrics = http.get("/metrics").text
    assert [(v["version"], v["state"]) for v in listed["versions"]] == [
        (2, "loaded"),
        (3, "failed"),
        (4, "failed"),
    ]
    statuses = [status for _, status, _ in load.answers]
    assert len(statuses) > 60 and set(statuses) == {200}, "a request failed during reloads"
    assert reloads(metrics, "loaded") == 1
    assert reloads(metrics, "refused") == 4
    assert reloads(metrics, "unloaded") == 1
    gc.collect()
    assert v1_batcher() is None and v1_model() is None, "v1 is still held after its unload"


def test_requests_queued_on_a_version_finish_on_it_when_it_is_replaced(models: Path) -> None:
    """A reload that removes v1 while six requests wait for v1's batch to close (a long
    batch delay): they are answered by v1, and v1 stops only after them."""
    settings = make_settings(models, admin_without_keys=True, max_batch_delay_ms=4000)
    with serve(settings) as live:
        new_version(models, 1)
        shutil.rmtree(models / "reg" / "1")

        async def scenario() -> tuple[list[httpx.Response], httpx.Response, int]:
            queued = [
                asyncio.ensure_future(live.client.post(PREDICT, json=BODY, timeout=30))
                for _ in range(6)
            ]
            await asyncio.sleep(0.2)
            reload = await live.client.post("/v1/models/reg:reload")
            waiting = sum(not q.done() for q in queued)
            return await asyncio.gather(*queued), reload, waiting

        answers, reload, waiting = live.portal.call(scenario)
        after = live.post(PREDICT, json=BODY, timeout=30)
    assert reload.json()["loaded"] == [2] and reload.json()["unloaded"] == [1]
    assert waiting == 6, "the reload came after the requests: it tested nothing"
    assert [a.status_code for a in answers] == [200] * 6
    assert [a.json()["model_version"] for a in answers] == [1] * 6
    assert after.json()["model_version"] == 2


def test_polling_swaps_in_new_versions_and_refuses_a_corrupt_one_once(models: Path) -> None:
    with serve(make_settings(models, model_poll_s=0.1)) as live:

        def default() -> int | None:
            return live.get("/v1/models/reg").json()["default_version"]

        new_version(models, 1)
        wait_until(lambda: default() == 2)
        tamper(new_version(models, 2))
        wait_until(lambda: len(live.get("/v1/models/reg").json()["versions"]) == 3)
        time.sleep(0.5)  # several polls: the broken v3 is not read again
        served = live.post(PREDICT, json=BODY)
        listed = live.get("/v1/models/reg").json()["versions"]
        metrics = live.get("/metrics").text
        shutil.rmtree(models / "reg")
        wait_until(lambda: live.get("/v1/models/reg").status_code == 404)
    assert served.status_code == 200 and served.json()["model_version"] == 2
    assert listed[2]["state"] == "failed" and "sha256" in listed[2]["error"]
    assert reloads(metrics, "refused") == 1


def test_a_rewritten_version_that_is_corrupt_leaves_the_loaded_one_serving(models: Path):
    with serve(make_settings(models, admin_without_keys=True)) as live:
        before = live.post(PREDICT, json=BODY).json()
        tamper(models / "reg" / "1")
        refused = live.post("/v1/models/reg/versions/1:reload")
        after = live.post(PREDICT, json=BODY).json()
        state = live.get("/v1/models/reg").json()["versions"][0]
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith("reg v1 was refused (v1 keeps serving)")
    assert after["predictions"] == before["predictions"]
    assert state["state"] == "loaded" and "sha256" in state["reload_error"]


def test_admin_routes_are_off_without_keys_unless_opened(models: Path) -> None:
    with serve(make_settings(models)) as live:
        native = live.post("/v1/models/reg:reload")
        load = live.post("/v2/repository/models/reg/load")
        index = live.get("/v2/repository/index")
    assert native.status_code == 403 and native.json()["error"]["code"] == "admin_disabled"
    assert load.status_code == 403 and "CREDENCE_ADMIN_WITHOUT_KEYS" in load.json()["error"]
    assert index.status_code == 200  # reading the index changes nothing


def test_with_keys_the_admin_routes_need_one(models: Path) -> None:
    with serve(make_settings(models, api_keys="s3cret")) as live:
        missing = live.post("/v1/models/reg:reload")
        wrong = live.post("/v2/repository/models/reg/unload", headers={"authorization": "Bearer x"})
        right = live.post("/v1/models/reg:reload", headers={"authorization": "Bearer s3cret"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert right.status_code == 200 and right.json()["unchanged"] == [1]


def test_triton_clients_load_unload_and_index(models: Path) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    with listening(make_settings(models, admin_without_keys=True)) as address:
        client = triton.InferenceServerClient(address)
        assert client.is_model_ready("reg")
        assert client.get_model_repository_index() == [
            {"name": "reg", "version": "1", "state": "READY"}
        ]
        client.unload_model("reg")
        assert not client.is_model_ready("reg")
        unloaded = client.get_model_repository_index()
        new_version(models, 1)
        client.load_model("reg")
        assert client.is_model_ready("reg", "2")
        ready = client.get_model_repository_index()
        tamper(new_version(models, 2))
        with pytest.raises(InferenceServerException, match="v3 was refused"):
            client.load_model("reg")
        assert client.is_model_ready("reg")
        with pytest.raises(InferenceServerException, match="not supported"):
            client.load_model("reg", config='{"max_batch_size": 8}')
    assert unloaded == [
        {"name": "reg", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    ]
    assert [(r["version"], r["state"]) for r in ready] == [("1", "READY"), ("2", "READY")]


def raw_post(address: str, path: str) -> tuple[int, str]:
    """A POST with the path exactly as given (no client-side normalisation of `..`)."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", path, skip_accept_encoding=True)
    connection.putheader("Content-Length", "0")
    connection.endheaders()
    response = connection.getresponse()
    answer = response.status, response.read().decode()
    connection.close()
    return answer


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/..:reload",
        "/v1/models/%2e%2e:reload",
        "/v1/models/.:reload",
        "/v1/models/..%2F..%2Fetc:reload",
        "/v1/models/%2Fetc:reload",
        "/v1/models/reg/versions/..:reload",
        "/v1/models/reg/versions/%2e%2e:reload",
        "/v1/models/reg/versions/-1:reload",
        "/v1/models/reg/versions/%2Ftmp:reload",
        "/v2/repository/models/%2e%2e/load",
        "/v2/repository/models/..%2F..%2Ftmp/load",
        "/v2/repository/models/%2Fetc/unload",
    ],
)
def test_names_and_versions_cannot_leave_the_model_directory(models: Path, path: str) -> None:
    with listening(make_settings(models, admin_without_keys=True)) as address:
        status, body = raw_post(address, path)
    assert 400 <= status < 500, (status, body)


def test_symlinks_out_of_the_model_directory_are_refused(models: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    evil = save_checkpoint(regression_model(5), outside, "evil", regression_manifest())
    (models / "evil").symlink_to(outside / "evil")  # a model folder pointing out
    (models / "reg" / "7").symlink_to(evil)  # a version folder pointing out
    planted = models / "reg" / "8"
    shutil.copytree(models / "reg" / "1", planted)  # a file pointing out
    (planted / WEIGHTS).unlink()
    (planted / WEIGHTS).symlink_to(evil / WEIGHTS)
    with serve(make_settings(models, admin_without_keys=True)) as live:
        at_start = live.get("/v1/models").json()["models"]
        folder = live.post("/v1/models/evil:reload")
        versions = live.post("/v1/models/reg:reload")
    assert [m["name"] for m in at_start] == ["reg"]
    states = {v["version"]: v for v in at_start[0]["versions"]}
    assert states[1]["state"] == "loaded"
    for version in (7, 8):
        assert "outside the model directory" in states[version]["error"]
    assert folder.status_code == 400 and "outside the model directory" in folder.text
    assert versions.status_code == 422 and "outside the model directory" in versions.text


def test_a_version_computed_in_worker_processes_is_swapped_and_its_workers_exit(models: Path):
    with serve(make_settings(models, admin_without_keys=True, batch_workers=1)) as live:
        process = live.app.state.batchers["reg", 1].processes[0]._process
        assert live.post(PREDICT, json=BODY).json()["model_version"] == 1
        new_version(models, 1)
        shutil.rmtree(models / "reg" / "1")
        reload = live.post("/v1/models/reg:reload")
        answer = live.post(PREDICT, json=BODY)
        wait_until(lambda: not process.is_alive())
        new = live.app.state.batchers["reg", 2].processes[0].pid
    assert reload.json()["loaded"] == [2] and reload.json()["unloaded"] == [1]
    assert answer.status_code == 200 and answer.json()["model_version"] == 2
    assert new is not None and new != process.pid
