"""PaRa demo, one command: train two subjects, merge them, edit a single image, export a LoRA.

    python workflows/demo.py                       # a small trained model; the first run builds it
    python workflows/demo.py --quick               # a smoke run on random weights (about a minute)
    python workflows/demo.py --checkpoint NAME     # your SD1.5 checkpoint, at the paper's settings

It finds ComfyUI (COMFYUI_PATH, the ComfyUI that holds this pack in custom_nodes, or
~/ComfyUI) and builds its own training images (drawn here, no downloads). Unless you give a
checkpoint it uses a small text-to-image model of the synthetic shapes world of bench/world.py:
the quality benchmark's base when it has been built (python bench/train_base.py), else a smaller
one trained here once and cached (about 12 min on 2 CPU cores); --quick uses random weights
(noise pictures, every step still real). It starts ComfyUI headless with this pack on a free
loopback port and with --out/comfyui as its base directory (models/, input/, output/, kept
afterwards, so workflows/batch.py --start-server can use what the demo trained); runs the shipped
workflows 1, 3, 4 and 5 (workflows/api/) through POST /prompt; and writes the PaRa files, images,
loss plots, a summary and the batch command to try next into --out (./demo_output).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if __package__ in (None, ""):  # run as a script: the repo root makes harness/, workflows/, bench/ importable
    sys.path.insert(0, str(ROOT))

from bench import world  # noqa: E402  (the synthetic world the demo's trained model knows; numpy and PIL only)
from harness import comfyui, models, server as comfy_server  # noqa: E402  (find ComfyUI, the test model, the server)
from harness.client import Client, Result, describe_rejection  # noqa: E402
from workflows import api_graph  # noqa: E402

GET_COMFYUI = f"""ComfyUI was not found. The demo looks in:
  1. $COMFYUI_PATH
  2. the ComfyUI folder above custom_nodes/, when this pack is installed there
  3. ~/ComfyUI
Get it with:
  git clone https://github.com/comfyanonymous/ComfyUI ~/ComfyUI
  pip install -r ~/ComfyUI/requirements.txt     (in the Python environment you run the demo with)
