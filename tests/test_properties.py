"""Property-based tests (hypothesis) over shapes, dtypes, batch sizes, sparsities, input layouts and
every backend present; non-finite inputs; bad inputs; and randomly corrupted packed tensors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseprune import backends
from sparseprune.formats import FormatError
from sparseprune.modules import SparseLinear
from tests.helpers import assert_matches_reference, random_weight

# Triton is only exercised on GPUs here (its CPU interpreter is too slow for property tests).
BACKENDS = [b for b in backends.available_backends("cpu") if b != "triton"]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
BLOCKS = [(4, 8), (8, 8), (16, 8), (8, 16), (16, 16), (32, 32)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["semi24", "bsr", "hybrid"]))
    if kind == "semi24":
        n, k, block = draw(st.integers(1, 72)), 4 * draw(st.integers(1, 50)), (32, 32)
    else:
        block = draw(st.sampled_from(BLOCKS))
        n, k = block[0] * draw(st.integers(1, 4)), block[1] * draw(st.integers(1, 4))
    return dict(kind=kind, n=n, k=k, block=block, density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
                dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**16)))


def make_input(layout, batch, k, dtype):
    """x [..., k] in a given memory layout, with the same values whatever the layout."""
    if layout == "contiguous":
        return torch.randn(batch, k).to(dtype)
    if layout == "transposed":  # non-contiguous, last dim stride != 1
        return torch.randn(k, batch).to(dtype).T
    if layout == "strided":  # every other row of a bigger buffer
        return torch.randn(2 * batch, k).to(dtype)[::2]
    # channels-last 4-D activations: [b, h, w, k] stored as NCHW-channels-last of [b, k, h, w]
    return torch.randn(batch, k, 2, 3).to(dtype).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


@SETTINGS
@given(layer=layers(), batch=st.integers(0, 70), backend=st.sampled_from(BACKENDS), with_bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "strided", "channels_last"]))
def test_matches_dense(layer, batch, backend, with_bias, layout):
    torch.manual_seed(layer["seed"])
    packed, wd = random_weight(layer["kind"], layer["n"], layer["k"], layer["dtype"], block=layer["block"],
                               density=layer["density"])
    bias = torch.randn(layer["n"]).to(layer["dtype"]) if with_bias else None
    m = SparseLinear(packed, bias, backend=backend)
    x = make_input(layout, batch, layer["k"], layer["dtype"])
    y = m(x)
    assert y.shape == (*x.shape[:-1], layer["n"])
    assert_matches_reference(y.reshape(-1, layer["n"]), x.reshape(-1, layer["k"]), wd, m.bias)


def _stored_mask(packed):
    """Positions the packed format stores (a stored value may be 0), as a dense bool mask."""
    ones = packed.to(dtype=torch.float32)
    ones = type(ones)(shape=ones.shape, **{n: (torch.ones_like(t) if n == "values" else t)
                                           for n, t in ones.tensors().items()})
    return ones.to_dense() != 0


@SETTINGS
@given(layer=layers(), batch=st.integers(1, 9), backend=st.sampled_from(BACKENDS),
       special=st.sampled_from([float("nan"), float("inf"), float("-inf")]), frac=st.sampled_from([0.05, 0.3]))
def test_nonfinite_inputs_propagate(layer, batch, backend, special, frac):
    """NaN/Inf reaching a nonzero weight give a non-finite output, as in dense; finite outputs stay exact.

    Sparse kernels skip pruned weights, so a NaN meeting only pruned (zero) weights may stay out of
    the output (dense computes 0 * NaN = NaN there); outputs are non-finite at most where the
    stored weights (the dense backend: all weights) meet a non-finite input.
    """
    torch.manual_seed(layer["seed"])
    dtype = layer["dtype"]
    packed, wd = random_weight(layer["kind"], layer["n"], layer["k"], dtype, block=layer["block"],
                               density=layer["density"])
    x = torch.randn(batch, layer["k"])
    bad = torch.rand_like(x) < frac
    x[bad] = special
    x = x.to(dtype)
    y = SparseLinear(packed, backend=backend)(x).double()
    xd = x.double()

    def ref(mask):  # sum over masked positions only, in fp64
        prod = torch.where(mask.unsqueeze(0), xd.unsqueeze(1) * wd.double().unsqueeze(0), torch.zeros((), dtype=torch.float64))
        return prod.sum(-1)

    ref_nonzero = ref(wd != 0)
    ref_stored = ref(torch.ones_like(wd, dtype=torch.bool) if backend == "dense" else _stored_mask(packed))
    assert (~torch.isfinite(y))[~torch.isfinite(ref_nonzero)].all(), "a NaN/Inf reaching a nonzero weight was lost"
    assert torch.isnan(y)[torch.isnan(ref_nonzero)].all()
    fin = torch.isfinite(ref_stored)
    assert torch.isfinite(y)[fin].all(), "non-finite output where no stored weight met a NaN/Inf"
    clean = fin & torch.isfinite(ref_nonzero)
    if clean.any():
        xz = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype))
        y_clean = SparseLinear(packed, backend=backend)(xz)
        torch.testing.assert_close(y[clean], y_clean.double()[clean])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["semi24", "bsr", "hybrid"])
def test_bad_inputs_give_clear_errors(kind, backend):
    packed, _ = random_weight(kind, 32, 64, block=(16, 16))
    m = SparseLinear(packed, backend=backend)
    with pytest.raises(RuntimeError, match="dtype torch.float16 does not match weight dtype torch.float32"):
        m(torch.randn(2, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="input is on meta but the weight is on cpu"):
        m(torch.randn(2, 64, device="meta"))
    with pytest.raises(RuntimeError, match=r"input of shape \(2, 48\) has 48 features in its last dimension, the weight expects 64"):
        m(torch.randn(2, 48))
    with pytest.raises(RuntimeError, match=r"input of shape \(\) has 0 features"):
        m(torch.tensor(1.0))
    assert m(torch.randn(0, 64)).shape == (0, 32)
    assert m(torch.randn(3, 0, 64)).shape == (3, 0, 32)


@SETTINGS
@given(kind=st.sampled_from(["bsr", "hybrid"]), which=st.sampled_from(["crow", "col"]),
       pos=st.integers(0, 100), value=st.integers(-(2**31), 2**31 - 1), seed=st.integers(0, 2**16))
def test_corrupted_structure_never_crashes(kind, which, pos, value, seed):
    """Random index corruption: validate() refuses it by name; the C++ op, called directly, either
    refuses it too or (for memory-safe damage such as unsorted columns) computes without crashing."""
    torch.manual_seed(seed)
    packed, _ = random_weight(kind, 32, 64, block=(8, 8), density=0.5)
    t = getattr(packed, which).clone()
    if t.numel() == 0:
        return
    t[pos % t.numel()] = value
    bad = type(packed)(shape=packed.shape, **{**packed.tensors(), which: t})
    try:
        bad.validate(name="layer")
    except FormatError as e:
        assert f"layer.{which}" in str(e) or "layer.crow" in str(e) or "layer.col" in str(e)
        x = torch.randn(3, 64)
        args = (x, bad.values, bad.crow, bad.col, 64, None) if kind == "bsr" else \
            (x, bad.values, bad.meta, bad.crow, bad.col, 64, None)
        op = torch.ops.sparseprune.bsr_linear if kind == "bsr" else torch.ops.sparseprune.hybrid_linear
        try:  # the kernel's own checks: an error for anything unsafe, never an out-of-bounds read
            y = op(*args)
        except RuntimeError:
            return
        assert y.shape == (3, 32)  # memory-safe corruption (e.g. unsorted columns): still computes
        return
    # still valid (e.g. the same value written back): it must compute the right thing
    x = torch.randn(3, 64)
    assert_matches_reference(SparseLinear(bad, backend="cpu")(x), x, bad.to_dense().float())


@SETTINGS
@given(pos=st.integers(0, 1000), byte=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_corrupted_meta_is_refused_or_harmless(pos, byte, seed):
    torch.manual_seed(seed)
    packed, _ = random_weight("semi24", 16, 36)
    meta = packed.meta.clone().reshape(-1)
    meta[pos % meta.numel()] = byte
    bad = type(packed)(shape=packed.shape, values=packed.values, meta=meta.reshape(packed.meta.shape))
    try:
        bad.validate(name="w")
    except FormatError as e:
        assert "w.meta" in str(e)
        return
    x = torch.randn(4, 36)
    assert_matches_reference(SparseLinear(bad, backend="cpu")(x), x, bad.to_dense().float())
