"""The evaluation job gives the same numbers on 8 devices as on 1 (issue #18): `run_eval` on a
prompt file (what `holocine-jax eval --prompts` runs) with the Flax towers of real-layout
checkpoints (a CLIPModel directory: background, inter-shot, semantic; a DINO ViT directory:
subject; a LAION head file: aesthetic), the towers' mesh once over one device and once over all
eight, as read back from the arrays the towers ran on. The sampler's place is taken by rendered
synthetic-world films (varied frames, known cuts; a tiny random DiT's films are near-constant),
so everything after sampling runs as in the CLI: per-film scoring, metrics.json, the step's means."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from holocine_jax import parallel
from holocine_jax.eval import job
from holocine_jax.eval import towers as tower_module
from holocine_jax.sample.run import film_layout
from holocine_jax.world import make_film
from eval.test_clip import dirs, jitter  # noqa: F401  (dirs: the tiny CLIPModel directories)
from eval.test_job import eval_config, save_steps, write_bench

MEASURED = ("subject_consistency", "background_consistency", "aesthetic_quality",
            "semantic_global", "semantic_shot", "shot_cut_accuracy", "inter_shot_consistency")


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A tiny ViTModel directory, patch 16 as DINO ViT-B/16 (a 2x2 grid, interpolated to VBench's
    224 px), every parameter offset at random."""
    torch.manual_seed(3)
    model = jitter(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=16)))
    path = str(tmp_path_factory.mktemp("dino"))
    model.save_pretrained(path)
    return path


def run_on(devices, config, ckpt, bench, work, clips, monkeypatch):
    """run_eval with the towers' mesh over `devices`, the sampler standing in with the world films
    `clips` ({seed: frames}) -> (the films' metrics.json records, the step's metrics, [(tower
    method, input, output)] of every tower call)."""
    real_mesh, calls = parallel.make_mesh, []

    class Recorded(tower_module.ShardedEmbedder):
        def __init__(self, fn, **kwargs):
            super().__init__(fn, **kwargs)
            program = self.program

            def run(state, x):
                out = program(state, x)
                calls.append((fn.__name__, x, out))
                return out
            self.program = run

    def generate(config, models, tokenizer, encoder, vae, films, **kwargs):
        for i, film in enumerate(films):
            yield i, film, clips[film.seed], film_layout(config, film, tokenizer)

    monkeypatch.setattr(parallel, "make_mesh", lambda c, d=None: real_mesh(c, devices))
    monkeypatch.setattr(tower_module, "ShardedEmbedder", Recorded)
    monkeypatch.setattr(job, "generate", generate)
    (metrics,) = job.run_eval(config, ckpt, None, work, prompts=bench, progress=False).values()
    monkeypatch.undo()
    out = os.path.join(work, "eval", "step_00000001")
    films = [json.load(open(os.path.join(out, f"film_{i:03d}", "metrics.json")))
             for i in range(len(clips))]
    return films, metrics, calls


def test_eval_job_on_eight_devices_matches_one_device(tmp_path, dirs, dino,  # noqa: F811
                                                      monkeypatch):
    assert jax.device_count() == 8
    torch.manual_seed(7)
    torch.save(jitter(torch.nn.Linear(16, 1)).state_dict(), tmp_path / "head.pth")  # LAION layout
    config = eval_config()
    config.eval.update(clip=dirs["eos"], dino=dino, aesthetic_head=str(tmp_path / "head.pth"),
                       backend="jax")
    films = {seed: make_film(seed, height=32, width=48, num_frames=17) for seed in range(3)}
    clips = {seed: frames for seed, (frames, _) in films.items()}
    bench = write_bench(tmp_path / "bench.jsonl", [   # the world films' own captions and cuts
        dict(global_caption=spec.global_caption, shots=list(spec.shot_captions),
             cuts=list(spec.cut_frames), frames=17, seed=seed)
        for seed, (_, spec) in films.items()])
    ckpt = str(tmp_path / "ckpt")
    save_steps(ckpt, config, [1])
    one = run_on(jax.devices()[:1], config, ckpt, bench, str(tmp_path / "one"), clips, monkeypatch)
    eight = run_on(jax.devices(), config, ckpt, bench, str(tmp_path / "eight"), clips, monkeypatch)

    # the towers really ran on the meshes: inputs and outputs split by rows over 8 devices vs 1
    for (_, _, calls), n in ((one, 1), (eight, 8)):
        assert {name for name, _, _ in calls} == {"features", "image_features", "text_features"}
        for name, x, out in calls:
            for a in (x, out):
                assert len(a.sharding.device_set) == n, (name, a.sharding)
                assert a.sharding.shard_shape(a.shape)[0] == a.shape[0] // n, (name, a.sharding)

    worst = {}
    for film_one, film_eight in zip(one[0], eight[0]):
        assert film_one["detected_cuts"] == film_eight["detected_cuts"] == film_one["cuts"]
        for name in MEASURED:
            a, b = film_one["values"][name], film_eight["values"][name]
            assert len(a) == len(b) > 0 and np.all(np.isfinite(a + b)), (name, a, b)
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(np.subtract(a, b)))))
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=name)
    print("max |8 devices - 1 device| per metric:", {k: f"{v:.1e}" for k, v in worst.items()})
    for name in MEASURED:                  # and the step's averages agree too
        assert one[1][name] is not None and abs(one[1][name] - eight[1][name]) <= 1e-5, name
