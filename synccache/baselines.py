"""The peers SyncCache is benchmarked against: FORA, TeaCache, FBCache, MagCache and a static deep cache.

Each one is rebuilt from its public reference code. The facts carry over; the code is new. All of them
work like SyncCache's hooks (synccache.hooks): one model forward is one denoising step. Heavy and audio
blocks get instance-level `forward` wrappers and the model gets a pre-hook and an always-called forward
hook. `remove()` deletes all of that and leaves the model exactly as it was.

THE DIFFERENCE FROM SYNCCACHE (the reason for the benchmark): these peers cache the whole transformer,
so on a reuse step they also skip the audio injection. A reuse step runs no audio block. The lip motion
of the last computed step is replayed while the audio moves on.

Layout-level assumptions (BlockLayout): heavy blocks take the hidden state [B, L, D] as their first
argument (or `hidden_states=` / `x=`) and return a tensor of the same shape. Audio block j runs after
heavy block audio_after[j] and RETURNS A DELTA that the model adds to the block's first argument
(AvatarDiT.audio_step does `x + audio_block(x, ...)`). So when an audio block returns zeros, nothing is
injected, and when it returns its delta from the last computed step, that step's injection is
replayed. No block output is modified in place.

How a reuse step is served. Residuals add up, so bypassing every heavy block i with its stored
residual, and every audio block j with its stored delta, is the same as adding the whole model's
residual once. That is what the peers store, with the same memory as their reference code:
- teacache, magcache: heavy block 0 returns x + R, where R = (output of the last heavy block) - (input
  of heavy block 0) from the last computed step. R already holds every audio delta injected before
  the last heavy block, so those audio blocks return zeros. Audio blocks placed after the last heavy
  block return their stored delta. Heavy blocks 1.. pass their input through.
- fbcache: heavy block 0 always runs. It returns its output + R, with R measured from block 0's
  output. The rest works as above.
- fora: per heavy block, the attention and MLP outputs of the last computed step are gated again with
  the current step's adaLN gates (FORA's DiT code). Every audio block returns its stored delta.
- deepcache: every block before the last `keep_last` heavy blocks is skipped. Heavy block 0 returns
  the hidden state that entered the first kept block at the last computed step (feature reuse, as
  HunyuanVideo-Avatar's `cache_out`). The kept blocks run fresh. Skipped audio blocks return zeros and
  audio blocks after kept blocks return their stored delta.

Methods and the sources read (reference repositories, not dependencies):
- fora (prathebaselva/FORA src/models.py, 'boost_infer_static'): the step index i counts down
  steps-1..0, and a step is computed when i == steps-1 or i % N == 0. Otherwise each layer reuses its
  cached attention/MLP outputs under the current gates. Default N = 3 (README).
- teacache (ali-vilab/TeaCache TeaCache4HunyuanVideo/teacache_sample_video.py and
  TeaCache4Wan2.1/teacache_generate.py): the signal is the timestep-modulated input of the first heavy
  block, modulate(norm1(x), shift1, scale1). Add poly(rel-L1 to the previous step's value); reuse
  while the sum < threshold, and on a computed step reset the sum to 0. The previous modulated input
  is updated on every step. The first `ret_steps` steps and the last step are always computed. poly
  is np.polyfit(x, y, 4) of (input rel-L1, model-output rel-L1) pairs over all steps of calibration
  samples (TeaCache issue #2). Default threshold 0.15.
- fbcache (huggingface/diffusers src/diffusers/hooks/first_block_cache.py; ParaAttention's
  are_two_tensors_similar): diff = mean|r0 - r0_prev| / mean|r0_prev|, where r0 is the residual of
  heavy block 0 and r0_prev is the one from the last computed step. Reuse if diff < threshold. There
  is no accumulation. Default threshold 0.05 (diffusers).
- magcache (Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py): the mag ratio per step, from
  calibration, is mean over tokens of ||r_t|| / ||r_{t-1}|| of the whole residual r. From step
  int(steps * retention_ratio) on: ratio *= mag[t], skips += 1, err += |1 - ratio|. Reuse if
  err < threshold and skips <= K, otherwise compute and reset. A calibrated curve of another length is
  resampled by nearest interpolation. Defaults: threshold 0.12, K 2, retention 0.2.
- deepcache (Tencent-Hunyuan/HunyuanVideo-Avatar
  hymm_sp/diffusion/pipelines/pipeline_hunyuan_video_audio.py and hymm_sp/modules/models_audio.py): at
  50 steps, steps 0-14, 15, 20, ..., 40 and 41-49 are computed (no_cache_steps). On the others,
  every double block (with the audio adapters) and every single block except the last is skipped.
  The last single block runs on the cached input (cache_out). The schedule is scaled to the step
  count: warm-up 15/50, tail 9/50, interval 5/50 of the steps.

MagCache's residual here is the heavy-block residual R (audio deltas after the last heavy block are not
in it, because their token placement is the model's business). TeaCache's rescaled distance is
clamped at 0: a relative distance cannot be negative, and a fitted polynomial can dip below zero.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from synccache.layout import BlockLayout, LayoutError, hidden_state
from synccache.probe import rel_l1
from synccache.wrap import detach, wrap_forward

METHODS = ("fora", "teacache", "fbcache", "magcache", "deepcache")
THRESHOLD_DEFAULTS = {"teacache": 0.15, "fbcache": 0.05, "magcache": 0.12}
FORA_INTERVAL = 3
# HunyuanVideo-Avatar's schedule at its 50 inference steps: no_cache_steps = 0..14, 15, 20, ..., 40, 41..49
HVA_STEPS, HVA_WARM, HVA_TAIL, HVA_INTERVAL = 50, 15, 9, 5
CALIBRATION_FORMAT, CALIBRATION_VERSION = "synccache-baselines-calibration", 1
COMPUTE, REUSE = "C", "R"
_MARKERS = ("_baseline", "_synccache")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def fora_schedule(steps: int, interval: int) -> str:
    """FORA's static plan, C/R per step: step k has FORA index i = steps-1-k; computed if k == 0 or i % N == 0."""
    return "".join(COMPUTE if k == 0 or (steps - 1 - k) % interval == 0 else REUSE for k in range(steps))


