"""ShotLayout: the one home of shot geometry (DESIGN §3).

A film is `num_latent_frames` (F) latent frames of `tokens_per_frame` (T = h*w after patchify)
tokens, L = F*T tokens in (frame, row, column) order, cut into at most `max_shots` (K) shots.
Static maxima are pytree metadata; the per-film arrays are pytree leaves, so one compiled program
serves every cut layout with the same maxima.

Conventions used by every predicate here:
- shot k covers latent frames [shot_starts[k], shot_starts[k+1]) (shot_starts[K] := F); padding
  shots k >= num_shots start at F and are empty;
- summary tokens = the first `summary_frames` latent frames of each shot (HoloCine: 1);
- a token shot id of -1 marks a padding token (block padding in attention): it allows nothing;
- text windows are half-open token ranges [start, end); row 0 is the global window, row k+1 the
  window of shot k; every token t >= text_pad_start is visible to every video token.

Requested cut frames (user, manifest, eval) become applied ones in one place, `snap_cuts`, by the
official scripts' rule (nearest 4t+1, duplicates merged, in range).

A run config's geometry is read here and nowhere else: `latent_shape(config)` (the latents) and
`ShotLayout.for_config(config, cuts)` (its token grid, max_shots, summary_frames). The config is
duck-typed: this module imports no other holocine_jax module.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SELF_ATTENTION_MODES = ("sparse", "full", "independent")


# ----------------------------------------------------------------------------- frame arithmetic
def latent_num_frames(num_frames: int) -> int:
    """Latent frames of a `num_frames` (= 4t+1) pixel video: (n-1)//4 + 1."""
    if int(num_frames) != num_frames or num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames={num_frames} is not of the form 4t+1 (1, 5, 9, ..., 241)")
    return (int(num_frames) - 1) // 4 + 1


def pixel_to_latent_cut(pixel_frame: int) -> int:
    """The latent frame a cut at pixel frame p >= 1 starts: (p-1)//4 + 1 (= ceil(p/4))."""
    return (int(pixel_frame) - 1) // 4 + 1


def latent_to_pixel_cut(latent_frame: int) -> int:
    """The first pixel frame of latent frame j >= 1: 4(j-1) + 1 (inverse of the above on 4t+1)."""
    return 4 * (int(latent_frame) - 1) + 1


def snap_4t_plus_1(n: int) -> int:
    """The nearest 4t+1 frame count (the official `enforce_4t_plus_1`, Python rounding)."""
    return 4 * round((n - 1) / 4) + 1


def snap_cuts(num_frames: int, cut_frames) -> list[int]:
    """The pixel cuts the official scripts apply for requested `cut_frames` of a `num_frames`
    (4t+1) film: each snapped to the nearest 4t+1 (`snap_4t_plus_1`), duplicates merged, sorted,
    and only 0 < p < num_frames kept (a cut that snaps onto the last frame or past it is dropped).
    The latent cuts then follow `pixel_to_latent_cut`. Requested cuts must be integers."""
    latent_num_frames(num_frames)
    snapped = set()
    for c in cut_frames:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ValueError(f"cut frame {c!r} is not an integer")
        snapped.add(snap_4t_plus_1(int(c)))
    return [p for p in sorted(snapped) if 0 < p < num_frames]


def even_cuts(num_frames: int, num_shots: int) -> list[int]:
    """Evenly spaced pixel-frame cuts (4t+1) for `num_shots` shots, the official default rule:
    `snap_cuts` of round(i * num_frames / num_shots) for i = 1..num_shots-1."""
    if num_shots < 1:
        raise ValueError(f"num_shots={num_shots} must be at least 1")
    step = num_frames / num_shots
    cuts = snap_cuts(num_frames, [round(i * step) for i in range(1, num_shots)])
    if len(cuts) != num_shots - 1:
        raise ValueError(f"{num_frames} frames are too few for {num_shots} evenly spaced shots")
    return cuts


def shot_bounds(num_frames: int, cut_frames) -> list[tuple[int, int]]:
    """[(start, end)] pixel frames per shot for cuts (first frames of shots 2..K)."""
    edges = [0, *[int(c) for c in cut_frames], int(num_frames)]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"cut frames {list(cut_frames)} are not increasing inside "
                         f"[1, {num_frames - 1}]")
    return list(zip(edges, edges[1:]))


