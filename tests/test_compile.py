"""`holocine-jax compile`: AOT compilation for TPU topologies from this CPU host (libtpu, the
`tpu` extra). The full Wan2.2-A14B sizing (minutes per topology) is `slow`; the default run
compiles the tiny config with context parallelism and checks the report and the errors."""
import importlib.util
import json

import pytest

from holocine_jax.cli import main
from holocine_jax.config import load_config
from holocine_jax.compile import compile_report, over_budget

pytestmark = [pytest.mark.tpu_aot,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="libtpu (the `tpu` extra) is not installed")]


def tiny(*overrides):
    return load_config("tiny", ["--config.attention.impl=xla", "--config.shots.max_shots=5",
                                *overrides])


def test_tiny_train_and_sample_compile_for_v5p_with_context_parallelism(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["compile", "--config", "tiny", "--topology", "v5p:2x2x1", "--shots", "3",
          "--mesh.fsdp=2", "--mesh.context=2", "--config.attention.impl=xla",
          "--config.shots.max_shots=5", "--config.sample.guidance_scale=1.0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "fits; report in" in printed and "collectives:" in printed
    report = json.load(open(out))
    assert report["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "tensor": 1}
    assert report["chip"] == "v5p" and report["devices"] == 4
    train = report["programs"]["train"]
    assert train["fits"] and 0 < train["total_bytes"] < train["hbm_bytes"]
    assert train["collective_bytes"]["all-to-all"] > 0          # ulysses over `context`
    # tiny: no remat; at guidance 1 training is fwd + 2x bwd, sampling one forward pass
    assert train["flops_total"] == pytest.approx(3 * report["programs"]["sample"]["flops_total"])


@pytest.mark.slow  # 10 s: a second AOT compile; the v5p compile test stays in the default run
def test_what_does_not_fit_is_reported_with_the_numbers():
    config = load_config("wan22_t2v_a14b", ["--config.attention.impl=xla", "--config.mesh.fsdp=4",
                                            "--config.train.batch_size=4"])
    report = compile_report(config, "v5e:2x2", num_shots=5, programs=("train",))
    problem = over_budget(report)
    assert problem.startswith("train"), problem
    assert "HBM" in problem or "does not compile" in problem


def test_bad_meshes_fail_before_compiling():
    with pytest.raises(ValueError, match="has 8 devices but 4 are available"):
        compile_report(tiny("--config.mesh.fsdp=8"), "v5p:2x2x1", num_shots=3)
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by config.mesh.tensor=8"):
        compile_report(tiny("--config.mesh.fsdp=1", "--config.mesh.tensor=8", "--config.mesh.data=-1"),
                       "v5p:2x2x2", num_shots=3)
    with pytest.raises(ValueError, match="cannot describe TPU topology 'v9z:1x1'"):
        compile_report(tiny(), "v9z:1x1", num_shots=3)


@pytest.mark.slow
@pytest.mark.parametrize("topology, mesh, extra", [
    ("v5p:4x4x4", ["--config.mesh.fsdp=8", "--config.mesh.context=8"], ["--config.train.batch_size=8"]),
])
def test_a14b_training_step_fits_a_v5_slice(topology, mesh, extra):
    config = load_config("wan22_t2v_a14b", ["--config.attention.impl=xla", *mesh, *extra])
    report = compile_report(config, topology, num_shots=5, programs=("train",))
    train = report["programs"]["train"]
    assert train["fits"] and train["headroom"] >= 0.10, over_budget(report)


def test_a_kernel_out_of_smem_does_not_compile_and_hbm_does_not_fit():
    from holocine_jax.compile import _failure_text, compile_failure

    smem = ("RESOURCE_EXHAUSTED: Mosaic failed to compile TPU kernel shot_attention_fwd: Allocation "
            "(size=2214400) would exceed memory (size=1048576) space=smem prefetched SMEM operand 0")
    hbm = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm."
    r = compile_failure(smem)
    assert (r["compiles"], r["resource"], r["kernel"]) == (False, "SMEM", "shot_attention_fwd")
    assert _failure_text("train", r).startswith(
        "train does not compile for this topology: SMEM exhausted in shot_attention_fwd: ")
    r = compile_failure(hbm)
    assert (r["compiles"], r["resource"]) == (True, "HBM")
    assert _failure_text("train", r).startswith("train does not fit: HBM exhausted: ")
    assert compile_failure("INVALID_ARGUMENT: something else") is None