def deepcache_interval(steps: int) -> int:
    """HunyuanVideo-Avatar's cache interval (5 of 50 steps) scaled to `steps`."""
    return max(1, _round(HVA_INTERVAL * steps / HVA_STEPS))


def deepcache_schedule(steps: int, interval: Optional[int] = None) -> str:
    """HunyuanVideo-Avatar's static plan scaled to `steps`, as C/R per step.

    The first 15/50 and the last 9/50 of the steps are computed. In between, every `interval`-th step
    is computed, starting at the first one; interval defaults to 5/50 of the steps. At 50 steps this
    reproduces no_cache_steps exactly.
    """
    warm = max(1, _round(HVA_WARM * steps / HVA_STEPS))
    tail = max(1, _round(HVA_TAIL * steps / HVA_STEPS))
    n = deepcache_interval(steps) if interval is None else interval
    return "".join(COMPUTE if i < warm or i >= steps - tail or (i - warm) % n == 0 else REUSE
                   for i in range(steps))


def nearest_interp(values, length: int) -> list:
    """Resample a per-step curve to `length` points by nearest index (as MagCache does)."""
    values = list(values)
    if length == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (length - 1)
    return [values[_round(k * scale)] for k in range(length)]


def _poly(coefficients, x: float) -> float:
    """np.poly1d(coefficients)(x), highest power first."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


# --- calibration data ------------------------------------------------------------------------------
def _finite_list(v, what, positive=False):
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"calibration {what} must be a non-empty list of numbers, got {v!r:.80}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0):
            kind = "finite positive" if positive else "finite"
            raise ValueError(f"calibration {what} holds {x!r}, expected {kind} numbers")
        out.append(float(x))
    return out


def load_calibration(source: Union[dict, str, Path]) -> dict:
    """A calibration dict (from calibrate_baselines), or the path of its JSON file -> dict."""
    if isinstance(source, (str, Path)):
        try:
            source = json.loads(Path(source).read_text())
        except OSError as e:
            raise ValueError(f"cannot read calibration file {source}: {e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"calibration file {source} is not valid JSON: {e}") from None
    if not isinstance(source, dict):
        raise ValueError(f"calibration must be a dict or a JSON path, got {type(source).__name__}")
    if source.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"calibration has format {source.get('format')!r}, expected {CALIBRATION_FORMAT!r} "
                         "(make it with synccache.baselines.calibrate_baselines)")
    if source.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"unknown calibration version {source.get('version')!r}")
    return source


def teacache_coefficients(calibration: dict) -> list:
    """The TeaCache rescaling polynomial (highest power first) held by a calibration dict."""
    tc = calibration.get("teacache")
    if not isinstance(tc, dict):
        why = calibration.get("teacache_unavailable", "it has no 'teacache' section")
        raise ValueError(f"calibration cannot drive teacache: {why}")
    return _finite_list(tc.get("coefficients"), "teacache.coefficients")


def magcache_ratios(calibration: dict) -> list:
    """The MagCache per-step magnitude-ratio curve held by a calibration dict."""
    mc = calibration.get("magcache")
    if not isinstance(mc, dict):
        raise ValueError("calibration cannot drive magcache: it has no 'magcache' section")
    return _finite_list(mc.get("mag_ratios"), "magcache.mag_ratios", positive=True)


# --- config ----------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class BaselineConfig:
    """Which peer to run and its knobs. Unset knobs get the defaults of the reference code.

    method: one of METHODS.
    threshold: teacache / fbcache / magcache only (defaults 0.15 / 0.05 / 0.12); 0 computes every step.
    interval: fora's N (default 3); deepcache's cache interval in our steps (default 5/50 of steps).
      With 1, every step is computed.
    steps: denoising steps per sample. Every method except fbcache needs it (for the last-step rule,
      the schedules and the retention ratio). The step counter wraps after `steps` forwards, which starts
      a new sample, as TeaCache's and MagCache's counters do.
    ret_steps: teacache, the first steps that are always computed (1, as in TeaCache4HunyuanVideo).
    max_skips: magcache's K, the most consecutive reuse steps.
    retention_ratio: magcache, the fraction of the first steps that is always computed.
    keep_last: deepcache, the number of final heavy blocks that run fresh on reuse steps (1, as the
      last single-stream block in HunyuanVideo-Avatar).
    calibration: calibrate_baselines' dict or its JSON path; teacache and magcache need it. The other
      methods ignore it.
    """
    method: str
    threshold: Optional[float] = None
    interval: Optional[int] = None
    steps: Optional[int] = None
    ret_steps: int = 1
    max_skips: int = 2
    retention_ratio: float = 0.2
    keep_last: int = 1
    calibration: Optional[Union[dict, str, Path]] = None

    def __post_init__(self):
        m = self.method.lower() if isinstance(self.method, str) else self.method
        if m not in METHODS:
            raise ValueError(f"unknown baseline method {self.method!r}; expected one of {', '.join(METHODS)}")
        self.method = m
        if m in THRESHOLD_DEFAULTS:
            if self.threshold is None:
                self.threshold = THRESHOLD_DEFAULTS[m]
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                    or not math.isfinite(self.threshold) or self.threshold < 0:
                raise ValueError(f"{m} threshold must be a finite number >= 0, got {self.threshold!r}")
            self.threshold = float(self.threshold)
        elif self.threshold is not None:
            raise ValueError(f"{m} has no threshold (it follows a fixed schedule); set interval instead")
        if m in ("fora", "deepcache"):
            if self.interval is None and m == "fora":
                self.interval = FORA_INTERVAL
            if self.interval is not None and (not _is_int(self.interval) or self.interval < 1):
                raise ValueError(f"{m} interval must be an integer >= 1, got {self.interval!r}")
        elif self.interval is not None:
            raise ValueError(f"{m} has no interval; it decides online with a threshold")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.steps is None and m != "fbcache":
            raise ValueError(f"{m} needs steps (the denoising steps per sample)")
        if not _is_int(self.ret_steps) or self.ret_steps < 0:
            raise ValueError(f"ret_steps must be an integer >= 0, got {self.ret_steps!r}")
        if not _is_int(self.max_skips) or self.max_skips < 0:
            raise ValueError(f"max_skips must be an integer >= 0, got {self.max_skips!r}")
        if isinstance(self.retention_ratio, bool) or not isinstance(self.retention_ratio, (int, float)) \
                or not 0.0 <= self.retention_ratio <= 1.0:
            raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        if not _is_int(self.keep_last) or self.keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {self.keep_last!r}")
        if m in ("teacache", "magcache"):
            if self.calibration is None:
                raise ValueError(f"{m} needs calibration: run synccache.baselines.calibrate_baselines on "
                                 "full uncached samples and pass its dict (or JSON path) as calibration=")
            self.calibration = load_calibration(self.calibration)
            (teacache_coefficients if m == "teacache" else magcache_ratios)(self.calibration)

    def label(self) -> str:
        """Short name for tables: 'teacache(0.15)', 'fora(N=3)', 'deepcache(N=2)'."""
        if self.method in THRESHOLD_DEFAULTS:
            return f"{self.method}({self.threshold:g})"
        n = self.interval if self.interval is not None else deepcache_interval(self.steps)
        return f"{self.method}(N={n})"


# --- duck typing on DiT blocks ---------------------------------------------------------------------
def _cond_vec(i, args, kwargs):
    c = args[1] if len(args) > 1 else kwargs.get("c")
    if not isinstance(c, torch.Tensor):
        raise LayoutError(f"heavy block {i} was called without its conditioning vector c "
                          "(second positional argument or c=); adaLN-based baselines need it")
    return c


def _require(block, i, names, method):
    missing = [n for n in names if not callable(getattr(block, n, None))]
    if missing:
        raise LayoutError(f"{method} needs DiT-style heavy blocks with {', '.join(names)}; heavy block {i} "
                          f"({type(block).__name__}) has no {', '.join(missing)}")


def _modulation(block, c):
    """adaLN-Zero chunks (shift1, scale1, gate1, shift2, scale2, gate2), each broadcastable over tokens."""
    out = block.adaLN_modulation(c).chunk(6, dim=-1)
    return [m.unsqueeze(1) if m.dim() == 2 else m for m in out]


def _modulated_input(block, x, c):
    """TeaCache's signal: modulate(norm1(x), shift1, scale1) of the first heavy block."""
    shift, scale = _modulation(block, c)[:2]
    return block.norm1(x) * (1 + scale) + shift


