"""The serving image, built and run for real with podman (runc, as root): a Debian base made
with debootstrap (kept between runs), torch from the local wheel folder, a trained model
mounted read-only. The container's HEALTHCHECK passes, its seeded prediction equals the
same model served in-process, and SIGTERM under load drains: every request the server took
is answered, and it exits 0."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, listening, make_settings

from training import cli

ROOT = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")
BASE = "localhost/debian-min:bookworm"
# one tag per checkout, so that two clones testing at once do not replace each other's image
IMAGE = f"localhost/credence-serve:test-{hashlib.sha256(bytes(ROOT)).hexdigest()[:8]}"
# runc, not crun, and ulimits no higher than the sandbox's (raising them is refused here)
RUNTIME = ["--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
LOCKED_DOWN = ["--read-only", "--cap-drop=all", "--security-opt=no-new-privileges"]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BODY = {"instances": [[0.0], [2.5]], "parameters": {"num_samples": 200, "seed": 7}}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PODMAN is None or shutil.which("runc") is None,
        reason="no container runtime: podman and runc are not installed "
        "(make install adds them as root; apt-get install podman runc debootstrap)",
    ),
]


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [PODMAN, *RUNTIME, *args], capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Build and run numbers, written to the test run's output (they are not asserted)."""
    terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if terminal is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # past pytest's output capture
                terminal.write_line(f"[container] {line}")

    return write


def ensure_base_image(report: Callable[[str], None]) -> None:
    """Debian bookworm's minimal system as an image, imported once and reused."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    debootstrap = shutil.which("debootstrap") or pytest.fail("debootstrap is not installed")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as rootfs:
        done = subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", rootfs],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [PODMAN, "import", "-", BASE], stdin=tar.stdout, capture_output=True, timeout=300
        )
        tar.wait()
        assert imported.returncode == 0, imported.stderr
    report(f"base image {BASE} made in {time.monotonic() - started:.0f} s")


def local_torch_wheels() -> Path:
    """The folder pip's configuration names as find-links that holds the CPU torch wheel."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            for folder in value.strip("'\"").split():
                if any(Path(folder).glob("torch-*+cpu-cp311-*.whl")):
                    return Path(folder)
    pytest.fail(f"no CPU torch wheel for cp311 in pip's find-links:\n{done.stdout}")


def image_id() -> str | None:
    done = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def build_command() -> list[str]:
    command = ["build", "--format", "docker", *ULIMITS, "--network=host"]  # docker: HEALTHCHECK
    command += ["--build-arg", f"BASE={BASE}", "--build-arg", "TORCH_SOURCE=wheels"]
    command += ["--build-context", f"wheels={local_torch_wheels()}"]
    if HOST_CA.exists():  # pip inside the build trusts what the host trusts
        command += ["-v", f"{HOST_CA}:/host-ca.crt:ro", "--build-arg", "PIP_CERT=/host-ca.crt"]
    return command


@pytest.fixture(scope="module")
def image(report: Callable[[str], None]) -> str:
    ensure_base_image(report)
    before = image_id()
    started = time.monotonic()
    podman(*build_command(), "-t", IMAGE, str(ROOT), timeout=1800)
    seconds = time.monotonic() - started
    after = image_id()
    if before and before != after:  # the previous build's layers, not another's cache
        podman("rmi", before, check=False)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    report(f"image {IMAGE} built in {seconds:.1f} s, {size / 1e9:.2f} GB")
    return IMAGE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("container-models")
    argv = ["--data", "toy:sine-gap", "--epochs", "20", "--name", "sine-gap", "--out", str(root)]
    assert cli.main([*argv, "--quiet"]) == 0
    root.chmod(0o755)  # mktemp's 0700 would keep the container's user out
    return root


