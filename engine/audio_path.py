"""The audio path behind one interface, with interchangeable backends: torch, torch.compile, ONNX Runtime
(CPU and CUDA providers) and TensorRT.

Once SyncCache bypasses the heavy blocks, what still runs on every denoising step is the audio path: the
audio cross-attention blocks; once per chunk, the audio encoder and each block's K/V projection. A reuse
step costs a fraction c of a full step, and the DiT speedup is 1 / (f + (1 - f) c): the audio path's
speed sets the cache's ceiling. An `AudioPath` runs its three parts:
- `tokens(feats)`: the audio encoder after the log-mel (AudioEncoder.tokens; the log-mel stays in torch);
- `kv(tokens)`: every audio block's K/V projection of the chunk's audio tokens;
- `block(i, x, k, v, bias, face_mask)`: audio block i's output on the chunk tokens x.
`install(model, path)` routes the model's calls through a path by replacing `forward`, `project_audio` and
`tokens` on the module instances (so hooks on the modules, such as SyncCache's audio-call counter, still
fire), and returns a handle whose `remove()` puts the model back exactly.

`export(model, out)` writes the ONNX graphs (opset 18, dynamic batch, token and audio lengths) with a
manifest of shapes and the audio path's hash; ONNX Runtime runs them, and `build_trt` turns them into
TensorRT engines (FP16, normalisation and softmax kept in FP32), cached under a key of GPU model, TensorRT
version and model hash. onnxruntime(-gpu) and tensorrt are imported only when a backend needs them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine.model.audio_encoder import MARGIN_FRAMES

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
# What "auto" times on a CPU. torch.compile is measured by `bench audio` but left out here: it compiles
# for ~20 s per input shape at start-up and never beat eager on the audio path on this CPU (README).
AUTO_CPU = ("torch", "onnxruntime")
OPSET = 18
MANIFEST = "manifest.json"
# the shapes the exported graphs and TensorRT profiles cover: (min, opt, max)
BATCH = (1, 2, 16)  # chunks x guidance branches x sessions
TOKENS = (16, 64, 1024)  # video tokens of a chunk (16 per frame)
AUDIO = (2, 20, 128)  # audio tokens of a chunk's window (2 per frame)
MEL = (16, 48, 512)  # log-mel frames of a window (4 per video frame, margins included)


class AudioPathError(RuntimeError):
    """A backend that cannot be used here (one line, says why)."""


# ------------------------------------------------------------------------------------------ hashing
def path_modules(model) -> dict:
    """The modules of the audio path: the audio encoder and the DiT's audio blocks."""
    return {"audio": model.audio, **{f"audio_blocks.{i}": b for i, b in enumerate(model.dit.audio_blocks)}}


