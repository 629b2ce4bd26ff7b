"""PaRa in ComfyUI's bypass mode: loading a PaRa file with
comfy.sd.load_bypass_lora_for_models / "Load LoRA (Bypass)" gives what weight patching gives,
at every strength, biases included; an interface PaRa cannot serve is an error, never a no-op."""

import pytest
import torch

from harness import models
from harness.server import load_latent

pytestmark = pytest.mark.comfyui
STRENGTHS = (1.0, 0.5, 2.0, -1.0)


@pytest.fixture(scope="module")
def mod(mods):
    return mods


@pytest.fixture(scope="module")
def bypass_api(comfy_in_process):
    import comfy.sd
    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
        pytest.skip("this ComfyUI has no bypass loading (added after 0.3.64)")
    return comfy.sd


def with_random_biases(model, seed=5):
    """The test models are built with zero biases; the bypass form needs the real bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.model.diffusion_model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model


def subject_lora(mod, model, seed, rank=2, preset="full", merged=False):
    """A PaRa file's tensors (as Load LoRA reads them) for every layer of ``preset``."""
    core, patching = mod("para_core"), mod("nodes.patching")
    shapes = patching.layer_shapes(model)
    layers = core.select_layers(shapes, preset)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for l in layers:
        out = shapes[l][0]
        if merged:
            U = torch.linalg.qr(torch.randn(out, rank, generator=g))[0]
            sd[f"{l}.para_U"], sd[f"{l}.para_V"] = U * 0.7, torch.randn(out, rank, generator=g) * 0.3
        else:
            sd[f"{l}.para_B"] = torch.randn(out, rank, generator=g)
    return sd


def sample(model, seed=3):
    pos, neg = models.random_conditioning(1), models.random_conditioning(2)
    return models.sample_latent(model, pos, neg, seed=seed, steps=2, cfg=2.0)


@pytest.mark.parametrize("merged", [False, True], ids=["subject", "merged"])
def test_bypass_loading_equals_weight_patching_at_every_strength(tiny_model_factory, mod, bypass_api, merged):
    model = with_random_biases(tiny_model_factory(seed=0))
    lora = subject_lora(mod, model, seed=1, merged=merged)
    base = sample(model)
    for s in STRENGTHS:
        patched, _ = bypass_api.load_lora_for_models(model, None, lora, s, 0)
        bypassed, _ = bypass_api.load_bypass_lora_for_models(model, None, lora, s, 0)
        assert bypassed.injections, "the bypass loader injected nothing for a PaRa file"
        want, got = sample(patched), sample(bypassed)
        assert (want - base).abs().max() > 1e-2, "PaRa changed nothing (test is not sensitive)"
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=lambda m: f"strength {s}: {m}")


def test_reference_kind_bypass_equals_weight_patching(tiny_model_factory, mod, bypass_api):
    adapter_mod = mod("nodes.adapters.para")
    if not hasattr(adapter_mod, "ReferenceAdapter"):
        pytest.skip("no reference-kind adapter in this tree yet")
    model = with_random_biases(tiny_model_factory(seed=0))
    shapes = mod("nodes.patching").layer_shapes(model)
    layers = mod("para_core").select_layers(shapes, "full")
    g = torch.Generator().manual_seed(6)
    lora = {}
    for l in layers:
        out, inner = shapes[l][0], int(torch.tensor(shapes[l][1:]).prod())
        lora[f"{l}.para_U"] = torch.randn(out, 2, generator=g) * 0.3
        lora[f"{l}.para_D"] = torch.randn(2, inner, generator=g) / inner ** 0.5
    base = sample(model)
    for s in (1.0, 0.5, 2.0):
        patched, _ = bypass_api.load_lora_for_models(model, None, lora, s, 0)
        bypassed, _ = bypass_api.load_bypass_lora_for_models(model, None, lora, s, 0)
        want, got = sample(patched), sample(bypassed)
        assert (want - base).abs().max() > 1e-2
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=lambda m: f"strength {s}: {m}")


