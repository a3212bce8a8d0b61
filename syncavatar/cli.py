"""The `syncavatar` command: thin subcommands over the packages that own the work.

Errors a user can cause (a missing or corrupt file, an unknown avatar) print one line to stderr and
exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.caching import METHODS as CACHE_METHODS

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user gave cannot be used; the message is one line."""


def _config(a):
    from engine.config import DEFAULT_CONFIG, ConfigError, load_config
    try:
        return load_config(a.config or DEFAULT_CONFIG)
    except ConfigError as e:
        raise UserError(str(e)) from None


# ------------------------------------------------------------------------------------------- data
def cmd_data(a):
    from engine.data.corpus import SPLITS, build_corpus
    if a.split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}")
    if a.clips < 1:
        raise UserError("--clips must be >= 1")
    info = build_corpus(a.out, a.clips, a.seed, a.split, workers=a.workers)
    print(json.dumps(info))


# ------------------------------------------------------------------------------------------- live
def cmd_serve(a):
    from streaming.server import serve
    cfg = _config(a)
    s = cfg.server
    s.host = a.host if a.host is not None else s.host
    s.port = a.port if a.port is not None else s.port
    s.telemetry = a.telemetry if a.telemetry is not None else s.telemetry
    if not 0 < s.port < 65536:
        raise UserError(f"--port must be 1..65535, got {s.port}")
    cfg.cluster.workers = a.workers if a.workers is not None else cfg.cluster.workers
    if cfg.cluster.workers < 0:
        raise UserError(f"--workers must be >= 0, got {cfg.cluster.workers}")
    if cfg.model.audio_backend != "auto":  # an explicit backend that cannot run here: say so before starting
        from engine.audio_path import unavailable
        why = unavailable(cfg.model.audio_backend)
        if why:
            raise UserError(why)
    if cfg.cluster.workers:
        try:
            from streaming.cluster import serve_cluster
        except ImportError as e:
            raise UserError(f"--workers needs Ray Serve ({e}): pip install -e '.[cluster]'") from None
        return serve_cluster(cfg)
    serve(cfg)


def cmd_telemetry(a):
    from streaming.telemetry import watch
    address = a.address if a.address is not None else _config(a).server.telemetry
    if not address:
        raise UserError("no telemetry address: pass --address tcp://HOST:PORT")
    watch(address, session=a.session, csv_path=a.csv, types=a.types.split(","), duration=a.duration,
          idle_timeout=a.idle_timeout)


def cmd_client(a):
    from clients.client import ClientError, main as client_main
    try:
        code = client_main(a)
    except ClientError as e:
        raise UserError(str(e)) from None
    if code:
        raise SystemExit(code)


def cmd_soak(a):
    from clients.client import ClientError
    from clients.soak import run_soak, summary_line, token_from, verdict
    cfg = _config(a)
    telemetry = a.telemetry if a.telemetry is not None else cfg.server.telemetry
    try:
        report = run_soak(a.server, a.minutes, a.sessions, thresholds=cfg.soak, json_path=a.json, plot=a.plot,
                          speech=a.speech, telemetry=telemetry, token=token_from(a.token, cfg.server.token),
                          interval_s=a.interval, avatar=a.avatar, seed=a.seed)
    except ClientError as e:
        raise UserError(str(e)) from None
    print(summary_line(report), flush=True)
    code = verdict(report)
    if code:
        raise SystemExit(code)