class Container:
    """A detached container of the image on the host's network, bound to loopback, locked
    down as deploy/kubernetes' pods are: read-only root (a tmpfs /tmp), no capabilities,
    no privilege escalation."""

    def __init__(self, image: str, model_dir: Path, **env: str):
        self.name = f"credence-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        settings = {"CREDENCE_HOST": "127.0.0.1", "CREDENCE_PORT": str(self.port), **env}
        flags = [f"--env={key}={value}" for key, value in settings.items()]
        podman(
            "run",
            "--detach",
            "--name",
            self.name,
            *ULIMITS,
            *LOCKED_DOWN,
            "--network=host",
            "--volume",
            f"{model_dir}:/models:ro",
            *flags,
            image,
        )

    def wait_healthy(self, timeout: float = 120) -> float:
        """Runs the image's own HEALTHCHECK until it passes; seconds it took."""
        started = time.monotonic()
        while podman("healthcheck", "run", self.name, check=False).returncode != 0:
            state = podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
            assert state == "running", f"container {state}:\n{self.logs()}"
            assert time.monotonic() - started < timeout, f"never healthy:\n{self.logs()}"
            time.sleep(0.5)
        health = podman("inspect", "--format", "{{.State.Health.Status}}", self.name)
        assert health.stdout.strip() == "healthy"
        return time.monotonic() - started

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture
def container(image: str, model_dir: Path, request: pytest.FixtureRequest) -> Iterator[Container]:
    running = Container(image, model_dir, **getattr(request, "param", {}))
    try:
        yield running
    finally:
        running.remove()


def test_container_is_healthy_and_predicts_as_the_same_model_outside(
    container: Container, model_dir: Path, report: Callable[[str], None]
) -> None:
    report(f"healthy {container.wait_healthy():.1f} s after start")
    inside = httpx.post(f"{container.base}/v1/models/sine-gap:predict", json=BODY, timeout=30)
    assert inside.status_code == 200, inside.text
    with listening(make_settings(model_dir)) as address:
        outside = httpx.post(f"http://{address}/v1/models/sine-gap:predict", json=BODY, timeout=30)
    assert outside.status_code == 200, outside.text
    assert inside.json() == outside.json()
    # the HEALTHCHECK does look at the server: pointed at a port with none, it fails
    inspected = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    kind, *check = inspected["Healthcheck"]["Test"]
    assert kind == "CMD"
    elsewhere = podman(
        "exec", "--env", f"CREDENCE_PORT={free_port()}", container.name, *check, check=False
    )
    assert elsewhere.returncode != 0
    user = podman("exec", container.name, "id", "-u").stdout.strip()
    assert user == "10001"  # not root
    ready = httpx.get(f"{container.base}/readyz", timeout=5).json()
    assert ready["loaded"] == ["sine-gap/1"]


@pytest.mark.parametrize(
    "container",
    [{"CREDENCE_MAX_BATCH_DELAY_MS": "600", "CREDENCE_SHUTDOWN_GRACE_S": "20"}],
    indirect=True,
)
def test_sigterm_under_load_answers_every_accepted_request(
    container: Container, report: Callable[[str], None]
) -> None:
    """Clients keep sending, a new connection per request, while each batch waits 600 ms
    for rows; SIGTERM lands 200 ms into a wait, when every client's request is in (they send
    within milliseconds of an answer) and well before the batch closes. Every request is
    answered 200, the ones sent after the server stopped listening are refused at connect
    (none is reset), and the container exits 0."""
    container.wait_healthy()
    clients, lock = 12, threading.Lock()
    answered: list[tuple[float, int]] = []  # (time, status)
    refused: list[float] = []
    broken: list[str] = []  # taken, then not answered
    answered_event = threading.Event()

    def client() -> None:
        url = f"{container.base}/v1/models/sine-gap:predict"
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=30, limits=no_reuse) as http:
            while time.monotonic() < deadline:
                try:
                    status = http.post(url, json=BODY).status_code
                except httpx.ConnectError:
                    with lock:
                        refused.append(time.monotonic())
                    return
                except httpx.TransportError as exc:
                    with lock:
                        broken.append(repr(exc))
                    return
                with lock:
                    answered.append((time.monotonic(), status))
                answered_event.set()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(answered) < 3 * clients:  # load running: a few batches answered
        assert time.monotonic() < deadline, container.logs()
        time.sleep(0.01)
    answered_event.clear()
    answered_event.wait(10)  # a batch was just answered; the next one is filling
    time.sleep(0.2)
    signalled = time.monotonic()
    podman("kill", "--signal", "TERM", container.name)
    for thread in threads:
        thread.join(60)
    exit_code = podman("wait", container.name, timeout=60).stdout.strip()
    logs = container.logs()
    assert not broken, broken
    assert {status for _, status in answered} == {200}
    assert sum(t > signalled for t, _ in answered) >= 1  # in flight at SIGTERM, then answered
    assert len(refused) == clients and min(refused) > signalled
    assert exit_code == "0", logs
    assert "Application shutdown complete" in logs
    report(f"SIGTERM under load: {len(answered)} answered, {clients} refused after it, exit 0")


