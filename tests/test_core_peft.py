"""PEFT's DEFT (para=true) adapters read and written by para_core/peft.py, checked against the
real peft and diffusers packages on a tiny diffusers UNet (no ComfyUI needed)."""
import copy
import json
import os
import shutil
import sys

import pytest
import torch

from core_helpers import CKPT_LAYERS, PARA_LAYERS, make_checkpoint, make_subject
from para_core import ParaError, ParaState, load_para, merge_states, save_para
from para_core import peft as core_peft
from para_core.base_model import Checkpoint
from para_core.functional.projection import reduce_weight
from para_core.cli import main

peft = pytest.importorskip("peft", minversion="0.21.2",
                           reason="peft >= 0.21.2 (the version with DEFT) is not installed: pip install 'peft>=0.21.2'")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install diffusers")
from peft import DeftConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "linear_1", "linear_2"]


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 7, 16, generator=g)


def deft_model(unet, method, seed=3, std=None, **cfg):
    """A PeftModel with DEFT on TARGETS and a random deft_P everywhere."""
    model = get_peft_model(copy.deepcopy(unet), DeftConfig(r=cfg.pop("r", 4), para=cfg.pop("para", True),
                                                           decomposition_method=method, target_modules=TARGETS, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deft_P" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (std or p.shape[0] ** -0.5))
    return model.eval()


def deft_layers(model):
    """{diffusers module path: DeftLinear} of a PeftModel."""
    from peft.tuners.deft.layer import DeftLayer
    return {n[len("base_model.model."):]: m for n, m in model.named_modules() if isinstance(m, DeftLayer)}


def weights_with(unet, weights):
    """A copy of ``unet`` whose named Linear weights are replaced ({module path: W'})."""
    out = copy.deepcopy(unet)
    with torch.no_grad():
        for path, w in weights.items():
            out.get_submodule(path).weight.copy_(w)
    return out


def our_weights(unet, state, strength=1.0):
    return {l: reduce_weight(unet.get_submodule(l).weight.detach().float(), U, V, strength)
            for l, (U, V) in state.factors().items()}


def output(model):
    x, t, c = unet_inputs()
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=c).sample


# ------------------------------------------------------------------------------- import

@pytest.mark.parametrize("method", ["qr", "relu"])
def test_import_gives_peft_weights_and_output(unet, tmp_path, method):
    model = deft_model(unet, method)
    model.save_pretrained(tmp_path / "a")
    state = load_para(str(tmp_path / "a"))
    assert state.kind == ("subject" if method == "qr" else "merged")
    assert core_peft.has_diffusers_names(state)
    layers = deft_layers(model)
    assert set(state.layers) == set(layers)
    ours = our_weights(unet, state)
    worst = 0.0
    for path, layer in layers.items():
        theirs = (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach()
        worst = max(worst, float((theirs - ours[path]).abs().max()))
    assert worst < 1e-5, worst
    out_theirs, out_ours, out_base = output(model), output(weights_with(unet, ours)), output(unet)
    diff = float((out_theirs - out_ours).abs().max())
    effect = float((out_theirs - out_base).abs().max())
    print(f"\n{method}: max |W' ours - W' peft| = {worst:.3g}; output max diff {diff:.3g} (adapter effect {effect:.3g})")
    assert effect > 100 * diff and diff < 1e-4


def test_import_of_the_weights_file_or_the_config(unet, tmp_path):
    deft_model(unet, "qr").save_pretrained(tmp_path / "a")
    ref = load_para(str(tmp_path / "a"))
    for p in (tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"):
        st = load_para(str(p))
        assert st.layers == ref.layers and all(torch.equal(st.B[l], ref.B[l]) for l in st.layers)
    # renamed to sit in models/para: <name>.safetensors + <name>.json
    shutil.copy(tmp_path / "a" / "adapter_model.safetensors", tmp_path / "dog.safetensors")
    shutil.copy(tmp_path / "a" / "adapter_config.json", tmp_path / "dog.json")
    assert load_para(str(tmp_path / "dog.safetensors")).kind == "subject"


def test_para_false_is_refused_naming_the_injection_term(unet, tmp_path):
    deft_model(unet, "qr", para=False).save_pretrained(tmp_path / "d")
    for p in (tmp_path / "d", tmp_path / "d" / "adapter_model.safetensors"):
        with pytest.raises(ParaError, match=r"para=false.*injection term"):
            load_para(str(p))


def test_weights_without_their_config_are_refused(unet, tmp_path):
    deft_model(unet, "qr").save_pretrained(tmp_path / "a")
    os.makedirs(tmp_path / "alone")
    shutil.copy(tmp_path / "a" / "adapter_model.safetensors", tmp_path / "alone" / "x.safetensors")
    with pytest.raises(ParaError, match="adapter_config.json"):
        load_para(str(tmp_path / "alone" / "x.safetensors"))


def test_trained_biases_and_other_peft_types_are_refused(unet, tmp_path):
    deft_model(unet, "qr", bias="all").save_pretrained(tmp_path / "b")
    with pytest.raises(ParaError, match="biases"):
        load_para(str(tmp_path / "b"))
    from peft import LoraConfig
    get_peft_model(copy.deepcopy(unet), LoraConfig(r=2, target_modules=["to_q"])).save_pretrained(tmp_path / "l")
    with pytest.raises(ParaError, match="LORA adapter, not DEFT"):
        load_para(str(tmp_path / "l"))
    with pytest.raises(ParaError, match="LoRA file"):
        load_para(str(tmp_path / "l" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["qr", "relu"])
def test_peft_tensors_go_through_the_validator_of_every_para_file(unet, tmp_path, method):
    """A deft_P with NaN is refused naming its layer; a float8 one is read exactly in float32
    (as para_B/para_U are), then expressed like any other."""
    from safetensors.torch import load_file, save_file
    deft_model(unet, method).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    for name, change in (("nan", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
                         ("f8", lambda t: t.to(torch.float8_e4m3fn))):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "a", folder)
        save_file(dict(tensors, **{key: change(tensors[key])}), str(folder / "adapter_model.safetensors"))
        if name == "nan":
            with pytest.raises(ParaError, match=r"deft_P read as para_B.*NaN or Inf"):
                load_para(str(folder))
            continue
        state = load_para(str(folder))
        layer = key[len("base_model.model."):-len(".deft_P")]
        stored = state.B[layer] if method == "qr" else state.U[layer]
        assert stored.dtype == torch.float32
        assert torch.equal(stored, tensors[key].to(torch.float8_e4m3fn).float())
        if method == "relu":
            assert torch.equal(state.V[layer], torch.relu(stored))


def test_alpha_does_not_change_a_para_adapter(unet, tmp_path):
    """alpha scales DEFT's injection term only; para=true has none (peft and this reader agree)."""
    a, b = deft_model(unet, "qr", alpha=64), deft_model(unet, "qr")
    assert torch.equal(output(a), output(b))
    a.save_pretrained(tmp_path / "a")
    ours = our_weights(unet, load_para(str(tmp_path / "a")))
    assert float((output(weights_with(unet, ours)) - output(a)).abs().max()) < 1e-4


# ------------------------------------------------------------------------------- export

def test_export_loads_with_from_pretrained_and_round_trips_exactly(unet, tmp_path):
    model = deft_model(unet, "qr")
    model.save_pretrained(tmp_path / "a")
    state = load_para(str(tmp_path / "a"))
    report = core_peft.save_peft(state, str(tmp_path / "b"), {}, {})
    assert report["decomposition"] == "qr" and not report["left_out_conv"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "b")).eval()
    for path, layer in deft_layers(loaded).items():
        assert torch.equal(layer.deft_P["default"].detach(), state.B[path])
    assert torch.equal(output(loaded), output(model))
    again = load_para(str(tmp_path / "b"))
    assert all(torch.equal(again.B[l], state.B[l]) for l in state.layers)


def diffusers_subject(unet, ranks, seed=5):
    """A subject with diffusers names, rank ranks[i % len(ranks)] per Linear layer."""
    g = torch.Generator().manual_seed(seed)
    B = {}
    for i, (name, m) in enumerate(n for n in unet.named_modules() if isinstance(n[1], torch.nn.Linear)):
        if any(name.endswith(t) for t in TARGETS):
            B[name] = torch.randn(m.out_features, ranks[i % len(ranks)], generator=g)
    return ParaState(kind="subject", B=B, metadata={core_peft.LAYER_NAMES: core_peft.DIFFUSERS}, source="subject")


def peft_weights(model):
    return {p: (l.get_base_layer().weight + l.get_delta_weight("default")).detach() for p, l in deft_layers(model).items()}


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("ranks,strength", [((2, 3), 1.0), ((2,), 0.6)])
def test_mixed_ranks_and_strengths_export_in_the_exact_relu_form(unet, tmp_path, ranks, strength):
    state = diffusers_subject(unet, ranks)
    report = core_peft.save_peft(state, str(tmp_path / "x"), {}, {}, strength=strength)
    assert report["decomposition"] == "relu" and report["r"] == 2 * max(ranks)
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "x"))
    theirs, ours = peft_weights(loaded), our_weights(unet, state, strength)
    assert set(theirs) == set(ours)
    assert max_diff(theirs, ours) < 1e-5
    # and back: the relu import reproduces the same weights
    back = our_weights(unet, load_para(str(tmp_path / "x")))
    assert max_diff(back, ours) < 1e-5


def test_merges_export_when_they_are_sums_of_projections(unet, tmp_path):
    a, b = diffusers_subject(unet, (2,), seed=1), diffusers_subject(unet, (2,), seed=2)
    for mode, ok in (("sum", True), ("union", True), ("sequential", False)):
        merged = merge_states([a, b], [0.7, 1.0], mode)
        assert core_peft.has_diffusers_names(merged)  # a merge of PEFT imports still maps its names
        if not ok:
            with pytest.raises(ParaError, match="sequential"):
                core_peft.save_peft(merged, str(tmp_path / mode), {}, {})
            assert not os.path.exists(tmp_path / mode)
            continue
        core_peft.save_peft(merged, str(tmp_path / mode), {}, {})
        loaded = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / mode))
        assert max_diff(peft_weights(loaded), our_weights(unet, merged)) < 1e-5, mode


