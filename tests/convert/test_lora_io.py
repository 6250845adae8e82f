"""LoRA files against the PyTorch references: our export loads in diffusers (its own layout, and
ComfyUI's through diffusers' converter) with the same outputs; peft's and diffusers' adapter
files import into the same function; bad files name the tensor; merge == runtime; --lora specs;
`export` / `sample --lora` on a LoRA run.

Mutations tried, each failing the tests named (then reverted):
- lora_tensors without the alpha / r fold into diffusers' lora_B: test_diffusers_export_*,
  test_cli_export_of_a_lora_run.
- ComfyUI `.alpha` written as the scale instead of scale * rank: test_comfyui_export_*,
  test_cli_export_*, test_sample_lora_*.
- load_lora ignoring adapter_config.json / the header metadata: test_peft_import[all three],
  test_other_bad_inputs; rank / alpha patterns ignored, or the per-module alpha / r ratio not
  folded into b: test_peft_import[inject-patterns], [diffusers-metadata]; use_rslora ignored:
  test_peft_import[peft_model-rslora].
- merge_loras dropping the strength: test_diffusers_export_* (the 0.5 case),
  test_merge_equals_runtime, test_sample_lora_*; with_runtime_loras without strength * scale in
  b: test_merge_equals_runtime.
- load_lora skipping the block-index check: test_bad_file_names_the_tensor[block].
- export --format diffusers of a LoRA run without merge_lora: test_cli_export_of_a_lora_run.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from flax import nnx
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.numpy import load_file, save_file

from conftest import tiny_config
from convert.test_roundtrip import assert_same_params, forward, random_model
import re

from holocine_jax.checkpoint import load_config_json, run_config, save_params
from holocine_jax.cli import main
from holocine_jax.convert import CheckpointMismatchError, load_diffusers, save_diffusers
from holocine_jax.convert import lora as L
from holocine_jax.model import WanDiT
from holocine_jax.model.lora import TARGETS, LoRASpec, lora_linears
from holocine_jax.model.transformer import merge_lora, with_lora
from holocine_jax.sample.run import load_experts
from model.test_parity import inputs, torch_forward

RANK, ALPHA = 4, 6.0                  # scale 1.5: a dropped alpha / r shows
TORCH_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]   # = TARGETS in peft


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_close(ours, ref, what, rel=1e-5):
    err = rel_err(ours, ref)
    print(f"{what}: relative error {err:.2e}")
    assert err <= rel, f"{what}: max abs err / max |ref| = {err:.3e} > {rel}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random base, the same with random rank-4 adapters (alpha 6), its diffusers export, and
    the LoRA model's output on fixed inputs."""
    config = tiny_config()
    base = random_model(config)
    model = with_lora(base, LoRASpec(rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(3))
    r = np.random.default_rng(4)
    for linear in lora_linears(model).values():
        linear.lora_b[...] = jnp.asarray(0.3 * r.standard_normal(linear.lora_b.shape), jnp.float32)
    root = tmp_path_factory.mktemp("lora")
    # Small timesteps: at t = 400..913 the float32 timestep sinusoid alone differs from diffusers'
    # (ulps of XLA's vs torch's exp(-log(1e4) i / 128), times t) enough for a ~9e-6 base-model
    # floor (model/test_parity's business; with torch's frequencies it is ~1e-6), which would
    # leave these LoRA checks no margin below 1e-5.
    latents, _, text = inputs(config, (3, 4, 4))
    x = (latents, np.array([37.5, 12.0], np.float32), text)
    return dict(config=config, base=base, model=model, root=root, x=x, y=forward(model, *x),
                base_dir=save_diffusers(base, str(root / "base_diffusers")))


def torch_base(world):
    return WanTransformer3DModel.from_pretrained(world["base_dir"]).eval()


def torch_out(ref_model, world):
    with torch.no_grad():
        return torch_forward(ref_model, *world["x"]).numpy()


def test_diffusers_export_loads_in_diffusers_and_matches(world, tmp_path):
    weights = L.adapter_weights(world["model"])
    assert weights.rank == RANK and weights.scale == ALPHA / RANK and weights.targets == TARGETS
    path = L.save_lora(weights, str(tmp_path / "out"), fmt="diffusers", base={"base": "seed 0"})
    assert sorted(os.listdir(tmp_path / "out")) == sorted([L.BASE_NAME, L.FILE_NAMES["diffusers"]])
    tensors = load_file(path)
    assert len(tensors) == 2 * len(TARGETS) * 2
    assert tensors["transformer.blocks.1.attn1.to_out.0.lora_A.weight"].shape == (RANK, 64)
    assert tensors["transformer.blocks.0.ffn.net.0.proj.lora_B.weight"].shape == (128, RANK)
    ref = torch_base(world)
    ref.load_lora_adapter({k: torch.from_numpy(v) for k, v in tensors.items()},
                          prefix="transformer", adapter_name="ours")
    assert_close(world["y"], torch_out(ref, world), "diffusers export, in diffusers")
    # Strength: diffusers' adapter weight 0.5 == merged at strength 0.5 after re-import.
    ref.set_adapters(["ours"], weights=[0.5])
    back = L.load_lora(str(tmp_path / "out"), world["base"])
    assert back.scale == 1.0 and np.array_equal(back.a["attn2.to_k"], weights.a["attn2.to_k"])
    half = L.apply_loras(world["base"], [(back, 0.5, None)])
    assert_close(forward(half, *world["x"]), torch_out(ref, world), "strength 0.5 merged vs diffusers")


def test_comfyui_export_converts_in_diffusers_and_round_trips(world, tmp_path):
    weights = L.adapter_weights(world["model"])
    path = L.save_lora(weights, str(tmp_path / "out"), fmt="comfyui")
    tensors = load_file(path)
    assert tensors["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (RANK, 64)
    assert tensors["diffusion_model.blocks.1.ffn.0.lora_up.weight"].shape == (128, RANK)
    assert float(tensors["diffusion_model.blocks.1.cross_attn.o.alpha"]) == ALPHA
    # diffusers' own converter of non-diffusers Wan LoRAs is the reference for names and alpha.
    state = WanPipeline.lora_state_dict(path)
    ref = torch_base(world)
    ref.load_lora_adapter(state, prefix="transformer", adapter_name="comfy")
    assert_close(world["y"], torch_out(ref, world), "comfyui export, diffusers-converted")
    back = L.load_lora(path, world["base"])
    assert back.scale == weights.scale and back.targets == weights.targets
    for t in TARGETS:
        assert np.array_equal(back.a[t], weights.a[t]) and np.array_equal(back.b[t], weights.b[t]), t


def test_bfloat16_export_reads_back(world, tmp_path):
    weights = L.adapter_weights(world["model"])
    path = L.save_lora(weights, str(tmp_path / "out"), fmt="comfyui", dtype="bfloat16")
    tensors = load_file(path)
    assert str(tensors["diffusion_model.blocks.0.self_attn.q.lora_up.weight"].dtype) == "bfloat16"
    assert tensors["diffusion_model.blocks.0.self_attn.q.alpha"].dtype == np.float32
    back = L.load_lora(path, world["base"])
    rounded = weights.b["attn1.to_q"].astype(jnp.bfloat16).astype(np.float32)
    assert np.array_equal(back.b["attn1.to_q"], rounded)


def _randomize_lora_b(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))


def _peft_inject(world, out):
    """peft's functional API, rank / alpha patterns, no prefix, adapter_config.json beside."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TORCH_TARGETS,
                        rank_pattern={"attn1.to_q": 2}, alpha_pattern={"ffn.net.2": 5.0})
    ref = inject_adapter_in_model(config, torch_base(world), adapter_name="default")
    _randomize_lora_b(ref, 1)
    tensors = {k: v.numpy() for k, v in get_peft_model_state_dict(ref).items()}
    assert "blocks.0.attn1.to_q.lora_A.weight" in tensors
    os.makedirs(out)
    save_file(tensors, os.path.join(out, "my_adapter.safetensors"))
    config.save_pretrained(out)          # adapter_config.json
    return ref


def _peft_model(world, out):
    """A PeftModel (keys `base_model.model.`), rsLoRA, its own save_pretrained."""
    ref = get_peft_model(torch_base(world), LoraConfig(r=RANK, lora_alpha=3.0, use_rslora=True,
                                                       target_modules=TORCH_TARGETS))
    _randomize_lora_b(ref, 2)
    ref.save_pretrained(out)             # adapter_model.safetensors + adapter_config.json
    return ref


def _diffusers_adapter(world, out):
    """diffusers' add_adapter / save_lora_adapter: the config in the header metadata."""
    ref = torch_base(world)
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=2.0, target_modules=["to_q", "to_v", "net.0.proj"],
                               rank_pattern={"ffn.net.0.proj": 3}), adapter_name="x")
    _randomize_lora_b(ref, 3)
    ref.save_lora_adapter(out, adapter_name="x")
    return ref


