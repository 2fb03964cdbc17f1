import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def warm_float64_reference():
    """Evaluate the float64 reference once before any test compares against it.

    On this machine the first float64 reference attention in a pytest process came out ~1e-10 off (relative)
    in about one run in three, while a second evaluation of the same call, torch's SDPA and both fused
    kernels agreed to 1e-16: a first-call effect in torch's CPU float64 path, not in what the tests check.
    """
    from striped_attention import kernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 24, generator=g, dtype=torch.float64) for _ in range(3))
    out, lse = kernels.reference_forward(q, k, v, causal=True, scale=0.3)
    kernels.reference_backward(torch.ones_like(q), q, k, v, out, lse, causal=True, scale=0.3)


@pytest.fixture(params=["blas", "registers"])
def dense_chunks(request, monkeypatch):
    """Each way the compiled CPU kernel can compute the chunks of keys a query tile sees whole (the processor
    picks one by default): BLAS, or its register blocks."""
    from striped_attention import kernels

    monkeypatch.setattr(kernels, "cpu_register_chunks", request.param == "registers")
    return request.param