or point to an existing checkout:
  COMFYUI_PATH=/path/to/ComfyUI {Path(sys.executable).name} workflows/demo.py"""

# The two subjects (new concepts with made-up trigger words) and the single image to edit, in
# the synthetic world of bench/world.py, which the demo's trained base model knows: it draws
# circles, squares and triangles; a bar and a column are new to it.
SUBJECTS = {
    "sks": {"shape": "bar", "colour": "yellow", "backgrounds": ("blue", "white")},
    "zwx": {"shape": "column", "colour": "red", "backgrounds": ("white", "gray")},
}
PROMPT_A = "a large yellow sks on a gray background"
PROMPT_B = "a large red zwx on a blue background"
PROMPT_MERGED = "a small yellow sks and a small red zwx on a blue background"
EDIT_CAPTION = "a large green square on a white background"
EDIT_PROMPT = "a large green square on a red background"

# Names the demo leaves in --out/comfyui (stable, so the README's batch example names them).
BASE_NAME = "demo_base.safetensors"
RESULT_NAMES = {"sks": "demo_sks.safetensors", "zwx": "demo_zwx.safetensors", "merged": "demo_merged.safetensors",
                "lora": "demo_sks_lora.safetensors"}

# The most UNet steps the demo spends on a base it builds. When the benchmark's own default build
# is no longer than that (bench/train_base.UNET_STEPS: 1200 today) the demo builds exactly that
# base, so one cached model serves both; else its own, shorter, with the same builder.
DEMO_BASE_UNET_STEPS = 1200


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------

def settings_for(args) -> dict:
    """Image size, steps and the like for this run. A user checkpoint gets the paper's settings,
    which the shipped workflows carry (rank 4, noxattn, lr 1e-4, batch 1, 1000 steps, 512 px).
    The built-in 64 px model gets the settings the quality benchmark uses for it (bench/quality.py:
    lr 5e-3, batch 2, cfg 4, dpmpp_2m/karras): it learns a new shape in a few hundred steps."""
    if args.checkpoint:
        s = {"size": 512, "train_steps": 1000, "edit_steps": 500, "sample_steps": 30, "images": 6}
    else:
        s = {"size": 64, "train_steps": 200, "edit_steps": 60, "sample_steps": 20, "images": 6,
             "learning_rate": 5e-3, "batch_size": 2, "cfg": 4.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
        if args.quick:
            s.update(train_steps=4, edit_steps=4, sample_steps=2, images=3)
    for key in ("size", "train_steps", "edit_steps", "sample_steps", "images"):
        value = getattr(args, key, None)
        if value:
            s[key] = value
    return s


RANDOM_BASE = ("a small SD1.5-format model with random weights: its pictures are noise (--quick; every step still "
               "runs for real)")


def demo_base_path() -> Path:
    from bench import train_base  # noqa: PLC0415  (imports numpy only at module level)
    return train_base.cache_dir() / f"para_demo_base_u{DEMO_BASE_UNET_STEPS}.safetensors"


def demo_checkpoint(quick: bool, log=print, threads: int = 0) -> tuple[Path, str]:
    """The checkpoint the demo uses when none is given, as (path, description).

    --quick: the random-weight SD1.5-format test model (built in seconds). Otherwise a model
    that draws the world's shapes and colours: the quality benchmark's base, built here once
    when it is missing and small enough (see DEMO_BASE_UNET_STEPS), else the demo's own smaller
    base, built once with the benchmark's builder (bench/train_base.build) and cached beside it.
    threads: torch's CPU threads for a build (0: torch's own setting)."""
    if quick:
        return models.cached_sd15_checkpoint(), RANDOM_BASE
    from bench import train_base  # noqa: PLC0415
    bench = train_base.checkpoint_path()
    what = "the quality benchmark's trained base model of the shapes world (bench/train_base.py)"
    if train_base.is_current(bench):
        return bench, what
    if getattr(train_base, "UNET_STEPS", DEMO_BASE_UNET_STEPS + 1) <= DEMO_BASE_UNET_STEPS:
        log(f"building the benchmark's base model once (bench/train_base.py; cached as {bench}) ...")
        return train_base.ensure_base(threads=threads, parallel=(os.cpu_count() or 1) >= 2), what
    path = demo_base_path()
    what = (f"a small model of the shapes world trained here ({DEMO_BASE_UNET_STEPS} UNet steps; "
            "python bench/train_base.py builds the benchmark's larger one, which the demo then uses)")
    if not train_base.is_current(path):
        log(f"building the demo's base model once, about 12 min on 2 cores (cached as {path}; it logs its stages, then each "
            f"stage's progress with an ETA) ...")
        # two cores or more: the decoder and UNet stages train at once in two processes
        train_base.build(path, 0, unet_steps=DEMO_BASE_UNET_STEPS, threads=threads,
                         parallel=(os.cpu_count() or 1) >= 2)
    return path, what


def user_checkpoint(name: str, comfy_root: Path) -> Path:
    """NAME from the user's models/checkpoints (or a path to a file)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    folder = comfy_root / "models" / "checkpoints"
    if (folder / name).is_file():
        return (folder / name).resolve()
    have = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.suffix in (".safetensors", ".ckpt"))
    raise SystemExit(f"checkpoint {name!r} is not in {folder} (found: {', '.join(have) or 'none'}); give a name "
                     "from that folder or a path to the file")


# ------------------------------------------------------------------------------------------
# Training images (drawn here: no downloads)
# ------------------------------------------------------------------------------------------

def draw(scene: "world.Scene", size: int):
    """The scene as the world renders it (64 px), scaled to size when the model wants another."""
    from PIL import Image
    img = Image.fromarray(world.render(scene))
    return img if size == world.SIZE else img.resize((size, size), Image.LANCZOS)