@pytest.mark.parametrize("kind", ["subject", "reference"])
def test_float8_files_bypass_like_weight_patching(tiny_model_factory, mod, bypass_api, kind):
    model = with_random_biases(tiny_model_factory(seed=0))
    if kind == "subject":
        lora = subject_lora(mod, model, seed=7, preset="noxattn")
    else:
        shapes = mod("nodes.patching").layer_shapes(model)
        g = torch.Generator().manual_seed(8)
        lora = {}
        for l in mod("para_core").select_layers(shapes, "noxattn"):
            inner = int(torch.tensor(shapes[l][1:]).prod())
            lora[f"{l}.para_U"] = torch.randn(shapes[l][0], 2, generator=g) * 0.3
            lora[f"{l}.para_D"] = torch.randn(2, inner, generator=g) / inner ** 0.5
    lora = {k: v.to(torch.float8_e4m3fn) for k, v in lora.items()}
    patched, _ = bypass_api.load_lora_for_models(model, None, lora, 1.0, 0)
    bypassed, _ = bypass_api.load_bypass_lora_for_models(model, None, lora, 1.0, 0)
    want, got = sample(patched), sample(bypassed)
    assert (want - sample(model)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_bypass_form_keeps_the_bias_per_layer(mod, comfy_in_process):
    """Linear and strided/dilated/padded convs, with and without bias, the bias read from the
    module and from the forward itself (what offloaded / quantized layers need)."""
    adapter_mod = mod("nodes.adapters.para")
    g = torch.Generator().manual_seed(0)
    layers = [(torch.nn.Linear(12, 48), torch.randn(2, 5, 12, generator=g)),
              (torch.nn.Linear(12, 48, bias=False), torch.randn(3, 12, generator=g)),
              (torch.nn.Conv2d(6, 48, 3, stride=2, padding=1, dilation=2), torch.randn(2, 6, 9, 9, generator=g)),
              (torch.nn.Conv2d(6, 48, 1), torch.randn(1, 6, 4, 4, generator=g)),
              (torch.nn.Conv1d(6, 48, 5, padding=0), torch.randn(1, 6, 11, generator=g))]
    for layer, x in layers:
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.normal_(generator=g)
        B = torch.randn(48, 3, generator=g)
        Q = torch.linalg.qr(B)[0]
        for s in (1.0, 0.5, 2.0):
            W = layer.weight.reshape(48, -1)
            Wp = (W - s * Q @ (Q.t() @ W)).reshape(layer.weight.shape)
            want = layer._conv_forward(x, Wp, layer.bias) if hasattr(layer, "_conv_forward") \
                else torch.nn.functional.linear(x, Wp, layer.bias)
            ad = adapter_mod.ParaAdapter(set(), ("B", B))
            ad.multiplier = s
            got_module = ad.bypass_forward(layer.forward, x)
            # a forward that hides its module: the bias comes from the zero-input probe
            ad.is_conv, ad.conv_dim = not isinstance(layer, torch.nn.Linear), len(getattr(layer, "kernel_size", ()))
            ad.kernel_size, ad.kw_dict = getattr(layer, "kernel_size", ()), {"dilation": getattr(layer, "dilation", ())}
            got_probe = ad.bypass_forward(lambda t: layer(t), x)
            torch.testing.assert_close(got_module, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_probe, want, rtol=1e-5, atol=1e-5)


def test_h_alone_is_an_error_not_a_no_op(mod, comfy_in_process):
    ad = mod("nodes.adapters.para").ParaAdapter(set(), ("B", torch.randn(8, 2)))
    with pytest.raises(NotImplementedError, match="bias"):
        ad.h(torch.randn(1, 8), torch.randn(1, 8))


def test_bypass_at_strength_zero_is_the_base_model(tiny_model_factory, mod, bypass_api):
    model = with_random_biases(tiny_model_factory(seed=0))
    lora = subject_lora(mod, model, seed=2, preset="noxattn")
    zero, _ = bypass_api.load_bypass_lora_for_models(model, None, lora, 0.0, 0)
    assert zero.injections
    assert torch.equal(sample(zero), sample(model))


# ------------------------------------------------------------------ through the server (0.33)

@pytest.fixture(scope="module")
def bias_checkpoint(sd15_checkpoint):
    """The test checkpoint with random diffusion-model biases (the builder zeroes them), cached."""
    path = models.cache_dir() / "test_sd15_random_biases.safetensors"
    if not path.exists() or path.stat().st_mtime < sd15_checkpoint.stat().st_mtime:
        from safetensors.torch import load_file
        sd = load_file(str(sd15_checkpoint))
        g = torch.Generator().manual_seed(11)
        for k, v in sd.items():
            if k.startswith("model.diffusion_model.") and k.endswith(".bias"):
                sd[k] = (torch.randn(v.shape, generator=g) * 0.2).to(v.dtype)
        models.atomic_save(sd, path, {})
    return path


def test_load_lora_bypass_node_equals_para_loader_through_the_server(comfy_server, bias_checkpoint, mod):
    if "LoraLoaderBypassModelOnly" not in comfy_server.client.object_info():
        pytest.skip("this ComfyUI has no Load LoRA (Bypass) node (added after 0.3.64)")
    from safetensors import safe_open
    core = mod("para_core")
    comfy_server.add_model("checkpoints", bias_checkpoint)
    shapes = {}
    with safe_open(str(bias_checkpoint), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(".weight") and len(f.get_slice(k).get_shape()) >= 2:
                shapes[k[len("model."):-len(".weight")]] = tuple(f.get_slice(k).get_shape())
    layers = core.select_layers(shapes, "full")
    g = torch.Generator().manual_seed(4)
    state = core.ParaState(B={l: torch.randn(shapes[l][0], 4, generator=g) for l in layers},
                           metadata=core.build_metadata("subject", rank=4, layers="full", base_arch="SD15"))
    name = "bypass_subject.safetensors"
    core.save_para(state, str(comfy_server.models_dir / "para" / name))
    core.save_para(state, str(comfy_server.models_dir / "loras" / name))

    def run(prefix, node=None):
        g = models.txt2img_graph(ckpt_name=bias_checkpoint.name, save="latent", seed=9, prefix=prefix)
        if node is not None:
            g["m"] = node
            g["sampler"]["inputs"]["model"] = ["m", 0]
        (path,) = comfy_server.output_files(comfy_server.run(g, timeout=180), "latents")
        return load_latent(path)

    base = run("bp_base")
    for s in (1.0, 0.5, 2.0):
        para = run(f"bp_para_{s}", {"class_type": "PaRaLoader", "inputs": {
            "model": ["ckpt", 0], "para_name": name, "strength": s}})
        bypass = run(f"bp_bypass_{s}", {"class_type": "LoraLoaderBypassModelOnly", "inputs": {
            "model": ["ckpt", 0], "lora_name": name, "strength_model": s}})
        assert (para - base).abs().max() > 1e-3, "PaRa changed nothing (test is not sensitive)"
        print(f"strength {s}: |PaRa - base| max {(para - base).abs().max():.4g}, "
              f"|bypass - PaRa Loader| max {(bypass - para).abs().max():.3g}")
        torch.testing.assert_close(bypass, para, rtol=1e-3, atol=1e-3, msg=lambda m: f"strength {s}: {m}")


def _conv_layer(mod, model):
    shapes = mod("nodes.patching").layer_shapes(model)
    return next((l, shapes[l]) for l in mod("para_core").select_layers(shapes, "noxattn") if len(shapes[l]) == 4)


@pytest.mark.parametrize("case, says", [
    ("D_columns", "para_D has 100 input columns"),
    ("U_rows", "output channels"),
    ("rank_mismatch", "disagree on the rank"),
    ("int32", "dtype torch.int32"),
    ("bool", "dtype torch.bool"),
])
def test_reference_misfits_in_bypass_mode_are_clear_errors_naming_the_layer(tiny_model_factory, mod, bypass_api,
                                                                             case, says):
    """Not a raw "shape '[2, 320, 3, 3]' is invalid for input of size 200" during sampling."""
    model = tiny_model_factory(seed=0)
    l, shape = _conv_layer(mod, model)
    out, inner = shape[0], int(torch.tensor(shape[1:]).prod())
    U, D = torch.randn(out, 2), torch.randn(2, inner) * 0.01
    if case == "D_columns":
        D = torch.randn(2, 100)
    elif case == "U_rows":
        U = torch.randn(out + 3, 2)
    elif case == "rank_mismatch":
        D = torch.randn(3, inner)
    elif case in ("int32", "bool"):
        U, D = U.to(getattr(torch, case)), D.to(getattr(torch, case))
    with pytest.raises(mod("para_core").ParaError, match=says) as e:
        bypassed, _ = bypass_api.load_bypass_lora_for_models(model, None, {f"{l}.para_U": U, f"{l}.para_D": D}, 1.0, 0)
        sample(bypassed)
    assert l in str(e.value)


@pytest.mark.parametrize("kind", ["subject", "merged"])
def test_a_paper_file_for_another_model_is_a_clear_error_in_bypass_mode(tiny_model_factory, mod, bypass_api, kind):
    model = tiny_model_factory(seed=0)
    l, shape = _conv_layer(mod, model)
    U = torch.randn(shape[0] + 3, 2)
    lora = {f"{l}.para_B": U} if kind == "subject" else {f"{l}.para_U": U, f"{l}.para_V": U}
    with pytest.raises(mod("para_core").ParaError, match="output channels in the file") as e:
        bypassed, _ = bypass_api.load_bypass_lora_for_models(model, None, lora, 1.0, 0)
        sample(bypassed)
    assert l in str(e.value)


def test_a_rank_zero_reference_layer_changes_nothing_in_either_mode(tiny_model_factory, mod, bypass_api):
    model = tiny_model_factory(seed=0)
    l, shape = _conv_layer(mod, model)
    lora = {f"{l}.para_U": torch.zeros(shape[0], 0), f"{l}.para_D": torch.zeros(0, int(torch.tensor(shape[1:]).prod()))}
    base = sample(model)
    for load in (bypass_api.load_lora_for_models, bypass_api.load_bypass_lora_for_models):
        loaded, _ = load(model, None, lora, 1.0, 0)
        torch.testing.assert_close(sample(loaded), base)
