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

    # A kernel's call of another @triton.jit function (its own helpers, tl.cdiv, tl.sum, ...)
    # re-patches triton.language on every call (InterpretedFunction.__call__ -> _patch_lang:
    # inspect.getmembers over the language's modules, ~2 ms, a third of a kernel test's time),
    # although the modules stay patched, with the same values, until the running launch
    # (GridExecutor) returns. So within one launch, a callee whose language modules were
    # already patched (by the launch, or by an earlier call in it) goes straight to its
    # rewritten function; the first call for other modules, and any call outside a launch,
    # take Triton's own path.
    _launch_langs: list[set] = []  # per running launch: the language modules patched

    def _langs(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values()
                         if v is _interp.tl or v is _interp.tl.core)

    _orig_launch = _interp.GridExecutor.__call__
    _orig_device_call = _interp.InterpretedFunction.__call__

    def _launch(self, *args, **kwargs):
        _launch_langs.append(set(_langs(self.fn)))
        try:
            return _orig_launch(self, *args, **kwargs)
        finally:
            _launch_langs.pop()

    def _device_call(self, *args, **kwargs):
        langs = _langs(self.fn)
        if not (_launch_langs and langs <= _launch_langs[-1]):
            out = _orig_device_call(self, *args, **kwargs)
            if _launch_langs:
                _launch_langs[-1] |= langs
            return out
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _interp.InterpreterError(repr(e)) from e

    if not getattr(_interp, "_servelm_patched", False):
        _interp._patch_lang_tensor = _patch_lang_tensor
        _interp.GridExecutor.__call__ = _launch
        _interp.InterpretedFunction.__call__ = _device_call
        _interp._servelm_patched = True


def skip_half_on_interpreter(*indices: int) -> None:
    """Under the interpreter (~5 ms a program), run the half of a parametrized grid whose
    indices sum to an even number: every value of each parameter still runs, with half the
    values of another (in a grid of three, every pair of values still meets, for half the
    values of the third). The full grid runs on CUDA."""
    if INTERPRET and sum(indices) % 2:
        import pytest
        pytest.skip("interpreter: half of the grid (the full grid on CUDA)")


def covering(*axes, keep=None) -> list[tuple]:
    """Parametrization values for the axes (each a list of values): on CUDA every combination;
    under the interpreter (~5 ms a program) a covering subset in which every value of each axis
    meets every value of each other axis at least once (all pairs), picked greedily and
    deterministically from the combinations in order. ``keep(*combo)``, if given, says which
    combinations run at all (on CUDA too); the pairs are those of the kept combinations."""
    import itertools
    combos = [c for c in itertools.product(*axes) if keep is None or keep(*c)]
    if not INTERPRET or len(axes) < 2:
        return combos
    idx = [tuple(axis.index(v) for axis, v in zip(axes, c)) for c in combos]

    def pairs(c):
        return {(i, c[i], j, c[j]) for i, j in itertools.combinations(range(len(axes)), 2)}
    todo = set().union(*map(pairs, idx))
    picked = []
    while todo:
        best = max(range(len(idx)), key=lambda n: len(pairs(idx[n]) & todo))
        picked.append(best)
        todo -= pairs(idx[best])
    return [combos[n] for n in sorted(picked)]
