"""LoRA adapters <-> safetensors files: diffusers/peft and ComfyUI layouts (DESIGN §10, §13).

    weights = adapter_weights(model)                      # a LoRA run's adapters as plain arrays
    save_lora(weights, "out/", fmt="diffusers", base=base_reference(config))
    weights = load_lora("style.safetensors", model)       # either layout, auto-detected, validated
    model = apply_loras(model, [(weights, 0.8, None),     # merged into the base at strength 0.8
                                (other, 1.0, (0, 2))])    # runtime adapter on shots 0 and 2 only
    model = apply_lora_files(model, [LoRAUse.parse("style.safetensors:0.8@0,2")])  # sample --lora

Layouts (one tensor per block linear and block i; a [r, in], b [out, r] here are our `lora_a`
[in, r].T and `lora_b` [r, out].T in PyTorch's [out, in] orientation):
- diffusers / peft: `transformer.blocks.{i}.attn1.to_q.lora_A.weight` [r, in] and `.lora_B.weight`
  [out, r] (what `WanPipeline.load_lora_weights` and `WanTransformer3DModel.load_lora_adapter(...,
  prefix="transformer")` read). These files carry no alpha (diffusers applies B A, scale 1), so
  export folds scale = alpha / r into lora_B. Import also reads peft's own output
  (`get_peft_model_state_dict`: no prefix, or `base_model.model.`; `lora_A.<adapter>.weight`)
  with alpha from an `adapter_config.json` beside the file or diffusers' `lora_adapter_metadata`.
- ComfyUI / DiffSynth (official Wan module names): `diffusion_model.blocks.{i}.self_attn.q.
  lora_down.weight` [r, in], `.lora_up.weight` [out, r] and `.alpha` (a scalar: scale = alpha /
  r), which ComfyUI loads and diffusers converts (`_convert_non_diffusers_wan_lora_to_diffusers`);
  import also takes `lora_A` / `lora_B` there, and no prefix.
An imported adapter is a `LoRAWeights`: float32 arrays per target, stacked on the layer axis, and
one scale; a module whose own alpha / rank differs from it has the ratio folded into its b, and
modules of smaller rank (or blocks a file leaves out) are zero-padded to the adapter's rank, which
changes nothing (zero columns of a, zero rows of b).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from holocine_jax.convert import names as N
from holocine_jax.convert.layout import CheckpointMismatchError, torch_layout
from holocine_jax.convert.safetensors_io import header_problem
from holocine_jax.files import atomic_directory
from holocine_jax.model.lora import TARGETS, LoRASpec, lora_linears

FORMATS = ("diffusers", "comfyui")
FILE_NAMES = {"diffusers": "pytorch_lora_weights.safetensors",   # diffusers' default name
              "comfyui": "lora_comfyui.safetensors"}
BASE_NAME = "lora_base.json"
PEFT_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"    # diffusers' LoRA config inside a safetensors header
BASE_METADATA_KEY = "holocine_base"       # our base reference inside the exported header
# Prefixes every key of a file may share (the first that all keys share is removed).
PREFIXES = ("base_model.model.transformer.", "base_model.model.", "transformer.",
            "model.diffusion_model.", "diffusion_model.", "model.")
_KEY = re.compile(r"^blocks\.(\d+)\.(.+?)\.(lora_A|lora_B|lora_down|lora_up)(?:\.(\w+))?\.weight$")
_ALPHA = re.compile(r"^blocks\.(\d+)\.(.+)\.alpha$")
_DOWN = {"lora_A": "a", "lora_down": "a", "lora_B": "b", "lora_up": "b"}


@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """One adapter as plain arrays: a {target: [layers, in, r]}, b {target: [layers, r, out]}
    float32 (targets: names from lora.TARGETS), kernel update scale * a @ b; source: its file."""
    a: dict
    b: dict
    scale: float
    source: str = ""

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[-1]

    @property
    def targets(self) -> tuple:
        return tuple(t for t in TARGETS if t in self.a)


def adapter_weights(model) -> LoRAWeights:
    """The adapters of a WanDiT with LoRA (a LoRA run's model from `checkpoint.load_params`)."""
    linears = lora_linears(model)
    if not linears:
        raise ValueError("the model has no LoRA adapters (config.train.lora.rank is 0): export "
                         "it with --format diffusers|official")
    a = {m.lora_name: np.asarray(m.lora_a[...], np.float32) for m in linears.values()}
    b = {m.lora_name: np.asarray(m.lora_b[...], np.float32) for m in linears.values()}
    return LoRAWeights(a, b, float(next(iter(linears.values())).lora_scale), "model")


def base_reference(config) -> dict:
    """What a LoRA run's adapters go on: {"init_from": path or None, "seed": N, "config": name,
    "expert": A14B expert or None, "model": the architecture, "lora": rank/alpha/targets}."""
    from holocine_jax.convert.wan import ARCH_KEYS

    lora = LoRASpec.from_config(config.train.lora)
    init = config.train.get("init_from") or None
    return {"base": init if init else f"seed {config.seed}", "init_from": init,
            "seed": int(config.seed), "config": config.get("name"), "expert": config.get("expert"),
            "model": {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in config.model.to_dict().items() if k in ARCH_KEYS},
            "lora": {"rank": lora.rank, "alpha": lora.alpha or lora.rank,
                     "targets": list(lora.targets)}}


def lora_tensors(weights: LoRAWeights, fmt: str, dtype=None) -> dict[str, np.ndarray]:
    """{name: PyTorch-layout array} of `weights` in layout `fmt` ("diffusers" | "comfyui");
    the matrices in `dtype` (None: float32), a ComfyUI `.alpha` always float32."""
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format {fmt!r}; expected one of {FORMATS}")
    dtype = np.dtype(jnp.dtype(dtype or "float32"))
    out, r = {}, weights.rank
    for t in weights.targets:
        for i in range(weights.a[t].shape[0]):
            down = weights.a[t][i].T                         # [r, in]
            if fmt == "diffusers":                           # no alpha: fold the scale into B
                out[f"transformer.blocks.{i}.{t}.lora_A.weight"] = down
                out[f"transformer.blocks.{i}.{t}.lora_B.weight"] = weights.scale * weights.b[t][i].T
            else:
                name = "diffusion_model." + N.diffusers_to_official(f"blocks.{i}.{t}.weight")[:-len(".weight")]
                out[f"{name}.lora_down.weight"] = down
                out[f"{name}.lora_up.weight"] = weights.b[t][i].T
                out[f"{name}.alpha"] = np.asarray(weights.scale * r, np.float32)
    return {k: np.asarray(v, np.float32).astype(np.float32 if k.endswith(".alpha") else dtype,
                                                order="C") for k, v in out.items()}  # alpha: []


def save_lora(weights: LoRAWeights, out: str, *, fmt: str, base: dict | None = None,
              dtype=None) -> str:
    """Write `out/` (new or empty; all or nothing) with one adapter file (`FILE_NAMES[fmt]`,
    matrices in `dtype`, default float32) and, given `base` (`base_reference`), `lora_base.json`
    beside it (also in the file's header metadata). Returns the .safetensors path."""
    tensors = lora_tensors(weights, fmt, dtype)
    metadata = {"format": "pt"}
    if base is not None:
        metadata[BASE_METADATA_KEY] = json.dumps(base, sort_keys=True)
    with atomic_directory(out) as tmp:
        save_file(tensors, os.path.join(tmp, FILE_NAMES[fmt]), metadata=metadata)
        if base is not None:
            with open(os.path.join(tmp, BASE_NAME), "w") as f:
                json.dump({**base, "format": fmt, "file": FILE_NAMES[fmt]}, f, indent=2)
    return os.path.join(out, FILE_NAMES[fmt])


def lora_file(path: str) -> str:
    """The adapter file: `path`, or the one .safetensors file of a directory (diffusers' /
    peft's default name first)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LoRA path {path!r} does not exist")
    for name in (FILE_NAMES["diffusers"], "adapter_model.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"LoRA directory {path!r} holds {len(files)} .safetensors files "
                                f"{files}; give the file itself")
    return os.path.join(path, files[0])


def _read(file: str) -> tuple[dict, dict]:
    """({name: float32 array}, header metadata) of a safetensors file."""
    try:
        with safe_open(file, framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: np.asarray(handle.get_tensor(k)).astype(np.float32) for k in handle.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {header_problem(file) or e}") from None
    if not tensors:
        raise ValueError(f"LoRA file {file} holds no tensors")
    return tensors, metadata


def _peft_config(file: str, metadata: dict) -> dict | None:
    """The LoRA config of a peft / diffusers file: adapter_config.json beside it, or diffusers'
    `lora_adapter_metadata` (keys possibly prefixed `transformer.`); None without one."""
    side = os.path.join(os.path.dirname(file), PEFT_CONFIG)
    if os.path.isfile(side):
        with open(side) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{side} is not JSON ({e})") from None
    if METADATA_KEY in metadata:
        try:
            raw = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: header entry {METADATA_KEY!r} is not JSON ({e})") from None
        return {k.removeprefix("transformer."): v for k, v in raw.items()}
    return None


def _pattern(patterns: dict, name: str):
    """peft's rank_pattern / alpha_pattern lookup: the value of the first key matching the
    module name's tail (a key starting with "^" matches from the start)."""
    for key, value in (patterns or {}).items():
        regex = key[1:] if key.startswith("^") else rf"(?:.*\.)?{key}"
        if re.fullmatch(regex, name):
            return value
    return None


def _target(module: str, block: int) -> str | None:
    """A file's module name (diffusers or official) -> the target name in lora.TARGETS."""
    if module in TARGETS:
        return module
    renamed = N.official_to_diffusers(f"blocks.{block}.{module}.weight")
    if renamed is None:
        return None
    t = renamed[len(f"blocks.{block}."):-len(".weight")]
    return t if t in TARGETS else None


def _problems(source, unknown, missing, wrong):
    if unknown or missing or wrong:
        parts = [f"{title} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                 for title, items in (("unknown tensors", unknown), ("missing tensors", missing),
                                      ("mis-shaped tensors", wrong)) if items]
        raise CheckpointMismatchError(f"LoRA file {source} does not match the model: " + " | ".join(parts))


