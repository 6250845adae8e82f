"""gs:// end to end against a local GCS emulator (issue 21; tests/gcs_emulator.py, 127.0.0.1
only, never a real bucket): `data synthetic --out gs://` publishes a dataset whose batches through
the pipeline are its stored records; a training run with its workdir on gs:// killed with SIGKILL
mid-step resumes bit-identical to an uninterrupted gs:// run, and `export --out gs://` writes what
loads back as the trained weights; a stopped emulator fails the check at once. Under `slow`:
SIGTERM mid-step (the run saves that step), SIGKILL while a save is half uploaded (never taken as
complete), and the one-line error of a command whose GCS is down."""
import os
import signal
import socket
import subprocess
import sys
import time

import fsspec
import jax
import numpy as np
import pytest
from flax import nnx

from holocine_jax import files
from holocine_jax.cli import main
from holocine_jax.config import load_config
from holocine_jax.convert import load_diffusers
from holocine_jax.data.dataset import load_data_source
from holocine_jax.data.pipeline import make_pipeline
from holocine_jax.model import WanDiT
from holocine_jax.train.checkpointing import TrainCheckpointer
from holocine_jax.train.metrics import read_metrics
from holocine_jax.train.state import init_train_state, split_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "train"))
import gcs_emulator  # noqa: E402
from resume_worker import worker_config  # noqa: E402

BUCKET = "holocine-test"
STEPS, EVERY = 12, 3   # resume_worker: checkpoint_every=3, keep_checkpoints=2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fresh in-memory bucket on a local emulator; every client in this process (gcsfs, epath,
    tensorstore) and in the workers pointed at it."""
    port = free_port()
    try:
        proc = gcs_emulator.start(port, BUCKET)
    except RuntimeError as e:
        pytest.fail(str(e))
    env = gcs_emulator.emulator_env(port)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.setdefault("HOLOCINE_CACHE_DIR", str(tmp_path_factory.mktemp("gcs_cache")))
    yield dict(root=f"gs://{BUCKET}", port=port, tmp=tmp_path_factory.mktemp("gcs_runs"))
    proc.kill()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def up(gcs):
    """Fail at once, naming the emulator, if it stopped answering (rather than hang in retries)."""
    if not gcs_emulator.reachable(gcs["port"]):
        pytest.fail(f"the GCS emulator on 127.0.0.1:{gcs['port']} is not answering")


def test_synthetic_dataset_on_gcs_gives_the_local_datasets_batches(gcs, tmp_path, capsys):
    up(gcs)
    out = f"{gcs['root']}/data"
    overrides = ["--config.video.num_frames=17"]
    assert main(["data", "synthetic", "--num-films", "3", "--out", out, *overrides]) == 0
    assert f"-> {out}/holocine_clips/1.0.0" in capsys.readouterr().out
    assert {"build_report.json", "holocine_clips", "manifest.jsonl"} <= set(files.listdir(out))
    assert len([n for n in files.listdir(f"{out}/videos") if n.endswith(".mp4")]) == 3
    config = load_config("tiny", overrides)
    remote = next(make_pipeline(out, config, batch_size=3, seed=1, num_epochs=1))
    # the records as stored, fetched by another client (fsspec's recursive get), read locally
    fsspec.filesystem("gs").get(f"{out}/holocine_clips", str(tmp_path / "copy" / "holocine_clips"),
                                recursive=True)
    stored = load_data_source(str(tmp_path / "copy"))   # the folder holds holocine_clips/1.0.0
    assert sorted(remote["index"].tolist()) == [0, 1, 2]
    for i, video in zip(remote["index"], remote["video"]):
        assert np.array_equal(video, stored[int(i)]["video"])


def launch(gcs, name, cache):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    log = open(gcs["tmp"] / f"{name}.stderr", "a")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "train", "resume_worker.py"),
                             f"{gcs['root']}/{name}", str(STEPS)], stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env)


def stderr(gcs, name):
    return (gcs["tmp"] / f"{name}.stderr").read_text()[-3000:]


def kill_at(gcs, name, cache, at_batch, after_commit=None, during_save=None, sig=signal.SIGKILL):
    """SIGKILL run `name` once it drew batch `at_batch` and, with `after_commit`, once that
    step's checkpoint is committed on GCS (the kill lands mid-step, past a checkpoint), or, with
    `during_save`, once that step's upload has begun and is not committed (a half-written step)."""
    proc = launch(gcs, name, cache)
    for line in proc.stdout:
        if line.strip() == f"batch {at_batch}":
            step = after_commit if after_commit is not None else during_save
            ckpt = f"{gcs['root']}/{name}/checkpoints"
            marker = f"{ckpt}/{step}/commit_success.txt"
            deadline = time.time() + 60
            while after_commit is not None and not files.exists(marker) and time.time() < deadline:
                time.sleep(0.05)
            while during_save is not None and time.time() < deadline:
                if files.exists(marker):
                    raise AssertionError(f"the save of step {step} committed before it was seen "
                                         "half written")
                if files.exists(ckpt) and str(step) in files.listdir(ckpt):
                    break
            assert proc.poll() is None, f"{name} ended before it could be killed: {stderr(gcs, name)}"
            os.kill(proc.pid, sig)
            rc = proc.wait(timeout=300)
            assert sig != signal.SIGTERM or rc == 0, f"{name} exited {rc}: {stderr(gcs, name)}"
            return
    raise AssertionError(f"{name} finished before batch {at_batch}: {stderr(gcs, name)}")


