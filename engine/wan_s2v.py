"""Wan2.2-S2V, the seed paper's model, as diffsynth ships it: its code, its cost, and a user's pipeline.

diffsynth (the `[wan]` extra) carries the real DiT, `diffsynth.models.wan_video_dit_s2v.WanS2VModel`, and
the function its pipeline runs per denoising step instead of `forward`, `model_fn_wans2v`
(diffsynth/pipelines/wan_video.py). SyncCache attaches to either from synccache/wan_s2v.py.

The torchvision trap: `import diffsynth` runs diffsynth/core, which imports torchvision, and PyPI's
torchvision for torch 2.13 is a CUDA build whose extension does not load against the CPU torch
("operator torchvision::nms does not exist"). The DiT does not need torchvision, so `model_code()` reads
the DiT's own files from the installed package under a private package name (`_syncavatar_diffsynth`),
without running diffsynth/__init__.py, and takes `model_fn_wans2v` from its source file: the same code,
byte for byte. Nothing is patched: no module of the real names is created, replaced or stubbed, and a
later `import diffsynth` (on a machine where torchvision loads) is unaffected. On GPU machines, where
torchvision matches torch, the user's own pipeline imports diffsynth as usual (`load_pipeline`).
"""
import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

PRIVATE = "_syncavatar_diffsynth"

# Wan2.2-S2V-14B (diffsynth/configs/model_configs.py, model hash 966cffdcc52f9c46c391768b27637614)
S2V_14B = dict(dim=5120, in_dim=16, ffn_dim=13824, out_dim=16, text_dim=4096, freq_dim=256, eps=1e-6,
               patch_size=(1, 2, 2), num_heads=40, num_layers=40, cond_dim=16, audio_dim=1024,
               num_audio_token=4)
# A tiny random config of the same class: 4 blocks, dim 48, audio injected after blocks 0, 2, 3.
S2V_TINY = dict(dim=48, in_dim=16, ffn_dim=96, out_dim=16, text_dim=32, freq_dim=32, eps=1e-6,
                patch_size=(1, 2, 2), num_heads=4, num_layers=4, cond_dim=16, audio_dim=16,
                num_audio_token=4, audio_inject_layers=[0, 2, 3])


class WanS2VError(RuntimeError):
    """Something a Wan2.2-S2V user must fix (package, weights, GPU); the message is one line."""


def diffsynth_dir() -> Path:
    """The installed diffsynth package's folder (found without importing it)."""
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        raise WanS2VError("diffsynth is not installed: pip install -e '.[wan]' (diffsynth 2.1.12)")
    return Path(list(spec.submodule_search_locations)[0])


def _private_package(name: str, path: Path) -> ModuleType:
    """An empty package module `name` whose submodules are read from `path` (its __init__ is not run)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    mod = importlib.util.module_from_spec(spec)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod
    return mod


def model_code() -> SimpleNamespace:
    """diffsynth's Wan-S2V code, loaded without torchvision: .WanS2VModel, .model_fn_wans2v, .module."""
    root = diffsynth_dir()
    for sub, path in (("", root), (".models", root / "models"), (".core", root / "core")):
        _private_package(PRIVATE + sub, path)
    try:
        mod = importlib.import_module(PRIVATE + ".models.wan_video_dit_s2v")
    except ModuleNotFoundError as e:
        raise WanS2VError(f"diffsynth's Wan-S2V model needs {e.name}: pip install -e '.[wan]'") from None
    src = (root / "pipelines" / "wan_video.py").read_text()
    fn = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "model_fn_wans2v"]
    if not fn:
        raise WanS2VError(f"diffsynth {root} has no model_fn_wans2v in pipelines/wan_video.py (need 2.1.12)")
    scope = {"torch": torch, "rope_precompute": mod.rope_precompute,
             "sinusoidal_embedding_1d": mod.sinusoidal_embedding_1d,
             "gradient_checkpoint_forward": mod.gradient_checkpoint_forward}
    exec(compile(ast.Module(body=fn, type_ignores=[]), str(root / "pipelines" / "wan_video.py"), "exec"), scope)
    return SimpleNamespace(WanS2VModel=mod.WanS2VModel, model_fn_wans2v=scope["model_fn_wans2v"], module=mod)