def load_lora(path: str, model) -> LoRAWeights:
    """Read an adapter file (either layout, see the module docstring; a directory with one
    .safetensors file) and validate it against `model` (a WanDiT, abstract is enough): every key
    must be a lora_A/lora_B (lora_down/lora_up) of a block linear or its `.alpha`, each with its
    partner, block index < num_layers, shapes [r, in] / [out, r]. One CheckpointMismatchError
    names every unknown, missing or mis-shaped tensor."""
    file = lora_file(path)
    tensors, metadata = _read(file)
    prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in tensors)), "")
    layout = torch_layout(model)
    num_layers = model.config.num_layers
    modules, alphas, unknown = {}, {}, []
    for key in tensors:
        name = key[len(prefix):]
        m, ma = _KEY.match(name), _ALPHA.match(name)
        block, module = (int(m.group(1)), m.group(2)) if m else (
            (int(ma.group(1)), ma.group(2)) if ma else (None, None))
        target = None if module is None else _target(module, block)
        if target is None:
            unknown.append(f"{key} (not a LoRA tensor of a block linear {TARGETS} or its official "
                           "name; LoRA on other layers, biases (diff_b) and DoRA are not supported)")
        elif block >= num_layers:
            unknown.append(f"{key} (block {block}: the model has {num_layers} blocks, 0..{num_layers - 1})")
        elif ma:
            alphas[(block, target)] = key
        else:
            slot = modules.setdefault((block, target), {"module": f"blocks.{block}.{module}"})
            if _DOWN[m.group(3)] in slot:
                unknown.append(f"{key} (a second {_DOWN[m.group(3)]} matrix for {slot['module']}: "
                               f"{slot[_DOWN[m.group(3)]]})")
            else:
                slot[_DOWN[m.group(3)]] = key
    missing, wrong = [], []
    for (block, target), slot in modules.items():
        out_f, in_f = layout[f"blocks.0.{target}.weight"].shape
        partner = {"a": "lora_B (lora_up)", "b": "lora_A (lora_down)"}
        for have, want in (("a", "b"), ("b", "a")):
            if want not in slot:
                missing.append(f"the {partner[have]} of {slot[have]}")
        a, b = slot.get("a"), slot.get("b")
        if a is not None and (tensors[a].ndim != 2 or tensors[a].shape[1] != in_f):
            wrong.append(f"{a}: got {list(tensors[a].shape)}, expected [rank, {in_f}]")
        r = tensors[a].shape[0] if a is not None and tensors[a].ndim == 2 else None
        if b is not None and (tensors[b].shape != (out_f, r) if r else
                              (tensors[b].ndim != 2 or tensors[b].shape[0] != out_f)):
            wrong.append(f"{b}: got {list(tensors[b].shape)}, expected [{out_f}, {r or 'rank'}]")
    for (block, target), key in alphas.items():
        if (block, target) not in modules:
            unknown.append(f"{key} (an alpha without lora_A / lora_B tensors)")
        elif tensors[key].size != 1:
            wrong.append(f"{key}: got {list(tensors[key].shape)}, expected [] (a scalar)")
    _problems(file, unknown, missing, wrong)
    if not modules:
        raise ValueError(f"LoRA file {file} holds no lora_A / lora_B tensors")
    config = None if alphas else _peft_config(file, metadata)
    scales = {}
    for (block, target), slot in modules.items():
        r = tensors[slot["a"]].shape[0]
        if (block, target) in alphas:
            alpha, root = float(tensors[alphas[(block, target)]].reshape(())), r
        elif config is not None:
            rank = _pattern(config.get("rank_pattern"), slot["module"]) or config.get("r") or r
            if rank != r:
                raise ValueError(f"{file}: {slot['a']} has rank {r} but its LoRA config says {rank}")
            alpha = _pattern(config.get("alpha_pattern"), slot["module"]) or config.get("lora_alpha", r)
            root = math.sqrt(r) if config.get("use_rslora") else r
        else:
            alpha, root = r, r                 # diffusers' convention: no alpha, scale 1
        scales[(block, target)] = float(alpha) / root
    nonzero = [s for s in scales.values() if s]          # alpha 0 switches a module off
    scale = collections.Counter(nonzero).most_common(1)[0][0] if nonzero else 0.0
    rank = max(tensors[s["a"]].shape[0] for s in modules.values())
    a, b = {}, {}
    for (block, target), slot in sorted(modules.items()):
        out_f, in_f = layout[f"blocks.0.{target}.weight"].shape
        if target not in a:
            a[target] = np.zeros((num_layers, in_f, rank), np.float32)
            b[target] = np.zeros((num_layers, rank, out_f), np.float32)
        down, up = tensors[slot["a"]], tensors[slot["b"]]
        a[target][block, :, :down.shape[0]] = down.T
        b[target][block, :down.shape[0]] = up.T * (scales[(block, target)] / scale if scale else 0.0)
    return LoRAWeights(a, b, scale, file)