def complete(ckpt_dir):
    """Steps orbax takes as complete (a step on GCS is committed by its commit_success.txt)."""
    with TrainCheckpointer(ckpt_dir, worker_config()) as ckpt:
        return sorted(ckpt.manager.all_steps())


def restore(ckpt_dir, step):
    config = worker_config()
    _, params, _, _ = split_model(nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(lambda p: init_train_state(config, p), params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    with TrainCheckpointer(ckpt_dir, config) as ckpt:
        return ckpt.restore(abstract, step)


def killed_and_resumed(gcs, plan):
    """(straight, killed) checkpoint dirs on gs:// after killing the second run per `plan`
    ("step": SIGKILL mid-step after the first checkpoint; "term": SIGTERM there; "save": SIGKILL
    while a save is half uploaded) and resuming."""
    up(gcs)
    cache = str(gcs["tmp"] / "jax_cache")
    straight, killed = f"straight-{plan}", f"killed-{plan}"
    reference = launch(gcs, straight, cache)
    if plan == "step":
        kill_at(gcs, killed, cache, EVERY + 1, after_commit=EVERY)
    elif plan == "term":   # a preemption notice mid-step, past the first checkpoint
        kill_at(gcs, killed, cache, EVERY + 1, after_commit=EVERY, sig=signal.SIGTERM)
    else:   # batch EVERY is drawn right after the save of step EVERY started (async)
        kill_at(gcs, killed, cache, EVERY, during_save=EVERY)
    ckpt = f"{gcs['root']}/{killed}/checkpoints"
    before = complete(ckpt) if files.exists(ckpt) else []
    in_flight = [int(s) for s in files.listdir(ckpt) if s.isdigit() and int(s) not in before] \
        if files.exists(ckpt) else []
    assert reference.wait(timeout=300) == 0, stderr(gcs, straight)
    proc = launch(gcs, killed, cache)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the resumed run did not finish in 300 s: {stderr(gcs, killed)}")
    assert proc.returncode == 0, stderr(gcs, killed)
    assert out.strip().endswith(f"done {max(before, default=0)} {STEPS}"), (out, before)
    return f"{gcs['root']}/{straight}", f"{gcs['root']}/{killed}", before, in_flight


def assert_identical_runs(straight, killed):
    a, b = restore(f"{straight}/checkpoints", STEPS), restore(f"{killed}/checkpoints", STEPS)
    assert a[1] == b[1] == {"position": STEPS}
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0]), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    curve_a, curve_b = read_metrics(f"{straight}/metrics.jsonl"), read_metrics(f"{killed}/metrics.jsonl")
    assert sorted(curve_a) == sorted(curve_b) == list(range(1, STEPS + 1))
    assert [curve_a[s]["train/loss"] for s in curve_a] == [curve_b[s]["train/loss"] for s in curve_a]