def model_hash(model) -> str:
    """sha256 over the audio path's parameters and buffers (names, shapes, fp32 values) and its config."""
    h = hashlib.sha256()
    cfg = model.cfg
    h.update(json.dumps([cfg.hidden, cfg.audio_dim, cfg.audio_inner, cfg.audio_heads, len(cfg.audio_after)]).encode())
    for prefix, mod in path_modules(model).items():
        for name, t in sorted(mod.state_dict().items()):
            h.update(f"{prefix}.{name}{list(t.shape)}".encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ backends
class AudioPath:
    """Interface (and the eager torch implementation): the original modules' own code."""
    name = "torch"

    def __init__(self, model):
        self.encoder = model.audio
        self.blocks = list(model.dit.audio_blocks)

    def tokens(self, feats):
        return type(self.encoder).tokens(self.encoder, feats)

    def kv(self, tokens):
        """-> [(k, v) per audio block], each [B, heads, A, hd]."""
        return [type(b).project_audio(b, tokens) for b in self.blocks]

    def block(self, i, x, k, v, bias, face_mask):
        b = self.blocks[i]
        return type(b).forward(b, x, (k, v), bias, face_mask)

    def close(self):
        pass


class CompiledPath(AudioPath):
    """torch.compile of the same code (inductor; compiles on each new input shape, then reuses it)."""
    name = "compile"

    def __init__(self, model):
        super().__init__(model)
        self._tokens = torch.compile(super().tokens)
        self._kv = torch.compile(super().kv)
        self._blocks = [torch.compile(lambda x, k, v, bias, fm, b=b: type(b).forward(b, x, (k, v), bias, fm))
                        for b in self.blocks]

    def tokens(self, feats):
        return self._tokens(feats)

    def kv(self, tokens):
        return self._kv(tokens)

    def block(self, i, x, k, v, bias, face_mask):
        return self._blocks[i](x, k, v, bias, face_mask)


class OrtPath(AudioPath):
    """ONNX Runtime on the exported graphs; CPU tensors go through numpy, CUDA tensors through IO binding."""
    name = "onnxruntime"

    def __init__(self, onnx_dir, device="cpu", threads=None):
        ort = import_onnxruntime()
        self.dir, self.device = Path(onnx_dir), torch.device(device)
        self.manifest = read_manifest(self.dir)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise AudioPathError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})] + providers
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(self.dir / g["file"]), so, providers=providers)
                         for name, g in self.manifest["graphs"].items()}
        self.n_blocks = self.manifest["audio_blocks"]

    def _run(self, name, **inputs):
        sess = self.sessions[name]
        dtype = next(iter(inputs.values())).dtype
        if self.device.type == "cuda":
            return self._run_cuda(sess, inputs, dtype)
        feeds = {k: v.detach().float().cpu().numpy() for k, v in inputs.items()}
        return [torch.from_numpy(o).to(dtype) for o in sess.run(None, feeds)]

    def _run_cuda(self, sess, inputs, dtype):
        binding = sess.io_binding()
        keep = []
        for k, v in inputs.items():
            v = v.detach().float().contiguous()
            keep.append(v)
            binding.bind_input(k, "cuda", v.device.index or 0, np.float32, list(v.shape), v.data_ptr())
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cuda", self.device.index or 0)
        sess.run_with_iobinding(binding)
        return [torch.from_dlpack(o._ortvalue.to_dlpack()).to(dtype) for o in binding.get_outputs()]

    def tokens(self, feats):
        return self._run("audio_encoder", feats=feats)[0]

    def kv(self, tokens):
        out = self._run("audio_kv", tokens=tokens)
        return [(out[2 * i], out[2 * i + 1]) for i in range(self.n_blocks)]

    def block(self, i, x, k, v, bias, face_mask):
        return self._run(f"audio_block_{i}", x=x, k=k, v=v, bias=bias, face_mask=face_mask)[0]


