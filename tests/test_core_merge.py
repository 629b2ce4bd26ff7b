"""Merge modes against their dense formulas (docs/spec.md section 1, "Several subjects at once")."""
import json

import pytest
import torch

from core_helpers import dense_projector, make_subject, randn
from para_core import (ParaError, ParaState, basis, merge_factors, merge_sequential, merge_states, merge_sum,
                       merge_union)
from para_core.functional.projection import reduce_weight

OUT = 24
I = torch.eye(OUT, dtype=torch.float64)


def _subjects(ranks=(3, 2, 4), seed=0):
    return [randn(OUT, r, seed=seed + i) for i, r in enumerate(ranks)]


def _items(Bs, strengths):
    return [(basis(B), basis(B), s) for B, s in zip(Bs, strengths)]


def _apply(factors, W0):
    U, V = factors
    return reduce_weight(W0, U, V).double()


def _union_projector(Bs):
    """Projector onto span[B_1 ... B_n], from an SVD in float64 (rank-revealing)."""
    Uc, S, _ = torch.linalg.svd(torch.cat([B.double() for B in Bs], 1), full_matrices=False)
    Q = Uc[:, : int((S > 1e-9 * S[0]).sum())]
    return Q @ Q.t()


W0 = randn(OUT, 30, seed=100)


def test_sum_matches_dense_formula():
    Bs, s = _subjects(), [1.0, 0.5, -0.3]
    ref = (I - sum(si * dense_projector(B) for B, si in zip(Bs, s))) @ W0.double()
    torch.testing.assert_close(_apply(merge_sum(_items(Bs, s)), W0), ref, atol=1e-5, rtol=0)


def test_sequential_is_the_ordered_product_of_reductions():
    Bs, s = _subjects(), [1.0, 0.5, 2.0]
    ref = W0.double()
    for B, si in zip(Bs, s):
        ref = (I - si * dense_projector(B)) @ ref
    torch.testing.assert_close(_apply(merge_sequential(_items(Bs, s)), W0), ref, atol=1e-5, rtol=0)


def test_sequential_depends_on_the_order():
    Bs = _subjects()
    a = _apply(merge_sequential(_items(Bs, [1, 1, 1])), W0)
    b = _apply(merge_sequential(_items(Bs[::-1], [1, 1, 1])), W0)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("s", [1.0, 0.5])
def test_union_is_the_projector_onto_the_span(s):
    Bs = _subjects()
    ref = (I - s * _union_projector(Bs)) @ W0.double()
    U, V = merge_union(_items(Bs, [s] * 3))
    assert U.shape == (OUT, 9)
    torch.testing.assert_close(_apply((U, V), W0), ref, atol=1e-5, rtol=0)


def test_union_of_a_duplicate_is_the_single_subject():
    B = randn(OUT, 3, seed=7)
    U, V = merge_union(_items([B, B], [1.0, 1.0]))
    assert U.shape[1] == 3
    ref = (I - dense_projector(B)) @ W0.double()
    torch.testing.assert_close(_apply((U, V), W0), ref, atol=1e-5, rtol=0)


def test_union_of_a_duplicate_keeps_its_strength():
    B = randn(OUT, 3, seed=7)
    U, V = merge_union(_items([B, B], [0.5, 0.5]))
    torch.testing.assert_close(_apply((U, V), W0), (I - 0.5 * dense_projector(B)) @ W0.double(), atol=1e-5, rtol=0)


def test_union_of_overlapping_subspaces_does_not_blow_up():
    a, b, c = randn(OUT, 1, seed=8), randn(OUT, 1, seed=9), randn(OUT, 1, seed=10)
    U, V = merge_union(_items([torch.cat([a, b], 1), torch.cat([b, c], 1)], [1.0, 1.0]))
    assert U.shape[1] == 3
    M = (U @ V.t()).double()
    torch.testing.assert_close(M @ M, M, atol=1e-5, rtol=0)  # still a projector
    assert torch.linalg.matrix_norm(M, ord=2) <= 1 + 1e-5
    torch.testing.assert_close(M, _union_projector([a, b, c]), atol=1e-5, rtol=0)


def test_union_leaves_out_inputs_at_strength_zero():
    Bs = _subjects()
    U, V = merge_union(_items(Bs, [1.0, 0.0, 0.0]))
    torch.testing.assert_close(_apply((U, V), W0), (I - dense_projector(Bs[0])) @ W0.double(), atol=1e-5, rtol=0)
    U, V = merge_union(_items(Bs, [0.0, 0.0, 0.0]))
    assert U.shape == (OUT, 0)


