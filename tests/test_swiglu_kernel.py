"""``paradec.ops.swiglu`` (SwiGLU's activation read from the fused gate/up projection) against its
plain-torch twin and the compiled path, on fresh random inputs: on a GPU directly; on the CPU in
Triton's interpreter (a child process with TRITON_INTERPRET=1), where the MLP also routes
through it."""

from __future__ import annotations

import pytest
import torch

from paradec.ops import swiglu as sk

from interpreted import run_interpreted

needs_triton = pytest.mark.skipif(not sk.HAVE_TRITON, reason="needs triton")


def check_silu_mul(device: str, dtype: torch.dtype) -> None:
    """Shapes of any leading dims, widths not a multiple of the program's block, a column-sliced
    (strided) input, a transposed one (copied) and empty ones: values within one rounding of the
    twin's (fp32: the exponential's last bits), contiguous, the input untouched."""
    tol = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
           torch.float16: dict(rtol=1e-3, atol=1e-3)}[dtype]
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape, wide in [((3, 5), 0), ((7,), 0), ((2, 1, 4), 3), ((0, 4), 0)]:
        for inter in (1, 48, sk.BLOCK + 37):
            lines = torch.randn(*shape, 2 * inter + wide, generator=g) * 4
            cases.append(lines.to(device=device, dtype=dtype)[..., wide:])  # columns one stride apart, as a slice
    cases.append((torch.randn(2 * 50, 6, generator=g) * 4).to(device=device, dtype=dtype).t())  # last stride 6
    cases.append(torch.zeros(3, 0, device=device, dtype=dtype))  # I = 0
    for gate_up in cases:
        before = gate_up.clone()
        got = sk.silu_mul(gate_up)
        assert got.shape == (*gate_up.shape[:-1], gate_up.shape[-1] // 2) and got.is_contiguous()
        assert got.dtype == dtype and got.device == gate_up.device
        torch.testing.assert_close(got, sk.silu_mul_twin(gate_up), **tol)
        assert torch.equal(gate_up, before)
    with pytest.raises(ValueError, match="even last dimension"):
        sk.silu_mul(torch.zeros(2, 5, device=device, dtype=dtype))


def check_kernel_stays_in_its_lines(device: str) -> None:
    """The kernel called directly with output lines wider than I (NaN padding): each line's first
    I values are the twin's, the padding and the input are untouched."""
    inter, cols, pad = 48, 5, 8
    gate_up = torch.randn(cols, 2 * inter, device=device)
    out = torch.full((cols, inter + pad), float("nan"), device=device)
    sk._silu_mul_kernel[(cols, 1)](gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=64)
    torch.testing.assert_close(out[:, :inter], sk.silu_mul_twin(gate_up), rtol=2e-6, atol=1e-6)
    assert out[:, inter:].isnan().all()


def check_mlp_routes_through_the_kernel() -> None:
    """The MLP calls the kernel under no_grad (not with autograd on) and its output equals the
    eager path's."""
    from paradec.models.layers import SwiGLU
    from paradec.models.transformer_config import TransformerConfig

    calls = []
    kernel = sk.silu_mul

    def counted(gate_up):
        calls.append(tuple(gate_up.shape))
        return kernel(gate_up)

    sk.silu_mul = counted
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=32, hidden_size=16, intermediate_size=40, num_layers=1, num_heads=2,
                            num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, max_length=64)
    mlp = SwiGLU(cfg)
    x = torch.randn(2, 3, 16)
    eager = mlp(x)  # autograd on: the eager path
    assert not calls
    with torch.no_grad():
        got = mlp(x)
    assert calls == [(2, 3, 80)]
    torch.testing.assert_close(got, eager.detach(), rtol=1e-5, atol=1e-6)


@needs_triton
def test_in_the_triton_interpreter():
    setup = "from paradec.ops import swiglu; swiglu.DEVICES.add('cpu'); import test_swiglu_kernel as t"
    run_interpreted(setup, ["[t.check_silu_mul('cpu', d) for d in (torch.float32, torch.bfloat16, torch.float16)]; "
                            "t.check_kernel_stays_in_its_lines('cpu'); t.check_mlp_routes_through_the_kernel()"],
                    timeout_s=600)


def test_cpu_runs_stay_off_the_kernel():
    """Without a device in DEVICES (the CPU, by default) the MLP takes the eager path, even under
    no_grad."""
    assert "cpu" not in sk.DEVICES
    with torch.no_grad():
        assert not sk.usable(torch.zeros(2, 4))


def test_only_the_kernels_dtypes_route_to_it(monkeypatch):
    """float64 (which the fp32 kernel would round) and integer inputs keep the eager path; autograd
    does too."""
    monkeypatch.setattr(sk, "DEVICES", {"cpu"})
    with torch.no_grad():
        assert [sk.usable(torch.zeros(2, 4, dtype=d)) for d in (torch.float32, torch.bfloat16, torch.float16)] \
            == [sk.HAVE_TRITON] * 3
        assert not sk.usable(torch.zeros(2, 4, dtype=torch.float64))
        assert not sk.usable(torch.zeros(2, 4, dtype=torch.int32))
    assert not sk.usable(torch.zeros(2, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not sk.HAVE_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_against_the_twin(dtype):
    check_silu_mul("cuda", dtype)
    check_kernel_stays_in_its_lines("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not sk.HAVE_TRITON, reason="needs 2 GPUs and triton")
def test_cuda_on_a_second_gpu():
    """A tensor on cuda:1 while cuda:0 is current: the kernel launches on the tensor's GPU."""
    gate_up = torch.randn(9, 2 * 300, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        got = sk.silu_mul(gate_up)
    assert got.device == gate_up.device
    torch.testing.assert_close(got, sk.silu_mul_twin(gate_up), rtol=8e-3, atol=8e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not sk.HAVE_TRITON, reason="needs CUDA and triton")
def test_cuda_equals_the_compiled_path():
    """At an 8B MLP's width, against the compiled ``silu_mul`` the layers used before (fp32 inside,
    one rounding): within one bf16 rounding, the share of equal values reported."""
    from paradec.models import layers
    from paradec.models.layers import swiglu

    if not layers._FUSE:
        pytest.skip("PARADEC_COMPILE=0: no compiled path to compare with")

    gate_up = torch.randn(300, 2 * 12288, device="cuda", dtype=torch.bfloat16) * 3
    got = sk.silu_mul(gate_up)
    compiled = swiglu(*gate_up.chunk(2, dim=-1))
    torch.testing.assert_close(got, compiled, rtol=8e-3, atol=8e-3)
    print("swiglu kernel values equal to the compiled path's:", (got == compiled).float().mean().item())