# ------------------------------------------------------------------------------------------ train
def cmd_train(a):
    from engine import train
    stages = ["ae", "latents", "dit", "expert", "export"] if a.stage == "all" else [a.stage]
    corpus = Path(a.corpus)
    if not corpus.is_dir() or not any(corpus.glob("clip_*.npz")):
        raise UserError(f"no corpus clips in {corpus}: run `syncavatar data --out {corpus}` first")
    for stage in stages:
        if stage == "ae":
            train.train_ae(corpus, a.out, steps=a.ae_steps, preset=a.preset)
        elif stage == "latents":
            train.encode_corpus(corpus, a.out, preset=a.preset, init=a.init)
        elif stage == "dit":
            train.train_dit(corpus, a.out, steps=a.dit_steps, preset=a.preset, init=a.init, lr=a.dit_lr)
        elif stage == "expert":
            from engine.train_expert import train_expert
            train_expert(corpus, Path(a.out) / "lipsync_expert.safetensors", val_dir=a.val,
                         time_limit_s=a.expert_minutes * 60)
        elif stage == "decoder":
            if not a.init:
                raise UserError("--stage decoder retrains the decoder of a model: pass --init WEIGHTS")
            train.train_decoder(corpus, a.out, a.init, steps=a.decoder_steps, lr=a.decoder_lr,
                                generated=a.decoder_generated, t_max=a.decoder_tmax, fine=a.decoder_fine,
                                blink_share=a.decoder_blinks, portrait_share=a.decoder_portraits,
                                fine_window=tuple(int(v) for v in a.decoder_window.split(",")) if a.decoder_window else None,
                                widths=tuple(int(v) for v in a.decoder_widths.split(",")) if a.decoder_widths else None, batch=a.decoder_batch,
                                fine_blocks=a.decoder_fine_blocks, image_warp=a.decoder_image_warp)
        elif stage == "export":
            train.export(a.out, Path(a.out) / "avatar.safetensors", preset=a.preset)
    plot = train.plot_losses(a.out)
    if plot:
        print(f"loss curves: {plot}")


# ----------------------------------------------------------------------------------------- render
def cmd_render(a):
    import numpy as np

    from engine.audio import FPS, SAMPLE_RATE
    from engine.generator import load_avatar, render_frames
    from engine.media import MediaError, load_audio, write_mp4
    from engine.model.avatar import load_model
    if a.wan_s2v:
        try:
            return _render_wan(a, load_audio(a.audio, SAMPLE_RATE))
        except MediaError as e:
            raise UserError(str(e)) from None
    cfg = _config(a)
    a.avatar = a.avatar if a.avatar is not None else cfg.engine.avatar
    a.steps = a.steps if a.steps is not None else cfg.model.steps
    a.seed = a.seed if a.seed is not None else cfg.model.seed
    try:
        audio = load_audio(a.audio, SAMPLE_RATE)
    except MediaError as e:
        raise UserError(str(e)) from None
    try:
        avatar = load_avatar(a.avatar)
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.steps < 1:
        raise UserError("--steps must be >= 1")
    model = load_model(a.weights or cfg.path(cfg.model.weights))
    from engine.caching import cache_config
    try:
        cache = cache_config(a.cache, a.steps, a.cache_threshold, schedule=cfg.path(cfg.cache.schedule),
                             calibration=cfg.path(cfg.cache.calibration),
                             stream_schedule=cfg.path(cfg.cache.stream_schedule))
    except ValueError as e:
        raise UserError(str(e)) from None
    guidance = a.guidance if a.guidance is not None else cfg.model.guidance
    frames, stats = render_frames(model, avatar, audio, steps=a.steps, seed=a.seed, progress=not a.quiet,
                                  cache=cache, guidance=guidance, noise_scale=cfg.model.noise_scale)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, frames, FPS, audio, SAMPLE_RATE)
    if a.frames_out:
        np.save(a.frames_out, frames)
    stats = {"out": str(out), "avatar": str(a.avatar)} | stats
    if a.json:
        Path(a.json).write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