def test_gcs_workdir_killed_mid_step_resumes_bit_identical_and_exports_to_gcs(gcs, capsys):
    straight, killed, before, _ = killed_and_resumed(gcs, "step")
    assert before and before[-1] >= EVERY   # killed past a committed checkpoint: resumed from it
    assert_identical_runs(straight, killed)
    export = f"{gcs['root']}/export"
    assert main(["export", "--checkpoint", f"{killed}/checkpoints", "--format", "diffusers",
                 "--out", export]) == 0
    assert f"safetensors to {export}" in capsys.readouterr().out
    names = files.listdir(export)
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names), names
    exported = load_diffusers(files.local_copy(export), worker_config())
    trained = restore(f"{killed}/checkpoints", STEPS)[0].params
    for x, y in zip(jax.tree.leaves(nnx.state(exported, nnx.Param)), jax.tree.leaves(trained), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_gcs_workdir_sigterm_mid_step_saves_that_step_and_resumes_bit_identical(gcs):
    straight, killed, before, _ = killed_and_resumed(gcs, "term")
    assert before[-1] > EVERY, before   # the preempted run saved the step it was in, not only EVERY
    assert_identical_runs(straight, killed)


@pytest.mark.slow
def test_gcs_workdir_killed_during_an_async_save_keeps_the_last_complete_step(gcs):
    straight, killed, before, in_flight = killed_and_resumed(gcs, "save")
    # killed as the save of step EVERY started: on GCS its directory exists, half written, without
    # its commit marker; it is not taken as a step (the resume started from `before`, i.e. 0)
    assert before == [] and in_flight == [EVERY], (before, in_flight)
    assert_identical_runs(straight, killed)


def test_a_stopped_emulator_fails_the_check_at_once_with_its_address():
    port = free_port()
    proc = gcs_emulator.start(port, BUCKET)
    proc.kill()
    proc.wait()
    start = time.time()
    with pytest.raises(pytest.fail.Exception, match=f"127.0.0.1:{port} is not answering"):
        up(dict(port=port))
    assert time.time() - start < 10


@pytest.mark.slow
def test_an_unreachable_gcs_is_a_one_line_error_naming_path_and_endpoint(tmp_path):
    """The console command against a GCS that is down: gcsfs's retries (~40 s), then one line."""
    port = free_port()
    env = dict(os.environ, **gcs_emulator.emulator_env(port))
    proc = subprocess.run([sys.executable, "-m", "holocine_jax.cli", "data", "synthetic",
                           "--num-films", "1", "--out", f"gs://{BUCKET}/down",
                           "--config.video.num_frames=17"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("holocine-jax data synthetic: error: gs://") and \
        f"cannot reach Google Cloud Storage at http://127.0.0.1:{port}" in last, last


@pytest.mark.slow
def test_eval_reads_a_gcs_checkpoint_and_writes_its_results_to_gcs(gcs, tmp_path):
    """`eval` with checkpoint and workdir on gs://: per-film folders (metrics.json uploaded last),
    the step's metrics.json and table.md on GCS; a rerun skips the scored step."""
    import orbax.checkpoint as ocp

    from eval.test_job import eval_config, step_params
    from holocine_jax.data.dataset import write_synthetic_dataset
    from holocine_jax.eval import job

    up(gcs)
    config = eval_config()
    data = str(tmp_path / "data")
    write_synthetic_dataset(data, 2, 0, config)
    ckpt, work = f"{gcs['root']}/eval-ckpt", f"{gcs['root']}/eval-work"
    files.write_text(f"{ckpt}/config.json", config.to_json_best_effort())
    with ocp.CheckpointManager(ckpt, item_names=("params",)) as manager:
        manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(step_params(1))))
        manager.wait_until_finished()
    results = job.run_eval(config, ckpt, data, work, progress=False)
    assert sorted(results) == [1]
    step = f"{work}/eval/{job.point_name((1,))[1]}"
    assert {"metrics.json", "film_000", "film_001"} <= set(files.listdir(step))
    assert {"film.mp4", "contact_sheet.png", "film.json", "metrics.json"} <= \
        set(files.listdir(f"{step}/film_000"))
    assert "| step 00000001 |" in files.read_text(f"{work}/eval/table.md")
    assert job.run_eval(config, ckpt, data, work, progress=False) == {}   # scored: skipped
