"""TSV-Merge, Iso-C and Iso-CTS against references written another way (polar factors from eigendecompositions,
nuclear norms), hand-derived goldens, and the properties users rely on (zero deltas give the base, fallbacks)."""

from __future__ import annotations

import pytest
import torch

from mergelib.methods import REGISTRY, MethodInputs
from mergelib.methods.base import IgnoredWeight
from mergelib.methods.spectral import common_size

SPECTRAL = ("tsv", "iso_c", "iso_cts")


def run(name: str, base, fts, tensor_name="model.layers.0.mlp.up_proj.weight", **params):
    spec = REGISTRY[name]
    inputs = MethodInputs(tuple(fts), base, tuple(IgnoredWeight() for _ in fts), tensor_name)
    return spec.merge(inputs, spec.params(**params))


def polar_eigh(m: torch.Tensor) -> torch.Tensor:
    """M (M^T M)^(-1/2) (or (M M^T)^(-1/2) M for wide M), in float64 through an eigendecomposition."""
    m = m.double()
    if m.shape[0] >= m.shape[1]:
        w, q = torch.linalg.eigh(m.T @ m)
        return m @ (q * w.clamp(min=1e-30).rsqrt()) @ q.T
    w, q = torch.linalg.eigh(m @ m.T)
    return (q * w.clamp(min=1e-30).rsqrt()) @ q.T @ m


def _inputs(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_iso_c_is_the_nuclear_norm_over_rank_times_the_polar_factor(shape, lam):
    base, fts = _inputs(shape, 3, 1)
    total = sum(f - base for f in fts)
    expected = base + lam * torch.linalg.matrix_norm(total, "nuc") / min(shape) * polar_eigh(total)
    got = run("iso_c", base.float(), [f.float() for f in fts], **{"lambda": lam})
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_iso_c_golden_two_orthogonal_tasks():
    base = torch.zeros(2, 2)
    fts = [torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))]
    torch.testing.assert_close(run("iso_c", base, fts), 2 * torch.eye(2))  # spectrum (3, 1) -> (2, 2)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """Each task of rank <= r/T in its own rows and columns: nothing to decorrelate, TSV is task arithmetic."""
    base = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    t1 = torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    t2 = torch.diag(torch.tensor([0.0, 0.0, 2.0, -5.0]))
    got = run("tsv", base, [base + t1, base + t2])
    torch.testing.assert_close(got, base + t1 + t2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,n", [((16, 10), 2), ((10, 16), 3), ((9, 9), 4)])
def test_tsv_against_a_reference_written_another_way(shape, n):
    base, fts = _inputs(shape, n, 2)
    keep = min(shape) // n
    us, ss, vs = [], [], []
    for f in fts:
        u, s, v = torch.linalg.svd(f - base)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(v[:keep])
    expected = base + polar_eigh(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar_eigh(torch.cat(vs, 0))
    got = run("tsv", base.float(), [f.float() for f in fts])
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0, 1.0])
def test_iso_cts_against_a_reference_written_another_way(fraction):
    base, fts = _inputs((14, 10), 3, 4)
    taus = [f - base for f in fts]
    total = sum(taus)
    r, t = 10, 3
    k = r - round((r - int(r * fraction)) / t) * t
    assert k == common_size(r, t, fraction)
    per = (r - k) // t
    u, s, v = torch.linalg.svd(total, full_matrices=False)
    cols, vals, rows = [u[:, :k]], [s[:k]], [v[:k]]
    projector = torch.eye(14, dtype=torch.float64) - u[:, :k] @ u[:, :k].T
    for tau in taus:
        ut, st, vt = torch.linalg.svd(projector @ tau, full_matrices=False)
        cols.append(ut[:, :per])
        vals.append(st[:per])
        rows.append(vt[:per])
    sigma = torch.cat(vals).mean()
    expected = base + sigma * polar_eigh(torch.cat(cols, 1)) @ polar_eigh(torch.cat(rows, 0))
    got = run("iso_cts", base.float(), [f.float() for f in fts], common_space_fraction=fraction)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_iso_cts_with_the_whole_spectrum_common_is_iso_c():
    base, fts = _inputs((12, 8), 2, 5)
    base, fts = base.float(), [f.float() for f in fts]
    torch.testing.assert_close(run("iso_cts", base, fts, common_space_fraction=1.0), run("iso_c", base, fts),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SPECTRAL)
def test_zero_task_vectors_give_the_base_exactly(name):
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(run(name, base, [base.clone(), base.clone()]), base)


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("tensor_name,shape", [("model.norm.weight", (7,)), ("model.embed_tokens.weight", (9, 4)),
                                               ("lm_head.weight", (9, 4))])