def _render_wan(a, audio):
    """render on Wan2.2-S2V from the user's model folder (GPU): --image, optional --mask and --schedule."""
    from engine.audio import SAMPLE_RATE
    from engine.generator import render_with
    from engine.media import write_mp4
    from engine.wan_s2v import WanS2VError, WanS2VGenerator, check_model_dir, load_mask, load_pipeline
    from synccache import ScheduleError, SyncCacheConfig
    if a.cache not in ("none", "synccache"):
        raise UserError(f"--cache {a.cache} is not available on Wan2.2-S2V; use synccache with --schedule")
    try:
        check_model_dir(a.wan_s2v)
        if not a.image or not Path(a.image).is_file():
            raise WanS2VError(f"--image {a.image} is not a file (the portrait to animate)")
        if a.cache == "synccache" and not a.schedule:
            raise WanS2VError("--cache synccache on Wan2.2-S2V needs --schedule (from calibrate --wan-s2v)")
        cache = SyncCacheConfig(schedule=a.schedule) if a.cache == "synccache" else None
        from PIL import Image
        image = Image.open(a.image)
        mask = load_mask(a.mask, image.size) if a.mask else None
        pipe = load_pipeline(a.wan_s2v, a.device)
        gen = WanS2VGenerator(pipe, image, prompt=a.prompt, steps=a.steps or 40, cache=cache, person_mask=mask,
                              seed=a.seed or 0)
    except (WanS2VError, ScheduleError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    frames, stats = render_with(gen, audio, progress=not a.quiet)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, frames, gen.fps, audio, SAMPLE_RATE)
    stats = {"out": str(out), "backend": "wan-s2v", "cache": a.cache} | stats
    if a.json:
        Path(a.json).write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


# -------------------------------------------------------------------------------------- calibrate
def cmd_calibrate(a):
    if a.wan_s2v:
        return cmd_calibrate_wan(a)
    a.out = a.out or "configs/synccache/ref-XS.json"
    from engine.calibrate import calibrate
    from engine.model.avatar import load_model
    cfg = _config(a)
    steps = a.steps if a.steps is not None else cfg.model.steps
    if steps < 2:
        raise UserError("--steps must be >= 2")
    model = load_model(a.weights or cfg.path(cfg.model.weights))
    try:
        summary = calibrate(model, a.out, steps, a.budget or "4", clips=a.clips, corpus=a.corpus,
                            reuse_fraction=a.reuse_fraction, error_bound=a.error_bound, max_run=a.max_run or None,
                            guidance=cfg.model.guidance, noise_scale=cfg.model.noise_scale, plot=a.plot,
                            stream_out=a.stream_out or None, peers_out=a.peers_out or None,
                            progress=not a.quiet, forecast=a.forecast, errors_from=a.errors_from,
                            error_weight=a.error_weight, chunks_per_clip=a.chunks_per_clip)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(json.dumps(summary))


def cmd_calibrate_wan(a):
    from engine.wan_s2v import WanS2VError, calibrate_pipeline
    try:
        summary = calibrate_pipeline(a.wan_s2v, a.audio, a.image, a.out or "wan-s2v.json", steps=a.steps or 40,
                                     budget=a.budget or "12", reuse_fraction=a.reuse_fraction, mask=a.mask,
                                     prompt=a.prompt, max_run=a.max_run or None, device=a.device,
                                     progress=not a.quiet)
    except WanS2VError as e:
        raise UserError(str(e)) from None
    print(json.dumps(summary))


# ------------------------------------------------------------------------------------------ bench
def cmd_bench_wan(a):
    from engine.wan_s2v import WanS2VError, cost_report
    from synccache import Schedule
    cfg = _config(a)
    scheds = {"default": Schedule.load(cfg.path(cfg.cache.schedule)),
              "live": Schedule.load(cfg.path(cfg.live.levels[0].schedule))}
    try:
        r = cost_report(scheds, steps=a.steps, height=a.height, width=a.width, frames=a.frames)
    except WanS2VError as e:
        raise UserError(str(e)) from None
    f = r["flops"]
    print(f"Wan2.2-S2V-14B, {a.height}x{a.width}, {a.frames} frames ({r['video_tokens']} video tokens), "
          f"one CFG pass (a step is two):")
    for part in ("heavy", "audio", "audio_encoder", "rest", "total"):
        print(f"  {part:14s} {f[part] / 1e12:9.2f} TFLOP  {100 * f[part] / f['total']:6.2f} %")
    print(f"per denoising step: {r['per_step_flops'] / 1e12:.1f} TFLOP; {a.steps} steps: "
          f"{a.steps * r['per_step_flops'] / 1e15:.1f} PFLOP per chunk")
    for name, s in r["schedules"].items():
        print(f"schedule {name} ({s['source_steps']} steps, stretched to {a.steps}): computes "
              f"{100 * s['computed_fraction']:.1f} % of the heavy work -> DiT speedup ceiling "
              f"{s['speedup_ceiling']:.2f}x")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1))