def make_subject_images(folder: Path, word: str, n: int, size: int, seed: int = 0) -> list[str]:
    """n images of the subject with captions (<name>.txt beside each) that use its trigger word."""
    spec = SUBJECTS[word]
    rng = random.Random(f"{word}:{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        bg = spec["backgrounds"][i % len(spec["backgrounds"])]
        size_word = "large" if i % 3 != 2 else "small"
        cx, cy = world.place(rng, size_word)
        scene = world.Scene((world.Obj(spec["shape"], spec["colour"], size_word, cx, cy),), bg)
        draw(scene, size).save(folder / f"{word}_{i:02d}.png")
        caption = scene.caption({spec["shape"]: word})
        (folder / f"{word}_{i:02d}.txt").write_text(caption + "\n")
        captions.append(caption)
    return captions


def make_edit_image(path: Path, size: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(world.Scene((world.Obj("square", "green", "large"),), "white"), size).save(path)


# ------------------------------------------------------------------------------------------
# Running workflows with progress
# ------------------------------------------------------------------------------------------

class ProgressPrinter:
    """Prints a prompt's /ws progress: which node runs, the trainer's steps and loss."""

    def __init__(self, graph: dict, out=sys.stdout):
        self.graph, self.out = graph, out
        self.last_node = None
        self.last_print = 0.0
        self.last_pct = -1
        self.texts = 0

    def __call__(self, ev: dict):
        t = ev.get("type")
        if t == "executing" and ev.get("node") and ev["node"] != self.last_node:
            self.last_node = ev["node"]
            node = self.graph.get(ev["node"])
            if node is not None:
                self._print(f"    - {api_graph.title(node)}")
        elif t == "progress" and ev.get("max", 0) > 1 and not self.texts:
            # the bar, for nodes that send no text (the trainer's text line carries the loss)
            node = self.graph.get(str(ev.get("node")))
            if node is None or node["class_type"] != "PaRaTrainer":
                return
            pct = int(100 * ev["value"] / ev["max"])
            now = time.monotonic()
            if ev["value"] == ev["max"] or (pct >= self.last_pct + 10 and now - self.last_print > 1.0):
                self.last_pct, self.last_print = pct, now
                self._print(f"      training {ev['value']}/{ev['max']} ({pct}%)")
        elif t == "progress_text" and ev.get("text", "").startswith("step"):
            self.texts += 1
            now = time.monotonic()
            step, _, total = ev["text"].split()[1].partition("/")
            if now - self.last_print > 3.0 or step == total:
                self.last_print = now
                self._print(f"      {ev['text']}")

    def _print(self, line):
        print(line, file=self.out, flush=True)


class Demo:
    def __init__(self, args):
        self.args = args
        self.s = settings_for(args)
        self.out = Path(args.out).resolve()
        self.timings: dict[str, float] = {}
        self.summary: dict = {"settings": self.s, "workflows": {}}

    # -- helpers --------------------------------------------------------------------------

    def run(self, label: str, graph: dict, timeout: float) -> Result:
        print(f"  queue {label}", flush=True)
        t0 = time.monotonic()
        res = self.client.run(graph, timeout=timeout, on_event=ProgressPrinter(graph))
        dt = time.monotonic() - t0
        self.timings[label] = self.timings.get(label, 0.0) + dt
        if res.node_errors:  # the shipped graphs, filled in by the demo, must be valid as queued
            raise SystemExit(f"workflow {label}: ComfyUI ran only part of it: "
                             f"{describe_rejection({'node_errors': res.node_errors})}")
        if not res.ok:
            raise SystemExit(f"workflow {label} failed: {res.error}\n(ComfyUI log: {self.server.log_path})")
        print(f"    done in {dt:.1f} s", flush=True)
        return res

    def collect_images(self, res: Result, graph: dict, stem: str) -> list[str]:
        saved = []
        for nid, item in res.files(kinds=("images",)):
            node = graph.get(nid, {})
            if node.get("class_type") == "LossGraphNode":
                dest = self.out / f"loss_{stem}.png"
            else:
                tag = api_graph.title(node).lower().replace(" ", "_").replace("(", "").replace(")", "")
                dest = self.out / "images" / f"{stem}_{tag}.png"
            self.client.download(item, dest)
            saved.append(str(dest.relative_to(self.out)))
        return saved

    def newest(self, folder: Path, pattern: str) -> Path:
        files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
        if not files:
            raise SystemExit(f"expected a file {pattern} in {folder}; ComfyUI log: {self.server.log_path}")
        return files[-1]

    def cpu_training(self, g: dict):
        """On a CPU, train in fp32 without gradient checkpointing: bf16 matmuls are several times
        slower there than fp32, and memory is not what limits a small model."""
        if not self.gpu:
            api_graph.set_input(g, "PaRa Trainer.training_dtype", "fp32")
            api_graph.set_input(g, "PaRa Trainer.gradient_checkpointing", False)

    def base_graph(self, name: str) -> dict:
        pick = getattr(api_graph, "pick", None)  # the workflow's variant for this ComfyUI, if it has one
        g = api_graph.load(pick(name, self.node_types) if pick else name)
        api_graph.set_input(g, "Load Checkpoint.ckpt_name", self.ckpt_name)
        s = self.s
        g = skip_image_scaling(g)
        g = api_graph.shrink(g, size=s["size"], sample_steps=s["sample_steps"])
        for node in g.values():
            keys = {"KSampler": ("cfg", "sampler_name", "scheduler"),
                    "PaRaTrainer": ("learning_rate", "batch_size")}.get(node["class_type"], ())
            node["inputs"].update({k: s[k] for k in keys if k in s})
        return g

    # -- the workflows ----------------------------------------------------------------------

    def train_subject(self, word: str) -> Path:
        """Workflow 1: train on a folder of captioned images, then generate."""
        g = self.base_graph("1_train_subject")
        api_graph.set_input(g, "Training images + captions.folder", f"demo_{word}")
        api_graph.set_input(g, "PaRa Trainer.steps", self.s["train_steps"])
        api_graph.set_input(g, "PaRa Trainer.save_every", self.s["train_steps"])
        api_graph.set_input(g, "PaRa Trainer.filename_prefix", f"demo_{word}")
        api_graph.set_input(g, "PaRa Trainer.trigger_words", word)
        self.cpu_training(g)
        api_graph.set_input(g, "Plot Loss Graph.filename_prefix", f"demo_loss_{word}")
        api_graph.set_input(g, "Prompt.text", PROMPT_A if word == "sks" else PROMPT_B)
        api_graph.set_input(g, "Save Image.filename_prefix", f"demo/1_train_{word}")
        res = self.run(f"1_train_subject ({word})", g, timeout=self.args.timeout)
        images = self.collect_images(res, g, f"1_train_{word}")
        para = self.newest(self.server.models_dir / "para", f"demo_{word}_*_step*.safetensors")
        self.results[word] = para
        self.summary["workflows"][f"1_train_subject ({word})"] = {"images": images,
                                                                   "para_file": f"para/{RESULT_NAMES[word]}"}
        return para

    def merge(self, para_a: Path, para_b: Path):
        """Workflow 3: two subjects merged with PaRa Merge, then generate."""
        g = self.base_graph("3_merge_two_subjects")
        api_graph.set_input(g, "Subject A.para_name", para_a.name)
        api_graph.set_input(g, "Subject B.para_name", para_b.name)
        api_graph.set_input(g, "Prompt.text", PROMPT_MERGED)
        api_graph.set_input(g, "Save merged.filename_prefix", "demo_merged")
        api_graph.set_input(g, "Save Image.filename_prefix", "demo/3_merge")
        res = self.run("3_merge_two_subjects", g, timeout=600)
        images = self.collect_images(res, g, "3_merge")
        self.results["merged"] = self.newest(self.server.models_dir / "para", "demo_merged_*.safetensors")
        self.summary["workflows"]["3_merge_two_subjects"] = {"images": images,
                                                             "para_file": f"para/{RESULT_NAMES['merged']}"}

    def edit(self):
        """Workflow 4: single-image editing (train on one image + caption, generate an edited prompt)."""
        make_edit_image(self.server.input_dir / "demo_edit.png", self.s["size"])
        shutil.copy2(self.server.input_dir / "demo_edit.png", self.out / "images" / "4_edit_input.png")
        g = self.base_graph("4_single_image_edit")
        api_graph.set_input(g, "Load Image (the image to edit).image", "demo_edit.png")
        api_graph.set_input(g, "Caption (describes the image).text", EDIT_CAPTION)
        api_graph.set_input(g, "Edited prompt.text", EDIT_PROMPT)
        api_graph.set_input(g, "PaRa Trainer.steps", self.s["edit_steps"])
        api_graph.set_input(g, "PaRa Trainer.filename_prefix", "demo_edit")
        self.cpu_training(g)
        api_graph.set_input(g, "Save Image (edit).filename_prefix", "demo/4_edit")
        api_graph.set_input(g, "Save Image (caption).filename_prefix", "demo/4_edit_caption")
        res = self.run("4_single_image_edit", g, timeout=self.args.timeout)
        images = self.collect_images(res, g, "4_edit")
        self.summary["workflows"]["4_single_image_edit"] = {
            "images": ["images/4_edit_input.png"] + images, "caption": EDIT_CAPTION, "edited_prompt": EDIT_PROMPT}

    def export(self, para_a: Path):
        """Workflow 5: export as a standard LoRA, then generate with the stock Load LoRA node.
        The LoRA does not exist before the export, so the first queue holds only the export
        branch (what a user gets by queueing with the Load LoRA branch bypassed): a graph whose
        Load LoRA names a missing file fails validation for that branch. Then the full graph,
        with the new file picked in Load LoRA."""
        g = self.base_graph("5_export_as_lora")
        api_graph.set_input(g, "PaRa Load.para_name", para_a.name)
        api_graph.set_input(g, "PaRa Export LoRA.filename_prefix", "demo_lora")
        api_graph.set_input(g, "Prompt.text", PROMPT_A)
        api_graph.set_input(g, "Save Image.filename_prefix", "demo/5_lora")
        first = self.run("5_export_as_lora (export)", only_for(g, api_graph.find(g, "PaRa Export LoRA")), timeout=600)
        lora = self.newest(self.server.models_dir / "loras", "demo_lora_*.safetensors")
        api_graph.set_input(g, "Load LoRA (exported file).lora_name", lora.name)
        res = self.run("5_export_as_lora (generate)", g, timeout=600)
        images = self.collect_images(res, g, "5_lora")
        self.results["lora"] = lora
        self.summary["workflows"]["5_export_as_lora"] = {"images": images, "lora_file": f"lora/{RESULT_NAMES['lora']}",
                                                        "first_queue_outputs": sorted(first.outputs)}

    # -- main --------------------------------------------------------------------------------

    def main(self) -> int:
        args = self.args
        comfy_root = comfyui.find_comfyui()
        if comfy_root is None:
            print(GET_COMFYUI, file=sys.stderr)
            return 2
        t_start = time.monotonic()
        if args.checkpoint:
            ckpt = user_checkpoint(args.checkpoint, comfy_root)
            what = f"your checkpoint {ckpt.name}, at the paper's settings"
            self.ckpt_name = ckpt.name
        else:
            print("preparing the demo model (built once, then cached) ...", flush=True)
            # the build runs in this process with the thread count the demo gives the server (below):
            # --threads, else one (the small model's work is too fine-grained for more on a busy machine)
            ckpt, what = demo_checkpoint(args.quick, log=lambda m: print(m, flush=True),
                                         threads=self.args.threads or (0 if args.quick else 1))
            self.ckpt_name = BASE_NAME
        self.timings["model"] = time.monotonic() - t_start
        self.gpu = self._use_gpu()
        self.out.mkdir(parents=True, exist_ok=True)
        # a fresh ComfyUI base directory each run, so the files it makes have the same names
        for sub in ("images", "para", "lora", "comfyui"):
            shutil.rmtree(self.out / sub, ignore_errors=True)
        (self.out / "images").mkdir()

        threads = self.args.threads
        if threads is None and not self.gpu and not args.checkpoint:
            # The small model's work (8x8 latents) is too fine-grained for several threads: on a
            # busy 2-core machine one thread ran the trainer 2-30x faster than two.
            threads = 1
        if threads:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # for the server only
        device = "GPU" if self.gpu else "CPU" + (f" ({threads} thread{'s' if threads > 1 else ''})" if threads else "")
        self.summary["device"] = device
        print(f"ComfyUI:    {comfy_root}\ncheckpoint: {ckpt} ({what})\ndevice:     {device}\n"
              f"settings:   {json.dumps(self.s)}\noutput:     {self.out}", flush=True)
        self.server = comfy_server.ComfyServer(comfy_root, base_dir=self.out / "comfyui",
                                            device="cuda" if self.gpu else "cpu")
        self.server.add_model("checkpoints", ckpt, self.ckpt_name)
        self.results: dict[str, Path] = {}
        try:
            for word in SUBJECTS:
                make_subject_images(self.server.input_dir / f"demo_{word}", word, self.s["images"], self.s["size"])
            shutil.copytree(self.server.input_dir, self.out / "training_images", dirs_exist_ok=True)
            print(f"starting ComfyUI on {self.server.url} ...", flush=True)
            t0 = time.monotonic()
            self.server.start(timeout=180)
            self.timings["server start"] = time.monotonic() - t0
            if self.server.import_failures():
                raise SystemExit(f"this pack failed to import in ComfyUI: {self.server.import_failures()}\n"
                                 f"{self.server.log_tail()}")
            self.client = Client(self.server.url)
            self.node_types = set(self.client.object_info())
            try:
                self.client.listen()
            except OSError:
                print(f"(no live progress: /ws did not answer: {self.client.ws_error})", flush=True)
            print("workflow 1: train a subject from captioned images, then generate (two subjects)", flush=True)
            para_a = self.train_subject("sks")
            para_b = self.train_subject("zwx")
            print("workflow 3: merge the two subjects with PaRa Merge, then generate", flush=True)
            self.merge(para_a, para_b)
            print("workflow 4: single-image editing", flush=True)
            self.edit()
            print("workflow 5: export as a standard LoRA, use it with Load LoRA", flush=True)
            self.export(para_a)
            self.client.close()
        finally:
            self.server.stop()
        self.keep_results()
        self.timings["total"] = time.monotonic() - t_start
        self.write_summary(ckpt, what)
        print(f"\nall done in {self.timings['total']:.0f} s; see {self.out / 'summary.md'}")
        print(f"\nNext, a sweep of strength x seed on what the demo trained (ComfyUI log: {self.server.log_path}):\n"
              f"  {self.summary['batch_command']}")
        return 0

    def keep_results(self):
        """Give the results stable names (RESULT_NAMES) in the ComfyUI base directory, drop the
        trainer states (resuming a demo run is not a use case), and copy them into para/, lora/."""
        para_dir, lora_dir = self.server.models_dir / "para", self.server.models_dir / "loras"
        for key, path in self.results.items():
            dest = (lora_dir if key == "lora" else para_dir) / RESULT_NAMES[key]
            os.replace(path, dest)
            copy_dir = self.out / ("lora" if key == "lora" else "para")
            copy_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dest, copy_dir / dest.name)
        for state in para_dir.glob("*.trainer.pt"):
            state.unlink()

    def batch_command(self) -> str:
        """The workflows/batch.py command that sweeps strength x seed with the first subject on
        the ComfyUI base directory this run leaves behind."""
        s = self.s
        try:
            base = self.server.base_dir.relative_to(Path.cwd())
        except ValueError:
            base = self.server.base_dir
        parts = ["python", "workflows/batch.py", "2_generate_with_para_file", "--start-server", str(base),
                 "--ckpt", self.ckpt_name, "--para", RESULT_NAMES["sks"], "--size", str(s["size"]),
                 "--steps", str(s["sample_steps"])]
        for flag, key in (("--cfg", "cfg"), ("--sampler", "sampler_name"), ("--scheduler", "scheduler")):
            if key in s:
                parts += [flag, f"{s[key]:g}" if isinstance(s[key], float) else str(s[key])]
        parts += ["--prompt", PROMPT_A, "--seeds", "1,2,3", "--strengths", "0,0.5,1", "--grid", "--out", "batch_output"]
        return " ".join(shlex.quote(p) for p in parts)

    def _use_gpu(self) -> bool:
        if self.args.cpu:
            return False
        try:
            import torch
            return bool(torch.cuda.is_available())
        except Exception:
            return False

    # -- summary -----------------------------------------------------------------------------

    def write_summary(self, ckpt: Path, what: str):
        lora = self.out / "lora" / RESULT_NAMES["lora"]
        files = []
        shapes = checkpoint_shapes(ckpt)
        for f in sorted((self.out / "para").glob("*.safetensors")):
            files.append(describe_para_file(f, shapes))
        lora_info = {"file": f"lora/{lora.name}", "bytes": lora.stat().st_size, "params": count_params(lora),
                     "max_pixel_difference_to_para_image": image_difference(
                         self.out / "images" / "1_train_sks_save_image.png", self.out / "images" / "5_lora_save_image.png")}
        self.summary.update(checkpoint=str(ckpt), checkpoint_is=what,
                            timings_s={k: round(v, 1) for k, v in self.timings.items()}, para_files=files,
                            exported_lora=lora_info, comfyui_base=str(self.server.base_dir),
                            batch_command=self.batch_command())
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(self.summary))
        print("\n" + summary_markdown(self.summary))


