"""Interpreter compatibility for the kernel tests.

Triton 3.6's interpreter turns a runtime loop bound into a Python int with
``int(array)`` on a one-element array, which NumPy 2.4 rejects ("only 0-dimensional
arrays can be converted to Python scalars", triton-lang/triton#9171), so any kernel
with ``for ... in range(lo, hi)`` over runtime bounds fails there. Newer Triton
releases take ``.item()``; this applies the same fix when the interpreter is in use.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.runtime.interpreter as interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_with_item_index(tensor, scope) -> None:
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor_with_item_index