def cmd_bench_batch(a):
    from engine.bench_batch import bench_batch, plot, write_json
    from engine.model.avatar import load_model
    cfg = _config(a)
    try:
        sizes = sorted({int(b) for b in a.sizes.split(",")})
    except ValueError:
        raise UserError(f"--sizes must be comma-separated batch sizes, got {a.sizes!r}") from None
    if min(sizes) < 1 or a.rounds < 1 or a.threads < 1:
        raise UserError("--sizes, --rounds and --threads must be >= 1")
    model = load_model(a.weights or cfg.path(cfg.model.weights))
    result = bench_batch(model, cfg, sizes, rounds=a.rounds, threads=a.threads, precision=a.precision,
                         progress=not a.quiet)
    if a.json:
        write_json(result, a.json)
    if a.plot:
        plot(result, a.plot)
    print("B  separate ms  batched ms  chunk speedup  DiT speedup  chunks/s batched  max latent diff")
    for b, r in result["sizes"].items():
        print(f"{b:<2} {r['separate_chunk_ms']:11.1f} {r['batched_chunk_ms']:11.1f} {r['chunk_speedup']:14.2f} "
              f"{r['dit_speedup']:12.2f} {r['chunks_per_s_batched']:17.2f} {r['max_latent_diff']:16.2e}")


def cmd_bench_audio(a):
    from engine import audio_path
    from engine.bench_audio import bench_audio, print_table, write_json
    from engine.model.avatar import load_model
    cfg = _config(a)
    if a.rounds < 1 or a.threads < 1:
        raise UserError("--rounds and --threads must be >= 1")
    names = a.backends.split(",") if a.backends else None
    if a.device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {a.device!r}")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    for n in names or []:
        why = audio_path.unavailable(n, a.device)
        if why:
            raise UserError(why)
    model = load_model(a.weights or cfg.path(cfg.model.weights))
    result = bench_audio(model, cfg, names, rounds=a.rounds, threads=a.threads, precision=a.precision,
                         progress=not a.quiet, device=a.device)
    if a.json:
        write_json(result, a.json)
    print_table(result)


def cmd_export(a):
    from engine import audio_path
    from engine.model.avatar import load_model
    cfg = _config(a)
    if a.opset < audio_path.OPSET:
        raise UserError(f"--opset must be >= {audio_path.OPSET} (LayerNormalization and the attention graphs need it)")
    model = load_model(a.weights or cfg.path(cfg.model.weights))
    try:
        manifest = audio_path.export(model, a.out, opset=a.opset)
    except audio_path.AudioPathError as e:
        raise UserError(str(e)) from None
    print(json.dumps({"out": a.out, "graphs": list(manifest["graphs"]), "model_hash": manifest["model_hash"][:16],
                      "opset": manifest["opset"]}))


def cmd_build_trt(a):
    from engine import audio_path
    why = audio_path.unavailable("tensorrt", "cuda")
    if why:
        raise UserError(why)
    try:
        out = audio_path.build_trt(a.onnx, force=a.force)
    except audio_path.AudioPathError as e:
        raise UserError(str(e)) from None
    print(json.dumps({"engines": str(out)}))


def cmd_bench(a):
    from engine.bench import bench_cache, default_sweep, pareto_plot, print_matched, print_table, write_json
    from engine.model.avatar import load_model
    cfg = _config(a)
    model = load_model(a.weights or cfg.path(cfg.model.weights))
    try:
        methods = default_sweep(cfg.model.steps, cfg.path(cfg.cache.schedule), cfg.path(cfg.cache.calibration),
                                cfg.path(cfg.cache.stream_schedule), only=a.methods.split(",") if a.methods else None)
        result = bench_cache(model, methods, corpus=a.corpus, clips=a.clips, progress=not a.quiet)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    if a.json:
        write_json(result, a.json)
    if a.plot:
        pareto_plot(result, a.plot)
    print_table(result)
    print()
    print_matched(result)


