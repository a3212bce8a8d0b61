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
