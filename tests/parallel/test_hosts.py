"""Process-level setup (issue 21): which peers `initialize_distributed` is told about, and no
libtpu noise from commands on a CPU host that has the `tpu` extra installed."""
import importlib.util
import os
import subprocess
import sys

import pytest

from holocine_jax.parallel import initialize_distributed

NOISE = ("TPU_WORKER_HOSTNAMES", "libtpu", "TPU accelerator type")
PEERS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "HOLOCINE_DISTRIBUTED",
         "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def no_peers(monkeypatch):
    for key in PEERS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_without_peers_nothing_starts(no_peers):
    assert initialize_distributed() is False


@pytest.mark.parametrize("given, missing", [
    (dict(coordinator_address="127.0.0.1:1234"), "process count"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "process id"),
    (dict(num_processes=2, process_id=0), "coordinator address"),
])
def test_a_partial_set_of_peers_is_an_error_naming_what_is_missing(no_peers, given, missing):
    with pytest.raises(ValueError, match=missing):
        initialize_distributed(**given)


def test_bad_process_numbers_are_named(no_peers):
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        initialize_distributed("127.0.0.1:1234", 2, 2)
    no_peers.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        initialize_distributed("127.0.0.1:1234", process_id=0)


def _stderr_of(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", *PEERS)}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"   # else a process holding libtpu's lock silences it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (`tpu` extra)")
def test_cli_commands_on_a_cpu_host_print_no_libtpu_lines(tmp_path):
    """A CLI command followed by jax work in the same process: quiet. The control (jax started
    without the CLI) shows the lines exist on this host, so the check can fail."""
    start = "import jax; jax.numpy.ones(2).block_until_ready()"
    assert any(n in _stderr_of(start) for n in NOISE)
    stderr = _stderr_of(
        "from holocine_jax.cli import main\n"
        f"assert main(['data', 'synthetic', '--num-films', '1', '--out', {str(tmp_path)!r},"
        " '--config.video.num_frames=17']) == 0\n" + start)
    assert not [line for line in stderr.splitlines() if any(n in line for n in NOISE)], stderr
