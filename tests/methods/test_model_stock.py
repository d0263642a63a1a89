"""model_stock against a per-element loop reference of the paper's formula, golden values and properties; streamed
over row blocks it gives the whole-tensor bits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods import fused, torch_kernels
from mergelib.methods.base import MethodInputs, NoParams, StreamInputs
from mergelib.methods.model_stock import SPECS, ModelStockParams, _sums_torch, interpolation_ratio, merge, toward_mean

SHAPES = [(1,), (3,), (2, 3), (4, 5), (2, 2, 3)]


def run(base, *tensors, filter_wise=False):
    inputs = MethodInputs(tuple(tensors), base, tuple(NoParams() for _ in tensors), "w")
    return merge(inputs, ModelStockParams(filter_wise=filter_wise))


def reference(base, tensors, filter_wise):
    """Model Stock per vector with Python floats: mean pairwise cosine -> t, clamped to [0, 1]."""
    shape = base.shape
    if filter_wise and base.dim() >= 2:
        rows = [base.reshape(-1, shape[-1]).tolist()]
        rows += [x.reshape(-1, shape[-1]).tolist() for x in tensors]
    else:
        rows = [[base.reshape(-1).tolist()]] + [[x.reshape(-1).tolist()] for x in tensors]
    n = len(tensors)
    out = []
    for r in range(len(rows[0])):
        w0 = rows[0][r]
        offs = [[a - b for a, b in zip(rows[i + 1][r], w0)] for i in range(n)]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                dot = sum(a * b for a, b in zip(offs[i], offs[j]))
                norm_i = math.sqrt(sum(a * a for a in offs[i]))
                norm_j = math.sqrt(sum(b * b for b in offs[j]))
                cosines.append(min(1.0, max(-1.0, dot / max(norm_i * norm_j, 1e-6))))
        c = sum(cosines) / len(cosines)
        t = min(1.0, max(0.0, n * c / (1 + (n - 1) * c))) if c > 0 else 0.0
        for e in range(len(w0)):
            mean = sum(rows[i + 1][r][e] for i in range(n)) / n
            out.append(t * mean + (1 - t) * w0[e])
    return torch.tensor(out, dtype=torch.float64).reshape(shape)


def randoms(seed, shape, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(SHAPES),
    n=st.integers(2, 4),
    filter_wise=st.booleans(),
    shared=st.floats(0.0, 3.0),
)
def test_matches_loop_reference(seed, shape, n, filter_wise, shared):
    base, common, *noise = randoms(seed, shape, n + 2)
    # a shared direction makes positive cosines (t inside (0, 1)) as common as non-positive ones
    tensors = [base + shared * common + x for x in noise]
    got = run(base, *tensors, filter_wise=filter_wise)
    assert got.dtype == torch.float32 and got.shape == base.shape
    torch.testing.assert_close(got.double(), reference(base, tensors, filter_wise), atol=1e-5, rtol=1e-5)


def test_golden_two_models_at_45_degrees():
    # offsets (1,0) and (1,1): cos = 1/sqrt2, t = 2c/(1+c) = 2(sqrt2 - 1); mean = (1, 0.5)
    base = torch.zeros(2)
    got = run(base, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(got, torch.tensor([0.8284271247, 0.4142135624]))


def test_golden_whole_tensor_vs_filter_wise():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 4.0], [0.0, 1.0]])
    # filter_wise: row 0 offsets parallel (t = 1, the mean), row 1 orthogonal (t = 0, the base)
    torch.testing.assert_close(run(base, a, b, filter_wise=True), torch.tensor([[1.5, 3.0], [0.0, 0.0]]))
    # whole tensor: cos = 10/sqrt(6*21), t = 2c/(1+c) = 20/(10 + sqrt126) = 0.9422851...
    t = 0.9422851
    expected = t * torch.tensor([[1.5, 3.0], [0.5, 0.5]])
    torch.testing.assert_close(run(base, a, b), expected)


def test_golden_ratio_table():
    # t(N, cos) by hand: N=2 cos=.5 -> 1/1.5; N=3 cos=.5 -> 1.5/2; cos=1 -> 1; cos<=0 -> 0 (clamped)
    cos = torch.tensor([0.5, 0.5, 1.0, 0.0, -0.3, -1.0])
    ns = [2, 3, 5, 2, 3, 2]
    got = torch.stack([interpolation_ratio(c, n) for c, n in zip(cos, ns)])
    torch.testing.assert_close(got, torch.tensor([2 / 3, 0.75, 1.0, 0.0, 0.0, 0.0]))


def test_antipodal_offsets_give_the_base_not_infinity():
    # mergekit: N=2, cos=-1 gives t = -2/0; clamped here to t=0
    base = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, 1.0]])
    d = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.5, 0.5]])
    got = run(base, base + d, base - d)
    assert torch.equal(got, base)
    assert torch.equal(run(base, base + d, base - d, filter_wise=True), base)


def test_negative_mean_cosine_with_three_models_gives_the_base():
    # three offsets at 120 degrees: every pairwise cos = -1/2, mergekit's t = -1.5/0 (infinite)
    base = torch.tensor([1.0, 2.0])
    dirs = [(1.0, 0.0), (-0.5, math.sqrt(3) / 2), (-0.5, -math.sqrt(3) / 2)]
    got = run(base, *(base + torch.tensor(d) for d in dirs))
    assert torch.equal(got, base)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), n=st.integers(2, 4), fw=st.booleans())
def test_zero_offsets_give_the_base_exactly(seed, shape, n, fw):
    (base,) = randoms(seed, shape, 1)
    assert torch.equal(run(base, *[base.clone() for _ in range(n)], filter_wise=fw), base)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), n=st.integers(2, 4), fw=st.booleans())
def test_identical_fine_tunes_give_the_fine_tune(seed, shape, n, fw):
    base, tuned = randoms(seed, shape, 2)
    torch.testing.assert_close(run(base, *[tuned.clone() for _ in range(n)], filter_wise=fw), tuned)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), n=st.integers(2, 4), fw=st.booleans())
def test_result_lies_between_base_and_mean(seed, shape, n, fw):
    base, *tensors = randoms(seed, shape, n + 1)
    got = run(base, *tensors, filter_wise=fw).double()
    mean = torch.stack(tensors).mean(0).double()
    lo, hi = torch.minimum(base, mean) - 1e-5, torch.maximum(base, mean) + 1e-5
    assert bool(((got >= lo) & (got <= hi)).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), fw=st.booleans())
def test_model_order_does_not_matter(seed, shape, fw):
    base, a, b, c = randoms(seed, shape, 4)
    torch.testing.assert_close(run(base, a, b, c, filter_wise=fw), run(base, c, a, b, filter_wise=fw))


def test_filter_wise_on_a_bias_is_the_whole_vector():
    base, a, b = randoms(7, (5,), 3)
    assert torch.equal(run(base, a, b, filter_wise=True), run(base, a, b))


def test_filter_wise_rows_are_independent():
    base, a, b = randoms(11, (3, 4), 3)
    whole = run(base, a, b, filter_wise=True)
    for r in range(3):
        torch.testing.assert_close(whole[r], run(base[r], a[r], b[r]))


def test_inputs_are_not_modified():
    base, a, b = randoms(3, (2, 3), 3)
    copies = [x.clone() for x in (base, a, b)]
    run(base, a, b, filter_wise=True)
    assert all(torch.equal(x, y) for x, y in zip((base, a, b), copies))


def test_parameters_and_spec():
    assert ModelStockParams().filter_wise is False
    with pytest.raises(ValidationError, match="extra"):
        ModelStockParams.model_validate({"filter_wise": True, "weight": 1.0})
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("model_stock", "required", 2, None)
    assert spec.params is ModelStockParams and spec.paper == "https://arxiv.org/abs/2403.19522"


# ---- streamed over row blocks, and the torch kernels' path ----


def streamed(base, tensors, chunk, filter_wise):
    """`stream` over row blocks of `chunk` rows (every block read afresh, as the engine re-reads)."""
    out = torch.full(base.shape, float("nan"))
    inputs = {-1: base, **dict(enumerate(tensors))}

    def emit(start, rows):
        out[start : start + rows.shape[0]] = rows

    (spec,) = SPECS
    spec.stream(StreamInputs(tuple(base.shape), len(tensors), lambda i, a, b: inputs[i][a:b].clone(), emit,
                             tuple(NoParams() for _ in tensors), "w", None, chunk),
                ModelStockParams(filter_wise=filter_wise))
    return out


@pytest.mark.parametrize("shape,chunk", [((13, 7), 3), ((40, 5), 40), ((9, 2, 3), 4), ((1000,), 7), ((6, 1), 1),
                                         ((3, 4096), 2)])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_stream_equals_whole_bit_for_bit(shape, chunk, n, filter_wise):
    g = torch.Generator().manual_seed(n * 100 + chunk)
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    # bf16-rounded fine-tunes (many equal offsets), some rows left at the base, magnitudes over many exponents
    tensors = [(base + common + torch.randn(shape, generator=g) * 10.0 ** torch.randint(-4, 2, shape, generator=g))
               .to(torch.bfloat16).float() for _ in range(n)]
    tensors[0].view(-1)[: shape[-1]] = base.view(-1)[: shape[-1]]
    whole = run(base, *tensors, filter_wise=filter_wise)
    assert torch.equal(streamed(base, tensors, chunk, filter_wise).view(torch.int32), whole.view(torch.int32))
    torch.testing.assert_close(whole.double(), reference(base, tensors, filter_wise), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_torch_kernels_agree_with_the_numba_kernels(filter_wise):
    """The device path (torch ops): the same result step (bit for bit given the same t), sums equal up to their
    order, so the merges agree within float32 rounding of t."""
    base, common, *noise = randoms(5, (17, 33), 5)
    tensors = [base + common + x for x in noise]
    w0 = base
    sums = np.zeros((17 if filter_wise else 1, 3 + 3), dtype=np.float64)  # 3 pairs, 3 norms
    xs = tuple(x.reshape(-1).numpy() for x in tensors)
    fused.stock_sums(base.reshape(-1).numpy(), xs, 33 if filter_wise else 17 * 33, sums)
    rows = (lambda x: x) if filter_wise else (lambda x: x.reshape(1, -1))
    torch.testing.assert_close(_sums_torch(rows(w0), [rows(x) for x in tensors]), torch.from_numpy(sums),
                               rtol=1e-12, atol=1e-12)
    t = torch.rand(sums.shape[0], generator=torch.Generator().manual_seed(1))
    if filter_wise:
        t[:3] = torch.tensor([0.0, 0.5, 1.0])  # both lerp branches and their ends
    out = np.empty(17 * 33, dtype=np.float32)
    fused.stock_out(base.reshape(-1).numpy(), xs, 33 if filter_wise else 17 * 33, t.numpy(), out)
    by_torch = toward_mean(rows(w0), [rows(x) for x in tensors], t.unsqueeze(-1)).reshape(-1)
    assert torch.equal(by_torch.view(torch.int32), torch.from_numpy(out).view(torch.int32))
    with torch_kernels.forced():
        on_torch = run(base, *tensors, filter_wise=filter_wise)
    torch.testing.assert_close(on_torch, run(base, *tensors, filter_wise=filter_wise), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cuts", [[1], [3, 50, 51], [400, 401, 999]])
def test_sums_carried_across_cuts_are_the_sums_of_one_call(cuts):
    """The float64 sums (not only the float32 t they round to) do not depend on where the blocks are cut."""
    base, *tensors = randoms(9, (1000,), 4)
    xs = [x * 10.0 ** torch.randint(-6, 6, (1000,), generator=torch.Generator().manual_seed(2)) for x in tensors]
    whole = np.zeros((1, 6), dtype=np.float64)
    fused.stock_sums(base.numpy(), tuple(x.numpy() for x in xs), 1000, whole)
    carried = np.zeros((1, 6), dtype=np.float64)
    for a, b in zip([0, *cuts], [*cuts, 1000]):
        fused.stock_sums(base[a:b].numpy(), tuple(x[a:b].numpy() for x in xs), b - a, carried)
    assert whole.tobytes() == carried.tobytes()
    pairwise = np.zeros((1, 6), dtype=np.float64)  # a different order: partial sums added afterwards
    for a, b in zip([0, *cuts], [*cuts, 1000]):
        part = np.zeros((1, 6), dtype=np.float64)
        fused.stock_sums(base[a:b].numpy(), tuple(x[a:b].numpy() for x in xs), b - a, part)
        pairwise += part
    np.testing.assert_allclose(pairwise, whole, rtol=1e-12)
