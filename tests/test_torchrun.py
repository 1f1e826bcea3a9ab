"""`torchrun -m training.cli`: ensemble members and SG-MCMC chains spread over processes give
the checkpoint one process writes with the same seed, to the bit (training.distributed)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from training.checkpoint import Checkpoint, latest_checkpoint, list_versions
from training.cli import main
from training.distributed import Spread

COMMON = ["--data", "toy:sine-gap", "--hidden", "32", "32", "--name", "m", "--quiet"]
# learned homoscedastic noise (shared by the members) and early stopping on every epoch's
# validation score: the two places where members meet
ENSEMBLE = [*COMMON, "--method", "ensemble", "--members", "4", "--epochs", "24"]
# three chains over two processes: uneven blocks, one of them a lone chain
SGHMC = [
    *COMMON,
    *("--method", "sghmc", "--chains", "3", "--warmup-epochs", "6", "--cycles", "2"),
    *("--burnin-cycles", "1", "--epochs-per-cycle", "5", "--samples-per-cycle", "2"),
]
TIMINGS = ("seconds", "total_seconds")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend for torch.distributed",
)


def _torchrun(args: list[str], out: Path, processes: int = 2) -> str:
    """credence-train under the venv's torchrun on loopback; returns what it printed."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"),
        *("--nproc-per-node", str(processes), "--master-addr", "127.0.0.1"),
        *("--master-port", str(free_port()), "-m", "training.cli", *args, "--out", str(out)),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def _comparable(checkpoint: Checkpoint) -> dict:
    """The manifest less what differs between any two runs: when and how long, and where."""
    manifest = copy.deepcopy(checkpoint.manifest)
    manifest.pop("created_at")
    training = manifest["training"]
    for key in TIMINGS:
        training.pop(key)
    training.pop("processes", None)
    training["args"].pop("out")
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("args", [ENSEMBLE, SGHMC], ids=["ensemble", "sghmc"])
def test_torchrun_writes_the_checkpoint_one_process_writes(args, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    alone = capsys.readouterr().out
    printed = _torchrun(args, tmp_path / "two")
    # rank 0 alone reports and writes: one line, one version
    assert printed.replace(str(tmp_path / "two"), "") == alone.replace(str(tmp_path / "one"), "")
    assert list_versions(tmp_path / "two" / "m") == [1]
    one, two = latest_checkpoint(tmp_path / "one", "m"), latest_checkpoint(tmp_path / "two", "m")
    assert two.manifest["training"]["processes"] == {"world_size": 2, "backend": "gloo"}
    assert all(two.manifest["training"][key] >= 0 for key in TIMINGS)
    # metrics, per-epoch losses, noise, calibration, OOD reference, file hashes: all equal
    assert _comparable(two) == _comparable(one)
    model_one, model_two = one.build(), two.build()
    state = model_two.state_dict()
    for key, value in model_one.state_dict().items():
        assert torch.equal(state[key], value), key
    # the served draws: the gap and the data, several seeds in one batch
    x = torch.linspace(-4, 4, 41).view(-1, 1)
    seeds = torch.arange(41, dtype=torch.int64) % 3
    n = model_one.set_size
    assert torch.equal(model_two.sample(x, n, seeds), model_one.sample(x, n, seeds))


@pytest.mark.parametrize("method", ["mc_dropout", "variational", "laplace"])
def test_one_network_methods_refuse_to_spread(method, monkeypatch, tmp_path, capsys):
    """What torchrun sets for its processes; the check comes before any process group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        main([*COMMON, "--method", method, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--method {method} fits one network, which cannot be split across 2 processes" in err
    assert not any(tmp_path.iterdir())


def test_only_rank_0_says_what_is_wrong(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        main([*COMMON, "--method", "laplace", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--method", "ensemble", "--members", "2"], "--members 2"), (["--method", "sgld"], "")],
)
def test_too_few_members_or_chains_for_the_processes(args, flag, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3" if flag else "5")  # sgld's default is 4 chains
    with pytest.raises(SystemExit):
        main([*COMMON, *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"{flag or '--chains 4'} cannot be spread over {3 if flag else 5} processes" in err


@pytest.mark.parametrize(("units", "processes"), [(4, 2), (5, 2), (3, 2), (7, 4), (4, 4), (1, 1)])
def test_blocks_cover_the_members_in_order(units, processes):
    blocks = [Spread(rank, processes).block(units) for rank in range(processes)]
    assert [m for b in blocks for m in range(b.start, b.stop)] == list(range(units))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