# ------------------------------------------------------------------------------------------
# Graph edits
# ------------------------------------------------------------------------------------------

def only_for(graph: dict, node_id: str) -> dict:
    """The part of graph that node_id needs (it and everything upstream): what ComfyUI runs
    when only that output is queued."""
    keep, todo = set(), [node_id]
    while todo:
        nid = todo.pop()
        if nid in keep:
            continue
        keep.add(nid)
        todo += [v[0] for v in graph[nid].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2
                 and isinstance(v[0], str)]
    return {nid: n for nid, n in graph.items() if nid in keep}


def skip_image_scaling(graph: dict) -> dict:
    """Take ImageScaleToTotalPixels nodes out (their consumers read the unscaled images): the
    demo draws its images at the model's size, and that node cannot go below ~100 px (0.01
    megapixels), so it would hand the 64 px model larger images than it was made for."""
    g = {nid: dict(n, inputs=dict(n.get("inputs", {}))) for nid, n in graph.items()}
    for nid in [k for k, n in g.items() if n["class_type"] == "ImageScaleToTotalPixels"]:
        source = g[nid]["inputs"].get("image")
        del g[nid]
        for n in g.values():
            for k, v in n["inputs"].items():
                if isinstance(v, list) and len(v) == 2 and v[0] == nid:
                    n["inputs"][k] = source
    return g


