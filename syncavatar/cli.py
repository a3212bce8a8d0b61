"""The `syncavatar` command: thin subcommands over the packages that own the work.

Errors a user can cause (a missing or corrupt file, an unknown avatar) print one line to stderr and
exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user gave cannot be used; the message is one line."""


def _config(a):
    from syncavatar.config import DEFAULT_CONFIG, ConfigError, load_config
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
            train.train_dit(corpus, a.out, steps=a.dit_steps, preset=a.preset, init=a.init)
        elif stage == "expert":
            from engine.train_expert import train_expert
            train_expert(corpus, Path(a.out) / "lipsync_expert.safetensors", val_dir=a.val,
                         time_limit_s=a.expert_minutes * 60)
        elif stage == "export":
            train.export(a.out, Path(a.out) / "avatar.safetensors", preset=a.preset)


# ----------------------------------------------------------------------------------------- render
def cmd_render(a):
    import numpy as np

    from engine.generator import load_avatar, render_frames
    from engine.media import MediaError, load_audio, write_mp4
    from engine.model.avatar import load_model
    cfg = _config(a)
    a.avatar = a.avatar if a.avatar is not None else cfg.engine.avatar
    a.steps = a.steps if a.steps is not None else cfg.model.steps
    a.seed = a.seed if a.seed is not None else cfg.model.seed
    try:
        audio = load_audio(a.audio, 16000)
    except MediaError as e:
        raise UserError(str(e)) from None
    try:
        avatar = load_avatar(a.avatar)
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.steps < 1:
        raise UserError("--steps must be >= 1")
    model = load_model(a.weights or cfg.path(cfg.model.weights))
    cache = None
    if a.cache == "synccache":
        from synccache import SyncCacheConfig
        cache = SyncCacheConfig(**({"threshold": a.cache_threshold} if a.cache_threshold is not None else {}))
    elif a.cache_threshold is not None:
        raise UserError("--cache-threshold needs --cache synccache")
    frames, stats = render_frames(model, avatar, audio, steps=a.steps, seed=a.seed, progress=not a.quiet,
                                  cache=cache)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, frames, 25, audio, 16000)
    if a.frames_out:
        np.save(a.frames_out, frames)
    stats = {"out": str(out), "avatar": str(a.avatar)} | stats
    if a.json:
        Path(a.json).write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


# ------------------------------------------------------------------------------------------- eval
def cmd_eval(a):
    from engine.lipsync import evaluate
    from engine.media import MediaError
    if a.corpus:
        return _eval_corpus(a)
    if not a.video:
        raise UserError("give --video V.mp4 (one clip) or --corpus DIR (held-out corpus report)")
    try:
        res = evaluate(a.video, a.audio, a.truth)
    except MediaError as e:
        raise UserError(str(e)) from None
    res = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))


def _eval_corpus(a):
    from engine.report import evaluate_corpus
    report = evaluate_corpus(a.corpus, clips=a.clips, steps=a.steps, sheet=a.sheet)
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
    t.add_argument("--stage", default="all", choices=["all", "ae", "latents", "dit", "expert", "export"])
    t.add_argument("--preset", default="ref-S")
    t.add_argument("--ae-steps", type=int, default=3000)
    t.add_argument("--dit-steps", type=int, default=6000)
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
    r.add_argument("--config", default=None, help="TOML config (default configs/default.toml)")
    r.add_argument("--json", default=None, help="write stats JSON here")
    r.add_argument("--frames-out", default=None, help="save the exact RGB frames as .npy (T x H x W x 3)")
    r.add_argument("--weights", default=None)
    r.add_argument("--cache", default="none", choices=["none", "synccache"],
                   help="accelerate the DiT with SyncCache (issue 3, in progress: not yet calibrated)")
    r.add_argument("--cache-threshold", type=float, default=None)
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_render)

    e = sub.add_parser("eval", help="lip-sync metrics of a video (sync_conf, offset_frames, env_corr)")
    e.add_argument("--video", default=None)
    e.add_argument("--audio", default=None)
    e.add_argument("--truth", default=None, help="ground-truth openness (.npz corpus clip, .npy, .json)")
    e.add_argument("--json", action="store_true", help="one-line JSON")
    e.add_argument("--corpus", default=None, help="instead of --video: render and score a held-out corpus")
    e.add_argument("--clips", type=int, default=None, help="with --corpus: the first N clips only")
    e.add_argument("--steps", type=int, default=None, help="with --corpus: sampler steps")
    e.add_argument("--report", default=None, help="with --corpus: write the per-clip report JSON here")
    e.add_argument("--sheet", default=None, help="with --corpus: contact sheet PNG")
    e.set_defaults(func=cmd_eval)
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