def test_a_peft_import_does_not_merge_with_a_model_named_adapter(unet):
    a = diffusers_subject(unet, (2,))
    b = ParaState(kind="subject", B={"diffusion_model." + l: t for l, t in a.B.items()}, source="dog.safetensors")
    with pytest.raises(ParaError, match="cannot merge subject .*diffusers layer names.*one after the other"):
        merge_states([a, b], [1.0, 1.0], "sum")
    assert not core_peft.has_diffusers_names(merge_states([b, b], [1.0, 1.0], "sum"))


def test_what_has_no_deft_form_is_refused(unet, tmp_path):
    state = diffusers_subject(unet, (2,))
    for s in (0.0, -1.0):
        with pytest.raises(ParaError, match="strength"):
            core_peft.save_peft(state, str(tmp_path / "n"), {}, {}, strength=s)
    ref = ParaState(kind="reference", U={"x": torch.randn(4, 1)}, D={"x": torch.randn(1, 4)})
    with pytest.raises(ParaError, match="reference"):
        core_peft.save_peft(ref, str(tmp_path / "n"), {"x": "x"}, {"x": (4, 4)})
    assert not os.path.exists(tmp_path / "n")


# ------------------------------------------------------------------------------- the command line

def ckpt_names():
    return core_peft.diffusers_unet_names("diffusion_model." + l for l in CKPT_LAYERS)


