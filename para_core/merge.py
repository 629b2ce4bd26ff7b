"""Several subjects at once, without training (docs/spec.md section 1).

Every mode returns the general form (U, V), shape (out, k), with W' = W0 - U (V^T W0).
Inputs are lists of (U_i, V_i, s_i); a subject contributes U_i = V_i = Q_i.
"""
from __future__ import annotations

import json
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .errors import ParaError
from .functional import reference
from .functional.base import check_finite
from .functional.projection import basis
from .state import ParaState, reference_state
from .write import build_metadata

__all__ = ["MERGE_MODES", "merge_sum", "merge_union", "merge_sequential", "merge_factors", "merge_states"]

MERGE_MODES = ("sum", "union", "sequential")
Factors = Tuple[torch.Tensor, torch.Tensor]


def merge_sum(items: Sequence[Tuple[torch.Tensor, torch.Tensor, float]]) -> Factors:
    """W' = W0 - sum_i s_i U_i (V_i^T W0): what the reference code does."""
    U = torch.cat([s * u.float() for u, _, s in items], dim=1)
    V = torch.cat([v.float() for _, v, _ in items], dim=1)
    return U, V


def merge_union(items: Sequence[Tuple[torch.Tensor, torch.Tensor, float]], rtol: float = 1e-4) -> Factors:
    """A true projection onto the union of the subspaces (rank-revealing).

    Q is the orthonormal basis of span[V_1 ... V_n] (inputs with s_i = 0 left out), from an SVD
    that drops directions whose singular value is below ``rtol`` * the largest, so duplicate or
    overlapping subspaces are merged instead of counted twice. The strengths act through
    T = G^-1/2 M G^-1/2 on that span, with M = sum_i s_i Q_i Q_i^T and G = sum_i Q_i Q_i^T
    (Q_i: orthonormal basis of input i; G = stack stack^T, so G^-1/2 = Q S^-1 Q^T from the same
    SVD): W' = W0 - T W0. With all s_i = s, T = s Q Q^T exactly; with orthogonal subspaces T
    equals ``sum``; a duplicate counts once; T's eigenvalues stay within [min s_i, max s_i].
    (T is a full k x k matrix in the basis Q, not a diagonal: when singular values repeat, e.g.
    orthogonal inputs, the SVD's Q mixes the inputs' directions.) Merged (non-projector) inputs
    enter through their V, their column space.
    """
    kept = [(v.float(), float(s)) for _, v, s in items if s != 0]
    if not kept:
        u0 = items[0][0]
        z = torch.zeros(u0.shape[0], 0, dtype=torch.float32, device=u0.device)
        return z, z.clone()
    # Orthonormalize each input first so that the SVD of the stack measures overlap of
    # subspaces, not the scale of the stored factors.
    bases = [basis(v) for v, _ in kept]
    stack = torch.cat(bases, dim=1)
    Uc, S, _ = torch.linalg.svd(stack, full_matrices=False)
    k = int((S > rtol * S[0]).sum()) if S.numel() else 0
    Q = Uc[:, :k]
    C = torch.zeros(k, k, dtype=torch.float32, device=Q.device)  # Q^T M Q
    for b, (_, s) in zip(bases, kept):
        A = b.t() @ Q
        C += s * (A.t() @ A)
    inv = 1.0 / S[:k]
    C = inv[:, None] * C * inv[None, :]  # S^-1 Q^T M Q S^-1: T = Q C Q^T
    return Q @ C, Q


def merge_sequential(items: Sequence[Tuple[torch.Tensor, torch.Tensor, float]]) -> Factors:
    """W' = (I - s_n U_n V_n^T) ... (I - s_1 U_1 V_1^T) W0, in order.

    By induction, with P = I - U V^T so far: (I - s u v^T) P = I - [U, s u] [V, P^T v]^T,
    and P^T v = v - V (U^T v). k = sum of the ranks.
    """
    U = V = None
    for u, v, s in items:
        u, v = u.float(), v.float()
        if U is None:
            U, V = s * u, v
        else:
            v_new = v - V @ (U.t() @ v)
            U, V = torch.cat([U, s * u], dim=1), torch.cat([V, v_new], dim=1)
    return U, V


def merge_factors(items: Sequence[Tuple[torch.Tensor, torch.Tensor, float]], mode: str = "sum") -> Factors:
    if mode == "sum":
        return merge_sum(items)
    if mode == "union":
        return merge_union(items)
    if mode == "sequential":
        return merge_sequential(items)
    raise ValueError(f"unknown merge mode {mode!r}; use one of {', '.join(MERGE_MODES)}")