# --- cost ------------------------------------------------------------------------------------------
def _meta_model(code, cfg):
    """WanS2VModel on the meta device: shapes and FLOPs, no weights, no memory."""
    with torch.device("meta"):
        dit = code.WanS2VModel(**cfg)
    # a plain tensor attribute the frame packer reads with .item(): give it back its values
    dit.frame_packer.zip_frame_buckets = torch.tensor([1, 2, 16], dtype=torch.long)
    return dit


def step_flops(cfg: dict = S2V_14B, height: int = 448, width: int = 832, frames: int = 80,
               motion: bool = True, text_tokens: int = 512) -> dict:
    """FLOPs of one call of diffsynth's model_fn_wans2v (one CFG pass of one denoising step), by part.

    Counted with torch's FlopCounterMode on the meta device. Parts: `heavy` (the DiT blocks), `audio`
    (the audio injections after their blocks: AdaLN + cross-attention), `audio_encoder` (run on every call
    by cal_audio_emb), `rest` (embeddings, RoPE, motion packing, head). frames: video frames of the chunk
    (80 at 16 fps in Wan2.2-S2V, 4 per latent frame); motion: the chunk continues a previous one (motion
    latents of 73 frames, as after the first chunk).
    """
    from torch.utils.flop_counter import FlopCounterMode
    code = model_code()
    dit = _meta_model(code, cfg)
    lat_f, lat_h, lat_w = frames // 4, height // 8, width // 8
    meta = dict(device="meta")
    latents = torch.empty(1, cfg["in_dim"], 1 + lat_f, lat_h, lat_w, **meta)
    context = torch.empty(1, text_tokens, cfg["text_dim"], **meta)
    audio = torch.empty(1, 25, cfg["audio_dim"], frames, **meta)
    motion_latents = torch.empty(1, cfg["in_dim"], 19, lat_h, lat_w, **meta)
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        code.model_fn_wans2v(dit, latents, torch.tensor([500.0], **meta), context, audio, motion_latents, None,
                             drop_motion_frames=not motion)
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total = counter.get_total_flops()
    heavy = by_module.get(type(dit.blocks[0]).__name__, 0)
    audio_part = sum(by_module.get(type(m).__name__, 0) for m in (dit.audio_injector.injector[0],
                                                                 dit.audio_injector.injector_adain_layers[0]))
    encoder = by_module.get(type(dit.casual_audio_encoder).__name__, 0)
    return {"config": {k: v for k, v in cfg.items()}, "height": height, "width": width, "frames": frames,
            "motion": motion, "text_tokens": text_tokens, "video_tokens": lat_f * (lat_h // 2) * (lat_w // 2),
            "flops": {"heavy": heavy, "audio": audio_part, "audio_encoder": encoder,
                      "rest": total - heavy - audio_part - encoder, "total": total}}


def computed_fraction(schedule, spans) -> float:
    """Share of the heavy blocks' work a schedule computes: blocks x steps not bypassed / all."""
    blocks = [b - a + 1 for a, b in spans]
    done = sum(n * sum(not r for r in row) for n, row in zip(blocks, schedule.reuse))
    return done / (sum(blocks) * schedule.steps)


def speedup_ceiling(flops: dict, fraction: float) -> float:
    """DiT speedup when a `fraction` of the heavy work is computed and everything else runs every step:
    1 / (f h + (1 - h)), h = heavy / total (the probe-free schedule mode; no online cost)."""
    h = flops["heavy"] / flops["total"]
    return 1.0 / (fraction * h + (1.0 - h))


def stretch(schedule, steps: int, spans: list):
    """A schedule made for other step and span counts, laid over `spans` at `steps`: span k takes the row
    of the span at the same relative depth, step t the decision at the same point of the trajectory."""
    from synccache import Schedule
    n, m = schedule.num_spans, schedule.steps
    reuse = [[schedule.reuse[k * n // len(spans)][t * m // steps] for t in range(steps)]
             for k in range(len(spans))]
    for row in reuse:
        row[0] = False  # step 0 has no residual yet
    return Schedule(reuse=reuse, spans=[list(p) for p in spans],
                    meta={"stretched_from": schedule.meta.get("source", ""), "steps": steps})


def cost_report(schedules: dict, steps: int = 40, **shape) -> dict:
    """FLOPs of the 14B per denoising step (two CFG passes) and the speedup ceiling of each schedule in
    `schedules` (name -> Schedule) stretched to `steps` over the 14B's 12 spans."""
    from synccache.wan_s2v import layout
    result = step_flops(**shape)
    code = model_code()
    spans = layout(_meta_model(code, S2V_14B)).spans()
    f = result["flops"]
    result["per_step_flops"] = 2 * f["total"]  # CFG: a pass with the audio and one without
    result["steps"] = steps
    result["schedules"] = {}
    for name, sched in schedules.items():
        wan = stretch(sched, steps, spans)
        frac = computed_fraction(wan, spans)
        result["schedules"][name] = {"source_steps": sched.steps, "computed_fraction": round(frac, 4),
                                     "speedup_ceiling": round(speedup_ceiling(f, frac), 3)}
    return result


# --- a user's pipeline, from their own files -------------------------------------------------------
# What the model folder must hold: the layout of Wan-AI/Wan2.2-S2V-14B (glob pattern, or a folder: "/")
S2V_FILES = {
    "DiT": "diffusion_pytorch_model*.safetensors",
    "audio encoder": "wav2vec2-large-xlsr-53-english/model.safetensors",
    "audio processor": "wav2vec2-large-xlsr-53-english/",
    "text encoder": "models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer": "google/umt5-xxl/",
    "VAE": "Wan2.1_VAE.pth",
}
MEMORY_MARGIN = 1.5  # GPU memory needed, as a multiple of the DiT's bf16 weights


# ------------------------------------------------------------------------------- audio path export
class WanInjection(torch.nn.Module):
    """Audio injection i of a WanS2VModel as one module, for the audio-path backends (engine/audio_path.py):
    adaLN of the video tokens on the audio's global token, then cross-attention to the audio tokens -> the
    residual `after_transformer_block` adds. Inputs per latent frame, as that method arranges them
    (injection_inputs): hidden [(b t), n, dim], temb [(b t), dim], audio [(b t), a, dim]."""

    def __init__(self, dit, i: int):
        super().__init__()
        inj = dit.audio_injector
        if not hasattr(inj, "injector_adain_layers"):
            raise WanS2VError("this WanS2VModel was built without enable_adain: its injection is not exported")
        self.adain, self.attn = inj.injector_adain_layers[i], inj.injector[i]

    def forward(self, hidden, temb, audio):
        return self.attn(self.adain(hidden, temb), audio)


def injection_inputs(hidden_states, audio_emb_global, audio_emb, original_seq_len):
    """after_transformer_block's own arguments -> (hidden, temb, audio) for WanInjection."""
    t = audio_emb.shape[1]
    x = hidden_states[:, :original_seq_len]
    x = x.reshape(x.shape[0] * t, -1, x.shape[-1])  # b (t n) c -> (b t) n c
    return x, audio_emb_global.flatten(0, 1)[:, 0], audio_emb.flatten(0, 1)


def export_injection(dit, i: int, out_dir, example: tuple) -> dict:
    """Export audio injection i of dit to out_dir/wan_injection_{i}.onnx (dynamic frames, video tokens and
    audio tokens) -> its manifest entry; example: (hidden, temb, audio) as injection_inputs gives them."""
    from engine import audio_path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames, tokens, audio = ("frames", 1, 4096), ("tokens", 2, 1 << 20), ("audio", 1, 4096)
    return audio_path.export_graph(
        WanInjection(dit, i), tuple(example),
        {"hidden": {0: frames, 1: tokens}, "temb": {0: frames}, "audio": {0: frames, 1: audio}}, ["residual"],
        out / f"wan_injection_{i}.onnx")


def check_model_dir(folder) -> dict:
    """part -> path(s) in the user's model folder; WanS2VError naming every missing part, in one line."""
    root = Path(folder)
    if not root.is_dir():
        raise WanS2VError(f"model folder {root} does not exist (the Wan2.2-S2V-14B files, downloaded by you)")
    found, missing = {}, []
    for part, pattern in S2V_FILES.items():
        if pattern.endswith("/"):
            hit = [root / pattern] if (root / pattern).is_dir() else []
        else:
            hit = sorted(root.glob(pattern))
        if hit:
            found[part] = [str(p) for p in hit] if len(hit) > 1 else str(hit[0])
        else:
            missing.append(f"{part} ({pattern})")
    if missing:
        raise WanS2VError(f"{root} lacks {', '.join(missing)}")
    return found


def dit_bytes(cfg: dict = S2V_14B, bytes_per_param: int = 2) -> int:
    """Bytes of the DiT's weights (counted on the meta device)."""
    return bytes_per_param * sum(p.numel() for p in _meta_model(model_code(), cfg).parameters())


def check_device(device: str, need_bytes: int) -> None:
    """WanS2VError unless `device` is a CUDA GPU with about need_bytes of memory."""
    if not str(device).startswith("cuda"):
        raise WanS2VError(f"Wan2.2-S2V-14B runs on a CUDA GPU; --device {device} is not one")
    if not torch.cuda.is_available():
        raise WanS2VError("no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                          "Wan2.2-S2V-14B needs one")
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if total < need_bytes:
        raise WanS2VError(f"{torch.cuda.get_device_name(torch.device(device))} has {total / 2**30:.0f} GiB; "
                          f"Wan2.2-S2V-14B needs about {need_bytes / 2**30:.0f} GiB")


def load_pipeline(folder, device: str = "cuda", dtype=torch.bfloat16):
    """diffsynth's WanVideoPipeline for Wan2.2-S2V from the user's folder; nothing is downloaded."""
    files = check_model_dir(folder)
    check_device(device, int(MEMORY_MARGIN * dit_bytes()))
    try:
        from diffsynth.core import ModelConfig
        from diffsynth.pipelines.wan_video import WanVideoPipeline
    except (ImportError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WanS2VError(f"diffsynth cannot be imported ({first}); pip install -e '.[wan]' with a "
                          f"torchvision built for your torch") from None
    models = [ModelConfig(path=files[p]) for p in ("DiT", "audio encoder", "text encoder", "VAE")]
    return WanVideoPipeline.from_pretrained(
        torch_dtype=dtype, device=device, model_configs=models, redirect_common_files=False,
        tokenizer_config=ModelConfig(path=files["tokenizer"]),
        audio_processor_config=ModelConfig(path=files["audio processor"]))


def load_mask(path, size=None) -> torch.Tensor:
    """A person/face mask image -> float [H, W] in [0, 1] (white = person)."""
    import numpy as np
    from PIL import Image
    try:
        img = Image.open(path).convert("L")
    except (OSError, ValueError) as e:
        raise WanS2VError(f"cannot read the mask {path}: {e}") from None
    if size is not None:
        img = img.resize(size)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def calibrate_pipeline(folder, audio, image, out, steps: int = 40, budget: str = "12",
                       reuse_fraction: float = 0.75, mask=None, prompt: str = "a person talking",
                       max_run=None, device: str = "cuda", height: int = 448, width: int = 832,
                       num_frames: int = 81, progress: bool = True) -> dict:
    """Record span reuse errors on the user's Wan2.2-S2V pipeline (both CFG passes, every step of one
    clip) and solve the SyncCache schedule by DP -> summary; the schedule is saved to `out`.

    Cost: each step runs 1 + (number of spans) forwards per CFG pass while recording, 13 for the 14B.
    """
    from PIL import Image
    from tqdm import tqdm

    from engine.calibrate import parse_budget, solve
    from engine.media import MediaError, load_audio
    from synccache.calibrate import SpanErrorRecorder
    from synccache.wan_s2v import WanS2VStep, layout
    check_model_dir(folder)
    for what, path in (("--audio", audio), ("--image", image), ("--mask", mask)):
        if (path is not None or what != "--mask") and (path is None or not Path(path).is_file()):
            raise WanS2VError(f"{what} {path} is not a file")
    check_device(device, int(MEMORY_MARGIN * dit_bytes()))
    try:
        speech = load_audio(audio, 16000)
        portrait = Image.open(image).convert("RGB").resize((width, height))
    except (MediaError, OSError, ValueError) as e:
        raise WanS2VError(f"cannot read the calibration input: {e}") from None
    person = load_mask(mask, (width, height)) if mask else None
    pipe = load_pipeline(folder, device)
    step = WanS2VStep(pipe.dit, pipe.model_fn)
    lay = layout(pipe.dit, person)
    spans = lay.spans()
    pipe.model_fn = step
    try:
        with SpanErrorRecorder(step, lay) as rec:
            rec.reset()
            pipe(prompt=prompt, input_image=portrait, input_audio=speech, audio_sample_rate=16000,
                 num_inference_steps=steps, height=height, width=width, num_frames=num_frames, seed=0,
                 progress_bar_cmd=tqdm if progress else (lambda steps_: steps_))
            err = rec.errors()
    finally:
        pipe.model_fn = step.fn
    n_tokens = (num_frames - 1) // 4 * (height // 16) * (width // 16)
    try:
        max_spans = parse_budget(budget, n_tokens * S2V_14B["dim"] * 2, len(spans))
        sched = solve(err, steps, max_spans, spans, reuse_fraction=reuse_fraction, max_run=max_run)
    except ValueError as e:
        raise WanS2VError(str(e)) from None
    sched.meta.update({"model": "Wan2.2-S2V-14B", "steps": steps, "budget": budget, "forecast": 0,
                       "reuse_fraction": reuse_fraction, "error_weight": "person mask" if mask else "uniform",
                       "span_errors": [[None if v == float("inf") else v for v in row] for row in err]})
    sched.save(out)
    return {"out": str(out), "steps": steps, "spans": len(spans), "cached_spans": len(sched.cached_spans),
            "reuses": sched.reuse_count, "computed_fraction": computed_fraction(sched, spans)}


# --- the generator backend -------------------------------------------------------------------------
class WanS2VGenerator:
    """engine.generator.Generator on a diffsynth Wan2.2-S2V pipeline: `infer_frames` frames at 16 fps per
    chunk, the last `motion_frames` generated frames carried as the next chunk's motion video (as
    diffsynth's multi-clip example does), SyncCache applied to the pipeline when `cache` is given.

    Each chunk hands the pipeline the chunk's own audio (its wav2vec features are computed per chunk,
    so no audio from beyond the chunk is needed: the order a live stream could feed it).
    """
    fps = 16
    SAMPLE_RATE = 16000

    def __init__(self, pipe, image, prompt: str = "a person talking", negative_prompt: str = "",
                 steps: int = 40, infer_frames: int = 80, motion_frames: int = 73, height: int = 448,
                 width: int = 832, cache=None, person_mask=None, seed: int = 0):
        """image: the portrait (PIL image, resized to width x height); cache: a SyncCacheConfig or None."""
        if infer_frames % 4:
            raise WanS2VError(f"infer_frames must be a multiple of 4, got {infer_frames}")
        self.pipe, self.prompt, self.negative_prompt = pipe, prompt, negative_prompt
        self.image = image.convert("RGB").resize((width, height))
        self.steps, self.frames_per_chunk, self.motion_frames = steps, infer_frames, motion_frames
        self.height, self.width, self.seed = height, width, seed
        self.handle = None
        if cache is not None:
            from synccache.wan_s2v import apply_to_pipeline
            self.handle = apply_to_pipeline(pipe, cache, person_mask)
        self.reset()

    def reset(self):
        self.motion_video, self.chunks = None, 0

    def chunk(self, audio, start_frame):
        """Frames [start_frame, start_frame + W) at 16 fps -> uint8 [W, height, width, 3]."""
        import numpy as np
        w, sr = self.frames_per_chunk, self.SAMPLE_RATE
        a0, a1 = start_frame * sr // self.fps, (start_frame + w) * sr // self.fps
        speech = np.zeros(a1 - a0, np.float32)
        got = audio[a0:a1].numpy() if hasattr(audio, "numpy") else np.asarray(audio[a0:a1], np.float32)
        speech[:len(got)] = got
        video = self.pipe(prompt=self.prompt, negative_prompt=self.negative_prompt, input_image=self.image,
                          input_audio=speech, audio_sample_rate=sr, num_frames=w + 1, height=self.height,
                          width=self.width, motion_video=self.motion_video, num_inference_steps=self.steps,
                          seed=self.seed, output_type="floatpoint")  # [1, 3, frames, H, W] in [-1, 1]
        clip = video[:, :, -w:]
        tail = clip[:, :, 3:] if self.chunks == 0 else clip  # the first frames repeat the portrait
        keep = min(self.motion_frames, tail.shape[2])
        prev = self.motion_video[:, :, keep:] if self.motion_video is not None else tail[:, :, :0]
        motion = torch.cat([prev, tail[:, :, -keep:]], dim=2)
        short = self.motion_frames - motion.shape[2]  # the pipeline takes exactly motion_frames frames
        if short > 0:
            motion = torch.cat([motion[:, :, :1].expand(-1, -1, short, -1, -1), motion], dim=2)
        self.motion_video = motion.clone()
        self.chunks += 1
        frames = ((clip[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round()
        return frames.to(torch.uint8).cpu().numpy()

    def cache_stats(self):
        if self.handle is None:
            return {"computed_steps": self.chunks * self.steps, "reused_steps": 0, "cache_bytes": 0}
        st = self.handle.stats()
        return {"computed_steps": st["computed_steps"], "reused_steps": st["reuse_steps"],
                "cache_bytes": st["peak_cache_bytes"]}

    def close(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
