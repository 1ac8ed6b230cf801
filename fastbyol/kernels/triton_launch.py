"""How fastbyol.kernels runs its Triton kernels: which backend a call takes, how a kernel is launched
(compiled on CUDA tensors, interpreted on CPU tensors), and how per-sample parameters reach the
device. The kernels themselves live beside their torch twins (crop_resize.py, augment.py)."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # an install without Triton: the twins serve every device
    triton = tl = None


def use_triton(backend: str | None, device: torch.device) -> bool:
    """The kernel choice every entry point of fastbyol.kernels makes: backend "torch" (the twin),
    "triton" (the Triton kernel; on CPU tensors through Triton's interpreter), or None: Triton on
    CUDA tensors, the twin elsewhere."""
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend {backend!r}: choose 'torch', 'triton' or None (automatic)")
    if backend == "torch":
        return False
    if triton is None:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package")
        return False
    return backend == "triton" or torch.device(device).type == "cuda"


def tiling(device: torch.device, n: int, rows: int) -> tuple[int, int]:
    """(samples, rows) per program for n samples of `rows` rows. On a GPU one program takes 8 rows of
    one sample. Triton's interpreter costs per program and op, not per pixel, so there one program
    takes whole images of up to 64 samples (the kernels vectorise over samples for it)."""
    if device.type == "cuda":
        return 1, 8
    return min(triton.next_power_of_2(n), 64), triton.next_power_of_2(rows)


def launch(kernel, grid, device: torch.device, *args, **constexprs) -> None:
    """Run a @triton.jit kernel: compiled on CUDA tensors, through Triton's interpreter on CPU
    tensors (the tests' path)."""
    if device.type == "cuda":
        # No contraction of a*b+c into FMAs the twins do not have; the kernels write their FMAs.
        kernel[grid](*args, **constexprs, enable_fp_fusion=False)
        return
    with _interpreting(kernel):
        _INTERPRETED[kernel.fn][grid](*args, **constexprs)


_INTERPRETED: dict = {}  # function -> its InterpretedFunction


@contextlib.contextmanager
def _interpreting(kernel):
    """While a kernel is interpreted, every @triton.jit function it can reach (its module's helpers,
    triton.language's own: tl.max, tl.zeros_like, ...) is its interpreted twin. TRITON_INTERPRET=1
    would do this for the whole process, but triton.jit reads it once, when triton is first imported
    (torchvision imports it), so a test cannot set it in time."""
    from triton.runtime.interpreter import InterpretedFunction
    try:  # imported lazily by the interpreter, and asserting that tl.cdiv is a JITFunction
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    modules = [sys.modules[kernel.fn.__module__], tl, tl.standard, tl.math, tl.core]
    # The interpreter patches triton.language's builtins while it runs, and a nested helper's patches
    # of tl.core are never undone: everything it may touch is put back afterwards, or a later
    # compilation in this process would build with the interpreter's builtins.
    touched = [*modules, tl.core.tensor, tl.core.tensor_descriptor_base]
    before = [dict(vars(owner)) for owner in touched]
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.JITFunction):
                if value.fn not in _INTERPRETED:
                    _INTERPRETED[value.fn] = InterpretedFunction(value.fn)
                setattr(module, name, _INTERPRETED[value.fn])
    try:
        yield
    finally:
        for owner, saved in zip(touched, before):  # names the interpreter adds, it keeps using
            for name, value in saved.items():
                if vars(owner).get(name) is not value:
                    setattr(owner, name, value)


def host_table(columns: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-sample parameter columns as one (n, len(columns)) table on `device`: built where the
    columns are, and copied to a GPU in one non-blocking copy from pinned memory (a pageable copy
    would wait for the device)."""
    table = torch.stack([c.to(dtype) for c in columns], dim=1)
    if table.device == device:
        return table.contiguous()
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)