# ----------------------------------------------------------------------------- a config's grid
def latent_shape(config, batch: int = 1, *, num_frames: int | None = None) -> tuple[int, ...]:
    """[B, F, h, w, z] latents of a `num_frames` film (None: config.video.num_frames) under a
    run config: F = latent_num_frames, (h, w) = config.video size / config.vae.stride,
    z = config.model.in_channels. `config` is duck-typed (any object with those fields)."""
    v, (_, sh, sw) = config.video, config.vae.stride
    if v.height % sh or v.width % sw:
        raise ValueError(f"video size {v.height}x{v.width} is not divisible by the VAE stride "
                         f"{(sh, sw)}")
    frames = v.num_frames if num_frames is None else num_frames
    return (batch, latent_num_frames(frames), v.height // sh, v.width // sw,
            config.model.in_channels)


# ----------------------------------------------------------------------------- predicates
def self_attention_allowed(shot_q, shot_k, summary_k, mode: str):
    """The self-attention predicate (broadcasting): may query q attend to key k?

    sparse: same shot or k is a summary token; full: always; independent: same shot.
    Padding tokens (shot id -1) allow nothing.
    """
    valid = (shot_q >= 0) & (shot_k >= 0)
    if mode == "full":
        return valid
    same = shot_q == shot_k
    if mode == "independent":
        return valid & same
    if mode == "sparse":
        return valid & (same | summary_k)
    raise ValueError(f"attention mode {mode!r} is not one of {SELF_ATTENTION_MODES}")


def own_summary(shot_q, shot_k, summary_k):
    """Keys that get the summary_self_weight bias: summary tokens of the query's own shot.

    The official sparse code lists a shot's first frame twice among its keys (own shot ++ all
    first frames), which equals a logit bias of log 2 on exactly these keys.
    """
    return (shot_q >= 0) & (shot_q == shot_k) & summary_k


def cross_attention_allowed(shot_q, text_pos, text_windows, text_pad_start):
    """The cross-attention predicate: may video token q read text token t?

    shot_q: [..., L]; text_pos: [Lt]; text_windows: [..., K+1, 2]; text_pad_start: [...].
    Returns [..., L, Lt]: t in the global window, or in the window of shot(q), or t >= pad start.
    """
    t = text_pos[None, :]
    glob = (t >= text_windows[..., 0:1, 0:1]) & (t < text_windows[..., 0:1, 1:2])
    own = jnp.take_along_axis(text_windows, jnp.maximum(shot_q, 0)[..., None] + 1, axis=-2)
    mine = (t >= own[..., 0:1]) & (t < own[..., 1:2])
    pad = t >= jnp.asarray(text_pad_start)[..., None, None]
    return glob | mine | pad