def test_diffusers_map_of_a_checkpoint():
    names = ckpt_names()
    assert names["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert names["mid_block.resnets.0.time_emb_proj"] == "diffusion_model.middle_block.0.emb_layers.1"
    # (the full map of a real UNet is compared with ComfyUI's in test_nodes_peft.py)


def test_cli_export_peft_inspect_and_round_trip(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.safetensors"
    make_checkpoint(ckpt)
    st = make_subject(seed=1, rank=2)
    save_para(st, str(tmp_path / "dog.safetensors"))
    out = tmp_path / "dog_peft"
    assert main(["export-lora", "--base", str(ckpt), "--para", str(tmp_path / "dog.safetensors"), "--format", "peft",
                 "-o", str(out)]) == 0
    text = capsys.readouterr()
    assert "decomposition_method=qr" in text.out and "2 Linear layer(s)" in text.out
    assert "middle_block.2.out_layers.3" in text.out and "left out 2 conv layer(s)" in text.out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "DEFT" and cfg["para"] is True and cfg["r"] == 2
    assert sorted(cfg["target_modules"]) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                             "mid_block.resnets.0.time_emb_proj"]
    assert main(["inspect", str(out), "--base", str(ckpt), "--json"]) == 0
    text = capsys.readouterr()
    assert text.err.count("no base fingerprint") == 1
    data = json.loads(text.out)
    assert {l["name"] for l in data["layers"]} == {"diffusion_model." + l for l in PARA_LAYERS[:2]}
    with Checkpoint(ckpt) as c:
        back = core_peft.resolve_for_checkpoint(load_para(str(out)), c.layer_shapes())
    for layer in back.layers:
        assert torch.equal(back.B[layer], st.B[layer])  # bit for bit
    # PEFT -> LoRA works too (the names are mapped through the checkpoint)
    assert main(["export-lora", "--base", str(ckpt), "--para", str(out), "-o", str(tmp_path / "l.safetensors")]) == 0
    # and a merge of PEFT folders keeps their names: it still fits the checkpoint (bake, export)
    assert main(["merge", "--mode", "sum", f"{out}:0.5", f"{out}:0.5", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["bake", "--base", str(ckpt), "--para", str(tmp_path / "m.safetensors"),
                 "-o", str(tmp_path / "baked.safetensors")]) == 0
    assert main(["bake", "--base", str(ckpt), "--para", str(out), "-o", str(tmp_path / "baked1.safetensors")]) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "baked.safetensors")), load_file(str(tmp_path / "baked1.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # 0.5 Q Q^T + 0.5 Q Q^T = Q Q^T


def test_cli_errors_are_one_line(unet, tmp_path, capsys, monkeypatch):
    deft_model(unet, "qr", para=False).save_pretrained(tmp_path / "d")
    assert main(["inspect", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "para=false" in err
    ckpt = tmp_path / "ckpt.safetensors"
    make_checkpoint(ckpt)
    save_para(make_subject(seed=1, rank=2), str(tmp_path / "dog.safetensors"))
    monkeypatch.setitem(sys.modules, "diffusers.loaders.single_file_utils", None)
    assert main(["export-lora", "--base", str(ckpt), "--para", str(tmp_path / "dog.safetensors"), "--format", "peft",
                 "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "needs the diffusers package" in err and not os.path.exists(tmp_path / "o")


def test_a_peft_import_saved_as_a_para_file_keeps_its_diffusers_names(unet, tmp_path):
    """PaRa Load -> PaRa Save with no model in between: the file says its names are diffusers
    paths, so applying it later still maps them."""
    deft_model(unet, "relu").save_pretrained(tmp_path / "a")
    state = load_para(str(tmp_path / "a"))
    save_para(state, str(tmp_path / "saved.safetensors"))
    again = load_para(str(tmp_path / "saved.safetensors"))
    assert core_peft.has_diffusers_names(again) and again.kind == "merged"
    assert all(torch.equal(again.U[l], state.U[l]) and torch.equal(again.V[l], state.V[l]) for l in state.layers)
    renamed = core_peft.to_model_names(again, {l: "diffusion_model." + l for l in again.layers})
    assert not core_peft.has_diffusers_names(renamed) and all(l.startswith("diffusion_model.") for l in renamed.layers)
    with pytest.raises(ParaError, match="has no counterpart"):
        core_peft.to_model_names(again, {})


def test_cli_never_writes_over_the_input_adapter(unet, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.safetensors"
    make_checkpoint(ckpt)
    save_para(make_subject(seed=1, rank=2), str(tmp_path / "dog.safetensors"))
    out = tmp_path / "peft"
    assert main(["export-lora", "--base", str(ckpt), "--para", str(tmp_path / "dog.safetensors"), "--format", "peft",
                 "-o", str(out)]) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(["export-lora", "--base", str(ckpt), "--para", str(out), "--format", "peft", "-o", str(out)]) == 1
    assert "overwrite the input" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before