class TrtPath(AudioPath):
    """TensorRT engines built from the exported graphs (build_trt), run on CUDA tensors. Never run here:
    this machine has no GPU and tensorrt does not install (README)."""
    name = "tensorrt"

    def __init__(self, onnx_dir, device="cuda"):
        trt = import_tensorrt()
        self.device = torch.device(device)
        engine_dir = build_trt(onnx_dir)
        self.manifest = read_manifest(onnx_dir)
        self.n_blocks = self.manifest["audio_blocks"]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name in self.manifest["graphs"]:
            engine = runtime.deserialize_cuda_engine((engine_dir / f"{name}.plan").read_bytes())
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()

    def _run(self, name, **inputs):
        engine, ctx = self.engines[name], self.contexts[name]
        dtype = next(iter(inputs.values())).dtype
        keep = []
        for k, v in inputs.items():
            v = v.detach().to(self.device, torch.float32).contiguous()
            keep.append(v)
            ctx.set_input_shape(k, tuple(v.shape))
            ctx.set_tensor_address(k, v.data_ptr())
        outs = []
        for o in self.manifest["graphs"][name]["outputs"]:
            out = torch.empty(tuple(ctx.get_tensor_shape(o)), device=self.device, dtype=torch.float32)
            ctx.set_tensor_address(o, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise AudioPathError(f"TensorRT engine {name} failed to run")
        return [o.to(dtype) for o in outs]

    tokens = OrtPath.tokens
    kv = OrtPath.kv
    block = OrtPath.block


# ------------------------------------------------------------------------------------------ install
class Installed:
    """Handle of install(): `remove()` restores the model's own forward methods."""

    def __init__(self, model, path: AudioPath):
        self.path, self._patched = path, []
        enc = model.audio

        def tokens(feats, margin=MARGIN_FRAMES):  # the graphs are exported with the default margin
            return path.tokens(feats) if margin == MARGIN_FRAMES else type(enc).tokens(enc, feats, margin)
        self._patch(enc, "tokens", tokens)
        per_chunk = {}  # project_audio is called once per block with the same tokens: one kv() for all

        def project(i, audio):
            if per_chunk.get("tokens") is not audio:
                per_chunk.update(tokens=audio, kv=path.kv(audio))
            return per_chunk["kv"][i]
        for i, blk in enumerate(model.dit.audio_blocks):
            self._patch(blk, "project_audio", lambda audio, i=i: project(i, audio))
            self._patch(blk, "forward", lambda x, kv, bias, fm, i=i: path.block(i, x, kv[0], kv[1], bias, fm))
        self._per_chunk = per_chunk

    def _patch(self, mod, attr, fn):
        mod.__dict__[attr] = fn
        self._patched.append((mod, attr))

    def remove(self):
        for mod, attr in self._patched:
            mod.__dict__.pop(attr, None)
        self._patched = []
        self._per_chunk.clear()  # the closure's dict: drops the last chunk's tokens and K/V
        self.path.close()


def install(model, path: AudioPath) -> Installed:
    """Route model's audio encoder and audio blocks through path (see the module docstring)."""
    return Installed(model, path)


# ------------------------------------------------------------------------------------------ export
class _Tokens(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, feats):
        return type(self.enc).tokens(self.enc, feats)


class _KV(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, tokens):
        return tuple(t for b in self.blocks for t in type(b).project_audio(b, tokens))


class _Block(nn.Module):
    def __init__(self, blk):
        super().__init__()
        self.blk = blk

    def forward(self, x, k, v, bias, face_mask):
        return type(self.blk).forward(self.blk, x, (k, v), bias, face_mask)


def export_graph(module, args: tuple, inputs: dict, outputs: list, path, opset=OPSET) -> dict:
    """Export module(*args) to ONNX at path. inputs: {name: {axis: (dim name, min, max)}} in argument order
    (axes not named are static). -> the graph's manifest entry {file, inputs: {name: shape}, outputs}."""
    from torch.export import Dim
    import warnings
    dims = {}
    dynamic = {}
    for name, axes in inputs.items():
        dynamic[name] = {ax: dims.setdefault(d, Dim(d, min=lo, max=hi)) for ax, (d, lo, hi) in axes.items()}
    sig = list(inputs)
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), dynamo=True, opset_version=opset, input_names=sig,
                          output_names=outputs, verbose=False,
                          dynamic_shapes={n: d for n, d in zip(_arg_names(module), dynamic.values())})
    shapes = {n: [inputs[n].get(ax, (None,))[0] or int(s) for ax, s in enumerate(a.shape)]
              for n, a in zip(sig, args)}
    return {"file": path.name, "inputs": shapes, "outputs": outputs}


def _arg_names(module):
    import inspect
    return [p for p in inspect.signature(module.forward).parameters]