def _kernel_paths(model) -> dict:
    """{target: NNX path of its stacked kernel [layers, in, out]}."""
    layout = torch_layout(model)
    return {t: layout[f"blocks.0.{t}.weight"].path for t in TARGETS}


def _check_fits(model, weights: LoRAWeights) -> None:
    layers = model.config.num_layers
    paths = _kernel_paths(model)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for t in weights.targets:
        shape = tuple(flat[paths[t]].get_value().shape)
        want = ((layers, shape[1], weights.rank), (layers, weights.rank, shape[2]))
        if (weights.a[t].shape, weights.b[t].shape) != want:
            raise ValueError(f"LoRA {weights.source}: {t} has a {list(weights.a[t].shape)} and b "
                             f"{list(weights.b[t].shape)}, the model needs {list(want[0])} and "
                             f"{list(want[1])}")


def merge_loras(model, loras) -> nnx.Module:
    """A WanDiT without adapters whose kernels are W + sum strength * scale * a @ b (float32
    sums, cast back to the kernel's dtype). loras: [(LoRAWeights, strength)]; adapters the model
    itself carries (a LoRA run) are merged first at strength 1."""
    from holocine_jax.model.transformer import merge_lora

    if model.lora.rank:
        model = merge_lora(model)
    paths = _kernel_paths(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))
    for weights, strength in loras:
        _check_fits(model, weights)
        for t in weights.targets:
            var = flat[paths[t]]
            delta = jnp.einsum("lir,lro->lio", jnp.asarray(weights.a[t]), jnp.asarray(weights.b[t]))
            kernel = var.get_value().astype(jnp.float32) + (float(strength) * weights.scale) * delta
            flat[paths[t]] = var.replace(kernel.astype(var.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())), rest)