# ------------------------------------------------------------------------------------------
# File facts for the summary (safetensors headers only, through safetensors.safe_open: no torch)
# ------------------------------------------------------------------------------------------

def _header(path: Path) -> tuple[dict, dict]:
    """({tensor name: {"shape": [...]}}, metadata) of a safetensors file, tensors left unread."""
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        header = {k: {"shape": list(f.get_slice(k).get_shape())} for k in f.keys()}
        meta = f.metadata() or {}
    return header, meta


def count_params(path: Path) -> int:
    header, _ = _header(path)
    return sum(math.prod(v["shape"]) for v in header.values())


def checkpoint_shapes(ckpt: Path) -> dict[str, list[int]]:
    """{diffusion_model.<layer>: weight shape} of an SD-style checkpoint."""
    header, _ = _header(ckpt)
    out = {}
    for k, v in header.items():
        if k.endswith(".weight") and "diffusion_model." in k:
            out[k[k.index("diffusion_model."):-len(".weight")]] = v["shape"]
    return out


def describe_para_file(path: Path, shapes: dict) -> dict:
    """Rank, layers, parameters and size of a PaRa file, and the same for an equivalent LoRA
    (same layers and ranks: r * (out + in) parameters per layer, vs r * out for PaRa)."""
    header, meta = _header(path)
    params = sum(math.prod(v["shape"]) for v in header.values())
    kind = meta.get("para.kind", "?")
    ranks: dict[str, int] = {}
    for k, v in header.items():
        for suffix in (".para_B", ".para_U"):
            if k.endswith(suffix):
                ranks[k[:-len(suffix)]] = v["shape"][1]
    lora_params = 0
    for layer, r in ranks.items():
        shape = shapes.get(layer)
        if shape:
            lora_params += r * (shape[0] + math.prod(shape[1:]))
    bytes_per = (path.stat().st_size / params) if params else 4
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    train = json.loads(meta.get("para.train", "{}") or "{}")
    return {
        "file": f"para/{path.name}", "kind": kind, "merge_mode": meta.get("para.merge_mode"),
        "rank": meta.get("para.rank"), "layers": len(ranks), "preset": meta.get("para.layers"),
        "effective_ranks": {f"r{r}": n for r, n in sorted(counts.items())},
        "params": params, "bytes": path.stat().st_size,
        "equivalent_lora_params": lora_params, "equivalent_lora_bytes_estimate": int(lora_params * bytes_per),
        "steps": train.get("steps"), "final_loss": train.get("final_loss"), "trigger_words": train.get("trigger_words"),
    }