def _check_free(layout):
    for role, mods in (("heavy", layout.heavy), ("audio", layout.audio)):
        for i, m in enumerate(mods):
            f = m.__dict__.get("forward")
            if any(getattr(f, k, False) for k in _MARKERS):
                raise RuntimeError(f"a cache is already applied ({role} block {i}); remove() it first")


# --- the handle ------------------------------------------------------------------------------------
class _State:
    """What belongs to one sample; cleared by reset() and when the step counter wraps."""

    def __init__(self):
        self.step = -1
        self.in_step, self.mode = False, COMPUTE
        self.cache = {}  # tensors kept from the last computed step (see _required)
        self.valid = False  # cache holds a complete computed step of this sample
        self.ref = None  # within a computed step: input (or fbcache: output) of heavy block 0
        self.prev_mod = None  # teacache: modulated input of the previous step
        self.head_res = None  # fbcache: block-0 residual of the last computed step
        self.acc, self.ratio, self.skips = 0.0, 1.0, 0
        self.signal = None

    def cache_bytes(self):
        ts = [v for v in self.cache.values() if isinstance(v, torch.Tensor)]
        ts += [t for t in (self.prev_mod, self.head_res) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


class _Stats:
    def __init__(self):
        self.steps = self.reuse_steps = self.audio_calls = self.heavy_calls = self.peak_bytes = 0
        self.decisions, self.signal, self.accumulated = [], [], []


class BaselineHandle:
    """A peer baseline attached to one model: reset() per sample or chunk, stats(), remove()."""

    def __init__(self, model: nn.Module, config: BaselineConfig, layout: BlockLayout):
        self.model, self.config, self.layout = model, config, layout
        self.method, self.steps = config.method, config.steps
        n = len(layout.heavy)
        self.last = n - 1
        self.kind = {"teacache": "residual", "magcache": "residual", "fbcache": "fb",
                     "fora": "layer", "deepcache": "feature"}[self.method]
        self.keep_from = n - config.keep_last  # deepcache: first heavy block that runs on reuse steps
        if self.kind == "residual" or self.kind == "fb":
            self.tail_audio = {j for j, a in enumerate(layout.audio_after) if a == self.last}
        elif self.kind == "feature":
            self.tail_audio = {j for j, a in enumerate(layout.audio_after) if a >= self.keep_from}
        else:
            self.tail_audio = set(range(len(layout.audio)))
        self.plan = None
        if self.method == "fora":
            self.plan = fora_schedule(self.steps, config.interval)
        elif self.method == "deepcache":
            self.plan = deepcache_schedule(self.steps, config.interval)
        self.coefficients = teacache_coefficients(config.calibration) if self.method == "teacache" else None
        self.mag = None
        if self.method == "magcache":
            mag = magcache_ratios(config.calibration)
            self.mag = mag if len(mag) == self.steps else nearest_interp(mag, self.steps)
        self._wrapped, self._hooks, self._removed = [], [], False
        self.state, self._stats = _State(), _Stats()

    # --- what a computed step must leave behind ----------------------------------------------------
    def _required(self):
        keys = [("delta", j) for j in sorted(self.tail_audio)]
        keys += [("zero", j) for j in range(len(self.layout.audio)) if j not in self.tail_audio]
        if self.kind in ("residual", "fb"):
            keys.append("res")
        elif self.kind == "feature":
            keys.append("feat")
        else:
            keys += [(k, i) for i in range(len(self.layout.heavy)) for k in ("attn", "mlp")]
        return keys

    def _fits(self, x):
        """True if the stored step matches the current hidden state's shape."""
        c = self.state.cache
        key = {"residual": "res", "fb": "res", "feature": "feat", "layer": ("attn", 0)}[self.kind]
        return key in c and c[key].shape == x.shape

    def _compute_now(self):
        """This step is computed: drop the stored step (it is about to be replaced)."""
        st = self.state
        st.mode, st.cache, st.valid = COMPUTE, {}, False

    # --- decisions ---------------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        st = self.state
        st.step += 1
        if self.steps is not None and st.step >= self.steps:  # a new sample starts
            self.state = st = _State()
            st.step = 0
        st.in_step, st.mode, st.signal, st.ref = True, COMPUTE, None, None
        reuse = None  # teacache and fbcache decide at heavy block 0
        if self.plan is not None:
            reuse = self.plan[st.step] == REUSE
        elif self.method == "magcache":
            reuse = self._magcache(st)
        if reuse is not None:
            if reuse and st.valid:
                st.mode = REUSE
            else:
                self._compute_now()

    def _magcache(self, st):
        t = st.step
        if t < int(self.steps * self.config.retention_ratio):
            return False
        st.ratio *= self.mag[t]
        st.skips += 1
        st.signal = abs(1.0 - st.ratio)
        st.acc += st.signal
        if st.acc < self.config.threshold and st.skips <= self.config.max_skips and st.valid:
            return True
        st.acc, st.skips, st.ratio = 0.0, 0, 1.0
        return False

    def _teacache(self, x, args, kwargs):
        st, cfg = self.state, self.config
        block = self.layout.heavy[0]
        mod = _modulated_input(block, x, _cond_vec(0, args, kwargs)).detach()
        t, reuse = st.step, False
        forced = t < cfg.ret_steps or t >= self.steps - 1
        if forced or st.prev_mod is None or st.prev_mod.shape != mod.shape:
            st.acc = 0.0
        else:
            st.signal = rel_l1(mod, st.prev_mod)
            st.acc += max(0.0, _poly(self.coefficients, st.signal))
            if st.acc < cfg.threshold and st.valid and self._fits(x):
                reuse = True
            else:
                st.acc = 0.0
        st.prev_mod = mod
        if reuse:
            st.mode = REUSE
        else:
            self._compute_now()

    def _fbcache(self, x, out):
        st = self.state
        r0 = (out - x).detach()
        reuse = False
        if st.head_res is not None and st.head_res.shape == r0.shape and st.valid and self._fits(x):
            st.signal = rel_l1(r0, st.head_res)
            reuse = st.signal < self.config.threshold
        if reuse:
            st.mode = REUSE
        else:
            self._compute_now()
            st.head_res = r0

    # --- wrapped forwards --------------------------------------------------------------------------
    def _run(self, forward, args, kwargs):
        self._stats.heavy_calls += 1
        return forward(*args, **kwargs)

    def _heavy(self, i, forward, args, kwargs):
        st = self.state
        if not st.in_step:
            return forward(*args, **kwargs)
        x = hidden_state(i, args, kwargs)
        if i == 0:
            if self.method == "teacache":
                self._teacache(x, args, kwargs)
            elif self.method == "fbcache":
                out = self._run(forward, args, kwargs)
                self._fbcache(x, out)
                if st.mode == REUSE:
                    return out + st.cache["res"]
                return self._stored(0, x, out)
            elif st.mode == REUSE and not self._fits(x):
                self._compute_now()  # batch or sequence changed: nothing valid to reuse
        if st.mode == COMPUTE:
            return self._stored(i, x, self._run(forward, args, kwargs))
        if self.kind == "residual":
            return x + st.cache["res"] if i == 0 else x
        if self.kind == "fb":
            return x
        if self.kind == "feature":
            if i >= self.keep_from:
                return self._run(forward, args, kwargs)
            return st.cache["feat"] if i == 0 else x
        g = _modulation(self.layout.heavy[i], _cond_vec(i, args, kwargs))  # fora: re-gate cached outputs
        return x + g[2] * st.cache[("attn", i)] + g[5] * st.cache[("mlp", i)]

    def _stored(self, i, x, out):
        """After heavy block i computed: keep what a later reuse step needs."""
        st = self.state
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise LayoutError(f"heavy block {i} must return a tensor shaped like its input")
        if self.kind in ("residual", "fb"):
            if i == 0:
                st.ref = x if self.kind == "residual" else out
            if i == self.last and st.ref is not None:
                st.cache["res"] = (out - st.ref).detach()
                st.ref = None
        elif self.kind == "feature" and i == self.keep_from:
            st.cache["feat"] = x.detach()
        return out

    def _audio(self, j, forward, args, kwargs):
        st = self.state
        if st.in_step and st.mode == REUSE:
            if j in self.tail_audio:
                return st.cache[("delta", j)]
            shape, dtype, device = st.cache[("zero", j)]
            return torch.zeros(shape, dtype=dtype, device=device)
        self._stats.audio_calls += 1
        out = forward(*args, **kwargs)
        if st.in_step:
            if not isinstance(out, torch.Tensor):
                raise LayoutError(f"audio block {j} must return a tensor (the delta the model adds)")
            if j in self.tail_audio:
                st.cache[("delta", j)] = out.detach()
            else:
                st.cache[("zero", j)] = (out.shape, out.dtype, out.device)
        return out

    def _capture(self, kind, i):
        """fora: forward hook on heavy block i's attention / MLP, recording outputs on computed steps."""
        def hook(module, args, output):
            st = self.state
            if st.in_step and st.mode == COMPUTE:
                st.cache[(kind, i)] = output.detach()
        return hook

    def _end(self, module, args, output):
        st, ss = self.state, self._stats
        if st.mode == COMPUTE:
            st.valid = all(k in st.cache for k in self._required())
        st.in_step, st.ref = False, None
        ss.steps += 1
        ss.reuse_steps += st.mode == REUSE
        ss.decisions.append(st.mode)
        ss.signal.append(st.signal)
        ss.accumulated.append(st.acc if self.method in ("teacache", "magcache") else None)
        ss.peak_bytes = max(ss.peak_bytes, st.cache_bytes())

    # --- attach / detach ---------------------------------------------------------------------------
    def _wrap(self, block, fn):
        self._wrapped.append(wrap_forward(block, lambda f, *a, **k: fn(f, a, k), marker="_baseline"))

    def _attach(self):
        for i, block in enumerate(self.layout.heavy):
            self._wrap(block, lambda f, a, k, _i=i: self._heavy(_i, f, a, k))
        for j, block in enumerate(self.layout.audio):
            self._wrap(block, lambda f, a, k, _j=j: self._audio(_j, f, a, k))
        if self.method == "fora":
            for i, block in enumerate(self.layout.heavy):
                self._hooks.append(block.attn.register_forward_hook(self._capture("attn", i)))
                self._hooks.append(block.mlp.register_forward_hook(self._capture("mlp", i)))
        self._hooks.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._end, always_call=True))

    def reset(self, keep_stats: bool = False, next_chunk: bool = False) -> None:
        """Forget the stored step and the signals (new sample or chunk); stats too unless keep_stats.

        next_chunk is accepted for the engine's sake and changes nothing: the peers never carry state
        from one chunk to the next."""
        self.state = _State()
        if not keep_stats:
            self._stats = _Stats()

    def remove(self) -> None:
        """Detach everything: the model's modules are as they were before apply_baseline."""
        if self._removed:
            return
        detach(self._wrapped, self._hooks)
        self._wrapped, self._hooks, self._removed = [], [], True
        self.state = _State()

    def stats(self) -> dict:
        """Step counts, the C/R decision string, per-step signal, stored bytes, audio and heavy block calls."""
        st, ss = self.state, self._stats
        return {
            "method": self.method, "label": self.config.label(),
            "steps": ss.steps, "reuse_steps": ss.reuse_steps, "computed_steps": ss.steps - ss.reuse_steps,
            "decisions": "".join(ss.decisions),
            "signal": list(ss.signal), "accumulated": list(ss.accumulated),
            "cache_bytes": st.cache_bytes(), "peak_cache_bytes": ss.peak_bytes,
            "audio_calls": ss.audio_calls, "heavy_calls": ss.heavy_calls,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_baseline(model: nn.Module, config: BaselineConfig, layout: BlockLayout) -> BaselineHandle:
    """Attach a peer baseline to model (the module whose forward is one denoising step) -> handle."""
    if not isinstance(config, BaselineConfig):
        raise ValueError(f"config must be a BaselineConfig, got {type(config).__name__}")
    layout.validate()
    layout.check_model(model)
    _check_free(layout)
    n = len(layout.heavy)
    if config.method == "teacache":
        _require(layout.heavy[0], 0, ("adaLN_modulation", "norm1"), "teacache")
    elif config.method == "fora":
        for i, block in enumerate(layout.heavy):
            _require(block, i, ("adaLN_modulation", "attn", "mlp"), "fora")
            for name in ("attn", "mlp"):
                if not isinstance(getattr(block, name), nn.Module):
                    raise LayoutError(f"fora needs heavy block {i}.{name} to be an nn.Module "
                                      "(its output is hooked)")
    elif config.method == "deepcache" and config.keep_last >= n:
        raise ValueError(f"deepcache keep_last={config.keep_last} leaves nothing to skip: "
                         f"the layout has {n} heavy blocks")
    handle = BaselineHandle(model, config, layout)
    handle._attach()
    return handle


# --- calibration -----------------------------------------------------------------------------------
class _Recorder:
    """Measures, on full uncached samples, what TeaCache and MagCache calibrate on."""

    def __init__(self, model, layout, steps):
        self.model, self.layout, self.steps = model, layout, steps
        block = layout.heavy[0]
        missing = [k for k in ("adaLN_modulation", "norm1") if not callable(getattr(block, k, None))]
        self.teacache_why = (f"heavy block 0 ({type(block).__name__}) has no {', '.join(missing)}; "
                             "TeaCache's modulated input needs a DiT-style adaLN block") if missing else None
        self.forwards, self.step = 0, -1
        self.mod = self.x0 = self.res = self.out = None  # previous step's
        self.cur = {}
        self.tea_x, self.tea_y = [], []  # per sample, per step >= 1
        self.mag, self.mag_std = [], []
        self._wrapped, self._hooks = [], []

    def _heavy(self, i, forward, args, kwargs):
        if self.step < 0:
            return forward(*args, **kwargs)
        x = hidden_state(i, args, kwargs)
        if i == 0:
            self.cur["x0"] = x.detach()
            if self.teacache_why is None:
                self.cur["mod"] = _modulated_input(self.layout.heavy[0], x, _cond_vec(0, args, kwargs)).detach()
        out = forward(*args, **kwargs)
        if i == len(self.layout.heavy) - 1 and "x0" in self.cur:
            self.cur["res"] = (out - self.cur["x0"]).detach()
        return out

    def _begin(self, module, args, kwargs):
        self.step = self.forwards % self.steps
        self.cur = {}
        if self.step == 0:  # a new sample
            self.mod = self.res = self.out = None
            self.tea_x.append([])
            self.tea_y.append([])
            self.mag.append([])
            self.mag_std.append([])

    def _end(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, torch.Tensor):
            raise LayoutError(f"the model returned {type(out).__name__}; calibration needs a tensor output")
        out = out.detach()
        res, mod = self.cur.get("res"), self.cur.get("mod")
        if res is None:
            raise LayoutError("a model forward ran without its heavy blocks; is the layout the model's?")
        if self.out is not None and self.out.shape == out.shape and self.res.shape == res.shape:
            if mod is not None:
                self.tea_x[-1].append(rel_l1(mod, self.mod))
                self.tea_y[-1].append(rel_l1(out, self.out))
            ratio = res.float().norm(dim=-1) / self.res.float().norm(dim=-1).clamp_min(1e-12)
            self.mag[-1].append(float(ratio.mean()))
            self.mag_std[-1].append(float(ratio.std()) if ratio.numel() > 1 else 0.0)
        self.mod, self.res, self.out = mod, res, out
        self.forwards += 1
        self.step = -1

    def attach(self):
        for i, block in enumerate(self.layout.heavy):
            self._wrapped.append(wrap_forward(block, lambda f, *a, _i=i, **k: self._heavy(_i, f, a, k),
                                              marker="_baseline"))
        self._hooks.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._end, always_call=True))

    def remove(self):
        detach(self._wrapped, self._hooks, strict=False)
        self._wrapped, self._hooks = [], []