@pytest.mark.parametrize("producer", [_peft_inject, _peft_model, _diffusers_adapter],
                         ids=["inject-patterns", "peft_model-rslora", "diffusers-metadata"])
def test_peft_import(world, tmp_path, producer):
    out = str(tmp_path / "adapter")
    ref = producer(world, out)
    weights = L.load_lora(out, world["base"])
    ours = forward(L.apply_loras(world["base"], [(weights, 1.0, None)]), *world["x"])
    assert_close(ours, torch_out(ref, world), f"peft import ({producer.__name__})")


def zeros(*shape):
    return np.zeros(shape, np.float32)


D, C = "transformer.blocks.", "diffusion_model.blocks."   # key prefixes: diffusers, ComfyUI


@pytest.mark.parametrize("fmt, edit, expected", [
    ("diffusers", lambda t: t.update({D + "0.attn1.norm_q.lora_A.weight": zeros(4, 64)}),
     ["unknown tensors (1)", D + "0.attn1.norm_q.lora_A.weight (not a LoRA tensor"]),
    ("diffusers", lambda t: t.update({D + "1.attn1.to_k.lora_A.weight": zeros(4, 63)}),
     ["mis-shaped tensors (1)", D + "1.attn1.to_k.lora_A.weight: got [4, 63], expected [rank, 64]"]),
    ("diffusers", lambda t: t.update({D + "0.ffn.net.2.lora_B.weight": zeros(64, 3)}),
     ["mis-shaped tensors (1)", D + "0.ffn.net.2.lora_B.weight: got [64, 3], expected [64, 4]"]),
    ("diffusers", lambda t: t.update({D + "2.attn1.to_q.lora_A.weight": zeros(4, 64),
                                      D + "2.attn1.to_q.lora_B.weight": zeros(64, 4)}),
     ["unknown tensors (2)", D + "2.attn1.to_q.lora_A.weight (block 2: the model has 2 blocks, 0..1)"]),
    ("diffusers", lambda t: t.pop(D + "1.attn2.to_v.lora_B.weight"),
     ["missing tensors (1)", "the lora_B (lora_up) of " + D + "1.attn2.to_v.lora_A.weight"]),
    ("comfyui", lambda t: [t.pop(C + f"0.cross_attn.k.{m}.weight") for m in ("lora_down", "lora_up")],
     ["unknown tensors (1)", C + "0.cross_attn.k.alpha (an alpha without"]),
    ("comfyui", lambda t: t.update({C + "0.ffn.2.alpha": np.ones(2, np.float32)}),
     ["mis-shaped tensors (1)", C + "0.ffn.2.alpha: got [2], expected [] (a scalar)"]),
    ("comfyui", lambda t: t.update({C + "0.ffn.2.diff_b": zeros(64)}),
     ["unknown tensors (1)", C + "0.ffn.2.diff_b (not a LoRA tensor"]),
], ids=["unknown", "a-shape", "b-rank", "block", "partner", "lone-alpha", "alpha-shape", "diff_b"])
def test_bad_file_names_the_tensor(world, tmp_path, fmt, edit, expected):
    good = L.save_lora(L.adapter_weights(world["model"]), str(tmp_path / "good"), fmt=fmt)
    tensors = load_file(good)
    edit(tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as info:
        L.load_lora(str(tmp_path / "bad.safetensors"), world["base"])
    assert "bad.safetensors does not match the model" in str(info.value)
    for text in expected:
        assert text in str(info.value)


def test_other_bad_inputs(world, tmp_path):
    weights = L.adapter_weights(world["model"])
    good = L.save_lora(weights, str(tmp_path / "good"), fmt="diffusers")
    # every problem at once; a model of another width refuses each matrix of 64 (36 of 40)
    tensors = load_file(good)
    tensors.pop(D + "0.attn1.to_q.lora_B.weight")
    tensors[D + "0.attn1.add_k_proj.lora_A.weight"] = zeros(4, 64)
    save_file(tensors, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"unknown tensors \(1\).*\| missing tensors \(1\)"):
        L.load_lora(str(tmp_path / "two.safetensors"), world["base"])
    narrow = nnx.eval_shape(lambda: WanDiT.from_config(tiny_config(dim=32, num_heads=2), rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped tensors \(36\): transformer"):
        L.load_lora(good, narrow)
    # a peft config that disagrees with the file's rank
    os.makedirs(tmp_path / "peft")
    save_file(load_file(good), str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="has rank 4 but its LoRA config says 8"):
        L.load_lora(str(tmp_path / "peft"), world["base"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.load_lora(str(tmp_path / "nope.safetensors"), world["base"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        L.load_lora(str(tmp_path / "junk.safetensors"), world["base"])
    # nothing is written on a failed or refused save
    with pytest.raises(ValueError, match="LoRA format 'kohya'"):
        L.save_lora(weights, str(tmp_path / "kohya"), fmt="kohya")
    with pytest.raises(FileExistsError, match="not empty"):
        L.save_lora(weights, str(tmp_path / "good"), fmt="comfyui")
    assert not (tmp_path / "kohya").exists() and os.listdir(tmp_path / "good") == [L.FILE_NAMES["diffusers"]]


def test_failed_save_leaves_nothing(world, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(L, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        L.save_lora(L.adapter_weights(world["model"]), str(tmp_path / "out"), fmt="diffusers",
                    base={"base": "x"})
    assert os.listdir(tmp_path) == []


def small_adapter(config, seed):
    """A rank-2 adapter on two targets with scale 0.5 (LoRAWeights built by hand)."""
    r, m, n = np.random.default_rng(seed), config.model, config.model.num_layers
    shapes = {"attn1.to_q": (m.dim, m.dim), "ffn.net.2": (m.ffn_dim, m.dim)}
    draw = lambda *shape: (0.3 * r.standard_normal(shape)).astype(np.float32)  # noqa: E731
    return L.LoRAWeights({t: draw(n, i, 2) for t, (i, o) in shapes.items()},
                         {t: draw(n, 2, o) for t, (i, o) in shapes.items()}, 0.5, "small")


def test_merge_equals_runtime(world):
    base, x = world["base"], world["x"]
    weights, small = L.adapter_weights(world["model"]), small_adapter(world["config"], 5)
    loras = [(weights, 0.7, None), (small, -1.3, None)]
    merged = L.merge_loras(base, [(w, s) for w, s, _ in loras])
    runtime = L.with_runtime_loras(base, loras)
    assert runtime.lora.rank == RANK + 2 and runtime.lora_shots is None
    assert_close(forward(runtime, *x), forward(merged, *x), "merged vs runtime")
    # a LoRA model's own adapters are merged first, at strength 1
    own = L.apply_loras(world["model"], [(small, 1.0, None)])
    both = L.merge_loras(base, [(weights, 1.0), (small, 1.0)])
    assert not lora_linears(own)
    assert_close(forward(own, *x), forward(both, *x), "own adapters + file vs both merged")
    # every-shot adapters are merged, per-shot ones stay as runtime columns with their shots
    mixed = L.apply_loras(base, [(weights, 1.0, None), (small, 0.5, (0, 2))])
    assert mixed.lora.rank == 2 and mixed.lora.targets == ("attn1.to_q", "ffn.net.2")
    assert mixed.lora_shots == ((0, 2), (0, 2))
    with pytest.raises(ValueError, match="all per-shot or all for every shot"):
        L.with_runtime_loras(base, [(weights, 1.0, None), (small, 1.0, (1,))])


@pytest.mark.parametrize("text, parsed", [
    ("a.safetensors", ("a.safetensors", 1.0, None)),
    ("a.safetensors:0.5", ("a.safetensors", 0.5, None)),
    ("a.safetensors:-1", ("a.safetensors", -1.0, None)),
    ("a.safetensors:0.5@0,2", ("a.safetensors", 0.5, (0, 2))),
    ("dir/a.safetensors@2,0,2", ("dir/a.safetensors", 1.0, (0, 2))),
    ("C:/x:y", ("C:/x:y", 1.0, None)),
    ("C:/x", ("C:/x", 1.0, None)),
    ("C:/x:0.25@1", ("C:/x", 0.25, (1,))),
])
def test_lora_use_parse(text, parsed):
    use = L.LoRAUse.parse(text)
    assert (use.path, use.strength, use.shots) == parsed


@pytest.mark.parametrize("text, message", [
    ("a.safetensors@", "comma-separated 0-based shot indices"),
    ("a.safetensors@x", "comma-separated 0-based shot indices"),
    ("a.safetensors@0,,1", "comma-separated 0-based shot indices"),
    ("a.safetensors@-1", "shot indices must be >= 0"),
    ("a.safetensors:inf", "finite number"),
    ("a.safetensors:nan@0", "finite number"),
    (":0.5", "no path"),
    ("", "no path"),
])
def test_lora_use_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        L.LoRAUse.parse(text)


@pytest.fixture(scope="module")
def lora_run(world):
    """A LoRA run's checkpoint as training writes it: config.json naming its base (init_from) and
    a params item holding the adapters alone."""
    root, config = world["root"], world["config"]
    base_dir = save_params(world["base"], str(root / "base_ckpt"), config)
    run = root / "run"
    config = run_config(world["model"], config)
    config.train.init_from, config.train.lora.rank, config.train.lora.alpha = base_dir, RANK, ALPHA
    run.mkdir()
    (run / "config.json").write_text(config.to_json_best_effort(indent=2))
    with ocp.CheckpointManager(str(run), item_names=("params",)) as manager:
        manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(
            nnx.state(world["model"], nnx.LoRAParam))))
        manager.wait_until_finished()
    return base_dir, str(run)


def test_cli_export_of_a_lora_run(world, lora_run, tmp_path, capsys):
    base_dir, run = lora_run
    for fmt in ("diffusers-lora", "comfyui-lora"):
        assert main(["export", "--checkpoint", run, "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        file = tmp_path / fmt / L.FILE_NAMES[fmt.removesuffix("-lora")]
        info = json.loads((tmp_path / fmt / L.BASE_NAME).read_text())
        assert info["init_from"] == base_dir and info["lora"] == {
            "rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)} and info["format"] in fmt
        back, weights = L.load_lora(str(file), world["base"]), L.adapter_weights(world["model"])
        for t in TARGETS:
            assert np.array_equal(back.a[t], weights.a[t]), t
            np.testing.assert_allclose(back.scale * back.b[t], weights.scale * weights.b[t],
                                       rtol=1e-6)
    assert "exported the LoRA adapters of" in capsys.readouterr().out
    # diffusers|official: the merged model
    merged = str(tmp_path / "merged")
    assert main(["export", "--checkpoint", run, "--format", "diffusers", "--out", merged]) == 0
    assert_same_params(load_diffusers(merged, world["config"]), merge_lora(world["model"]))
    # a plain checkpoint has no adapters to export: one line, exit 2, nothing written
    assert main(["export", "--checkpoint", base_dir, "--format", "comfyui-lora", "--out",
                 str(tmp_path / "none")], report_errors=True) == 2
    assert "is not a LoRA run" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_sample_lora_on_the_loaded_model(world, lora_run, tmp_path, capsys):
    _, run = lora_run
    file = L.save_lora(L.adapter_weights(world["model"]), str(tmp_path / "c"), fmt="comfyui")
    config = load_config_json(run)
    # the run's own adapters (strength 1) and the same file at 0.5: base + 1.5 * delta
    (model,) = load_experts(config, run, loras=[L.LoRAUse.parse(f"{file}:0.5")])
    want = L.merge_loras(world["base"], [(L.adapter_weights(world["model"]), 1.5)])
    np.testing.assert_allclose(np.asarray(model.blocks.attn2.to_v.kernel[...]),
                               np.asarray(want.blocks.attn2.to_v.kernel[...]), rtol=0, atol=1e-6)
    (per_shot,) = load_experts(config, run, loras=[L.LoRAUse.parse(f"{file}@1")])
    assert per_shot.lora_shots == ((1,),) * RANK
    # a file for another model names the checkpoint and the file; a missing one fails first
    other = L.LoRAWeights({"attn1.to_q": np.zeros((2, 32, 1), np.float32)},
                          {"attn1.to_q": np.zeros((2, 1, 32), np.float32)}, 1.0)
    bad = L.save_lora(other, str(tmp_path / "narrow"), fmt="diffusers")
    with pytest.raises(ValueError, match=re.escape(f"--lora on the model of checkpoint '{run}': "
                                                    f"LoRA file {bad} does not match")):
        load_experts(config, run, loras=[L.LoRAUse(bad)])
    assert main(["sample", "--checkpoint", run, "--global-caption", "A room.", "--shot-caption",
                 "Wide shot.", "--lora", str(tmp_path / "missing.safetensors"), "--out",
                 str(tmp_path / "films")], report_errors=True) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "does not exist" in err and not (tmp_path / "films").exists()