def with_runtime_loras(model, loras) -> nnx.Module:
    """A WanDiT carrying `loras` [(LoRAWeights, strength, shots)] as one runtime adapter of rank
    sum(ranks): a / b concatenated along the rank axis, strength * scale folded into b, and
    `set_lora_shots` giving each adapter's columns its shots (0-based shot indices; None: every
    shot). Adapters the model carries are merged into its base first. The new model shares the
    base's arrays (built from an abstract model: no second copy of the weights)."""
    from holocine_jax.model import WanDiT
    from holocine_jax.model.transformer import base_params, merge_lora

    if not loras:
        raise ValueError("with_runtime_loras needs at least one adapter")
    if len({shots is None for _, _, shots in loras}) > 1:
        raise ValueError("runtime LoRA adapters are all per-shot or all for every shot; merge the "
                         "every-shot ones (apply_loras does)")
    if model.lora.rank:
        model = merge_lora(model)
    for weights, _, _ in loras:
        _check_fits(model, weights)
    rank = sum(w.rank for w, _, _ in loras)
    targets = tuple(t for t in TARGETS if any(t in w.a for w, _, _ in loras))
    spec = LoRASpec(rank=rank, alpha=rank, targets=targets)   # scale 1: the scales are in b
    abstract = nnx.eval_shape(lambda: WanDiT(model.config, model.attention, model.rules,
                                             rngs=nnx.Rngs(0), lora=spec))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))
    flat.update(nnx.to_flat_state(base_params(model)))
    for path, linear in lora_linears(abstract).items():
        t = linear.lora_name
        (layers, in_f, _), out_f = linear.lora_a.shape, linear.lora_b.shape[2]
        a = [w.a[t] if t in w.a else np.zeros((layers, in_f, w.rank), np.float32) for w, _, _ in loras]
        b = [float(s) * w.scale * w.b[t] if t in w.b else np.zeros((layers, w.rank, out_f), np.float32)
             for w, s, _ in loras]
        for name, parts, axis in (("lora_a", a, -1), ("lora_b", b, 1)):
            var = flat[(*path, name)]
            flat[(*path, name)] = var.replace(jnp.asarray(np.concatenate(parts, axis=axis),
                                                          var.get_value().dtype))
    fresh = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())), rest)
    if all(shots is not None for _, _, shots in loras):
        fresh.set_lora_shots([tuple(shots) for w, _, shots in loras for _ in range(w.rank)])
    return fresh


