"""Check an installed pof_fast against the torch beside it, with no GPU: python wheel-load-check.py KIND
(KIND: cpu, cu12, cu13; the kernels the installed extension should hold). ``--fits KIND`` only answers, by the
exit code, whether a KIND wheel fits this torch.

A wheel that fits loads, with the kernels of its kind registered with torch's dispatcher (CUDA kernels load
without a GPU; nothing runs on one) and its CPU kernels giving the torch backend's result. A CUDA wheel under a
torch of the other CUDA major, or under a CPU torch, is not loaded: one warning names the wheel to take, and the
search falls back to the torch backend. Used by .ci/build-wheels.sh and .ci/ext-cuda-compile.sh; run it from
outside the checkout so that the installed pof_fast is the one imported.
"""
import sys
import warnings

import torch

OPS = ("line_stats", "head_gradient", "direction_logits", "search")


def fits(kind: str) -> bool:
    if kind == "cpu":
        return True
    return torch.version.cuda is not None and torch.version.cuda.split(".")[0] == kind[2:]


def main(kind: str) -> None:
    import pof_fast
    from pof_fast import _ext

    assert pof_fast.__file__.find("site-packages") > 0, f"not the installed pof_fast: {pof_fast.__file__}"
    h = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = pof_fast.line_search(h, w, None, y)
        pof_fast.line_search(h, w, None, y)
    want = pof_fast.line_search(h, w, None, y, backend="torch")
    assert torch.allclose(got.step, want.step, rtol=1e-5, atol=1e-6), (got.step, want.step)
    messages = [str(c.message) for c in caught if "pof_fast._C" in str(c.message)]
    if not fits(kind):
        major = kind[2:]
        (message,) = messages
        assert message.startswith(f"pof_fast._C holds CUDA {major} kernels but torch {torch.__version__} "), message
        want_wheel = "+cu" + torch.version.cuda.split(".")[0] if torch.version.cuda else ""
        assert f"{pof_fast.__version__.split('+')[0]}{want_wheel}-cp310-abi3-" in message, message
        print(f"  not loaded, one warning: {message}")
        return
    assert not messages and _ext.available(), messages
    import pof_fast._C as ext

    cuda = kind != "cpu"
    assert bool(ext.cuda) == cuda, ext.build
    assert f"; abi=2.10; cuda={kind[2:] if cuda else 'none'}" in ext.build, ext.build
    for key in ("CPU",) + (("CUDA",) if cuda else ()):
        for op in OPS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pof_fast::{op}", key), f"no {key} kernel: {op}"
    if cuda:  # the launch settings of benchmarks/sweep.py (host state only: no GPU needed)
        assert ext._cuda_launch() == (256, 8), ext._cuda_launch()
        ext._set_cuda_launch(512, 4)
        assert ext._cuda_launch() == (512, 4), ext._cuda_launch()
        try:
            ext._set_cuda_launch(256, 3)
        except (ValueError, RuntimeError) as exc:
            assert "scorer_warps" in str(exc), exc
        else:
            raise AssertionError("scorer_warps=3 was accepted")
        assert ext._cuda_launch() == (512, 4)
    print(f"  loads: {pof_fast.backends().extension}; kernels registered: {', '.join(OPS)}")


if __name__ == "__main__":
    if sys.argv[1] == "--fits":
        sys.exit(0 if fits(sys.argv[2]) else 1)
    main(sys.argv[1])
