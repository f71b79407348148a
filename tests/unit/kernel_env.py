"""Where the kernel tests run: on CUDA, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1), small shapes only. Imported by the test_kernels* modules."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_CUDA else "cpu"

if INTERPRET:
    # Triton 3.6's interpreter turns a scalar (a 1-element array) into a Python int with
    # int(array), which numpy >= 2.3 refuses; loops with run-time bounds need it.
    import triton.runtime.interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if not getattr(_interp, "_servelm_patched", False):
        _interp._patch_lang_tensor = _patch_lang_tensor
        _interp._servelm_patched = True


def skip_half_on_interpreter(*indices: int) -> None:
    """Under the interpreter (~5 ms a program), run the half of a parametrized grid whose
    indices sum to an even number: every value of each parameter still runs, with half the
    values of another (in a grid of three, every pair of values still meets, for half the
    values of the third). The full grid runs on CUDA."""
    if INTERPRET and sum(indices) % 2:
        import pytest
        pytest.skip("interpreter: half of the grid (the full grid on CUDA)")