# ------------------------------------------------------------------------------------------- eval
def cmd_eval(a):
    from engine.lipsync import evaluate
    from engine.media import MediaError
    if a.corpus:
        return _eval_corpus(a)
    if not a.video:
        raise UserError("give --video V.mp4 (one clip) or --corpus DIR (held-out corpus report)")
    ident = _eval_identity(a)
    try:
        res = evaluate(a.video, a.audio, a.truth, window_s=a.window)
        if ident is not None:
            res |= _eval_picture(a, ident)
    except MediaError as e:
        raise UserError(str(e)) from None
    rnd = lambda d: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    res = rnd(res) | ({"windows": [rnd(w) for w in res["windows"]]} if "windows" in res else {})
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))


def _eval_identity(a):
    """The --avatar identity (None without it), checked before any slow work."""
    from engine.picture import as_identity
    if a.avatar is None:
        return None
    if a.picture_stride < 1:
        raise UserError("--picture-stride must be >= 1")
    try:
        return as_identity(a.avatar)
    except ValueError as e:
        raise UserError(str(e)) from None


def _eval_picture(a, ident) -> dict:
    """face_psnr and face_psnr_min of the video against clean renders of the --avatar portrait."""
    from engine.picture import video_face_psnr
    try:
        return video_face_psnr(a.video, ident, stride=a.picture_stride)
    except ValueError as e:  # frames the portrait fit cannot read (not 128x128)
        raise UserError(str(e)) from None


def _eval_corpus(a):
    from engine.model.avatar import load_model
    from engine.report import evaluate_corpus
    model = load_model(a.weights) if a.weights else None
    report = evaluate_corpus(a.corpus, model=model, clips=a.clips, steps=a.steps, sheet=a.sheet)
    if a.report:
        Path(a.report).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