def export(model, out_dir, opset=OPSET) -> dict:
    """Write the audio path's ONNX graphs and manifest.json to out_dir -> the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    n = len(model.dit.audio_blocks)
    b, d, da = 2, cfg.hidden, cfg.audio_dim
    tokens_n, audio_n = cfg.frames * cfg.tokens_per_frame, 2 * cfg.audio_frames
    mel_t = 4 * (cfg.audio_frames + 2)
    batch = ("batch",) + BATCH[::2]
    graphs = {}
    with torch.no_grad():
        feats = torch.randn(b, 2 * model.audio.mel.n_mels, mel_t)
        graphs["audio_encoder"] = export_graph(
            _Tokens(model.audio), (feats,), {"feats": {0: batch, 2: ("mel", MEL[0], MEL[2])}}, ["tokens"],
            out / "audio_encoder.onnx", opset)
        tok = torch.randn(b, audio_n, da)
        graphs["audio_kv"] = export_graph(
            _KV(model.dit.audio_blocks), (tok,), {"tokens": {0: batch, 1: ("audio", AUDIO[0], AUDIO[2])}},
            [f"{kv}{i}" for i in range(n) for kv in ("k", "v")], out / "audio_kv.onnx", opset)
        k, v = model.dit.audio_blocks[0].project_audio(tok)
        x, fm = torch.randn(b, tokens_n, d), torch.rand(b, tokens_n, 1)
        bias = model.dit.audio_bias()
        tok_dim, aud_dim = ("tokens", TOKENS[0], TOKENS[2]), ("audio", AUDIO[0], AUDIO[2])
        for i, blk in enumerate(model.dit.audio_blocks):
            graphs[f"audio_block_{i}"] = export_graph(
                _Block(blk), (x, k, v, bias, fm),
                {"x": {0: batch, 1: tok_dim}, "k": {0: batch, 2: aud_dim}, "v": {0: batch, 2: aud_dim},
                 "bias": {0: tok_dim, 1: aud_dim}, "face_mask": {0: batch, 1: tok_dim}},
                ["out"], out / f"audio_block_{i}.onnx", opset)
    manifest = {"format": 1, "opset": opset, "model_hash": model_hash(model), "torch": torch.__version__,
                "audio_blocks": n, "graphs": graphs,
                "profiles": {"batch": BATCH, "tokens": TOKENS, "audio": AUDIO, "mel": MEL},
                "log_mel": "computed in torch before audio_encoder (engine.model.audio_encoder.features)"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(onnx_dir) -> dict:
    path = Path(onnx_dir) / MANIFEST
    if not path.exists():
        raise AudioPathError(f"no {MANIFEST} in {onnx_dir}: run `syncavatar export --out {onnx_dir}` first")
    return json.loads(path.read_text())


def cache_dir() -> Path:
    """Where exported graphs and engines are kept: $SYNCAVATAR_CACHE or ~/.cache/syncavatar."""
    return Path(os.environ.get("SYNCAVATAR_CACHE") or Path.home() / ".cache" / "syncavatar")


def exported(model, onnx_dir=None) -> Path:
    """The ONNX dir for model (default: the cache, by model hash), exported now if absent or stale."""
    digest = model_hash(model)
    path = Path(onnx_dir) if onnx_dir else cache_dir() / "onnx" / digest[:16]
    try:
        if read_manifest(path)["model_hash"] == digest:
            return path
    except AudioPathError:
        pass
    # export beside it and rename: processes starting together (replicas) never read a half-written dir
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    export(model, tmp)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if read_manifest(path)["model_hash"] != digest:
            raise AudioPathError(f"{path} holds graphs of another model") from None
    return path


# ------------------------------------------------------------------------------------------ TensorRT
def trt_key(model_hash_: str) -> str:
    """Engine cache key: GPU model, TensorRT version, model hash (a mismatch in any means a rebuild)."""
    trt = import_tensorrt()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{gpu}-trt{trt.__version__}-{model_hash_[:16]}")


def build_trt(onnx_dir, force=False) -> Path:
    """Build (or find in the cache) a TensorRT engine per exported graph -> the engines' directory.

    FP16, with normalisation, softmax and reductions kept in FP32; one optimisation profile per graph over
    the manifest's (min, opt, max) of batch, tokens, audio and mel lengths.
    """
    trt = import_tensorrt()
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    out = onnx_dir / "trt" / trt_key(manifest["model_hash"])
    stamp = out / "build.json"
    if stamp.exists() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    keep_fp32 = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    prof = manifest["profiles"]
    for name, g in manifest["graphs"].items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse((onnx_dir / g["file"]).read_bytes()):
            raise AudioPathError(f"TensorRT could not parse {g['file']}: {parser.get_error(0)}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for li in range(network.num_layers):
            layer = network.get_layer(li)
            if layer.type in keep_fp32:
                layer.precision = trt.float32
                for oi in range(layer.num_outputs):
                    layer.set_output_type(oi, trt.float32)
        profile = builder.create_optimization_profile()
        for inp, shape in g["inputs"].items():
            lo, opt, hi = ([prof[d][j] if isinstance(d, str) else d for d in shape] for j in range(3))
            profile.set_shape(inp, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise AudioPathError(f"TensorRT failed to build an engine for {g['file']}")
        (out / f"{name}.plan").write_bytes(bytes(plan))
    stamp.write_text(json.dumps({"key": out.name, "model_hash": manifest["model_hash"], "built": time.time()}))
    return out


# ------------------------------------------------------------------------------------------ choice
def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise AudioPathError(f"audio_backend onnxruntime needs the onnxruntime package ({e})") from None
    return onnxruntime


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise AudioPathError(f"audio_backend tensorrt needs the tensorrt package and an NVIDIA GPU "
                             f"(pip install '.[gpu]'; {e})") from None
    return tensorrt


def unavailable(name, device="cpu") -> str | None:
    """Why backend `name` cannot run on device here, or None if it can."""
    device = torch.device(device)
    if name not in BACKENDS:
        return f"unknown audio_backend {name!r}: choose auto, {', '.join(BACKENDS)}"
    try:
        if name == "onnxruntime":
            ort = import_onnxruntime()
            if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
                return "audio_backend onnxruntime on CUDA needs onnxruntime-gpu (pip install '.[gpu]')"
        if name == "tensorrt":
            if not torch.cuda.is_available():
                return "audio_backend tensorrt needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)"
            import_tensorrt()
            if device.type != "cuda":
                return "audio_backend tensorrt runs on CUDA tensors: the model is on the CPU"
    except AudioPathError as e:
        return str(e)
    return None


def make(name, model, device="cpu", onnx_dir=None) -> AudioPath:
    """The backend `name` for model (AudioPathError with one line if it cannot run here)."""
    why = unavailable(name, device)
    if why:
        raise AudioPathError(why)
    if name == "torch":
        return AudioPath(model)
    if name == "compile":
        return CompiledPath(model)
    if name == "onnxruntime":
        return OrtPath(exported(model, onnx_dir), device)
    return TrtPath(exported(model, onnx_dir), device)


def candidates(device="cpu") -> list[str]:
    """What `auto` chooses among: TensorRT alone where it can run, else the CPU backends that can."""
    if unavailable("tensorrt", device) is None:
        return ["tensorrt"]
    return [n for n in AUTO_CPU if unavailable(n, device) is None]


def fastest(model, paths: dict, run, rounds=3, clock=time.perf_counter) -> tuple[str, dict]:
    """Time run() (e.g. one live chunk) with each of paths {name: AudioPath} installed in turn, alternating
    for `rounds` rounds (this machine's speed drifts) -> (the fastest by median ms, {name: median ms}). Ties
    go to the first name; the model is left without a backend installed."""
    names = list(paths)
    times = {n: [] for n in names}
    for r in range(rounds + 1):
        for n in names:
            handle = install(model, paths[n])
            t0 = clock()
            run()
            if r:  # round 0 warms each backend up
                times[n].append((clock() - t0) * 1000)
            handle.remove()
    med = {n: float(np.median(t)) for n, t in times.items()}
    return min(names, key=lambda n: (med[n], names.index(n))), med


def choose(name, model, run=None, device="cpu", onnx_dir=None, log=print) -> tuple[AudioPath, dict]:
    """The configured audio_backend as an AudioPath, "auto" resolved (see candidates; by timing run() when
    there is more than one), its choice logged once -> (path, {"backend", "auto", "ms"}).

    An explicit choice that cannot run raises AudioPathError; auto leaves out a candidate that fails to set
    up (e.g. an export dir it cannot write) and says so in its log line.
    """
    if name != "auto":
        path = make(name, model, device, onnx_dir)
        return path, {"backend": name, "auto": False, "ms": {}}
    paths, left_out = {}, []
    for n in candidates(device):
        try:
            paths[n] = make(n, model, device, onnx_dir)
        except (AudioPathError, OSError) as e:
            left_out.append(f"{n} left out: {e}")
    ms = {}
    if len(paths) > 1 and run is not None:
        best, ms = fastest(model, paths, run)
    else:
        best = next(iter(paths), "torch")
    for n, p in paths.items():
        if n != best:
            p.close()
    log(f"audio backend: {best} (auto" + (": " + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items()) if ms else "")
        + "".join(f"; {w}" for w in left_out) + ")")
    return paths.get(best) or AudioPath(model), {"backend": best, "auto": True, "ms": ms}