def calibrate_baselines(model: nn.Module, layout: BlockLayout, run_fn: Callable[[], object], steps: int,
                        degree: int = 4) -> dict:
    """Record full uncached samples and fit what TeaCache and MagCache need -> JSON-serialisable dict.

    run_fn() must run whole samples of `steps` model forwards each (e.g. engine.sampler.sample over a few
    conditions and seeds) with no cache attached. Over consecutive steps of each sample we record:
    - TeaCache: x = rel-L1 change of heavy block 0's modulated input, y = rel-L1 change of the model
      output. coefficients = numpy.polyfit(x, y, degree) over all pairs (highest power first).
    - MagCache: mag_ratios[t] = mean over tokens of ||r_t|| / ||r_{t-1}||, where r is the residual of
      the heavy blocks. The curve is averaged over samples, and mag_ratios[0] = 1 (as in MagCache).
    Pass the result (or json.dump it and pass the path) as BaselineConfig(calibration=...).
    """
    import numpy as np

    if not _is_int(steps) or steps < 2:
        raise ValueError(f"calibration needs steps >= 2 per sample, got {steps!r}")
    if not _is_int(degree) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}")
    layout.validate()
    layout.check_model(model)
    _check_free(layout)
    rec = _Recorder(model, layout, steps)
    rec.attach()
    try:
        run_fn()
    finally:
        rec.remove()
    if rec.forwards == 0 or rec.forwards % steps:
        raise ValueError(f"run_fn made {rec.forwards} model forwards, not a whole number of samples "
                         f"of {steps} steps")
    samples = rec.forwards // steps
    result = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "steps": steps, "samples": samples}
    if rec.teacache_why is None:
        xs = [v for s in rec.tea_x for v in s]
        ys = [v for s in rec.tea_y for v in s]
        if len(xs) < degree + 1:
            raise ValueError(f"TeaCache's degree-{degree} fit needs >= {degree + 1} step pairs, "
                             f"the calibration runs gave {len(xs)}; run more or longer samples")
        coef = np.polyfit(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), degree)
        if not np.all(np.isfinite(coef)):
            raise ValueError("TeaCache's polynomial fit is not finite; the calibration runs are degenerate")
        result["teacache"] = {"degree": degree, "coefficients": [float(c) for c in coef],
                              "input_rel_l1": rec.tea_x, "output_rel_l1": rec.tea_y}
    else:
        result["teacache"] = None
        result["teacache_unavailable"] = rec.teacache_why
    per_step = list(zip(*rec.mag))  # [steps - 1][samples]
    std_step = list(zip(*rec.mag_std))
    mags = [1.0] + [sum(v) / len(v) for v in per_step]
    stds = [0.0] + [sum(v) / len(v) for v in std_step]
    if len(mags) != steps or not all(math.isfinite(v) and v > 0 for v in mags):
        raise ValueError("MagCache's magnitude ratios are not finite and positive; the heavy blocks' "
                         "residual vanished in the calibration runs (an untrained adaLN-Zero model?)")
    result["magcache"] = {"mag_ratios": mags, "mag_std": stds}
    return result


def save_calibration(calibration: dict, path: Union[str, Path]) -> Path:
    """Write calibrate_baselines' dict as JSON -> path."""
    path = Path(path)
    path.write_text(json.dumps(load_calibration(calibration), indent=1))
    return path