# ----------------------------------------------------------------------------- the layout
@dataclasses.dataclass(frozen=True)
class ShotLayout:
    """Cut layout of one film (or of a batch: leading dims on every array).

    shot_starts: [..., K] int32 first latent frame of each shot (padding shots: F).
    num_shots: [...] int32. text_windows: [..., K+1, 2] int32. text_pad_start: [...] int32.
    """
    shot_starts: jax.Array
    num_shots: jax.Array
    text_windows: jax.Array
    text_pad_start: jax.Array
    num_latent_frames: int = dataclasses.field(metadata=dict(static=True))
    tokens_per_frame: int = dataclasses.field(metadata=dict(static=True))
    max_shots: int = dataclasses.field(metadata=dict(static=True))
    summary_frames: int = dataclasses.field(default=1, metadata=dict(static=True))

    # -- construction
    @classmethod
    def from_latent_cuts(cls, num_latent_frames, latent_cuts, *, latent_hw, max_shots,
                         text_windows=None, text_pad_start=None, summary_frames=1):
        """Layout from the first latent frames of shots 2..K (`latent_cuts`, increasing).

        latent_hw: (h, w) token grid after patchify. text_windows: [num_shots+1, 2] half-open
        token windows (row 0 global) with text_pad_start, or None: every shot sees all text.
        """
        f = _positive_int(num_latent_frames, "num_latent_frames")
        h, w = (_positive_int(x, "latent_hw") for x in latent_hw)
        k = _positive_int(max_shots, "max_shots")
        if int(summary_frames) != summary_frames or summary_frames < 0:
            raise ValueError(f"summary_frames={summary_frames} must be a non-negative integer")
        cuts = [int(c) for c in latent_cuts]
        for i, c in enumerate(cuts):
            if not 1 <= c < f:
                raise ValueError(f"latent cut {c} is out of range [1, {f - 1}] for {f} latent "
                                 "frames")
            if i and c <= cuts[i - 1]:
                raise ValueError(f"latent cuts must increase: {c} follows {cuts[i - 1]}")
        n = len(cuts) + 1
        if n > k:
            raise ValueError(f"{n} shots exceed max_shots={k}")
        starts = np.full(k, f, np.int32)
        starts[:n] = [0] + cuts
        lengths = np.diff(np.append(starts[:n], f))
        for s, length in enumerate(lengths):
            if length < summary_frames:
                raise ValueError(f"shot {s} has {length} latent frame(s), fewer than "
                                 f"summary_frames={summary_frames}")
        windows, pad = _text_windows(text_windows, text_pad_start, n, k)
        return cls(starts, np.int32(n), windows, pad, f, h * w, k, int(summary_frames))

    @classmethod
    def from_cuts(cls, num_frames, cut_frames, *, latent_hw, max_shots, text_windows=None,
                  text_pad_start=None, summary_frames=1):
        """Layout from pixel-frame cuts (4t+1 rules of §3); see `from_latent_cuts`. The cuts are
        taken as given (strictly increasing latent frames); user-requested cuts go through
        `snap_cuts` first, as the official scripts snap them."""
        f = latent_num_frames(num_frames)
        cuts = [int(p) for p in cut_frames]
        for i, p in enumerate(cuts):
            if not 1 <= p < num_frames:
                raise ValueError(f"cut frame {p} is out of range [1, {num_frames - 1}] for "
                                 f"{num_frames} frames")
            if i and pixel_to_latent_cut(p) <= pixel_to_latent_cut(cuts[i - 1]):
                raise ValueError(f"cut frames must increase by whole latent frames: {p} follows "
                                 f"{cuts[i - 1]} (latent {pixel_to_latent_cut(p)} vs "
                                 f"{pixel_to_latent_cut(cuts[i - 1])})")
        return cls.from_latent_cuts(f, [pixel_to_latent_cut(p) for p in cuts],
                                    latent_hw=latent_hw, max_shots=max_shots,
                                    text_windows=text_windows, text_pad_start=text_pad_start,
                                    summary_frames=summary_frames)

    @classmethod
    def for_config(cls, config, cut_frames, *, num_frames=None, text_windows=None,
                   text_pad_start=None):
        """The layout of a film under a run config: pixel-frame `cut_frames` of a `num_frames`
        film (None: config.video.num_frames) on the token grid of `latent_shape` patchified by
        config.model.patch_size, with config.shots.{max_shots, summary_frames}; see `from_cuts`.
        config.shots.window_cross_attention=False drops the text windows (every shot reads every
        caption: the paper's "no window cross-attention" ablation).
        """
        frames = config.video.num_frames if num_frames is None else num_frames
        if not config.shots.window_cross_attention:
            text_windows = text_pad_start = None
        _, _, h, w, _ = latent_shape(config, num_frames=frames)
        _, ph, pw = config.model.patch_size
        return cls.from_cuts(frames, cut_frames, latent_hw=(h // ph, w // pw),
                             max_shots=config.shots.max_shots, text_windows=text_windows,
                             text_pad_start=text_pad_start,
                             summary_frames=config.shots.summary_frames)

    @staticmethod
    def stack(layouts):
        """Batch layouts of equal maxima: a leading batch dim on every array."""
        layouts = list(layouts)
        if not layouts:
            raise ValueError("ShotLayout.stack needs at least one layout")
        statics = {l.static_maxima for l in layouts}
        if len(statics) != 1:
            raise ValueError(f"cannot stack layouts with different maxima: {sorted(statics)}")
        leaves = [jax.tree.leaves(l) for l in layouts]
        stacked = [jnp.stack(xs) for xs in zip(*leaves)]
        return jax.tree.unflatten(jax.tree.structure(layouts[0]), stacked)

    def without_text_windows(self):
        """The same cuts with no text windows (every shot sees all text: the negative prompt)."""
        return dataclasses.replace(self, text_windows=jnp.zeros_like(self.text_windows),
                                   text_pad_start=jnp.zeros_like(self.text_pad_start))

    def broadcast_to_batch(self, batch: int):
        """An unbatched layout repeated `batch` times; a batched one is checked and returned."""
        if jnp.ndim(self.num_shots) == 0:
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + jnp.shape(x)), self)
        if jnp.shape(self.num_shots) != (batch,):
            raise ValueError(f"layout batch {jnp.shape(self.num_shots)} != input batch {batch}")
        return self

    # -- static geometry
    @property
    def static_maxima(self):
        """(num_latent_frames, tokens_per_frame, max_shots, summary_frames)."""
        return (self.num_latent_frames, self.tokens_per_frame, self.max_shots, self.summary_frames)

    @property
    def num_tokens(self) -> int:
        """L = F * T."""
        return self.num_latent_frames * self.tokens_per_frame

    def rope_frame_positions(self) -> np.ndarray:
        """[F] RoPE frame positions: they run on across the concatenated shots (§3, §4)."""
        return np.arange(self.num_latent_frames)

    # -- derived per-film quantities (work with any leading batch dims)
    def shot_lengths(self):
        """[..., K] latent frames per shot (0 for padding shots)."""
        ends = jnp.concatenate([self.shot_starts[..., 1:],
                                jnp.full_like(self.shot_starts[..., :1], self.num_latent_frames)],
                               axis=-1)
        return ends - self.shot_starts

    def frame_to_shot(self):
        """[..., F] shot index of each latent frame."""
        frames = jnp.arange(self.num_latent_frames)
        starts = jnp.asarray(self.shot_starts)[..., None, 1:]
        return jnp.sum(starts <= frames[:, None], axis=-1).astype(jnp.int32)

    def frame_is_summary(self):
        """[..., F] whether a latent frame is among the first `summary_frames` of its shot."""
        shot = self.frame_to_shot()
        start = jnp.take_along_axis(jnp.asarray(self.shot_starts), shot, axis=-1)
        return jnp.arange(self.num_latent_frames) - start < self.summary_frames

    def token_shot_id(self):
        """[..., L] shot index of each video token."""
        return jnp.repeat(self.frame_to_shot(), self.tokens_per_frame, axis=-1)

    def token_is_summary(self):
        """[..., L] whether each video token is a summary token."""
        return jnp.repeat(self.frame_is_summary(), self.tokens_per_frame, axis=-1)

    def self_attention_mask(self, mode: str):
        """[..., L, L] dense boolean mask (reference and tests only: O(L^2))."""
        s = self.token_shot_id()
        return self_attention_allowed(s[..., :, None], s[..., None, :],
                                      self.token_is_summary()[..., None, :], mode)

    def own_summary_mask(self):
        """[..., L, L] dense mask of the keys that get log(summary_self_weight) (tests only)."""
        s = self.token_shot_id()
        return own_summary(s[..., :, None], s[..., None, :], self.token_is_summary()[..., None, :])

    def cross_attention_mask(self, text_len: int):
        """[..., L, text_len] boolean window mask of video -> text attention."""
        return cross_attention_allowed(self.token_shot_id(), jnp.arange(text_len),
                                       jnp.asarray(self.text_windows),
                                       jnp.asarray(self.text_pad_start))

    # -- host-side views of a concrete, unbatched layout
    def num_allowed_pairs(self, mode: str) -> int:
        """Allowed (query, key) token pairs under `mode`: the useful work of the attention,
        counted per shot in O(K) (the dense mask would be O(L^2))."""
        if mode not in SELF_ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r} is not one of {SELF_ATTENTION_MODES}")
        frames = np.asarray(self.shot_lengths(), np.int64)[: int(self.num_shots)]
        tokens = frames * self.tokens_per_frame
        if mode == "full":
            return int(tokens.sum()) ** 2
        own = int(np.sum(tokens**2))
        if mode == "independent":
            return own
        summary = np.minimum(frames, self.summary_frames) * self.tokens_per_frame
        return own + int(np.sum(tokens * (summary.sum() - summary)))

    def latent_cuts(self) -> list[int]:
        """First latent frames of shots 2..num_shots."""
        return [int(s) for s in np.asarray(self.shot_starts)[1:int(self.num_shots)]]

    def pixel_cuts(self) -> list[int]:
        """The same cuts as 4t+1 pixel frames."""
        return [latent_to_pixel_cut(c) for c in self.latent_cuts()]


