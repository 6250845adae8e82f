"""Wan VAE encode / decode throughput: jitted JAX (chunked scan) vs diffusers' AutoencoderKLWan (torch, CPU).

    python benchmarks/vae.py [--repeats 3] [--frames 33] [--out benchmarks/results/vae.json]

Small random 2.1- and 2.2-style VAEs (Wan's stage layout at few channels) on 64x64 films, float32
on this machine's CPU, same weights on both sides; repeats alternate between JAX and torch so
that load from other processes hits both alike. Also times the tiny config's DCT autoencoder
(no torch counterpart). Prints a table and writes JSON with median frames/s and torch/jax time
ratios (> 1: JAX faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKLWan as TorchWanVAE

from holocine_jax.config import load_config
from holocine_jax.vae import load_diffusers_vae, make_vae

CASES = {
    "wan2.1-small": dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                         temperal_downsample=[False, True, True]),
    "wan2.2-small": dict(base_dim=32, decoder_base_dim=48, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                         temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                         in_channels=12, out_channels=12, scale_factor_spatial=16),
}


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_times(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # compile / warm up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def run_case(case: str, frames: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    ref = TorchWanVAE(**CASES[case]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        vae = load_diffusers_vae(tmp)
    video = np.random.default_rng(0).uniform(-1, 1, (1, frames, size, size, 3)).astype(np.float32)
    latents = np.array(vae.encode(jnp.asarray(video)))
    video_t = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()
    latents_t = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).contiguous()
    compile_s = timed(lambda: jax.block_until_ready(vae.decode(jnp.asarray(latents))))

    def torch_encode():
        with torch.no_grad():
            ref.encode(video_t)

    def torch_decode():
        with torch.no_grad():
            ref.decode(latents_t)

    med = median_times({
        "jax_encode": lambda: jax.block_until_ready(vae.encode(jnp.asarray(video))),
        "torch_encode": torch_encode,
        "jax_decode": lambda: jax.block_until_ready(vae.decode(jnp.asarray(latents))),
        "torch_decode": torch_decode,
    }, repeats)
    return {"case": case, "frames": frames, "size": size, "latent_shape": list(latents.shape[1:]),
            "jax_decode_compile_s": compile_s, **{f"{k}_s": v for k, v in med.items()},
            **{f"{k}_fps": frames / v for k, v in med.items()},
            "encode_ratio_torch_over_jax": med["torch_encode"] / med["jax_encode"],
            "decode_ratio_torch_over_jax": med["torch_decode"] / med["jax_decode"]}


def run_dct(frames: int, size: int, repeats: int) -> dict:
    ae = make_vae(load_config("tiny"))
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, frames, size, size, 3)).astype(np.float32))
    encode, decode = jax.jit(ae.encode), jax.jit(ae.decode)
    latents = encode(video)
    med = median_times({"jax_encode": lambda: jax.block_until_ready(encode(video)),
                        "jax_decode": lambda: jax.block_until_ready(decode(latents))}, repeats)
    return {"case": "tiny-dct", "frames": frames, "size": size, "latent_shape": list(latents.shape[1:]),
            **{f"{k}_s": v for k, v in med.items()}, **{f"{k}_fps": frames / v for k, v in med.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="benchmarks/results/vae.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = [run_case(c, args.frames, args.size, args.repeats) for c in args.cases.split(",") if c]
    rows.append(run_dct(args.frames, args.size, args.repeats))
    print(f"{'case':13} {'latents':>14} {'enc jax':>9} {'enc torch':>9} {'ratio':>6} "
          f"{'dec jax':>9} {'dec torch':>9} {'ratio':>6}   (frames/s)")
    for r in rows:
        t_enc, t_dec = r.get("torch_encode_fps"), r.get("torch_decode_fps")
        print(f"{r['case']:13} {str(tuple(r['latent_shape'])):>14} {r['jax_encode_fps']:9.1f} "
              f"{t_enc if t_enc else float('nan'):9.1f} {r.get('encode_ratio_torch_over_jax', float('nan')):6.2f} "
              f"{r['jax_decode_fps']:9.1f} {t_dec if t_dec else float('nan'):9.1f} "
              f"{r.get('decode_ratio_torch_over_jax', float('nan')):6.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "jax": jax.__version__, "repeats": args.repeats, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