def test_all_modes_agree_for_orthogonal_subspaces_at_strength_one():
    Q = basis(randn(OUT, 9, seed=11))
    mix = [randn(3, 3, seed=12 + i) for i in range(3)]  # B_i is not orthonormal, only its span matters
    Bs = [Q[:, 3 * i: 3 * i + 3] @ mix[i] for i in range(3)]
    results = [_apply(merge_factors(_items(Bs, [1.0] * 3), mode), W0) for mode in ("sum", "union", "sequential")]
    ref = (I - Q.double() @ Q.double().t()) @ W0.double()
    for r in results:
        torch.testing.assert_close(r, ref, atol=1e-5, rtol=0)


def test_union_with_different_strengths_equals_sum_for_orthogonal_subspaces():
    Q = basis(randn(OUT, 5, seed=16))
    Bs, s = [Q[:, :2], Q[:, 2:]], [1.0, 0.4]
    torch.testing.assert_close(_apply(merge_union(_items(Bs, s)), W0), _apply(merge_sum(_items(Bs, s)), W0),
                               atol=1e-5, rtol=0)


def test_union_with_different_strengths_weights_the_span_by_the_inputs():
    # T = G^-1/2 M G^-1/2 with M = sum s_i P_i, G = sum P_i (pseudo-inverse root on the span).
    a, b, c = randn(OUT, 2, seed=17), randn(OUT, 1, seed=18), randn(OUT, 2, seed=19)
    Bs, s = [torch.cat([a, b], 1), torch.cat([b, c], 1)], [1.0, 0.25]
    Ps = [dense_projector(B) for B in Bs]
    M, G = sum(si * P for si, P in zip(s, Ps)), sum(Ps)
    evals, evecs = torch.linalg.eigh(G)
    root = torch.where(evals > 1e-9, evals.clamp_min(1e-9).rsqrt(), torch.zeros_like(evals))
    G_inv_half = evecs @ torch.diag(root) @ evecs.t()
    T = G_inv_half @ M @ G_inv_half
    U, V = merge_union(_items(Bs, s))
    torch.testing.assert_close((U @ V.t()).double(), T, atol=1e-5, rtol=0)
    eig = torch.linalg.eigvalsh((T + T.t()) / 2)
    assert eig.max() <= 1.0 + 1e-6 and eig[eig.abs() > 1e-6].min() >= 0.25 - 1e-6