jax.tree_util.register_dataclass(ShotLayout)


def _positive_int(x, name):
    if int(x) != x or x < 1:
        raise ValueError(f"{name}={x} must be a positive integer")
    return int(x)


def _text_windows(text_windows, text_pad_start, num_shots, max_shots):
    """Validate and pad windows to [max_shots+1, 2]; None -> every shot sees all text."""
    if text_windows is None and text_pad_start is None:
        return np.zeros((max_shots + 1, 2), np.int32), np.int32(0)
    if text_windows is None or text_pad_start is None:
        raise ValueError("text_windows and text_pad_start go together (pass both or neither)")
    win = np.asarray(text_windows)
    if win.ndim != 2 or win.shape[1] != 2:
        raise ValueError(f"text_windows must be [num_shots+1, 2], got shape {win.shape}")
    if win.shape[0] - 1 != num_shots:
        raise ValueError(f"{win.shape[0] - 1} shot text windows for {num_shots} shots")
    for i, (a, b) in enumerate(win.tolist()):
        if not 0 <= a <= b:
            raise ValueError(f"text window {i} = [{a}, {b}) is not a valid token range")
    if int(text_pad_start) < 0:
        raise ValueError(f"text_pad_start={text_pad_start} must be >= 0")
    out = np.zeros((max_shots + 1, 2), np.int32)
    out[:win.shape[0]] = win
    return out, np.int32(text_pad_start)