def build_parser():
    p = argparse.ArgumentParser(prog="syncavatar", description="Real-time talking-portrait engine.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="generate the synthetic corpus (espeak-ng speech + portraits)")
    d.add_argument("--out", required=True)
    d.add_argument("--clips", type=int, default=600)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--split", default="train", help="train | heldout | heldout-id")
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train the reference model (resumable stages)")
    t.add_argument("--corpus", default="data/corpus")
    t.add_argument("--out", default="runs/ref")
    t.add_argument("--stage", default="all", choices=["all", "ae", "latents", "dit", "expert", "export", "decoder"],
                   help="decoder: retrain only the flow-warp decoder of --init (frozen encoder, DiT kept); "
                        "writes OUT/avatar.safetensors")
    t.add_argument("--preset", default="ref-XS")
    t.add_argument("--ae-steps", type=int, default=3000)
    t.add_argument("--dit-steps", type=int, default=6000)
    t.add_argument("--decoder-steps", type=int, default=1000)
    t.add_argument("--decoder-lr", type=float, default=3e-4, help="peak learning rate of the decoder stage")
    t.add_argument("--decoder-generated", type=float, default=0.5,
                   help="fraction of decoder training chunks decoded from the DiT's own latent prediction")
    t.add_argument("--decoder-tmax", type=float, default=0.3, help="highest noise level of those predictions")
    t.add_argument("--decoder-fine", type=int, default=0,
                   help="add a 128-px refinement stage of this width to the decoder (0: none)")
    t.add_argument("--decoder-fine-blocks", type=int, default=0,
                   help="deepen the 128-px stage to this many residual blocks after its first (added ones start "
                        "as the identity)")
    t.add_argument("--decoder-image-warp", choices=["bilinear", "bicubic"], default=None,
                   help="how the decoder's flow resamples the reference image (default: --init's)")
    t.add_argument("--decoder-blinks", type=float, default=0.0,
                   help="fraction of decoder training chunks that hold a closed-eye frame")
    t.add_argument("--decoder-window", default="",
                   help="r0,r1,c0,c1: the pixels the 128-px stage covers (default: the whole frame)")
    t.add_argument("--decoder-widths", default="",
                   help="a new decoder of these widths at 128,64,32,16,8 px (e.g. 16,16,32,64,128: the lite decoder), "
                        "trained from scratch")
    t.add_argument("--decoder-batch", type=int, default=4, help="chunks (4 frames each) per decoder step")
    t.add_argument("--decoder-portraits", type=float, default=0.0,
                   help="fraction of decoder training chunks drawn from faces the corpus never shows")
    t.add_argument("--dit-lr", type=float, default=3e-4, help="peak learning rate of the dit stage")
    t.add_argument("--expert-minutes", type=float, default=7.5)
    t.add_argument("--val", default=None, help="held-out corpus for the expert's validation")
    t.add_argument("--init", default=None, help="continue from shipped weights (latents, dit stages), "
                   "e.g. engine/weights/avatar.safetensors")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("render", help="audio file -> talking-portrait mp4, chunk by chunk as the live engine")
    r.add_argument("--audio", required=True)
    r.add_argument("--avatar", default=None, help="identity number (default from the config: 0)")
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--guidance", type=float, default=None, help="audio guidance scale (1.0 = off)")
    r.add_argument("--config", default=None, help="TOML config (default configs/default.toml)")
    r.add_argument("--json", default=None, help="write stats JSON here")
    r.add_argument("--frames-out", default=None, help="save the exact RGB frames as .npy (T x H x W x 3)")
    r.add_argument("--weights", default=None)
    r.add_argument("--cache", default="none", choices=list(CACHE_METHODS),
                   help="DiT cache (default none: the plain model)")
    r.add_argument("--cache-threshold", type=float, default=None,
                   help="synccache (probe online instead of the schedule), teacache, fbcache, magcache: the "
                        "reuse threshold; fora, deepcache: the interval N")
    r.add_argument("--quiet", action="store_true")
    rw = r.add_argument_group("Wan2.2-S2V backend (a CUDA GPU and your own weights; nothing is downloaded)")
    rw.add_argument("--wan-s2v", default=None, metavar="DIR",
                    help="render with Wan2.2-S2V from the model folder DIR instead of the reference model")
    rw.add_argument("--image", default=None, help="the portrait to animate")
    rw.add_argument("--mask", default=None, help="person/face mask image of the portrait (white = person)")
    rw.add_argument("--schedule", default=None, help="SyncCache schedule from calibrate --wan-s2v")
    rw.add_argument("--prompt", default="a person talking")
    rw.add_argument("--device", default="cuda")
    r.set_defaults(func=cmd_render)

    c = sub.add_parser("calibrate", help="measure span reuse errors, solve the SyncCache schedule (DP)")
    c.add_argument("--steps", type=int, default=None, help="sampler steps (default from the config)")
    c.add_argument("--budget", default=None, help="spans that may keep residuals: a count, or bytes (512K, 1M); "
                   "default 4 (the reference model's all), 12 with --wan-s2v")
    c.add_argument("--out", default=None, help="default configs/synccache/ref-XS.json (wan-s2v.json with --wan-s2v)")
    c.add_argument("--clips", type=int, default=6, help="calibration clips (train split, made on the fly)")
    c.add_argument("--chunks-per-clip", type=int, default=8,
                   help="consecutive chunks of each clip, from one chunk before its speech starts")
    c.add_argument("--corpus", default=None, help="take calibration clips from this corpus dir instead")
    c.add_argument("--reuse-fraction", type=float, default=0.9,
                   help="fraction of the budgeted span-steps to reuse (the least-error plan is chosen)")
    c.add_argument("--error-bound", type=float, default=None, help="instead: most reuses with error <= this")
    c.add_argument("--max-run", type=int, default=6,
                   help="most consecutive reuses of one span (0: no limit); a residual gets stale")
    c.add_argument("--forecast", type=int, choices=(0, 1), default=1,
                   help="1: reuse steps extrapolate each residual from the span's last two computed steps "
                        "(twice the memory); 0: add the last residual as it is (the paper)")
    c.add_argument("--error-weight", choices=("mouth", "uniform"), default=None,
                   help="mouth (default): weigh each reuse error towards the face (x4) and the mouth (x16); "
                        "uniform: every latent element alike. With --errors-from: the file's, checked if given")
    c.add_argument("--plot", default=None, help="heat map PNG of the errors and the chosen steps")
    c.add_argument("--errors-from", default=None,
                   help="solve again from the errors a schedule file recorded (no new calibration run)")
    c.add_argument("--stream-out", default="configs/synccache/ref-XS-stream.json",
                   help="also solve the streaming extension's schedule (cross-chunk reuse); '' to skip")
    c.add_argument("--peers-out", default="configs/synccache/peers.json",
                   help="also calibrate TeaCache and MagCache for the benchmark; '' to skip")
    c.add_argument("--weights", default=None)
    c.add_argument("--config", default=None)
    c.add_argument("--quiet", action="store_true")
    w = c.add_argument_group("Wan2.2-S2V (on a GPU, with your own weights; nothing is downloaded)")
    w.add_argument("--wan-s2v", default=None, metavar="DIR",
                   help="calibrate on diffsynth's Wan2.2-S2V pipeline from the model folder DIR instead")
    w.add_argument("--audio", default=None, help="calibration speech (any file PyAV reads)")
    w.add_argument("--image", default=None, help="the portrait to animate (PNG/JPEG)")
    w.add_argument("--mask", default=None, help="person/face mask image of the portrait (white = person)")
    w.add_argument("--prompt", default="a person talking", help="text prompt")
    w.add_argument("--device", default="cuda")
    c.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="what", required=True)
    bc = bsub.add_parser("cache", help="every cache method at several settings vs uncached, on held-out clips")
    bc.add_argument("--clips", type=int, default=6)
    bc.add_argument("--corpus", default="data/heldout")
    bc.add_argument("--methods", default=None, help="comma-separated subset, e.g. synccache,fora")
    bc.add_argument("--json", default=None)
    bc.add_argument("--plot", default=None, help="speed-quality Pareto PNG")
    bc.add_argument("--weights", default=None)
    bc.add_argument("--config", default=None)
    bc.add_argument("--quiet", action="store_true")
    bc.set_defaults(func=cmd_bench)
    bb = bsub.add_parser("batch", help="B sessions' chunks as one batch vs one after another (live SyncCache)")
    bb.add_argument("--sizes", default="1,2,4")
    bb.add_argument("--rounds", type=int, default=5)
    bb.add_argument("--threads", type=int, default=1, help="torch threads (the live worker uses 1)")
    bb.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    bb.add_argument("--json", default=None)
    bb.add_argument("--plot", default=None)
    bb.add_argument("--weights", default=None)
    bb.add_argument("--config", default=None)
    bb.add_argument("--quiet", action="store_true")
    bb.set_defaults(func=cmd_bench_batch)
    ba = bsub.add_parser("audio", help="the audio path (encoder, audio blocks) on each backend: step and chunk "
                         "ms, reuse-step cost c, parity with torch")
    ba.add_argument("--backends", default=None, help="comma-separated subset of torch,compile,onnxruntime,tensorrt "
                    "(default: every one available here)")
    ba.add_argument("--rounds", type=int, default=7)
    ba.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (the live worker uses 1)")
    ba.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                    help="torch autocast for the model around the audio path (ONNX Runtime runs fp32)")
    ba.add_argument("--device", default="cpu", help="cpu, or cuda: the audio path on the GPU (no chunk_ms there)")
    ba.add_argument("--json", default=None)
    ba.add_argument("--weights", default=None)
    ba.add_argument("--config", default=None)
    ba.add_argument("--quiet", action="store_true")
    ba.set_defaults(func=cmd_bench_audio)
    bw = bsub.add_parser("wan", help="Wan2.2-S2V-14B: FLOPs per step by part (meta device, no weights) and "
                         "the DiT speedup ceiling of the shipped schedules")
    bw.add_argument("--steps", type=int, default=40)
    bw.add_argument("--height", type=int, default=448)
    bw.add_argument("--width", type=int, default=832)
    bw.add_argument("--frames", type=int, default=80, help="video frames per chunk (4 per latent frame)")
    bw.add_argument("--json", default=None)
    bw.add_argument("--config", default=None)
    bw.set_defaults(func=cmd_bench_wan)

    x = sub.add_parser("export", help="the audio path (audio encoder, K/V, audio blocks) as ONNX graphs + manifest")
    x.add_argument("--out", required=True)
    x.add_argument("--opset", type=int, default=18)
    x.add_argument("--weights", default=None)
    x.add_argument("--config", default=None)
    x.set_defaults(func=cmd_export)
    bt = sub.add_parser("build-trt", help="TensorRT engines from `syncavatar export` graphs (NVIDIA GPU + tensorrt)")
    bt.add_argument("--onnx", required=True, help="the directory `syncavatar export --out` wrote")
    bt.add_argument("--force", action="store_true", help="rebuild even if the engine cache matches")
    bt.set_defaults(func=cmd_build_trt)

    e = sub.add_parser("eval", help="lip-sync metrics of a video (sync_conf, offset_frames, env_corr; "
                       "face_psnr with --avatar)")
    e.add_argument("--video", default=None)
    e.add_argument("--audio", default=None)
    e.add_argument("--truth", default=None, help="ground-truth openness (.npz corpus clip, .npy, .json)")
    e.add_argument("--json", action="store_true", help="one-line JSON")
    e.add_argument("--window", type=float, default=None,
                   help="also score every window of this many seconds (e.g. 60: per minute, for drift)")
    e.add_argument("--avatar", default=None,
                   help="identity in the video (e.g. 3): adds face_psnr (median over frames) and face_psnr_min")
    e.add_argument("--picture-stride", type=int, default=1, help="with --avatar: fit every Nth frame only")
    e.add_argument("--corpus", default=None, help="instead of --video: render and score a held-out corpus")
    e.add_argument("--clips", type=int, default=None, help="with --corpus: the first N clips only")
    e.add_argument("--steps", type=int, default=None, help="with --corpus: sampler steps")
    e.add_argument("--report", default=None, help="with --corpus: write the per-clip report JSON here")
    e.add_argument("--sheet", default=None, help="with --corpus: contact sheet PNG")
    e.add_argument("--weights", default=None, help="with --corpus: model weights (default: the shipped model)")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="the live avatar server: WebRTC mic in, avatar video + speech out")
    s.add_argument("--config", default=None)
    s.add_argument("--host", default=None, help="default: [server] host (127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="default: [server] port (8080)")
    s.add_argument("--telemetry", default=None, help="ZMQ PUB address, '' = off (default: [server] telemetry)")
    s.add_argument("--workers", type=int, default=None,
                   help="avatar-worker replicas on Ray Serve behind this front (default: [cluster] workers, 0 = "
                        "one process, no Ray)")
    s.set_defaults(func=cmd_serve)

    tl = sub.add_parser("telemetry", help="live table of a server's telemetry (ZMQ SUB)")
    tl.add_argument("--address", default=None, help="default: [server] telemetry of --config")
    tl.add_argument("--config", default=None)
    tl.add_argument("--session", default="", help="only this session id (prefix)")
    tl.add_argument("--csv", default=None, help="also append every message to this CSV")
    tl.add_argument("--types", default="chunk,second,decision,session", help="message types to show")
    tl.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    tl.add_argument("--idle-timeout", type=float, default=None, help="stop after this long without a message")
    tl.set_defaults(func=cmd_telemetry)

    cl = sub.add_parser("client", help="send an audio file as the mic to a server; record, measure latency")
    from clients.client import add_arguments
    add_arguments(cl)
    cl.set_defaults(func=cmd_client)

    sk = sub.add_parser("soak", help="N client sessions with turn-taking speech for M minutes: latency, fps, "
                        "A/V and server resources over time; exit 1 when a [soak] threshold is broken")
    from clients.soak import add_arguments as add_soak_arguments
    add_soak_arguments(sk)
    sk.set_defaults(func=cmd_soak)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"syncavatar {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"syncavatar {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