def test_merged_inputs_enter_through_their_general_form():
    # A merged input (U, V) is not a projector; sum and sequential still follow the formulas.
    U1, V1 = randn(OUT, 2, seed=13), randn(OUT, 2, seed=14)
    B2 = randn(OUT, 3, seed=15)
    Q2 = basis(B2)
    items = [(U1, V1, 0.5), (Q2, Q2, 1.0)]
    M1, P2 = U1.double() @ V1.double().t(), dense_projector(B2)
    torch.testing.assert_close(_apply(merge_sum(items), W0), (I - 0.5 * M1 - P2) @ W0.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(_apply(merge_sequential(items), W0), (I - P2) @ (I - 0.5 * M1) @ W0.double(),
                               atol=1e-5, rtol=0)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown merge mode"):
        merge_factors(_items(_subjects(), [1, 1, 1]), "average")


# ------------------------------------------------------------------------- merge_states (files)

def _reduce_state(state, W, layer, s=1.0):
    U, V = state.factors()[layer]
    return reduce_weight(W, U, V, s).double()


def test_merge_states_gives_a_merged_state_with_metadata():
    a, b = make_subject(seed=1), make_subject(seed=2)
    merged = merge_states([a, b], [1.0, 0.5], "sum")
    assert merged.kind == "merged"
    assert set(merged.layers) == set(a.layers)
    assert merged.metadata["para.kind"] == "merged"
    assert merged.metadata["para.merge_mode"] == "sum"
    assert json.loads(merged.metadata["para.merge_inputs"]) == [[a.name, 1.0], [b.name, 0.5]]
    layer = a.layers[0]
    W = randn(a.out_dim(layer), 16, seed=3)
    ref = (I[:W.shape[0], :W.shape[0]] - dense_projector(a.B[layer]) - 0.5 * dense_projector(b.B[layer])) @ W.double()
    torch.testing.assert_close(_reduce_state(merged, W, layer), ref, atol=1e-5, rtol=0)


def test_merge_states_merges_layers_present_in_only_some_inputs():
    a = make_subject(layers=["middle_block.0.emb_layers.1"], seed=1)
    b = make_subject(layers=["middle_block.0.emb_layers.1", "middle_block.2.out_layers.3"], seed=2)
    merged = merge_states([a, b], [1.0, 1.0], "union")
    only_b = "diffusion_model.middle_block.2.out_layers.3"
    assert set(merged.layers) == set(b.layers)
    W = randn(32, 40, seed=4)
    torch.testing.assert_close(_reduce_state(merged, W, only_b), _reduce_state(b, W, only_b), atol=1e-5, rtol=0)


def test_merge_keeps_the_fingerprint_only_when_all_inputs_share_it():
    same = merge_states([make_subject(seed=1, base_fingerprint="abc"), make_subject(seed=2, base_fingerprint="abc")],
                        [1, 1], "sum")
    assert same.metadata["para.base_fingerprint"] == "abc"
    other = merge_states([make_subject(seed=1, base_fingerprint="abc"), make_subject(seed=2, base_fingerprint="def")],
                         [1, 1], "sum")
    assert other.metadata["para.base_fingerprint"] == ""


def test_merging_different_model_families_is_an_error():
    with pytest.raises(ParaError, match="different model families"):
        merge_states([make_subject(seed=1), make_subject(seed=2, base_arch="SDXL")], [1, 1], "sum")


def test_merging_a_layer_of_different_sizes_is_an_error():
    a = make_subject(layers=["middle_block.0.emb_layers.1"], seed=1)
    b = ParaState(kind="subject", B={"diffusion_model.middle_block.0.emb_layers.1": randn(40, 2)}, metadata={})
    with pytest.raises(ParaError, match="middle_block.0.emb_layers.1"):
        merge_states([a, b], [1, 1], "sum")


@pytest.mark.parametrize("strengths, match", [([1.0], "2 adapters but 1 strengths"),
                                              ([1.0, float("nan")], "finite number")])
def test_bad_strengths_are_errors(strengths, match):
    with pytest.raises(ParaError, match=match):
        merge_states([make_subject(seed=1), make_subject(seed=2)], strengths, "sum")


def test_merge_states_rejects_an_unknown_mode():
    with pytest.raises(ParaError, match="unknown merge mode"):
        merge_states([make_subject(seed=1)], [1.0], "average")


# ------------------------------------------------------------------------- many layers

def _many_layers(n, seed):
    g = torch.Generator().manual_seed(seed)
    return ParaState(B={f"diffusion_model.l{i}": torch.randn(4, 1, generator=g) for i in range(n)})


def test_merge_does_not_scan_the_layer_list_per_layer(monkeypatch):
    """The work per layer does not grow with the layers: the layer list of an input is built a
    fixed number of times, whatever the layer count (a scan per layer made 10,000 layers take 9 s;
    the time itself is a benchmark's business, not a test's)."""
    calls = []
    original = ParaState.layers

    def counted(self):
        calls.append(1)
        return original.fget(self)

    monkeypatch.setattr(ParaState, "layers", property(counted))

    def listings(n):
        a, b = _many_layers(n, 1), _many_layers(n, 2)
        calls.clear()
        merged = merge_states([a, b], [1.0, 1.0], "sum")
        assert len(merged.layers) == n
        return len(calls)

    assert listings(10) == listings(300)


def test_merge_reports_progress_after_every_layer():
    a, b = _many_layers(5, 1), _many_layers(7, 2)
    calls = []
    merged = merge_states([a, b], [1.0, 0.5], "union", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 7) for i in range(1, 8)] and len(merged.layers) == 7


def test_a_file_with_more_layers_than_a_model_has_is_refused_before_its_tensors_are_read(tmp_path):
    from safetensors.torch import save_file
    from para_core import load_para
    from para_core.read import MAX_LAYERS
    path = tmp_path / "many.safetensors"
    save_file({f"diffusion_model.l{i}.para_B": torch.ones(1, 1) for i in range(MAX_LAYERS + 1)}, str(path))
    with pytest.raises(ParaError, match=f"{MAX_LAYERS + 1} layers, more than a PaRa file holds"):
        load_para(path)
