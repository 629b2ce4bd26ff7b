"""The PaRa file (docs/spec.md section 2): round trip, metadata, atomic writes, load errors (one
validation for PaRa Load and the stock Load LoRA), stored dtypes, fitting a model."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import para_core.read as read
import para_core.write as write
from core_helpers import CKPT_LAYERS, make_subject, randn
from para_core.cli import main as cli_main
from para_core import (FingerprintWarning, ParaError, ParaState, build_metadata, check_fingerprint, check_fits,
                       fingerprint, kohya_name, load_para, merge_states, save_para)

SPEC_KEYS = {"para.format", "para.kind", "para.rank", "para.ranks", "para.layers", "para.base_arch",
             "para.base_fingerprint", "para.train", "modelspec.sai_model_spec", "modelspec.architecture",
             "modelspec.implementation", "modelspec.title", "modelspec.date"}
MODEL_SHAPES = {"diffusion_model." + k: v for k, v in CKPT_LAYERS.items()}


def _tmp_files(folder):
    return [p for p in os.listdir(folder) if p.startswith(".tmp-") or p.endswith(".para-tmp")]


# ------------------------------------------------------------------------- round trip

def test_subject_round_trip_keeps_tensors_and_spec_metadata(tmp_path):
    state = make_subject(base_fingerprint="0123456789abcdef")
    path = save_para(state, tmp_path / "dog.safetensors")
    loaded = load_para(path)
    assert loaded.kind == "subject" and loaded.source == str(path)
    assert set(loaded.layers) == set(state.layers)
    for layer in state.layers:
        assert torch.equal(loaded.B[layer], state.B[layer])
    md = loaded.metadata
    assert SPEC_KEYS <= set(md)
    assert md["para.format"] == "1" and md["para.kind"] == "subject" and md["para.rank"] == "2"
    assert json.loads(md["para.ranks"]) == {l: 2 for l in state.layers}
    assert json.loads(md["para.train"])["trigger_words"] == "sks dog"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/para"
    assert all(isinstance(v, str) for v in md.values())


def test_subject_tensors_are_named_layer_dot_para_B(tmp_path):
    path = save_para(make_subject(), tmp_path / "dog.safetensors")
    header = read.read_header(str(path))
    assert set(header.shapes) == {l + ".para_B" for l in make_subject().layers}
    assert set(header.dtypes.values()) == {"F32"}


def test_merged_round_trip_keeps_U_V_and_merge_mode(tmp_path):
    merged = merge_states([make_subject(seed=1), make_subject(seed=2)], [1.0, 0.5], "sequential")
    loaded = load_para(save_para(merged, tmp_path / "m.safetensors"))
    assert loaded.kind == "merged"
    assert (SPEC_KEYS - {"para.train"}) | {"para.merge_mode"} <= set(loaded.metadata)
    assert loaded.metadata["para.merge_mode"] == "sequential"
    for layer in merged.layers:
        assert torch.equal(loaded.U[layer], merged.U[layer]) and torch.equal(loaded.V[layer], merged.V[layer])


def test_save_in_another_dtype(tmp_path):
    loaded = load_para(save_para(make_subject(), tmp_path / "h.safetensors", dtype=torch.float16))
    assert all(b.dtype == torch.float16 for b in loaded.B.values())


def test_factors_of_a_subject_are_its_orthonormal_basis():
    state = make_subject()
    for layer, (U, V) in state.factors().items():
        assert U is V and U.shape == state.B[layer].shape
        torch.testing.assert_close(U.t() @ U, torch.eye(U.shape[1]), atol=1e-5, rtol=0)


def test_build_metadata_records_merge_mode_and_extra_keys():
    md = build_metadata("merged", ranks={"a": 3, "b": 5}, merge_mode="union", base_arch="SDXL",
                        extra={"para.note": 1})
    assert md["para.rank"] == "5" and md["para.merge_mode"] == "union" and md["para.note"] == "1"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/para"


# ------------------------------------------------------------------------- atomic writes

def test_atomic_write_leaves_no_temporary_file(tmp_path):
    save_para(make_subject(), tmp_path / "a.safetensors")
    assert _tmp_files(tmp_path) == []
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_para(make_subject(seed=1), path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(write, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_para(make_subject(seed=2), path)
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []


def test_crash_on_first_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_para(make_subject(), tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------- load errors

def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ParaError, match="no such PaRa file"):
        load_para(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("data", [b"hello", b"this is a text file, not a model\n" * 4,
                                  struct.pack("<Q", 20) + b"not json at all!!!!!"],
                         ids=["tiny", "text", "header-not-json"])
def test_not_safetensors_is_an_error_naming_the_file(tmp_path, data):
    path = _write(tmp_path / "x.safetensors", data)
    with pytest.raises(ParaError, match="not a safetensors file") as e:
        load_para(path)
    assert str(path) in str(e.value)


def test_truncated_file_is_an_error(tmp_path):
    path = save_para(make_subject(), tmp_path / "t.safetensors")
    data = open(path, "rb").read()
    _write(tmp_path / "t.safetensors", data[:-10])
    with pytest.raises(ParaError, match="truncated"):
        load_para(path)


def test_lora_file_is_an_error_that_says_lora(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_a.alpha": torch.tensor(2.0)}, str(path))
    with pytest.raises(ParaError, match="LoRA file"):
        load_para(path)


def test_file_without_para_tensors_is_an_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(ParaError, match="no PaRa tensors"):
        load_para(path)


def test_nan_in_the_adapter_is_an_error(tmp_path):
    B = randn(16, 2)
    B[3, 1] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({"diffusion_model.x.para_B": B}, str(path))
    with pytest.raises(ParaError, match="NaN") as e:
        load_para(path)
    assert "diffusion_model.x.para_B" in str(e.value)


def test_para_U_without_para_V_is_an_error(tmp_path):
    path = tmp_path / "u.safetensors"
    save_file({"diffusion_model.x.para_U": randn(16, 2)}, str(path))
    with pytest.raises(ParaError, match="para_U but no para_V"):
        load_para(path)


def test_para_B_mixed_with_para_U_is_an_error(tmp_path):
    path = tmp_path / "mix.safetensors"
    save_file({"diffusion_model.x.para_B": randn(16, 2), "diffusion_model.y.para_U": randn(16, 2),
               "diffusion_model.y.para_V": randn(16, 2)}, str(path))
    with pytest.raises(ParaError, match="either a subject or a merged"):
        load_para(path)


def test_para_B_that_is_not_a_matrix_is_an_error(tmp_path):
    path = tmp_path / "3d.safetensors"
    save_file({"diffusion_model.x.para_B": randn(16, 2, 1)}, str(path))
    with pytest.raises(ParaError, match=r"expected \(out, rank\)"):
        load_para(path)


# ------------------------------------------------------------------------- fitting a model

def test_state_that_fits_passes_check_fits():
    state = make_subject()
    assert check_fits(state, MODEL_SHAPES).layers == state.layers


def test_shapes_not_fitting_name_the_first_layer():
    state = make_subject()
    wrong = dict(MODEL_SHAPES)
    for layer in state.layers[1:]:
        wrong[layer] = (7,) + tuple(wrong[layer][1:])
    with pytest.raises(ParaError, match="middle_block.0.emb_layers.1 has 32 output channels") as e:
        check_fits(state, wrong, family="tiny SD15")
    assert "tiny SD15" in str(e.value) and "middle_block.2" not in str(e.value)


def test_layer_missing_from_the_model_is_named():
    state = make_subject()
    shapes = {k: v for k, v in MODEL_SHAPES.items() if "attn1" not in k}
    with pytest.raises(ParaError, match=r"attn1.to_q does not exist in SDXL"):
        check_fits(state, shapes, family="SDXL")


def test_rank_larger_than_the_layer_is_an_error():
    state = ParaState(kind="subject", B={"diffusion_model.x": randn(8, 5)})
    with pytest.raises(ParaError, match="rank 5, more than the layer allows"):
        check_fits(state, {"diffusion_model.x": (8, 4)})


def test_kohya_style_names_are_resolved(tmp_path):
    layer = "diffusion_model.middle_block.2.out_layers.3"
    path = tmp_path / "kohya.safetensors"
    save_file({kohya_name(layer) + ".para_B": randn(32, 2)}, str(path))
    state = check_fits(load_para(path), MODEL_SHAPES)
    assert state.layers == [layer]


# ------------------------------------------------------------------------- fingerprint

def _weights(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"diffusion_model." + k: torch.randn(*v, generator=g).to(dtype) for k, v in CKPT_LAYERS.items()}


def test_fingerprint_is_stable_across_fp32_and_fp16_copies():
    w32 = _weights()
    w16 = {k: v.half() for k, v in w32.items()}
    assert fingerprint(w32) == fingerprint(w16)
    assert len(fingerprint(w32)) == 16


def test_fingerprint_ignores_order_and_the_name_prefix():
    w = _weights()
    reordered = dict(reversed(list(w.items())))
    bare = {k[len("diffusion_model."):]: v for k, v in w.items()}
    assert fingerprint(w) == fingerprint(reordered) == fingerprint(bare)


def test_fingerprint_differs_for_other_weights_and_other_layer_sets():
    w = _weights()
    assert fingerprint(w) != fingerprint(_weights(seed=1))
    assert fingerprint(w) != fingerprint(dict(list(w.items())[:-1]))


def test_fingerprint_mismatch_is_a_warning_showing_both():
    state = make_subject(base_fingerprint="aaaaaaaaaaaaaaaa")
    with pytest.warns(FingerprintWarning, match="aaaaaaaaaaaaaaaa.*bbbbbbbbbbbbbbbb"):
        assert check_fingerprint(state, "bbbbbbbbbbbbbbbb")
    assert check_fingerprint(state, "aaaaaaaaaaaaaaaa") is None


@pytest.mark.parametrize("spelling", ["kohya", "bare"])
def test_one_layer_under_two_names_is_an_error(tmp_path, spelling):
    """diffusion_model.X.para_B and lora_unet_X.para_B (or X.para_B) in one file: the loaders would
    apply both or either, and disagree."""
    layer = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    other = kohya_name(layer) if spelling == "kohya" else layer[len("diffusion_model."):]
    path = tmp_path / "twice.safetensors"
    save_file({f"{layer}.para_B": randn(16, 2, seed=1), f"{other}.para_B": randn(16, 2, seed=2)}, str(path))
    with pytest.raises(ParaError, match="two spellings of the same layer") as e:
        load_para(path)
    assert str(path) in str(e.value) and other in str(e.value)


# ------------------------------------------------------------------------- hostile headers

def write_header(path, header: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize("header", [b"[" * 100000 + b"]" * 100000, b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"],
                         ids=["top-level", "inside-an-entry"])
def test_deeply_nested_header_is_a_clear_error(tmp_path, header):
    p = tmp_path / "deep.safetensors"
    write_header(p, header)
    with pytest.raises(ParaError, match="deep.safetensors: not a safetensors file"):
        load_para(p)


# ------------------------------------------------------------------------- one validation for every load path

@pytest.mark.parametrize("tensors, says", [
    ({"para_B": torch.tensor([[1.0, float("nan")]])}, "NaN or Inf"),
    ({"para_U": torch.ones(4, 2)}, "para_U but no para_V"),
    ({"para_V": torch.ones(4, 2)}, "para_V but no para_U"),
    ({"para_B": torch.ones(4, 2, 1)}, r"shape \(4, 2, 1\)"),
    ({"para_B": torch.tensor(1.0)}, r"shape \(\)"),
    ({"para_B": torch.ones(4, 2, dtype=torch.int32)}, "dtype"),
    ({"para_U": torch.ones(4, 2), "para_V": torch.ones(4, 3)}, "differ in shape"),
])
def test_layer_checks_shared_by_para_load_and_stock_load_lora(tmp_path, tensors, says):
    with pytest.raises(ParaError, match=says):
        read.check_layer_tensors("f.safetensors", "diffusion_model.x", tensors)
    from safetensors.torch import save_file
    p = tmp_path / "f.safetensors"
    save_file({f"diffusion_model.x.{k}": v for k, v in tensors.items()}, str(p))
    with pytest.raises(ParaError, match=says):
        load_para(p)


# ------------------------------------------------------------------------- stored dtypes

def _factors(kind, dtype, out=16, inner=24, rank=2):
    g = torch.Generator().manual_seed(0)
    names = {"subject": ("para_B",), "merged": ("para_U", "para_V"), "reference": ("para_U", "para_D")}[kind]
    shapes = {"para_B": (out, rank), "para_U": (out, rank), "para_V": (out, rank), "para_D": (rank, inner)}
    return {f"diffusion_model.x.{n}": (torch.randn(*shapes[n], generator=g) * 0.5).to(dtype) for n in names}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("kind", ["subject", "merged", "reference"])
def test_float8_factors_are_read_exactly_in_float32(tmp_path, capsys, kind, dtype):
    from safetensors.torch import save_file
    tensors = _factors(kind, dtype)
    path = tmp_path / f"{kind}_fp8.safetensors"
    save_file(tensors, str(path), metadata={"para.kind": kind})
    st = load_para(path)
    assert st.kind == kind
    for key, t in tensors.items():
        layer, name = key.rsplit(".", 1)
        got = st.tensors(layer)[name]
        assert got.dtype == torch.float32 and torch.equal(got, t.float())
    assert cli_main(["inspect", str(path)]) == 0, capsys.readouterr().err


def test_float4_factors_are_refused_with_what_to_do(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "f4.safetensors"
    save_file({"diffusion_model.x.para_B": torch.zeros(16, 1, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, str(path))
    with pytest.raises(ParaError, match="para_B is stored as float4_e2m1fn_x2, a packed format.*fp32, fp16 or bf16"):
        load_para(path)
    with pytest.raises(ParaError, match="packed format"):
        read.check_layer_tensors("f4.safetensors", "diffusion_model.x",
                                 {"para_B": torch.zeros(16, 1, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)})
