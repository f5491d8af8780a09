"""The Triton backend: interpreter checks (any machine) and CUDA checks (GPU machines only).

The interpreter checks live in ``tests/kernels/triton_interpret_cases.py`` and run here in a fresh
pytest process with ``TRITON_INTERPRET=1 BNKIT_BACKEND=triton``: Triton decides between
compiling and interpreting when a kernel is decorated (at the first import of
``bnkit.kernels.triton_kernels``), so they cannot share a process with tests that may have
imported the kernels first. ``tests/kernels/triton_compile_cases.py`` likewise compiles every kernel
for sm_90 (no GPU needed) in a process of its own with ``TRITON_INTERPRET=0``. The tests
below that need a GPU compare against torch's own CUDA batch norm (the oracle) and skip when
CUDA is absent.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bn_tolerances import CUDA, CUDA_STEP, assert_close

from bnkit.kernels.triton import Layout, _split_eps, layout_of

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


# module -> environment of the fresh pytest process that runs it
SUBPROCESS_SUITES = {
    "triton_interpret_cases.py": {"TRITON_INTERPRET": "1", "BNKIT_BACKEND": "triton"},
    "triton_compile_cases.py": {"TRITON_INTERPRET": "0"},
}


@pytest.fixture(scope="module")
def subprocess_suites():
    """Start every suite of SUBPROCESS_SUITES at once (they are single-threaded: two run side by
    side on two cores); each test below waits for its own."""
    pytest.importorskip("triton")  # an optional extra: bnkit[triton]
    procs = {}
    for module, env_vars in SUBPROCESS_SUITES.items():
        env = dict(os.environ, **env_vars)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
        procs[module] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / module)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    yield procs
    for proc in procs.values():  # only if a test failed before waiting for its process
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _check_suite(procs: dict, module: str) -> None:
    proc = procs[module]
    try:
        out, err = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{module} timed out:\n{out[-6000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{module} failed:\n{out[-6000:]}\n{err[-3000:]}"
    assert " passed" in out and "skipped" not in out, out[-2000:]


def test_interpreted_kernels_match_reference_and_torch(subprocess_suites):
    _check_suite(subprocess_suites, "triton_interpret_cases.py")


def test_kernels_compile_for_sm90_with_vectorized_loads(subprocess_suites):
    _check_suite(subprocess_suites, "triton_compile_cases.py")


# --- the launcher's view of a tensor (no triton needed) ---------------------------------------


def test_layout_of_contiguous_puts_positions_innermost():
    assert layout_of(torch.empty(2, 3, 4, 5)) == Layout(np=2, c=3, sp=20, sn=60, sc=20, ss=1, cl=False)
    assert layout_of(torch.empty(2, 3, 7)) == Layout(2, 3, 7, 21, 7, 1, False)


def test_layout_of_channels_inner_layouts():
    cl = Layout(np=1, c=3, sp=40, sn=0, sc=1, ss=3, cl=True)
    assert layout_of(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)) == cl
    assert layout_of(torch.empty(2, 3, 4, 5, 1).to(memory_format=torch.channels_last_3d)) == cl
    assert layout_of(torch.empty(2, 4, 5, 3).movedim(3, 1)) == cl  # (N, H, W, C) memory seen as (N, C, H, W)
    assert layout_of(torch.empty(8, 3)) == Layout(1, 3, 8, 0, 1, 3, True)
    assert layout_of(torch.empty(8, 3, 1, 1)) == Layout(1, 3, 8, 0, 1, 3, True)


def test_layout_of_rejects_other_strides():
    x = torch.empty(2, 3, 4, 5)
    assert layout_of(x.transpose(2, 3)) is None
    assert layout_of(x[:, :, ::2]) is None
    assert layout_of(torch.empty(5)) is None


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1, 0.0, 1e-12])
def test_split_eps_is_exact_to_float64_precision(eps):
    hi, lo = _split_eps(eps)
    f32 = torch.tensor([hi, lo], dtype=torch.float32).double()
    assert f32.tolist() == [hi, lo]  # both halves are float32 values
    assert abs(float(f32.sum()) - eps) <= 2.0**-46 * eps


def test_load_backend_without_triton_raises_import_error(monkeypatch):
    # the dispatcher turns this ImportError into one warning and the reference backend
    from bnkit.kernels.triton import load_backend

    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now raises ImportError
    monkeypatch.delitem(sys.modules, "bnkit.kernels.triton_kernels", raising=False)
    with pytest.raises(ImportError):
        load_backend()


def test_cpu_tensors_need_the_interpreter():
    pytest.importorskip("triton")
    from bnkit.kernels.triton import TritonBackend

    compiled = TritonBackend(types.SimpleNamespace(affine_kernel=object()))  # stands for compiled kernels
    assert not compiled.interpreted
    assert not compiled.supports(torch.randn(2, 3, 4))


# --- real GPU ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_SHAPES = [
    ((16, 32, 24, 24), False),
    ((16, 32, 24, 24), True),
    ((256, 96), False),
    ((8, 40, 300), False),
    ((4, 16, 4, 6, 8), True),
    ((64, 128, 7, 7), False),
    ((64, 128, 7, 7), True),
]


def _gpu_input(shape, channels_last, dtype):
    x = torch.randn(shape, device="cuda") * 2 + 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.to(dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", list(CUDA), ids=str)
@pytest.mark.parametrize("shape, channels_last", GPU_SHAPES)
def test_gpu_functional_matches_torch(shape, channels_last, dtype):
    pytest.importorskip("triton")
    from bnkit.functional import batch_norm
    from bnkit.kernels import last_backend, use_backend

    x0 = _gpu_input(shape, channels_last, dtype)
    c = shape[1]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    w0, b0 = torch.rand(c, device="cuda", dtype=pd) + 0.5, torch.randn(c, device="cuda", dtype=pd)
    dy = torch.randn_like(x0)
    for training in (True, False):
        out = []
        for fn in (batch_norm, F.batch_norm):
            x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
            rm = torch.zeros(c, device="cuda", dtype=pd)
            rv = torch.ones(c, device="cuda", dtype=pd)
            with use_backend("triton"):
                y = fn(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
                (y.float() * dy.float()).sum().backward()
                if fn is batch_norm:
                    assert last_backend() == "triton"
            out.append((y, rm, rv, x.grad, w.grad, b.grad))
        assert out[0][0].stride() == x0.stride()
        for got, want in zip(*out, strict=True):
            assert_close(got, want, dtype, table=CUDA_STEP)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", list(CUDA), ids=str)
@pytest.mark.parametrize("shape, channels_last", GPU_SHAPES)
@pytest.mark.parametrize("fused_max_bytes", [0, 1 << 30], ids=["split", "fused"])
def test_gpu_plans_match_reference(shape, channels_last, dtype, fused_max_bytes):
    pytest.importorskip("triton")
    from bnkit.kernels.reference import ReferenceBackend
    from bnkit.kernels.triton import load_backend

    be, ref = load_backend(fused_max_bytes=fused_max_bytes), ReferenceBackend()
    x = _gpu_input(shape, channels_last, dtype)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, a, k, cc = torch.randn(5, shape[1], device="cuda", dtype=sd)
    dy = torch.randn_like(x)
    atol, rtol = CUDA[dtype]
    m = x.numel() // shape[1]
    for got, want in zip(be.forward_train(x, w, b, 1e-5), ref.forward_train(x, w, b, 1e-5), strict=True):
        assert_close(got, want, dtype, table=CUDA)
    mean = ref.forward_train(x, w, b, 1e-5)[1]
    for got, want in zip(be.backward_reduce(dy, x, mean), ref.backward_reduce(dy, x, mean), strict=True):
        torch.testing.assert_close(got, want, atol=atol * m, rtol=rtol)  # sums of m terms: atol scales with m
    assert_close(be.forward_eval(x, mean, a, b), ref.forward_eval(x, mean, a, b), dtype, table=CUDA)
    assert_close(be.backward_input(dy, x, mean, a, k, cc), ref.backward_input(dy, x, mean, a, k, cc), dtype, table=CUDA)