def test_image_carries_only_runtime_files(image: str) -> None:
    """No sources, no pip; the package and its entry point are there, models at /models."""
    script = (
        "import importlib.util as u, json, os, shutil; "
        "print(json.dumps({'pip': u.find_spec('pip') is not None, "
        "'src': os.path.exists('/src'), 'serve': shutil.which('credence-serve'), "
        "'train': shutil.which('credence-train'), 'models': os.listdir('/models'), "
        "'owner': os.stat('/models').st_uid}))"
    )
    done = podman("run", "--rm", *ULIMITS, "--entrypoint", "python", image, "-c", script)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {
        "pip": False,
        "src": False,
        "serve": "/opt/app/bin/credence-serve",
        "train": "/opt/app/bin/credence-train",
        "models": [],
        "owner": 10001,
    }
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["Entrypoint"] == ["credence-serve"] and config["User"] == "10001:10001"
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])  # kept: docker format


def in_image(image: str, script: str, *flags: str) -> subprocess.CompletedProcess:
    """A shell script run in the image as its user, not as the server."""
    return podman("run", "--rm", *ULIMITS, *flags, "--entrypoint", "/bin/sh", image, "-c", script)


def test_models_baked_in_by_a_build_context(image: str, model_dir: Path) -> None:
    baked = f"{IMAGE}-baked"
    podman(*build_command(), "--build-context", f"models={model_dir}", "-t", baked, str(ROOT))
    try:
        done = in_image(baked, "ls /models; stat -c %u /models/sine-gap/1/manifest.json")
        assert done.stdout.split() == ["sine-gap", "10001"]
    finally:
        podman("rmi", baked, check=False)


def test_compose_trainer_fills_only_an_empty_models_volume(image: str, model_dir: Path) -> None:
    """docker-compose.yml's trainer, on a named volume made from the image: the volume
    starts empty and writable by the image's user (so the trainer can fill it), and a
    volume that holds a model is left alone. (Filling it, the two demo trainings, takes
    73 s on 2 cores: measured, not run here.)"""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    trainer = compose["services"]["trainer"]
    assert trainer["entrypoint"] == ["/bin/sh", "-c"]
    script = trainer["command"][0].replace("$$", "$")  # compose's escape for a literal $
    volume = f"credence-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", volume)
    try:
        mount = f"{volume}:/models"
        fresh = in_image(
            image, "ls -A /models; touch /models/w && rm /models/w && echo w", "-v", mount
        )
        assert fresh.stdout.split() == ["w"]  # empty, and writable
        in_image(
            image, "cp -r /trained/sine-gap /models/", "-v", mount, "-v", f"{model_dir}:/trained:ro"
        )
        again = in_image(image, script, "-v", mount)
        assert "nothing to train" in again.stdout
        assert in_image(image, "ls /models", "-v", mount).stdout.split() == ["sine-gap"]
    finally:
        podman("volume", "rm", "--force", volume, check=False)