def merge_states(states: Sequence[ParaState], strengths: Sequence[float], mode: str = "sum",
                 progress: Optional[Callable[[int, int], None]] = None) -> ParaState:
    """Merge ParaStates (files) into one merged ParaState in the general form (a reference one
    for reference inputs, which merge by ``sum`` only).

    Layers present in only some inputs are merged over those inputs. Inputs made for different
    model families (same layer, different size, or different ``para.base_arch``) are an error.
    Time is linear in the layers; ``progress(done, total)`` is called after every layer (the
    PaRa Merge node shows it and honours Cancel there).
    """
    if mode not in MERGE_MODES:
        raise ParaError(f"unknown merge mode {mode!r}; use one of {', '.join(MERGE_MODES)}")
    if len(states) < 1:
        raise ParaError("merge needs at least one PaRa adapter")
    if len(strengths) != len(states):
        raise ParaError(f"merge got {len(states)} adapters but {len(strengths)} strengths")
    for i, s in enumerate(strengths):
        if not (s == s) or s in (float("inf"), float("-inf")):
            raise ParaError(f"strength of input {i + 1} ({states[i].name}) is {s}; give a finite number")
    from .peft import merged_layer_names  # PEFT imports keep their diffusers names until they meet a model
    names_metadata = merged_layer_names(states)
    kinds = {st.kind for st in states}
    if reference.KIND in kinds:
        _check_reference_merge(states, kinds, mode)
    archs = {st.metadata.get("para.base_arch") for st in states} - {None, ""}
    if len(archs) > 1:
        names = ", ".join(f"{st.name} ({st.metadata.get('para.base_arch')})" for st in states)
        raise ParaError(f"cannot merge adapters made for different model families: {names}")
    order = list(dict.fromkeys(l for st in states for l in st.layers))
    merge_layer = _merge_reference_layer if reference.KIND in kinds else _merge_layer
    A: Dict[str, torch.Tensor] = {}
    Bm: Dict[str, torch.Tensor] = {}
    for i, layer in enumerate(order):
        inputs = [(st, float(s)) for st, s in zip(states, strengths) if st.has_layer(layer)]
        A[layer], Bm[layer] = merge_layer(layer, inputs, mode)
        if progress is not None:
            progress(i + 1, len(order))
    base = states[0].metadata
    # The fingerprint covers the adapted layers; it only carries over when every input has the
    # same one over the same layers (otherwise the merged file's layer set or base differs).
    fps = {st.metadata.get("para.base_fingerprint", "") for st in states}
    first_layers = set(states[0].layers)
    same_layers = all(set(st.layers) == first_layers for st in states)
    fields = dict(
        ranks={l: int(A[l].shape[1]) for l in A},
        layers=base.get("para.layers", ""),
        base_arch=base.get("para.base_arch", ""),
        base_fingerprint=fps.pop() if len(fps) == 1 and same_layers else "",
        merge_mode=mode,
        title="merge(" + ", ".join(f"{st.name}:{s:g}" for st, s in zip(states, strengths)) + f", {mode})",
        extra={"para.merge_inputs": json.dumps([[st.name, float(s)] for st, s in zip(states, strengths)]),
               **names_metadata},
    )
    if reference.KIND in kinds:  # W0 - sum_i s_i U_i D_i, the terms concatenated (a reference adapter)
        return reference_state(A, Bm, **fields)
    return ParaState(kind="merged", U=A, V=Bm, metadata=build_metadata("merged", **fields))


def _merge_layer(layer: str, inputs, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    items = []
    out = None
    for st, s in inputs:
        u, v = st.factors()[layer]
        if out is not None and u.shape[0] != out:
            raise ParaError(
                f"cannot merge: layer {layer} has {out} output channels in one adapter and {u.shape[0]} in "
                f"{st.name}; they were made for different models")
        out = u.shape[0]
        items.append((u, v, s))
    names = ", ".join(st.name for st, _ in inputs)
    try:
        U, V = merge_factors(items, mode)
    except (torch.linalg.LinAlgError, RuntimeError) as e:  # e.g. an SVD of overflowing values
        raise ParaError(f"cannot merge layer {layer} of {names} in mode {mode}: the computation failed ({e}). "
                        "The adapters' values are too large (not finite once combined); check the input files.") from None
    for t, what in ((U, "para_U"), (V, "para_V")):
        check_finite(t, f"merge of {names}", f"the merged {layer}.{what}")
    return U, V


def _check_reference_merge(states, kinds, mode: str) -> None:
    names = ", ".join(f"{st.name} ({st.kind})" for st in states)
    if kinds != {reference.KIND}:
        raise ParaError(
            f"cannot merge reference-parametrization adapters (W0 - U D) with paper ones (W0 - Q Q^T W0): {names}. "
            "The sum would need the base weights W0 to write the paper's terms as U D. Export each to a LoRA "
            "(PaRa Export LoRA / python -m para_core export-lora) and stack the LoRAs, or apply them one after "
            "the other (PaRa Apply twice).")
    if mode != "sum":
        raise ParaError(
            f"merge mode {mode!r} is not defined for reference-parametrization adapters (W0 - U D, no subspace to "
            f"project onto without W0): {names}. Use mode 'sum'.")


def _merge_reference_layer(layer: str, inputs, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    items = []
    for st, s in inputs:
        u, d = st.U[layer], st.D[layer]
        if items and (u.shape[0] != items[0][0].shape[0] or d.shape[1] != items[0][1].shape[1]):
            raise ParaError(
                f"cannot merge: layer {layer} has shape U {tuple(items[0][0].shape)}, D {tuple(items[0][1].shape)} "
                f"in one adapter and U {tuple(u.shape)}, D {tuple(d.shape)} in {st.name}; they were made for "
                "different models")
        items.append((u, d, s))
    return reference.merge_sum(items)
