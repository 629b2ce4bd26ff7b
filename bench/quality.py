"""Quality benchmark: does PaRa personalize the small base model (bench/train_base.py) better
than LoRA, combine subjects without training, and edit from a single image?

    python bench/quality.py [--out DIR] [--quick] [--ckpt FILE] [--steps N] [--seeds S ...] [--pilot LR ...]

Everything runs through ComfyUI's own nodes, called in-process: CheckpointLoaderSimple,
CLIPTextEncode, VAEEncode, KSampler (common_ksampler), VAEDecode, LoraLoader's loader
(comfy.sd.load_lora_for_models), and this pack's PaRaTrainer, PaRaMerge and PaRaApply.

PaRa vs LoRA on the same layers, steps, data, loop and seeds: the LoRA side uses ComfyUI's own
LoRA training adapter (comfy.weight_adapter LoRAAdapter.create_train, the module
TrainLoraNode trains) inside the PaRa Trainer's loop (nodes/training.TrainingRun), so the
only difference is the parametrization: W0 - Q Q^T W0 vs W0 + (alpha/r) up down. The trained
LoRA is then loaded back through ComfyUI's stock LoRA loader.
The layers are the base model's live layers that the noxattn preset adapts
(train_base.LIVE_LAYER_PATTERNS; the base's other blocks are exact identities, see there).

Writes DIR/quality.md (tables), DIR/*.png (sample grids, one per row) and DIR/quality.json,
and prints as its last line:
RESULT concept_fidelity_para=.. concept_fidelity_lora=.. prompt_fidelity_para=..
prompt_fidelity_lora=.. multi_both_present_para=.. edit_success_para=..
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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import world  # noqa: E402
import judges as judges_mod  # noqa: E402
import train_base  # noqa: E402

NEGATIVE = ""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

@dataclass
class Settings:
    rank: int = 4
    extra_para_ranks: Sequence[int] = (8,)   # more PaRa rows (8 = the reference cap out//40 at 320)
    steps: int = 400
    batch_size: int = 2
    lr_para: float = 2e-2         # pilot (seed 100, 400 steps): see README "Quality"
    lr_lora: float = 5e-3
    seeds: Sequence[int] = (0, 1, 2)
    per_prompt: int = 4          # images per prompt (one KSampler batch, one noise seed)
    sample_steps: int = 8
    cfg: float = 4.0
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    edit_steps: int = 200          # each method at its own learning rate (lr_para / lr_lora)
    multi: bool = True
    edit: bool = True
    base_eval_prompts: int = 12   # held-out captions for the base model's prompt accuracy
    prompts_limit: int = 0        # > 0: only that many prompts per list (tests)
    subject_prompts: int = 4      # recontextualization prompts per subject
    drift_prompts: int = 3
    multi_prompts: int = 2
    equal_param_seeds: int = 3    # seeds for the equal-parameter LoRA (the first ones of `seeds`)
    judge_train: int = 1500       # ground-truth scenes the shape judge is trained on
    judge_validate: int = 300

    @classmethod
    def quick(cls):
        return cls(steps=2, batch_size=1, seeds=(0,), per_prompt=2, sample_steps=1, edit_steps=2,
                   base_eval_prompts=1, prompts_limit=1, judge_train=150, judge_validate=30)

    def limit(self, items):
        return list(items)[:self.prompts_limit] if self.prompts_limit else list(items)


# The subjects: novel shapes of the world, named by a trigger word.
SUBJECTS = {
    "bar": {"trigger": "sks", "train": [("yellow", "large", "blue"), ("red", "large", "white"),
                                         ("green", "small", "gray"), ("yellow", "small", "red")]},
    "column": {"trigger": "zwx", "train": [("blue", "large", "white"), ("green", "large", "red"),
                                            ("red", "small", "gray"), ("blue", "small", "white")]},
}
A, B = "bar", "column"  # the two subjects (novel shapes of the world)
# Prompts that recontextualize a subject: colours/backgrounds not in its training combos.
SUBJECT_PROMPTS = {
    "bar": [("blue", "large", "white"), ("red", "large", "gray"), ("green", "large", "blue"), ("yellow", "large", "gray")],
    "column": [("yellow", "large", "gray"), ("red", "large", "blue"), ("green", "large", "white"), ("blue", "large", "red")],
}
DRIFT_PROMPTS = ["a large red circle on a white background", "a large green square on a blue background",
                 "a large yellow triangle on a gray background"]
MULTI_PROMPTS = [(("yellow", "bar"), ("blue", "column"), "white"), (("red", "bar"), ("green", "column"), "gray")]
EDIT_SOURCE = world.Scene((world.Obj("triangle", "green", "large", 0.36, 0.62),), "white")
EDITS = [  # (what changes, new caption attributes (shape, colour, size, background))
    ("colour", ("triangle", "red", "large", "white")),
    ("background", ("triangle", "green", "large", "gray")),
    ("size", ("triangle", "green", "small", "white")),
]


def caption(shape, colour, size, bg, names=None):
    return world.Scene((world.Obj(shape, colour, size),), bg).caption(names)


# --------------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------------

class Comfy:
    """ComfyUI in this process with the base checkpoint loaded through CheckpointLoaderSimple."""

    def __init__(self, ckpt: Path, base_dir: Path):
        import comfy_env
        comfy_env.setup_comfy(base_directory=base_dir)
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
        self.pack = comfy_env.import_pack()
        self.pack.nodes.setup()
        from importlib import import_module
        self.pn = import_module(self.pack.__name__ + ".nodes.para_nodes")
        self.trainer_mod = import_module(self.pack.__name__ + ".nodes.trainer")
        self.training = import_module(self.pack.__name__ + ".nodes.training")
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
    def train_para(self, images, captions, s: Settings, seed, steps=None, layers=None, lr=None, rank=None):
        T = self.trainer_mod.PaRaTrainer
        out = T.execute(model=self.model, latents=self.encode_images(images),
                        positive=[self.cond(c)[0] for c in captions], rank=rank or s.rank,
                        layers="noxattn", rank_cap="reference", steps=steps or s.steps,
                        learning_rate=lr or s.lr_para, optimizer="AdamW", batch_size=s.batch_size, seed=seed,
                        training_dtype="fp32", gradient_checkpointing=False, init="kaiming", save_every=0,
                        filename_prefix="quality", resume_from="[none]",
                        custom_layers=layers or train_base.LIVE_LAYER_PATTERNS, trigger_words="")
        model, para, loss, _ = out.args
        return model, para, loss["loss"]

    def train_lora(self, images, captions, s: Settings, seed, rank, steps=None, layers=None, lr=None):
        """ComfyUI's LoRA training adapter on the same layers, in the same loop as PaRa."""
        torch = self.torch
        from comfy.weight_adapter import adapter_maps
        tr, tm = self.training, self.trainer_mod
        from importlib import import_module
        patching = import_module(self.pack.__name__ + ".nodes.patching")
        layer_op = import_module(self.pack.__name__ + ".para_core.train").layer_op
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
        settings = tr.TrainSettings(steps=steps or s.steps, learning_rate=lr or s.lr_lora, optimizer="AdamW",
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


def hash_key(s):
    return sum(ord(c) * 31 ** i for i, c in enumerate(s)) % (2 ** 31)


def eval_subject(cf: Comfy, J, model, name, s: Settings, seed, base_drift_imgs):
    """Concept fidelity, prompt fidelity, diversity, drift of one adapted model."""
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
    drift, kept = [], []
    for k, text in enumerate(s.limit(DRIFT_PROMPTS[:s.drift_prompts])):
        imgs = cf.sample(model, text, s.per_prompt, 5000 + k, s)
        rows.append(imgs)
        for img, ref in zip(imgs, base_drift_imgs[text]):
            drift.append(rms(img, ref))
            a, r = J.describe(img), J.describe(ref)
            oa, orf = main_object(a["objects"]), main_object(r["objects"])
            kept.append(a["background"] == r["background"] and (oa and orf and (oa.shape, oa.colour) == (orf.shape, orf.colour)) or (oa is None and orf is None))
    return dict(concept_fidelity=float(np.mean(concept)), prompt_fidelity=float(np.mean(prompt)),
                concept_and_prompt=float(np.mean(both)), diversity=float(np.mean(div)),
                drift_rms=float(np.mean(drift)), drift_kept=float(np.mean(kept))), rows


def para_params(para) -> int:
    return int(sum(b.numel() for b in para.B.values())) if getattr(para, "B", None) else 0


def lora_param_count(shapes, names, r):
    return sum(r * (shp[0] + int(np.prod(shp[1:]))) for n, shp in shapes.items() if n in names)


def run(out: Path, s: Settings, ckpt: Optional[Path] = None) -> Dict:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt or train_base.ensure_base()
    base_dir = Path(tempfile.mkdtemp(prefix="para-quality-"))
    try:
        return _run(out, s, ckpt, base_dir, t_start)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def _run(out, s, ckpt, base_dir, t_start):
    cf = Comfy(ckpt, base_dir)
    import torch
    torch.set_grad_enabled(False)
    from importlib import import_module
    patching = import_module(cf.pack.__name__ + ".nodes.patching")
    decoder = cf.vae.first_stage_model.taesd_decoder
    judge_cache = None if s.prompts_limit else train_base.cache_dir() / f"judges_v{judges_mod.JUDGE_VERSION}_{ckpt.stat().st_mtime_ns}.pt"
    J = judges_mod.judges_for(decoder.float(), judge_cache, n=s.judge_train)
    results: Dict = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()}}
    md = ["# PaRa quality benchmark", ""]

    # ---- judges and base model -------------------------------------------------------------
    jv = J.validate(n=s.judge_validate, decoder=decoder)
    results["judges"] = jv
    log(f"judges: {jv}")
    base_acc, base_rows = base_prompt_accuracy(cf, J, s)
    results["base"] = base_acc
    grid(base_rows, out / "base_heldout.png")
    log(f"base: {base_acc}")

    # ---- 1. subject personalization ---------------------------------------------------------
    shapes = patching.layer_shapes(cf.model)
    names = cf.trainer_mod.choose_layers(shapes, train_base.LIVE_LAYER_PATTERNS, "custom_layers", "SD15")
    imgs_a, caps_a = subject_data(A)
    base_drift = {t: cf.sample(cf.model, t, s.per_prompt, 5000 + k, s) for k, t in enumerate(s.limit(DRIFT_PROMPTS[:s.drift_prompts]))}
    lora1 = lora_param_count(shapes, names, 1)
    rows_by_method, per_method = {}, {}
    para_states = {}
    lora_sds = {}
    eq_rank = None
    for seed in s.seeds:
        tt = time.time()
        m, para, loss = cf.train_para(imgs_a, caps_a, s, seed)
        para_states[(A, seed)] = para
        np_para = para_params(para)
        eq_rank = max(1, int(round(np_para / lora1)))
        log(f"PaRa seed {seed}: {time.time() - tt:.0f}s, loss {np.mean(loss[:5]):.3f} -> {np.mean(loss[-5:]):.3f}, {np_para} params")
        r, rows = eval_subject(cf, J, m, A, s, seed, base_drift)
        per_method.setdefault(f"PaRa r={s.rank}", []).append(dict(r, params=np_para, train_s=time.time() - tt))
        rows_by_method.setdefault(f"PaRa r={s.rank}", rows)
        for rank in s.extra_para_ranks:  # PaRa with more capacity (still fewer parameters than LoRA r)
            tt = time.time()
            m, para_x, loss = cf.train_para(imgs_a, caps_a, s, seed, rank=rank)
            log(f"PaRa r={rank} seed {seed}: {time.time() - tt:.0f}s, loss {np.mean(loss[:5]):.3f} -> {np.mean(loss[-5:]):.3f}")
            r, rows = eval_subject(cf, J, m, A, s, seed, base_drift)
            per_method.setdefault(f"PaRa r={rank}", []).append(dict(r, params=para_params(para_x), train_s=time.time() - tt))
            rows_by_method.setdefault(f"PaRa r={rank}", rows)
        for label, rank in ((f"LoRA r={s.rank}", s.rank), (f"LoRA r={eq_rank} (equal params)", eq_rank)):
            if label.endswith("params)") and seed not in list(s.seeds)[:s.equal_param_seeds]:
                continue
            tt = time.time()
            sd, loss, npar = cf.train_lora(imgs_a, caps_a, s, seed, rank)
            lora_sds[(label, seed)] = sd
            log(f"{label} seed {seed}: {time.time() - tt:.0f}s, loss {np.mean(loss[:5]):.3f} -> {np.mean(loss[-5:]):.3f}, {npar} params")
            r, rows = eval_subject(cf, J, cf.with_lora(cf.model, sd), A, s, seed, base_drift)
            per_method.setdefault(label, []).append(dict(r, params=npar, train_s=time.time() - tt))
            rows_by_method.setdefault(label, rows)
    r0, rows0 = eval_subject(cf, J, cf.model, A, s, 0, base_drift)
    per_method["base model (no adapter)"] = [dict(r0, params=0, train_s=0)]
    rows_by_method["base model (no adapter)"] = rows0
    results["subject"] = per_method
    md += [f"## 1. Subject personalization (novel shape '{A}', trigger '{SUBJECTS[A]['trigger']}', {len(SUBJECTS[A]['train'])} images)", "",
           f"Training: {s.steps} steps, batch {s.batch_size}, AdamW, lr PaRa {s.lr_para} / LoRA {s.lr_lora}, fp32, "
           f"layers = {len(names)} live noxattn layers; seeds {list(s.seeds)}; sampling {s.sampler}/{s.scheduler} "
           f"{s.sample_steps} steps cfg {s.cfg}, {s.per_prompt} images per prompt.",
           f"Concept fidelity: the main object is judged a {A}. Prompt fidelity: its colour and the background "
           f"match the prompt ({len(s.limit(SUBJECT_PROMPTS[A][:s.subject_prompts]))} prompts with colour/background "
           "combinations absent from the training images). "
           "Diversity: mean RMS pixel distance between images of one prompt. Drift: RMS pixel change of "
           f"{len(s.limit(DRIFT_PROMPTS[:s.drift_prompts]))} unrelated base prompts vs the base model (same seeds); "
           "'kept': the judged shape/colour/background of those images did not change.", "",
           "| method | params | concept fidelity | prompt fidelity | concept & prompt | diversity | drift (RMS) | base prompts kept | grid |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, rs in per_method.items():
        fn = "subject_" + "".join(ch if ch.isalnum() else "_" for ch in label) + ".png"
        grid(rows_by_method[label], out / fn)
        md.append(f"| {label} | {rs[0]['params']} | {fmt([r['concept_fidelity'] for r in rs])} | "
                  f"{fmt([r['prompt_fidelity'] for r in rs])} | {fmt([r['concept_and_prompt'] for r in rs])} | "
                  f"{fmt([r['diversity'] for r in rs])} | {fmt([r['drift_rms'] for r in rs])} | "
                  f"{fmt([r['drift_kept'] for r in rs])} | [{fn}]({fn}) |")
    md.append("")

    # ---- 2. multi-subject -------------------------------------------------------------------
    if s.multi:
        log("multi-subject")
        imgs_b, caps_b = subject_data(B)
        seed = s.seeds[0]
        _, para_b, _ = cf.train_para(imgs_b, caps_b, s, seed)
        sd_b, _, _ = cf.train_lora(imgs_b, caps_b, s, seed, s.rank)
        para_a = para_states[(A, seed)]
        sd_a = lora_sds[(f"LoRA r={s.rank}", seed)]
        variants = {f"PaRa merge {mode}": cf.apply(cf.merge(mode, para_a, para_b)) for mode in ("sum", "union", "sequential")}
        variants[f"LoRA r={s.rank} stacked"] = cf.with_lora(cf.with_lora(cf.model, sd_a), sd_b)
        variants["base model (no adapter)"] = cf.model
        multi = {}
        md += [f"## 2. Multi-subject ({A} '{SUBJECTS[A]['trigger']}' + {B} '{SUBJECTS[B]['trigger']}', trained separately, combined without training)", "",
               f"Both present: the image shows a {A} and a {B} (prompts ask for both, two small objects). "
               "Each alone: the single-subject prompts of each concept still give that concept (concept fidelity).", "",
               f"| combination | both present | {A} alone | {B} alone | grid |", "|---|---|---|---|---|"]
        for label, model in variants.items():
            both, rows = [], []
            for k, ((ca, _), (cb, _), bg) in enumerate(s.limit(MULTI_PROMPTS[:s.multi_prompts])):
                text = (f"a small {ca} sks and a small {cb} zwx on a {bg} background")
                imgs = cf.sample(model, text, s.per_prompt, 7000 + k, s)
                rows.append(imgs)
                for img in imgs:
                    shapes_seen = {o.shape for o in J.objects(img)}
                    both.append({A, B} <= shapes_seen)
            alone = {}
            for name in (A, B):
                c, z, b = SUBJECT_PROMPTS[name][0]
                imgs = cf.sample(model, caption(name, c, z, b, {name: SUBJECTS[name]["trigger"]}), s.per_prompt, 7100, s)
                rows.append(imgs)
                alone[name] = float(np.mean([(main_object(J.objects(i)) or world.Obj("none", "", "")).shape == name for i in imgs]))
            multi[label] = dict(both_present=float(np.mean(both)), a_alone=alone[A], b_alone=alone[B])
            fn = "multi_" + "".join(ch if ch.isalnum() else "_" for ch in label) + ".png"
            grid(rows, out / fn)
            md.append(f"| {label} | {multi[label]['both_present']:.2f} | {alone[A]:.2f} | {alone[B]:.2f} | [{fn}]({fn}) |")
            log(f"{label}: {multi[label]}")
        results["multi"] = multi
        md.append("")

    # ---- 3. single-image editing -----------------------------------------------------------
    if s.edit:
        log("editing")
        src = world.render(EDIT_SOURCE)[None]
        src_cap = EDIT_SOURCE.caption()
        edit_layers = "middle_block.2.out_layers.3"
        m_para, _, _ = cf.train_para(src, [src_cap], s, 0, steps=s.edit_steps, layers=edit_layers)
        sd_l, _, _ = cf.train_lora(src, [src_cap], s, 0, s.rank, steps=s.edit_steps, layers=edit_layers)
        variants = {"PaRa (noxattn-hspace-last)": m_para, f"LoRA r={s.rank} (same layer)": cf.with_lora(cf.model, sd_l),
                    "base model (no adapter)": cf.model}
        src_obj = EDIT_SOURCE.objects[0]
        edit = {}
        md += ["## 3. Single-image editing (one image, preset noxattn-hspace-last = middle_block.2.out_layers.3)", "",
               f"Source: '{src_cap}' (object at x={src_obj.cx:.2f}, y={src_obj.cy:.2f}). Edited prompts change the colour, "
               "the background or the size. Edit success: the edited attribute is judged as asked. Preservation: "
               "every other attribute is unchanged and the object's centre is within 0.1 image widths of the "
               "source's. Reconstruction: the source prompt reproduces the source (same judged attributes and position).", "",
               "| model | reconstruction | edit success | preservation | success & preserved | grid |", "|---|---|---|---|---|---|"]
        for label, model in variants.items():
            rows = [src]
            imgs = cf.sample(model, src_cap, s.per_prompt, 9000, s)
            rows.append(imgs)
            recon = [_edit_check(J, img, ("triangle", "green", "large", "white"), None)[1] for img in imgs]
            succ, pres, bothl = [], [], []
            for k, (what, attrs) in enumerate(s.limit(EDITS) if s.prompts_limit else EDITS):
                imgs = cf.sample(model, caption(*attrs), s.per_prompt, 9000, s)
                rows.append(imgs)
                for img in imgs:
                    ok, kept = _edit_check(J, img, attrs, what)
                    succ.append(ok); pres.append(kept); bothl.append(ok and kept)
            edit[label] = dict(reconstruction=float(np.mean(recon)), edit_success=float(np.mean(succ)),
                               preservation=float(np.mean(pres)), success_and_preserved=float(np.mean(bothl)))
            fn = "edit_" + "".join(ch if ch.isalnum() else "_" for ch in label) + ".png"
            grid(rows, out / fn)
            e = edit[label]
            md.append(f"| {label} | {e['reconstruction']:.2f} | {e['edit_success']:.2f} | {e['preservation']:.2f} | "
                      f"{e['success_and_preserved']:.2f} | [{fn}]({fn}) |")
            log(f"{label}: {e}")
        results["edit"] = edit
        md.append("")

    # ---- summary -------------------------------------------------------------------------
    md += ["## Judges (accuracy on held-out ground truth; 'recon' = through the model's autoencoder)", "",
           "| judge | " + " | ".join(k for k in jv) + " |", "|---|" + "---|" * len(jv),
           "| accuracy | " + " | ".join(f"{v:.3f}" for v in jv.values()) + " |", "",
           "## Base model: prompt accuracy on held-out captions", "",
           "| shape | colour | size | background | all four |", "|---|---|---|---|---|",
           f"| {base_acc['shape']:.2f} | {base_acc['colour']:.2f} | {base_acc['size']:.2f} | {base_acc['background']:.2f} | {base_acc['all']:.2f} |",
           "", "[base_heldout.png](base_heldout.png)", ""]
    results["seconds"] = round(time.time() - t_start)
    md.append(f"Total time: {results['seconds']} s.")
    (out / "quality.md").write_text("\n".join(md) + "\n")
    (out / "quality.json").write_text(json.dumps(results, indent=1, default=float))
    sub = results["subject"]
    pk, lk = f"PaRa r={s.rank}", f"LoRA r={s.rank}"
    cfp = np.mean([r["concept_fidelity"] for r in sub[pk]])
    cfl = np.mean([r["concept_fidelity"] for r in sub[lk]])
    pfp = np.mean([r["prompt_fidelity"] for r in sub[pk]])
    pfl = np.mean([r["prompt_fidelity"] for r in sub[lk]])
    mb = max((v["both_present"] for k, v in results.get("multi", {}).items() if k.startswith("PaRa")), default=float("nan"))
    es = results.get("edit", {}).get("PaRa (noxattn-hspace-last)", {}).get("edit_success", float("nan"))
    line = (f"RESULT concept_fidelity_para={cfp:.2f} concept_fidelity_lora={cfl:.2f} prompt_fidelity_para={pfp:.2f} "
            f"prompt_fidelity_lora={pfl:.2f} multi_both_present_para={mb:.2f} edit_success_para={es:.2f}")
    results["result_line"] = line
    (out / "quality.json").write_text(json.dumps(results, indent=1, default=float))
    return results


def _edit_check(J, img, attrs, what):
    shape, colour, size, bg = attrs
    d = J.describe(img)
    o = main_object(d["objects"])
    if o is None:
        return False, False
    got = {"shape": o.shape, "colour": o.colour, "size": o.size, "background": d["background"]}
    want = {"shape": shape, "colour": colour, "size": size, "background": bg}
    src = EDIT_SOURCE.objects[0]
    near = math.hypot(o.cx - src.cx, o.cy - src.cy) < 0.1
    if what is None:  # reconstruction
        return all(got[k] == want[k] for k in want), all(got[k] == want[k] for k in want) and near
    ok = got[what] == want[what]
    kept = all(got[k] == want[k] for k in want if k != what) and near
    return ok, kept


def base_prompt_accuracy(cf: Comfy, J, s: Settings):
    """The base model on held-out captions (never seen in training): judged attributes vs caption."""
    _, held = world.caption_split(0)
    hits = {"shape": [], "colour": [], "size": [], "background": [], "all": []}
    rows = []
    for k, (shape, colour, size, bg) in enumerate(held[:s.base_eval_prompts]):
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


def pilot(out: Path, s: Settings, lrs: Sequence[float], ckpt: Optional[Path] = None, seed: int = 100):
    """Learning-rate pilot on a seed that the benchmark does not use: concept and prompt fidelity
    of PaRa and LoRA (rank s.rank) after s.steps steps, for each learning rate."""
    ckpt = ckpt or train_base.ensure_base()
    base_dir = Path(tempfile.mkdtemp(prefix="para-quality-"))
    cf = Comfy(ckpt, base_dir)
    import torch
    torch.set_grad_enabled(False)
    decoder = cf.vae.first_stage_model.taesd_decoder
    J = judges_mod.judges_for(decoder.float(), train_base.cache_dir() / f"judges_v{judges_mod.JUDGE_VERSION}_{ckpt.stat().st_mtime_ns}.pt",
                              n=s.judge_train)
    imgs, caps = subject_data(A)
    trig = SUBJECTS[A]["trigger"]
    rows = []
    for lr in lrs:
        for method in ("PaRa", "LoRA"):
            t0 = time.time()
            if method == "PaRa":
                model, _, loss = cf.train_para(imgs, caps, s, seed, lr=lr)
            else:
                sd, loss, _ = cf.train_lora(imgs, caps, s, seed, s.rank, lr=lr)
                model = cf.with_lora(cf.model, sd)
            conc, fit = [], []
            for k, (c, z, b) in enumerate(SUBJECT_PROMPTS[A][:2]):
                for img in cf.sample(model, caption(A, c, z, b, {A: trig}), s.per_prompt, 100 + k, s):
                    d = J.describe(img)
                    o = main_object(d["objects"])
                    conc.append(o is not None and o.shape == A)
                    fit.append(o is not None and o.colour == c and d["background"] == b)
            rows.append((method, lr, float(np.mean(conc)), float(np.mean(fit)), float(np.mean(loss[-10:])), time.time() - t0))
            log(f"pilot {rows[-1]}")
    text = "| method | lr | concept fidelity | prompt fidelity | final loss | seconds |\n|---|---|---|---|---|---|\n"
    text += "\n".join(f"| {m} | {lr} | {c:.2f} | {f:.2f} | {l:.3f} | {t:.0f} |" for m, lr, c, f, l, t in rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pilot.md").write_text(text + "\n")
    print(text)
    shutil.rmtree(base_dir, ignore_errors=True)


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
    ap.add_argument("--lr-para", type=float)
    ap.add_argument("--lr-lora", type=float)
    ap.add_argument("--no-multi", action="store_true")
    ap.add_argument("--no-edit", action="store_true")
    ap.add_argument("--pilot", type=float, nargs="+", metavar="LR",
                    help="only the learning-rate pilot (seed 100) at these learning rates")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    if args.out is None:
        args.out = Path("quality_quick_output") if args.quick else ROOT / "bench" / "results" / "quality"
    if args.quick and args.ckpt is None:
        args.ckpt = train_base.ensure_quick_base()
    if args.steps: s.steps = args.steps
    if args.seeds: s.seeds = tuple(args.seeds)
    if args.lr_para: s.lr_para = args.lr_para
    if args.lr_lora: s.lr_lora = args.lr_lora
    s.multi, s.edit = not args.no_multi, not args.no_edit
    if args.pilot:
        return pilot(args.out, s, args.pilot, args.ckpt)
    res = run(args.out, s, args.ckpt)
    print((args.out / "quality.md").read_text())
    print(res["result_line"])


if __name__ == "__main__":
    main()