def test_vectors_and_embeddings_take_the_mean_task_vector(name, tensor_name, shape):
    base, fts = _inputs(shape, 3, 7)
    base, fts = base.float(), [f.float() for f in fts]
    expected = base + 0.5 * torch.stack([f - base for f in fts]).mean(dim=0)
    torch.testing.assert_close(run(name, base, fts, tensor_name=tensor_name, **{"lambda": 0.5}), expected)


@pytest.mark.parametrize("name", SPECTRAL)
def test_the_same_inputs_give_the_same_bits(name):
    base, fts = _inputs((24, 16), 3, 8)
    base, fts = base.float(), [f.float() for f in fts]
    assert torch.equal(run(name, base, fts), run(name, base, [f.clone() for f in fts]))


def test_bad_parameters_are_rejected_by_name():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="common_space_fraction"):
        REGISTRY["iso_cts"].params(common_space_fraction=1.5)
    with pytest.raises(ValidationError, match="lambda"):
        REGISTRY["iso_c"].params(**{"lambda": float("inf")})


# --- svd: randomized -------------------------------------------------------------------------------------------------

def _low_rank_tasks(shape, n, rank, seed, noise=1e-4, common_rank=0):
    """Task vectors: a shared part of rank `common_rank` (singular values 30 .. 20), each task's own part of rank
    `rank` (10 .. 5), all in mutually orthogonal directions, plus Gaussian noise: a clear gap after the directions
    the methods keep."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    width = common_rank + n * rank
    u, _ = torch.linalg.qr(torch.randn(shape[0], width, generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], width, generator=g))
    common = (u[:, :common_rank] * torch.linspace(30, 20, common_rank)) @ v[:, :common_rank].T
    fts = []
    for i in range(n):
        cols = slice(common_rank + i * rank, common_rank + (i + 1) * rank)
        own = (u[:, cols] * torch.linspace(10, 5, rank)) @ v[:, cols].T
        fts.append(base + common + own + noise * torch.randn(shape, generator=g))
    return base, fts


@pytest.mark.parametrize("name,params,common,own", [("tsv", {}, 0, 40),
                                                    ("iso_cts", {"common_space_fraction": 0.4}, 48, 24)])
def test_randomized_svd_is_close_to_exact_on_low_rank_plus_noise(name, params, common, own):
    """Tolerance: the merged task vector within 1e-3 relative (Frobenius) of the exact one when the directions each
    method keeps (tsv: r/T = 40 per task; iso_cts at 0.4: 48 common, 24 per task) stand above noise 1e-4."""
    base, fts = _low_rank_tasks((180, 120), 3, own, seed=5, common_rank=common)
    spec = REGISTRY[name]

    def merged(svd: str) -> torch.Tensor:
        inputs = MethodInputs(tuple(fts), base, tuple(IgnoredWeight() for _ in fts), "model.layers.0.mlp.up_proj.weight",
                              torch.Generator().manual_seed(11))
        return spec.merge(inputs, spec.params(svd=svd, **params)) - base

    exact, fast = merged("exact"), merged("randomized")
    assert torch.linalg.norm(fast - exact) <= 1e-3 * torch.linalg.norm(exact)


def test_truncated_svd_recovers_the_top_triplets_and_repeats_bit_for_bit():
    from mergelib.merging.rng import generator_for
    from mergelib.methods.spectral import truncated_svd

    base, (ft,) = _low_rank_tasks((300, 200), 1, 15, seed=2, noise=1e-3)
    matrix = ft - base
    u, s, vh = truncated_svd(matrix, 15, generator_for(0, "w"))
    eu, es, evh = truncated_svd(matrix, 15, None)  # exact
    torch.testing.assert_close(s, es, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((u * s) @ vh, (eu * es) @ evh, rtol=0, atol=1e-3)
    again = truncated_svd(matrix, 15, generator_for(0, "w"))
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), again))
    small = truncated_svd(matrix[:20, :20], 15, generator_for(0, "w"))  # 25 probes >= 20: exact instead
    assert all(torch.equal(a, b) for a, b in zip(small, truncated_svd(matrix[:20, :20], 15, None)))


def test_randomized_merges_repeat_bit_for_bit_through_the_engine(tiny_family, tmp_path):
    import hashlib

    import mergelib

    recipe = {"merge_method": "tsv", "base_model": str(tiny_family.base), "parameters": {"svd": "randomized"},
              "models": [{"model": str(p)} for p in tiny_family.finetunes]}
    digests = set()
    for i in range(2):
        out = mergelib.merge(recipe, tmp_path / str(i), quiet=True, seed=3, threads=1 + i).out_dir
        digests.add(hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))).hexdigest())
    assert len(digests) == 1


def test_iso_c_takes_no_svd_parameter():
    with pytest.raises(ValueError, match="svd"):
        REGISTRY["iso_c"].params(svd="randomized")


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_the_polar_fallback_equals_the_svd_polar_factor(shape):
    from mergelib.methods.spectral import polar, polar_by_gram

    m = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(polar_by_gram(m), polar(m), rtol=0, atol=1e-5)
