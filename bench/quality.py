"""Quality benchmark: on a small base model that knows its world (bench/train_base.py), which
of PaRa paper, PaRa reference and ComfyUI's LoRA personalizes, combines subjects without
training, and edits from a single image?

    python bench/quality.py [--out DIR] [--quick] [--ckpt FILE] [--steps N] [--seeds S ...]
                            [--lr para=.. para_ref=.. lora=..] [--no-pilot] [--only TASK ...]
    # the same in two processes (two CPU cores), then one report:
    python bench/quality.py --only instance --out A &
    python bench/quality.py --only concept --lr-from A/pilot_lr.json --out B &
    python bench/quality.py --only multi edit --lr-from A/pilot_lr.json --out C
    python bench/quality.py --combine A B C

Everything runs through ComfyUI's own nodes, called in-process: CheckpointLoaderSimple,
CLIPTextEncode, VAEEncode, KSampler (common_ksampler), VAEDecode, LoraLoader's loader
(comfy.sd.load_lora_for_models), and this pack's PaRaTrainer, PaRaMerge and PaRaApply.

The methods, on the same layers (the base's live layers, train_base.LIVE_LAYER_PATTERNS), steps,
data, loop and seeds: PaRa Trainer with parametrization `paper` (B only, W0 - Q Q^T W0,
r*out parameters per layer) and `reference` (init `reference`: U and D free, W0 - U D,
r*(out + in) parameters, the authors' code), and ComfyUI's own LoRA training adapter
(comfy.weight_adapter LoRAAdapter.create_train, the module TrainLoraNode trains) inside the
PaRa Trainer's loop (nodes/training.TrainingRun), loaded back through ComfyUI's stock LoRA
loader. Equal rank (r=4: LoRA has the reference's parameter count) and LoRA r=1 at about the
paper parametrization's count. Each method's learning rate comes from a pilot on a seed the
comparison does not use (section 0 of the report).

Tasks: 0. the pilot; 1. an instance subject (a known class with a mark the base never draws);
2. a novel-shape subject; 3. two instance subjects combined without training; 4. single-image
editing on sources the base cannot draw from their caption (bench/editing.py: one layer, its own
learning-rate pilot on another source, 4 sources x 3 seeds). Writes DIR/quality.md (tables),
DIR/*.png (sample grids, one per row) and DIR/quality.json, and prints as its last line a RESULT
line (base_*_acc, instance_fidelity_*, concept_fidelity_*, prompt_fidelity_*, drift_*,
multi_both_present_*, base_recon, edit_recon_*, edit_joint_*, edit_success_*, edit_consistency_*,
edit_ci_*_minus_lora_lo/_hi, and the judges' controls ctl_*; the suffixes para, para_ref, lora;
means over seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if __package__ in (None, ""):  # run as a script: the repo root makes harness/ and bench/ importable
    sys.path.insert(0, str(ROOT))

from bench import judges as judges_mod  # noqa: E402
from bench import train_base  # noqa: E402
from bench import editing  # noqa: E402
from bench import world  # noqa: E402

NEGATIVE = ""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

# The three methods at equal rank, and LoRA at (about) PaRa paper's parameter count:
# (row label, method key, rank or None for Settings.rank). Method keys: "para" (PaRa Trainer,
# parametrization paper), "para_ref" (parametrization reference, init reference: the authors'
# code), "lora" (ComfyUI's LoRA training adapter).
METHODS = (("PaRa paper", "para", None), ("PaRa reference", "para_ref", None), ("LoRA", "lora", None),
           ("LoRA r=1 (~ PaRa paper's params)", "lora", 1))
METHOD_KEYS = ("para", "para_ref", "lora")


@dataclass
class Settings:
    rank: int = 4
    steps: int = 100
    batch_size: int = 2
    # learning rates when no pilot runs (--no-pilot); a full run takes them from its pilot
    lr: Dict[str, float] = field(default_factory=lambda: {"para": 2e-2, "para_ref": 5e-3, "lora": 5e-3})
    pilot_lrs: Dict[str, Sequence[float]] = field(default_factory=lambda: {
        "para": (0.01, 0.04, 0.1, 0.25), "para_ref": (0.002, 0.008, 0.02), "lora": (0.002, 0.008, 0.02)})
    pilot: bool = True
    lr_from: Optional[Path] = None  # another part's pilot_lr.json (parts run in parallel)
    pilot_seed: int = 100
    seeds: Sequence[int] = (0, 1, 2)
    per_prompt: int = 4          # images per prompt (one KSampler batch, one noise seed)
    sample_steps: int = 8
    cfg: float = 2.0   # the previous base drew its shapes best there (held-out shape 0.73; cfg 4: 0.65)
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    # single-image editing (bench/editing.py) at the authors' settings, scaled: they train one
    # layer (the last middle-block conv) 1000 steps at ranks 2/16/128 on SDXL; here that layer
    # of the base, 400 steps at rank 4, a learning rate per method from a pilot on another source
    edit_steps: int = 400
    edit_rank: int = 4
    edit_layer: str = editing.EDIT_LAYER
    edit_seeds: Sequence[int] = (0, 1, 2)
    edit_sources: int = 0         # > 0: only the first that many sources (tests)
    edit_samples: int = 8         # samples of the source caption (different noise) per model
    edit_pilot_lrs: Dict[str, Sequence[float]] = field(default_factory=lambda: {
        "para": (0.01, 0.03, 0.1), "para_ref": (0.003, 0.01, 0.03), "lora": (0.003, 0.01, 0.03)})
    instance: bool = True
    concept: bool = True
    multi: bool = True
    edit: bool = True
    base_eval_prompts: int = 12   # held-out captions for the base model's prompt accuracy
    prompts_limit: int = 0        # > 0: only that many prompts per list (tests)
    subject_prompts: int = 3      # recontextualization prompts per subject
    drift_prompts: int = 2
    multi_prompts: int = 2
    judge_train: int = 1500       # ground-truth scenes the shape judge is trained on
    judge_validate: int = 300

    @classmethod
    def quick(cls):
        return cls(steps=2, batch_size=1, seeds=(0,), per_prompt=2, sample_steps=1, edit_steps=2,
                   base_eval_prompts=1, prompts_limit=1, judge_train=150, judge_validate=30,
                   pilot_lrs={"para": (0.02,), "para_ref": (0.004,), "lora": (0.004,)},
                   edit_seeds=(0,), edit_sources=1, edit_samples=2,
                   edit_pilot_lrs={"para": (0.02,), "para_ref": (0.004,), "lora": (0.004,)})

    def limit(self, items):
        return list(items)[:self.prompts_limit] if self.prompts_limit else list(items)


# The novel-shape subject (a shape the base never saw), named by a trigger word.
SUBJECTS = {
    "bar": {"trigger": "sks", "train": [("yellow", "large", "blue"), ("red", "large", "white"),
                                         ("green", "small", "gray"), ("yellow", "small", "red")]},
}
A = "bar"
# Prompts that recontextualize it: colours/backgrounds not in its training combos.
SUBJECT_PROMPTS = {
    "bar": [("blue", "large", "white"), ("red", "large", "gray"), ("green", "large", "blue"), ("yellow", "large", "gray")],
}
# Instance subjects (DreamBooth-like): a specific object of a class the base knows, with a mark
# the base never draws. Trained on 4 large images on white and gray backgrounds, named
# "a large <trigger> <class>"; asked for on other backgrounds. Both are squares: the previous base
# drew large circles as rounded squares (with a yellow-circle instance, PaRa paper's seed 0 drew the
# mark in 10 of 12 images and a circle in none), and a dot or band does not fit inside a triangle.
INSTANCES = {
    "sks": {"shape": "square", "colour": "yellow", "detail": "dot", "train_bgs": ("white", "gray", "white", "gray"),
            "prompts": [("large", "red"), ("large", "blue"), ("large", "gray")]},
    "ohwx": {"shape": "square", "colour": "red", "detail": "band", "train_bgs": ("white", "gray", "white", "gray"),
            "prompts": [("large", "blue"), ("large", "gray"), ("large", "white")]},
}
IA, IB = "sks", "ohwx"
DRIFT_PROMPTS = ["a large red circle on a white background", "a large green square on a blue background",
                 "a large yellow triangle on a gray background"]
MULTI_BGS = ["white", "gray"]



def instance_caption(trigger, size, bg):
    return f"a {size} {trigger} {INSTANCES[trigger]['shape']} on a {bg} background"


def caption(shape, colour, size, bg, names=None):
    return world.Scene((world.Obj(shape, colour, size),), bg).caption(names)


# --------------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------------

class Comfy:
    """ComfyUI in this process with the base checkpoint loaded through CheckpointLoaderSimple."""

    def __init__(self, ckpt: Path, base_dir: Path):
        from harness import comfyui
        comfyui.setup_comfy(base_directory=base_dir)
        import torch
        import nodes
        import comfy.sd
        self.torch, self.nodes, self.comfy_sd = torch, nodes, comfy.sd
        import comfy.utils
        comfy.utils.PROGRESS_BAR_ENABLED = False
        import folder_paths  # (ComfyUI may already be configured, e.g. by the tests: use its folders)
        link = Path(folder_paths.get_folder_paths("checkpoints")[0]) / ckpt.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(ckpt)
        self.pack = comfyui.import_pack()
        self.pack.nodes.setup()
        from importlib import import_module
        self.pn = import_module(self.pack.__name__ + ".nodes.para_nodes")
        self.trainer_mod = import_module(self.pack.__name__ + ".nodes.trainer_node")
        self.training = import_module(self.pack.__name__ + ".nodes.training_loop")
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[:3]
        self._cond = {}

    def cond(self, text):
        if text not in self._cond:
            self._cond[text] = self.nodes.CLIPTextEncode().encode(self.clip, text)[0]
        return self._cond[text]

    def encode_images(self, imgs: np.ndarray):
        px = self.torch.from_numpy(imgs.astype(np.float32) / 255.0)
        return self.nodes.VAEEncode().encode(self.vae, px)[0]

    def sample(self, model, text, n, seed, s: Settings) -> np.ndarray:
        latent = {"samples": self.torch.zeros(n, 4, world.LATENT, world.LATENT)}
        out = self.nodes.common_ksampler(model, seed, s.sample_steps, s.cfg, s.sampler, s.scheduler,
                                         self.cond(text), self.cond(NEGATIVE), latent)[0]
        img = self.nodes.VAEDecode().decode(self.vae, out)[0]
        return (img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    # ---- training ----------------------------------------------------------------------
    def train_para(self, images, captions, s: Settings, seed, steps=None, layers=None, lr=None, rank=None,
                   parametrization="paper"):
        """PaRa Trainer. parametrization "reference" uses init "reference" (B0 = 0: the authors' code)."""
        T = self.trainer_mod.PaRaTrainer
        kw = {}
        if parametrization != "paper":
            kw["parametrization"] = parametrization
        out = T.execute(model=self.model, latents=self.encode_images(images),
                        positive=[self.cond(c)[0] for c in captions], rank=rank or s.rank,
                        layers="noxattn", rank_cap="none", steps=steps or s.steps,
                        learning_rate=lr or s.lr["para"], optimizer="AdamW", batch_size=s.batch_size, seed=seed,
                        training_dtype="fp32", gradient_checkpointing=False,
                        init="reference" if parametrization == "reference" else "kaiming", save_every=0,
                        filename_prefix="quality", resume_from="[none]",
                        custom_layers=layers or train_base.LIVE_LAYER_PATTERNS, trigger_words="", **kw)
        model, para, loss, _ = out.args[:4]
        return model, para, loss["loss"]

    def train(self, key, images, captions, s: Settings, seed, rank=None, steps=None, layers=None, lr=None):
        """One method: (model with the adapter, adapter (PaRa state or LoRA state dict), losses, params)."""
        lr = lr or s.lr[key]
        if key == "lora":
            sd, losses, n = self.train_lora(images, captions, s, seed, rank or s.rank, steps=steps, layers=layers, lr=lr)
            return self.with_lora(self.model, sd), sd, losses, n
        model, para, losses = self.train_para(images, captions, s, seed, steps=steps, layers=layers, lr=lr, rank=rank,
                                              parametrization="reference" if key == "para_ref" else "paper")
        return model, para, losses, para_params(para)

    def train_lora(self, images, captions, s: Settings, seed, rank, steps=None, layers=None, lr=None):
        """ComfyUI's LoRA training adapter on the same layers, in the same loop as PaRa."""
        torch = self.torch
        from comfy.weight_adapter import adapter_maps
        tr, tm = self.training, self.trainer_mod
        from importlib import import_module
        patching = import_module(self.pack.__name__ + ".nodes.patching")
        layer_op = import_module(self.pack.__name__ + ".para_core.functional.base").layer_op
        shapes = patching.layer_shapes(self.model)
        spec = layers or train_base.LIVE_LAYER_PATTERNS
        names = tm.choose_layers(shapes, spec, "custom_layers", "SD15")
        modules = tm.layer_modules(self.model, names, "custom_layers")
        gen = tr.generator_for(seed, "init")
        adapters = {}
        with torch.inference_mode(False):
            for n in names:
                w = patching.original_weight(self.model, n).float()
                torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
                adapters[n] = adapter_maps["LoRA"].create_train(w, rank=rank, alpha=1.0)
        fwd = lora_forward(tr, layer_op, modules, adapters)
        settings = tr.TrainSettings(steps=steps or s.steps, learning_rate=lr or s.lr["lora"], optimizer="AdamW",
                                    batch_size=s.batch_size, seed=seed, dtype="fp32", gradient_checkpointing=False)
        run = tr.TrainingRun(self.model, self.encode_images(images).get("samples").detach().float(),
                             [self.cond(c)[0] for c in captions], fwd, settings)
        losses = run.run()
        lora_sd = {}
        for n, a in adapters.items():
            up, down = a.lora_up.weight.detach().float(), a.lora_down.weight.detach().float()
            wshape = shapes[n]
            if len(wshape) == 4:
                up = up.reshape(up.shape[0], up.shape[1], 1, 1)
                down = down.reshape(down.shape[0], *wshape[1:])
            lora_sd[f"{n}.lora_up.weight"] = up.clone()
            lora_sd[f"{n}.lora_down.weight"] = down.clone()
            lora_sd[f"{n}.alpha"] = torch.tensor(float(a.alpha))
        nparams = sum(p.numel() for a in adapters.values() for p in (a.lora_up.weight, a.lora_down.weight))
        return lora_sd, losses, nparams

    def with_lora(self, model, lora_sd, strength=1.0):
        m, _ = self.comfy_sd.load_lora_for_models(model, None, lora_sd, strength, 0)
        return m

    def merge(self, mode, a, b):
        return self.pn.PaRaMerge.execute(mode=mode, para_1=a, strength_1=1.0, para_2=b, strength_2=1.0).args[0]

    def apply(self, para, strength=1.0):
        return self.pn.PaRaApply.execute(model=self.model, para=para, strength=strength).args[0]


def lora_forward(training, layer_op, modules, adapters):
    """The PaRa trainer's layer hook (training.LayerForwards) with ComfyUI's LoraDiff in place of
    the reduction: each layer runs with W0 + (alpha/r) up @ down (and its own bias)."""

    class LoraForward(training.LayerForwards):
        def parameters(self):
            return [p for a in adapters.values() for p in (a.lora_up.weight, a.lora_down.weight)]

        def _forward_for(self, name, module):
            op, adapter = layer_op(module), adapters[name]
            cdim = -1 if module.weight.dim() == 2 else 1

            def forward(x, *args, **kwargs):
                W0, b = training._weight_and_bias(module, x)
                y = op(x, adapter(W0.float()).to(x.dtype))
                if b is not None:
                    shape = [1] * y.dim()
                    shape[cdim] = -1
                    y = y + b.reshape(shape)
                return y
            return forward

    return LoraForward(modules)

# --------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------

def main_object(seen):
    return seen[0] if seen else None


def pairwise_distance(imgs: np.ndarray) -> float:
    """Mean RMS pixel distance (0..1) between the images of one batch: diversity."""
    x = imgs.astype(np.float32) / 255.0
    d = [np.sqrt(((x[i] - x[j]) ** 2).mean()) for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean(d)) if d else 0.0


def rms(a, b) -> float:
    return float(np.sqrt(((a.astype(np.float32) - b.astype(np.float32)) ** 2).mean()) / 255.0)


def grid(rows: List[np.ndarray], path: Path):
    from PIL import Image
    h = max(len(r) for r in rows)
    canvas = np.full((len(rows) * 66, h * 66, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            canvas[i * 66 + 1:i * 66 + 65, j * 66 + 1:j * 66 + 65] = img
    Image.fromarray(canvas).save(path)


def mean_sd(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values):
    m, sd = mean_sd(values)
    return f"{m:.2f} ± {sd:.2f}" if len(values) > 1 else f"{m:.2f}"


# --------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------

def subject_data(name):
    rng = random.Random(hash_key(name))
    trig = SUBJECTS[name]["trigger"]
    scenes = [world.Scene((world.Obj(name, c, z, *world.place(rng, z)),), b) for c, z, b in SUBJECTS[name]["train"]]
    imgs = np.stack([world.render(sc) for sc in scenes])
    caps = [sc.caption({name: trig}) for sc in scenes]
    return imgs, caps


def instance_obj(trigger, size, cx=0.5, cy=0.5):
    i = INSTANCES[trigger]
    return world.Obj(i["shape"], i["colour"], size, cx, cy, i["detail"])


def instance_data(trigger):
    """4 large images of the instance (at the layout's centre, jittered) on its training backgrounds."""
    rng = random.Random(hash_key("instance-" + trigger))
    scenes = [world.Scene((instance_obj(trigger, "large", *world.place(rng, "large")),), bg)
              for bg in INSTANCES[trigger]["train_bgs"]]
    return np.stack([world.render(sc) for sc in scenes]), [instance_caption(trigger, "large", bg) for bg in INSTANCES[trigger]["train_bgs"]]


def hash_key(s):
    return sum(ord(c) * 31 ** i for i, c in enumerate(s)) % (2 ** 31)


def eval_drift(cf: Comfy, J, model, s: Settings, base_drift_imgs):
    """RMS pixel change of unrelated base prompts vs the base model, and whether their judged
    shape/colour/background stayed."""
    drift, kept, rows = [], [], []
    for k, text in enumerate(s.limit(DRIFT_PROMPTS[:s.drift_prompts])):
        imgs = cf.sample(model, text, s.per_prompt, 5000 + k, s)
        rows.append(imgs)
        for img, ref in zip(imgs, base_drift_imgs[text]):
            drift.append(rms(img, ref))
            a, r = J.describe(img), J.describe(ref)
            oa, orf = main_object(a["objects"]), main_object(r["objects"])
            kept.append(bool(a["background"] == r["background"] and (oa and orf and (oa.shape, oa.colour) == (orf.shape, orf.colour))
                             or (oa is None and orf is None)))
    return dict(drift_rms=float(np.mean(drift)), drift_kept=float(np.mean(kept))), rows


def eval_subject(cf: Comfy, J, model, name, s: Settings, seed, base_drift_imgs):
    """Novel shape: concept fidelity, prompt fidelity, diversity, drift of one adapted model."""
    trig = SUBJECTS[name]["trigger"]
    concept, prompt, both, div, rows = [], [], [], [], []
    for k, (c, z, b) in enumerate(s.limit(SUBJECT_PROMPTS[name][:s.subject_prompts])):
        imgs = cf.sample(model, caption(name, c, z, b, {name: trig}), s.per_prompt, 1000 + 17 * seed + k, s)
        rows.append(imgs)
        for img in imgs:
            d = J.describe(img)
            o = main_object(d["objects"])
            is_c = o is not None and o.shape == name
            fits = o is not None and o.colour == c and d["background"] == b
            concept.append(is_c); prompt.append(fits); both.append(is_c and fits)
        div.append(pairwise_distance(imgs))
    dr, drows = eval_drift(cf, J, model, s, base_drift_imgs)
    return dict(fidelity=float(np.mean(concept)), prompt_fidelity=float(np.mean(prompt)),
                both=float(np.mean(both)), diversity=float(np.mean(div)), **dr), rows + drows


def eval_instance(cf: Comfy, J, model, trigger, s: Settings, seed, base_drift_imgs=None, prompts=None):
    """Instance: fidelity (class shape, body colour and mark all judged right), its parts, prompt
    fidelity (background and size as asked), both, diversity, drift."""
    inst = INSTANCES[trigger]
    fid, parts, prompt, both, div, rows = [], {"shape": [], "colour": [], "detail": []}, [], [], [], []
    for k, (z, b) in enumerate(s.limit(prompts or INSTANCES[trigger]["prompts"][:s.subject_prompts])):
        imgs = cf.sample(model, instance_caption(trigger, z, b), s.per_prompt, 2000 + 17 * seed + k, s)
        rows.append(imgs)
        for img in imgs:
            r = J.instance(img, inst["shape"], inst["colour"], inst["detail"])
            d = J.describe(img)
            o = main_object(d["objects"])
            fits = o is not None and o.size == z and d["background"] == b
            fid.append(r["all"]); prompt.append(fits); both.append(r["all"] and fits)
            for key in parts:
                parts[key].append(r[key])
        div.append(pairwise_distance(imgs))
    res = dict(fidelity=float(np.mean(fid)), prompt_fidelity=float(np.mean(prompt)), both=float(np.mean(both)),
               diversity=float(np.mean(div)), **{f"{k}_ok": float(np.mean(v)) for k, v in parts.items()})
    if base_drift_imgs is not None:
        dr, drows = eval_drift(cf, J, model, s, base_drift_imgs)
        res.update(dr)
        rows += drows
    return res, rows


def para_params(para) -> int:
    if hasattr(para, "num_params"):
        return int(para.num_params())
    return int(sum(b.numel() for b in para.B.values())) if getattr(para, "B", None) else 0


def lora_param_count(shapes, names, r):
    return sum(r * (shp[0] + int(np.prod(shp[1:]))) for n, shp in shapes.items() if n in names)


def run(out: Path, s: Settings, ckpt: Optional[Path] = None) -> Dict:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt or train_base.ensure_base()
    base_dir = Path(tempfile.mkdtemp(prefix="para-quality-"))
    import torch
    grad = torch.is_grad_enabled()  # _run turns it off; callers in the same process (tests) get it back
    try:
        return _run(out, s, ckpt, base_dir, t_start)
    finally:
        torch.set_grad_enabled(grad)
        shutil.rmtree(base_dir, ignore_errors=True)


def _fn(prefix, label):
    return prefix + "".join(ch if ch.isalnum() else "_" for ch in label) + ".png"


def method_rows(s: Settings):
    return [(label if r else f"{label} r={s.rank}", key, r or s.rank) for label, key, r in METHODS]


def run_pilot(cf: Comfy, J, s: Settings, out: Path, md: List[str]) -> Dict[str, float]:
    """Learning rate per method (rank s.rank) from a pilot on the instance task at a seed the
    benchmark does not use (s.pilot_seed): the rate with the highest instance fidelity, ties
    broken by prompt fidelity, then by the lower final loss."""
    log("pilot")
    imgs, caps = instance_data(IA)
    rows, best = [], {}
    for key in METHOD_KEYS:
        cands = []
        for lr in s.pilot_lrs[key]:
            t0 = time.time()
            model, _, loss, _ = cf.train(key, imgs, caps, s, s.pilot_seed, lr=lr)
            r, _ = eval_instance(cf, J, model, IA, s, s.pilot_seed, prompts=INSTANCES[IA]["prompts"][:2])
            fl = float(np.mean(loss[-10:]))
            rows.append((key, lr, r["fidelity"], r["prompt_fidelity"], fl, time.time() - t0))
            cands.append((r["fidelity"], r["prompt_fidelity"], -fl if math.isfinite(fl) else -1e9, lr))
            log(f"pilot {rows[-1]}")
        best[key] = max(cands)[3]
    md += [f"## 0. Learning-rate pilot (instance '{IA}', seed {s.pilot_seed}, rank {s.rank}, {s.steps} steps; "
           f"{2 * s.per_prompt} images per rate)", "",
           "| method | lr | instance fidelity | prompt fidelity | final loss | seconds | chosen |", "|---|---|---|---|---|---|---|"]
    md += [f"| {k} | {lr:g} | {f:.2f} | {p:.2f} | {l:.4f} | {t:.0f} | {'**yes**' if best[k] == lr else ''} |"
           for k, lr, f, p, l, t in rows]
    md.append("")
    return best


def _run(out, s, ckpt, base_dir, t_start):
    cf = Comfy(ckpt, base_dir)
    import torch
    torch.set_grad_enabled(False)
    from importlib import import_module
    patching = import_module(cf.pack.__name__ + ".nodes.patching")
    decoder = cf.vae.first_stage_model.taesd_decoder
    judge_cache = None if s.prompts_limit else train_base.cache_dir() / f"judges_v{judges_mod.JUDGE_VERSION}_{ckpt.stat().st_mtime_ns}.pt"
    J = judges_mod.judges_for(decoder.float(), judge_cache, n=s.judge_train)
    results: Dict = {"settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                                  for k, v in s.__dict__.items()}}
    md = ["# PaRa quality benchmark", ""]

    # ---- judges and base model -------------------------------------------------------------
    jv = J.validate(n=s.judge_validate, decoder=decoder)
    jv.update(instance_judge_accuracy(J, decoder, n=max(4, s.judge_validate // 10)))
    results["judges"] = jv
    log(f"judges: {jv}")
    ctl = controls(J, decoder)
    results["controls"] = ctl
    log(f"controls: {ctl}")
    md += ["## Judge controls", "",
           "Each metric on rendered ground truth, and through the model's autoencoder (`recon_`: what a "
           "generated image looks like to the judges), and on a known negative (`neg_`: must be low). "
           "ctl_* in the RESULT line are the decoded ground truth (the worse of gt and recon).", "",
           "| control | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ctl.items()] + [""]
    base_acc, base_rows = base_prompt_accuracy(cf, J, s)
    results["base"] = base_acc
    results["base_train_captions"], train_rows = base_prompt_accuracy(cf, J, s, "train")
    grid(train_rows, out / "base_train.png")
    log(f"base on training captions: {results['base_train_captions']}")
    grid(base_rows, out / "base_heldout.png")
    log(f"base: {base_acc}")
    shapes = patching.layer_shapes(cf.model)
    names = cf.trainer_mod.choose_layers(shapes, train_base.LIVE_LAYER_PATTERNS, "custom_layers", "SD15")
    base_drift = {t: cf.sample(cf.model, t, s.per_prompt, 5000 + k, s) for k, t in enumerate(s.limit(DRIFT_PROMPTS[:s.drift_prompts]))}
    rows_m = method_rows(s)

    # ---- 0. learning-rate pilot ----------------------------------------------------------------
    md.append(SECTION.format("pilot"))
    if s.pilot:
        s.lr = run_pilot(cf, J, s, out, md)
        _atomic_write(out / "pilot_lr.json", json.dumps(s.lr))
    elif s.lr_from:
        s.lr = wait_for_lrs(s.lr_from)
    results["lr"] = dict(s.lr)
    log(f"learning rates: {s.lr}")
    common = (f"Training: {s.steps} steps, batch {s.batch_size}, AdamW, fp32, learning rates {s.lr} "
              f"({'from the pilot above' if s.pilot or s.lr_from else 'given'}), the {len(names)} live layers of the base "
              f"(train_base.LIVE_LAYER_PATTERNS), seeds {list(s.seeds)}; PaRa rank_cap none, init kaiming (paper) / "
              f"reference (reference); sampling {s.sampler}/{s.scheduler} {s.sample_steps} steps cfg {s.cfg}, "
              f"{s.per_prompt} images per prompt. Drift: RMS pixel change of {len(s.limit(DRIFT_PROMPTS[:s.drift_prompts]))} "
              "unrelated base prompts vs the base model (same seeds); 'kept': their judged shape/colour/background unchanged.")

    def table(task, title, intro, data_fn, eval_fn, header):
        per, rows_by, adapters = {}, {}, {}
        imgs, caps = data_fn()
        for seed in s.seeds:
            for label, key, rank in rows_m:
                tt = time.time()
                model, adapter, loss, npar = cf.train(key, imgs, caps, s, seed, rank=rank)
                adapters[(label, seed)] = adapter
                r, rows = eval_fn(model, seed)
                log(f"{task} {label} seed {seed}: {time.time() - tt:.0f}s, loss {np.mean(loss[:5]):.3f} -> "
                    f"{np.mean(loss[-5:]):.3f}, {npar} params: {r}")
                per.setdefault(label, []).append(dict(r, params=npar, seconds=time.time() - tt))
                rows_by.setdefault(label, rows)
        r0, rows0 = eval_fn(cf.model, s.seeds[0])
        per["base model (no adapter)"] = [dict(r0, params=0, seconds=0)]
        rows_by["base model (no adapter)"] = rows0
        md.extend([title, "", intro, common, "",
                   f"| method | params | {header} | prompt fidelity | both | diversity | drift (RMS) | base prompts kept | grid |",
                   "|---|---|---|---|---|---|---|---|---|"])
        for label, rs in per.items():
            fn = _fn(f"{task}_", label)
            grid(rows_by[label], out / fn)
            md.append(f"| {label} | {rs[0]['params']} | {fmt([r['fidelity'] for r in rs])} | "
                      f"{fmt([r['prompt_fidelity'] for r in rs])} | {fmt([r['both'] for r in rs])} | "
                      f"{fmt([r['diversity'] for r in rs])} | {fmt([r['drift_rms'] for r in rs])} | "
                      f"{fmt([r['drift_kept'] for r in rs])} | [{fn}]({fn}) |")
        md.append("")
        return per, adapters

    # ---- 1. instance subject ---------------------------------------------------------------------
    md.append(SECTION.format("instance"))
    inst_adapters = {}
    if s.instance:
        log("instance subject")
        i = INSTANCES[IA]
        results["instance"], inst_adapters = table(
            "instance", f"## 1. Instance subject ('{IA}': a {i['colour']} {i['shape']} with a {world.DETAIL_COLOURS[i['detail']]} "
            f"{i['detail']}, {len(i['train_bgs'])} images)",
            f"Instance fidelity: the main object is judged a {i['shape']}, {i['colour']}, with the "
            f"{world.DETAIL_COLOURS[i['detail']]} {i['detail']} (the base never draws a mark). Prompt fidelity: size and "
            f"background as asked ({len(s.limit(i['prompts'][:s.subject_prompts]))} prompts, backgrounds "
            f"{[b for _, b in i['prompts']]}; training backgrounds {sorted(set(i['train_bgs']))}).",
            lambda: instance_data(IA), lambda m, seed: eval_instance(cf, J, m, IA, s, seed, base_drift), "instance fidelity")

    # ---- 2. novel shape ---------------------------------------------------------------------------
    md.append(SECTION.format("concept"))
    if s.concept:
        log("novel shape subject")
        results["concept"], _ = table(
            "concept", f"## 2. Novel-shape subject ('{A}', trigger '{SUBJECTS[A]['trigger']}', {len(SUBJECTS[A]['train'])} images)",
            f"Concept fidelity: the main object is judged a {A} (a shape the base never saw). Prompt fidelity: its colour and "
            "the background follow the prompt (colour/background combinations absent from the training images).",
            lambda: subject_data(A), lambda m, seed: eval_subject(cf, J, m, A, s, seed, base_drift), "concept fidelity")

    # ---- 3. two instances combined without training -------------------------------------------------
    md.append(SECTION.format("multi"))
    if s.multi:
        log("multi-subject")
        seed = s.seeds[0]
        imgs_a, caps_a = instance_data(IA)
        imgs_b, caps_b = instance_data(IB)
        ib = INSTANCES[IB]
        lab = {key: label for label, key, _ in rows_m[:3]}
        other = {key: cf.train(key, imgs_b, caps_b, s, seed)[1] for key in METHOD_KEYS}
        # section 1's adapters when it ran in this process, else the same training again
        mine = {key: inst_adapters[(lab[key], seed)] if (lab[key], seed) in inst_adapters
                else cf.train(key, imgs_a, caps_a, s, seed)[1] for key in METHOD_KEYS}
        variants = {f"PaRa paper merge {mode}": cf.apply(cf.merge(mode, mine["para"], other["para"]))
                    for mode in ("sum", "union", "sequential")}
        variants["PaRa reference merge sum"] = cf.apply(cf.merge("sum", mine["para_ref"], other["para_ref"]))
        variants[f"LoRA r={s.rank} stacked"] = cf.with_lora(cf.with_lora(cf.model, mine["lora"]), other["lora"])
        variants["base model (no adapter)"] = cf.model
        multi = {}
        md += [f"## 3. Two instances combined without training ('{IA}' {INSTANCES[IA]['shape']} + '{IB}': a {ib['colour']} "
               f"{ib['shape']} with a {world.DETAIL_COLOURS[ib['detail']]} {ib['detail']}; seed {seed})", "",
               "Each adapter trained alone (section 1's settings), then merged (PaRa Merge) or stacked (two LoRA loads). "
               f"Prompt: 'a small {IA} {INSTANCES[IA]['shape']} and a small {IB} {ib['shape']} on a <bg> background' "
               f"(backgrounds {MULTI_BGS}). Both present: the image shows a {INSTANCES[IA]['colour']} {INSTANCES[IA]['shape']} "
               f"and a {ib['colour']} {ib['shape']} (class and body colour; the prompt names neither colour); with marks: "
               "both marks judged too (hard at the small size two objects need). Alone: instance fidelity of each "
               "instance's own large prompt under the combination.", "",
               "| combination | both present | both with marks | " + f"'{IA}' alone | '{IB}' alone | grid |",
               "|---|---|---|---|---|---|"]
        for label, model in variants.items():
            both, marks, rows = [], [], []
            for k, bg in enumerate(s.limit(MULTI_BGS[:s.multi_prompts])):
                text = f"a small {IA} {INSTANCES[IA]['shape']} and a small {IB} {ib['shape']} on a {bg} background"
                imgs = cf.sample(model, text, s.per_prompt, 7000 + k, s)
                rows.append(imgs)
                for img in imgs:
                    ia = INSTANCES[IA]  # two different objects, never one fused blob
                    both.append(J.both_present(img, (ia["shape"], ia["colour"]), (ib["shape"], ib["colour"])))
                    marks.append(J.both_present(img, (ia["shape"], ia["colour"], ia["detail"]),
                                                (ib["shape"], ib["colour"], ib["detail"])))
            alone = {}
            for trig in (IA, IB):
                r, rr = eval_instance(cf, J, model, trig, s, seed, prompts=INSTANCES[trig]["prompts"][:1])
                rows += rr
                alone[trig] = r["fidelity"]
            multi[label] = dict(both_present=float(np.mean(both)), both_with_marks=float(np.mean(marks)),
                                a_alone=alone[IA], b_alone=alone[IB])
            fn = _fn("multi_", label)
            grid(rows, out / fn)
            md.append(f"| {label} | {multi[label]['both_present']:.2f} | {multi[label]['both_with_marks']:.2f} | "
                      f"{alone[IA]:.2f} | {alone[IB]:.2f} | [{fn}]({fn}) |")
            log(f"{label}: {multi[label]}")
        results["multi"] = multi
        md.append("")

    # ---- 4. single-image editing (bench/editing.py) --------------------------------------------
    md.append(SECTION.format("edit"))
    if s.edit:
        log("editing")
        results["edit"] = editing.run_task(cf, J, s, out, md, log, grid, _fn)

    # ---- summary -------------------------------------------------------------------------
    md.append(SECTION.format("judges"))
    md += ["## Judges (accuracy on held-out ground truth; 'recon' = through the model's autoencoder)", "",
           "| judge | " + " | ".join(k for k in jv) + " |", "|---|" + "---|" * len(jv),
           "| accuracy | " + " | ".join(f"{v:.3f}" for v in jv.values()) + " |", "",
           "## Base model: prompt accuracy (judged attributes vs caption)", "",
           "| captions | shape | colour | size | background | all four | grid |", "|---|---|---|---|---|---|---|"]
    for what, acc, fn in (("held-out (never trained on)", base_acc, "base_heldout.png"),
                          ("training (single-object)", results["base_train_captions"], "base_train.png")):
        md.append(f"| {what} | {acc['shape']:.2f} | {acc['colour']:.2f} | {acc['size']:.2f} | {acc['background']:.2f} | "
                  f"{acc['all']:.2f} | [{fn}]({fn}) |")
    md.append("")
    results["seconds"] = round(time.time() - t_start)
    md.append(SECTION.format("end"))
    md.append(f"Total time: {results['seconds']} s.")
    results["result_line"] = result_line(results, s)
    md += ["", "    " + results["result_line"]]
    _atomic_write(out / "quality.md", "\n".join(md) + "\n")
    _atomic_write(out / "quality.json", json.dumps(results, indent=1, default=float))
    return results


SECTION = "<!-- section:{} -->"
SECTION_ORDER = ("head", "pilot", "instance", "concept", "multi", "edit", "judges", "end")


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def wait_for_lrs(path: Path, timeout: float = 3600.0) -> Dict[str, float]:
    """The learning rates another part's pilot chose (its pilot_lr.json), waiting for them."""
    t0 = time.time()
    while not Path(path).is_file():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s (is the part running the pilot alive?)")
        time.sleep(10)
    return {k: float(v) for k, v in json.loads(Path(path).read_text()).items()}


def _sections(md_text: str) -> Dict[str, str]:
    out, name = {}, "head"
    for line in md_text.splitlines():
        if line.startswith("<!-- section:"):
            name = line[len("<!-- section:"):-len(" -->")]
            out.setdefault(name, "")
            continue
        out[name] = out.get(name, "") + line + "\n"
    return out


def combine(parts: Sequence[Path], out: Path, s: Settings) -> Dict:
    """One report from benchmark parts run in parallel (--only ... --out PART): each task's
    section and results from the part that ran it; their images copied into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results: Dict = {}
    secs: Dict[str, str] = {}
    seconds = []
    for part in parts:
        res = json.loads((part / "quality.json").read_text())
        seconds.append(res.get("seconds", 0))
        for k, v in res.items():
            if k in ("instance", "concept", "multi", "edit") or k not in results:
                results.setdefault(k, v)
        for name, text in _sections((part / "quality.md").read_text()).items():
            if text.strip() and not secs.get(name, "").strip():
                secs[name] = text
        for f in part.iterdir():
            if f.suffix == ".png" or f.name == "pilot_lr.json":
                if f.resolve() != (out / f.name).resolve():
                    shutil.copyfile(f, out / f.name)
    results["seconds"] = max(seconds)
    results["result_line"] = result_line(results, s)
    end = (f"Total time: {max(seconds)} s wall ({len(parts)} parts in parallel: "
           + ", ".join(f"{x} s" for x in seconds) + ").\n\n    " + results["result_line"] + "\n")
    text = "".join(SECTION.format(n) + "\n" + secs.get(n, "") for n in SECTION_ORDER[:-1])
    _atomic_write(out / "quality.md", text + SECTION.format("end") + "\n" + end)
    _atomic_write(out / "quality.json", json.dumps(results, indent=1, default=float))
    return results


def result_line(results, s: Settings) -> str:
    def mean_of(task, key, field_):
        rows = results.get(task, {})
        label = {k: l for l, k, _ in method_rows(s)[:3]}[key]
        return float(np.mean([r[field_] for r in rows[label]])) if label in rows else float("nan")
    b = results["base"]
    parts = [("base_shape_acc", b["shape"]), ("base_colour_acc", b["colour"]), ("base_size_acc", b["size"]),
             ("base_bg_acc", b["background"]),
             ("base_train_shape_acc", results.get("base_train_captions", {}).get("shape", float("nan")))]
    names = {"para": "para", "para_ref": "para_ref", "lora": "lora"}
    for task, what in (("instance", "instance_fidelity"), ("concept", "concept_fidelity")):
        parts += [(f"{what}_{names[k]}", mean_of(task, k, "fidelity")) for k in METHOD_KEYS]
    parts += [(f"prompt_fidelity_{names[k]}", mean_of("instance", k, "prompt_fidelity")) for k in METHOD_KEYS]
    parts += [(f"drift_{names[k]}", mean_of("instance", k, "drift_rms")) for k in METHOD_KEYS]
    multi = results.get("multi", {})
    parts.append(("multi_both_present_para", multi.get("PaRa paper merge sum", {}).get("both_present", float("nan"))))
    parts.append(("multi_both_present_para_ref", multi.get("PaRa reference merge sum", {}).get("both_present", float("nan"))))
    parts.append(("multi_both_present_lora", multi.get(f"LoRA r={s.rank} stacked", {}).get("both_present", float("nan"))))
    edit = results.get("edit", {}).get("rows", {})
    nan = float("nan")
    parts.append(("base_recon", edit.get("base model (no adapter)", {}).get("recon", nan)))
    parts.append(("base_edit_joint", edit.get("base model (no adapter)", {}).get("edit_joint", nan)))
    for k, label in zip(METHOD_KEYS, [l for l, _, _ in METHODS[:3]]):
        e = edit.get(f"{label} r={s.edit_rank}", {})
        for metric in ("recon", "edit_joint", "edit_success", "consistency"):
            key = metric if metric.startswith("edit_") else f"edit_{metric}"
            parts.append((f"{key}_{names[k]}", e.get(metric, nan)))
        if k != "lora":
            lo, hi = e.get("ci_edit_joint_minus_lora", (nan, nan))
            parts += [(f"edit_ci_{names[k]}_minus_lora_lo", lo), (f"edit_ci_{names[k]}_minus_lora_hi", hi)]
    ctl = results.get("controls", {})
    parts += [(k, ctl.get(k, float("nan"))) for k in ("ctl_recon_gt", "ctl_edit_preserved_gt", "ctl_multi_ceiling")]
    return "RESULT " + " ".join(f"{k}={v:.2f}" for k, v in parts)


def controls(J, decoder=None, n: int = 8, seed: int = 31) -> Dict[str, float]:
    """Positive controls on rendered ground truth (and its autoencoder reconstruction when a
    decoder is given) and known negatives. Editing: bench/editing.controls (each source
    reconstructs, perfect edits are edited and preserved; shifted, resized, unmarked, wrongly
    coloured and caption-only copies fail). Multi-subject: the pair prompt's ground truth has both
    present; a fused pair does not. ctl_* = the worse of gt/recon."""
    out = editing.controls(J, decoder)
    rng = random.Random(seed)
    ia, ib = INSTANCES[IA], INSTANCES[IB]
    pairs, fused = [], []
    for k in range(n):
        bg = [b for b in world.BACKGROUNDS if b not in (ia["colour"], ib["colour"])][k % 2]
        p1, p2 = world.place_two(rng)
        pairs.append(world.Scene((world.Obj(ia["shape"], ia["colour"], "small", *p1),
                                  world.Obj(ib["shape"], ib["colour"], "small", *p2)), bg))
        fused.append(world.Scene((world.Obj(ia["shape"], ia["colour"], "small", 0.42, 0.5),
                                  world.Obj(ib["shape"], ib["colour"], "small", 0.58, 0.5)), bg))
    want = ((ia["shape"], ia["colour"]), (ib["shape"], ib["colour"]))
    tags = ["gt"] + (["recon"] if decoder is not None else [])
    for tag in tags:
        def v(scenes):
            gt = np.stack([world.render(sc) for sc in scenes])
            return judges_mod.reconstruct(gt, decoder) if tag == "recon" else gt
        out[f"{tag}_multi"] = float(np.mean([J.both_present(img, *want) for img in v(pairs)]))
        out[f"neg_{tag}_multi_fused"] = float(np.mean([J.both_present(img, *want) for img in v(fused)]))
    out["ctl_multi_ceiling"] = min(out[f"{t}_multi"] for t in tags)
    return out


def instance_judge_accuracy(J, decoder, n: int = 30, seed: int = 77) -> Dict[str, float]:
    """The instance judge on ground truth and through the autoencoder: each instance at both sizes
    on random backgrounds is recognised, and the plain object (no mark) is not."""
    rng = random.Random(seed)
    scenes, plain = [], []
    for k in range(n):
        trig = (IA, IB)[k % 2]
        size = ("large", "small")[(k // 2) % 2]
        inst = INSTANCES[trig]
        bg = rng.choice([b for b in world.BACKGROUNDS if b != inst["colour"]])
        o = instance_obj(trig, size, *world.place(rng, size))
        scenes.append((trig, size, world.Scene((o,), bg)))
        plain.append(world.Scene((world.Obj(o.shape, o.colour, size, o.cx, o.cy),), bg))
    gt = np.stack([world.render(sc) for _, _, sc in scenes])
    gt_plain = np.stack([world.render(sc) for sc in plain])
    out = {}
    for tag, imgs, imgs_plain in (("gt", gt, gt_plain), ("recon", judges_mod.reconstruct(gt, decoder),
                                                         judges_mod.reconstruct(gt_plain, decoder))):
        for size in ("large", "small"):
            hits = []
            for (trig, z, _), img, pimg in zip(scenes, imgs, imgs_plain):
                if z != size:
                    continue
                inst = INSTANCES[trig]
                hits.append(J.instance(img, inst["shape"], inst["colour"], inst["detail"])["all"])
                hits.append(not J.instance(pimg, inst["shape"], inst["colour"], inst["detail"])["all"])
            out[f"{tag}_instance_{size}"] = float(np.mean(hits))
    return out


def base_prompt_accuracy(cf: Comfy, J, s: Settings, captions: str = "held-out"):
    """The base model on held-out captions (never seen in training), or on as many of its
    training captions ("train": single-object ones, a fixed sample): judged attributes vs caption."""
    train, held = world.caption_split(0)
    combos = held if captions == "held-out" else random.Random(5).sample(train, len(held))
    hits = {"shape": [], "colour": [], "size": [], "background": [], "all": []}
    rows = []
    for k, (shape, colour, size, bg) in enumerate(combos[:s.base_eval_prompts]):
        imgs = cf.sample(cf.model, caption(shape, colour, size, bg), s.per_prompt, 300 + k, s)
        rows.append(imgs)
        for img in imgs:
            d = J.describe(img)
            o = main_object(d["objects"])
            r = {"shape": o is not None and o.shape == shape, "colour": o is not None and o.colour == colour,
                 "size": o is not None and o.size == size, "background": d["background"] == bg}
            r["all"] = all(r.values())
            for key, v in r.items():
                hits[key].append(v)
    return {k: float(np.mean(v)) for k, v in hits.items()}, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default bench/results/quality; with --quick ./quality_quick_output)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny settings on a tiny base built in about a minute: checks that everything runs "
                         "(the numbers mean nothing)")
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--lr", nargs="+", metavar="METHOD=LR", default=[],
                    help="learning rates without the pilot, e.g. para=0.02 para_ref=0.004 lora=0.004")
    ap.add_argument("--no-pilot", action="store_true", help="skip the learning-rate pilot (use --lr or the defaults)")
    ap.add_argument("--only", nargs="+", choices=("base", "instance", "concept", "multi", "edit"),
                    help="run only these tasks ('base' alone: only the judges and the base model's prompt accuracy)")
    ap.add_argument("--lr-from", type=Path, metavar="PILOT_LR_JSON",
                    help="no pilot here: wait for another part's pilot_lr.json and use its learning rates")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="PART",
                    help="write one report into --out from parts run in parallel")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    if args.out is None:
        args.out = Path("quality_quick_output") if args.quick else ROOT / "bench" / "results" / "quality"
    if args.quick and args.ckpt is None:
        args.ckpt = train_base.ensure_quick_base()
    if args.steps:
        s.steps = args.steps
    if args.seeds:
        s.seeds = tuple(args.seeds)
    for item in args.lr:
        key, _, val = item.partition("=")
        if key not in METHOD_KEYS:
            ap.error(f"--lr {item}: method must be one of {METHOD_KEYS}")
        s.lr[key] = float(val)
    s.pilot = not args.no_pilot and not args.lr_from
    s.lr_from = args.lr_from
    if args.combine:
        res = combine(args.combine, args.out, s)
        print((args.out / "quality.md").read_text())
        print(res["result_line"])
        return
    if args.only:
        s.instance, s.concept, s.multi, s.edit = (t in args.only for t in ("instance", "concept", "multi", "edit"))
        if not (s.instance or s.concept or s.multi):
            s.pilot, s.lr_from = False, None  # the base alone, or editing (it has its own pilot)
    res = run(args.out, s, args.ckpt)
    print((args.out / "quality.md").read_text())
    print(res["result_line"])


if __name__ == "__main__":
    main()