def image_difference(a: Path, b: Path) -> int | None:
    """Largest per-pixel difference (0-255) of two images of the same size (None if unavailable)."""
    try:
        import numpy as np
        from PIL import Image
        x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
        return int(np.abs(x - y).max()) if x.shape == y.shape else None
    except (OSError, ImportError):
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def summary_markdown(s: dict) -> str:
    lines = ["# PaRa demo summary", "",
             f"- checkpoint: `{Path(s['checkpoint']).name}` ({s['checkpoint_is']})",
             f"- device: {s['device']}; settings: " + ", ".join(f"{k} {v}" for k, v in s["settings"].items()), "",
             "## Times", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["timings_s"].items()]
    lines += ["", "## PaRa files vs an equivalent LoRA (same layers, same ranks)", "",
              "| file | kind | layers | ranks | parameters | size | LoRA parameters | LoRA size (est.) | final loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in s["para_files"]:
        kind = f["kind"] + (f" ({f['merge_mode']})" if f.get("merge_mode") else "")
        ranks = ", ".join(f"{n} x {r}" for r, n in f["effective_ranks"].items())
        loss = f"{f['final_loss']:.4f}" if isinstance(f.get("final_loss"), (int, float)) else ""
        lines.append(f"| `{f['file']}` | {kind} | {f['layers']} | {ranks} | {f['params']:,} | {_mb(f['bytes'])} | "
                     f"{f['equivalent_lora_params']:,} | {_mb(f['equivalent_lora_bytes_estimate'])} | {loss} |")
    lo = s["exported_lora"]
    lines += ["", f"Exported LoRA (workflow 5, exact; rank = the PaRa rank): `{lo['file']}`, "
              f"{lo['params']:,} parameters, {_mb(lo['bytes'])}."]
    if lo.get("max_pixel_difference_to_para_image") is not None:
        lines.append(f"Its image (stock Load LoRA) differs from the PaRa image of workflow 1 (same prompt and seed) by "
                     f"at most {lo['max_pixel_difference_to_para_image']}/255 per pixel.")
    lines += ["", "## Images", ""]
    for name, w in s["workflows"].items():
        lines.append(f"- {name}: " + ", ".join(f"`{i}`" for i in w.get("images", [])))
    lines += ["", "## Next", "", f"`{s['comfyui_base']}` is a ComfyUI base directory holding the checkpoint, the PaRa "
              "files and the LoRA under the names above. A strength x seed sweep on it:", "",
              "    " + s["batch_command"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="demo_output", help="output folder (default: ./demo_output)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings on a random-weight model (noise pictures): a smoke test of every step")
    p.add_argument("--checkpoint", metavar="NAME",
                   help="a checkpoint in ComfyUI/models/checkpoints (or a path); runs at the paper's settings")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even when a GPU is there")
    p.add_argument("--threads", type=int, help="CPU threads for ComfyUI (default: 1 for the built-in small model "
                                                "on a CPU, else PyTorch's choice)")
    p.add_argument("--size", type=int, help="image size in pixels (overrides the preset)")
    p.add_argument("--train-steps", type=int, help="training steps per subject (overrides the preset)")
    p.add_argument("--edit-steps", type=int, help="training steps of the single-image edit (overrides the preset)")
    p.add_argument("--sample-steps", type=int, help="KSampler steps (overrides the preset)")
    p.add_argument("--images", type=int, help="training images per subject (overrides the preset)")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds one training workflow may take")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return Demo(parse_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