def apply_loras(model, loras) -> nnx.Module:
    """`model` with adapters `loras` [(LoRAWeights, strength, shots)]: those for every shot
    (shots None) merged into the base (`merge_loras`), per-shot ones (a tuple of 0-based shot
    indices: applied to those shots' video tokens) as runtime adapters (`with_runtime_loras`)."""
    merged = [(w, s) for w, s, shots in loras if shots is None]
    per_shot = [x for x in loras if x[2] is not None]
    if merged or model.lora.rank:
        model = merge_loras(model, merged)
    return with_runtime_loras(model, per_shot) if per_shot else model


def apply_lora_files(model, uses) -> nnx.Module:
    """`apply_loras` of `uses` [LoRAUse] (`sample --lora`), each file read and validated against
    `model` (`load_lora`); `model` itself when `uses` is empty."""
    uses = list(uses)
    if not uses:
        return model
    return apply_loras(model, [(load_lora(u.path, model), u.strength, u.shots) for u in uses])


@dataclasses.dataclass(frozen=True)
class LoRAUse:
    """One `sample --lora PATH[:STRENGTH][@SHOTS]`: path, strength (default 1), shots (None:
    every shot; else 0-based shot indices, e.g. `style.safetensors:0.8@0,2`)."""
    path: str
    strength: float = 1.0
    shots: tuple | None = None

    @classmethod
    def parse(cls, text: str) -> LoRAUse:
        spec, shots = text, None
        if "@" in text:
            spec, _, tail = text.rpartition("@")
            try:
                shots = tuple(sorted({int(s) for s in tail.split(",")}))
            except ValueError:
                raise ValueError(f"--lora {text!r}: the shots after '@' must be comma-separated "
                                 "0-based shot indices, e.g. style.safetensors:0.8@0,2") from None
            if not shots or shots[0] < 0:
                raise ValueError(f"--lora {text!r}: shot indices must be >= 0")
        path, strength = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep:
            try:
                path, strength = head, float(tail)
            except ValueError:
                pass                              # a ':' inside the path (C:/x)
        if not path:
            raise ValueError(f"--lora {text!r}: no path; expected PATH[:STRENGTH][@SHOTS], e.g. "
                             "style.safetensors:0.8@0,2")
        if not math.isfinite(strength):
            raise ValueError(f"--lora {text!r}: the strength must be a finite number")
        return cls(path, strength, shots)

    def describe(self) -> dict:
        """{"path", "strength", "shots"} (film.json)."""
        return {"path": self.path, "strength": self.strength,
                "shots": None if self.shots is None else list(self.shots)}
