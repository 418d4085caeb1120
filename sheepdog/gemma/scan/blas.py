"""GEMMA's own BLAS, found from its executable, for the kinship products GEMMA computes.

GEMMA's `-gk 1` sums x xᵀ with one cblas_dgemm per batch of SNPs. How a BLAS orders those
sums depends on the library, the kernel it picked for this CPU and its thread count: on
one machine numpy's OpenBLAS and Debian's (which chose its SSE3 kernel there) differ in
the last bits of ~400 of 39,204 BXD kinship entries, and a few of those show in the 10th
digit GEMMA writes. Calling the library GEMMA itself resolves `cblas_dgemm` from, with
GEMMA's arguments, gives GEMMA's own numbers. Where that library cannot be loaded (a
static GEMMA, another system's libc) numpy's BLAS stands in, and the step says so.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...process import capture
from ..commands import GEMMA_ENV

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values, fixed by the standard
_LDD_LINE = re.compile(r"=>\s*(\S+)\s+\(0x")
# one product at a time per process: it already uses every core, and a batch buffer of
# 20,000 SNPs per task at once would multiply the memory by the number of tasks
_ONE_AT_A_TIME = threading.Lock()


@dataclass(frozen=True)
class Blas:
    """C += X Xᵀ for a C-contiguous float64 X (individuals x SNPs), as GEMMA calls it."""

    name: str  # the library's path, or "numpy" when GEMMA's could not be used
    why: str  # for the step's log: whose BLAS and, for numpy, why
    _dgemm: Any = None

    def add_product(self, x: np.ndarray, c: np.ndarray) -> None:
        n, k = x.shape
        with _ONE_AT_A_TIME:
            if self._dgemm is None:
                c += x @ x.T
                return
            pointer = ctypes.POINTER(ctypes.c_double)
            a = x.ctypes.data_as(pointer)
            self._dgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, n, n, k, ctypes.c_double(1.0), a, k,
                        a, k, ctypes.c_double(1.0), c.ctypes.data_as(pointer), n)


def linked_libraries(executable: str) -> list[str]:
    """The shared libraries `ldd` lists for an executable, in the order the dynamic
    linker searches them for a symbol; [] for a static or unreadable one."""
    try:
        _, out, _ = capture(["ldd", executable], timeout=30)
    except (OSError, TimeoutError):
        return []
    return [m.group(1) for line in out.splitlines() if (m := _LDD_LINE.search(line))]


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]


def _defined_in(function: Any) -> str:
    """The real path of the shared object that defines a loaded C function."""
    info = _DlInfo()
    dladdr = ctypes.CDLL(None).dladdr  # glibc: in libc itself since 2.34, else libdl's
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    address = ctypes.cast(function, ctypes.c_void_p).value
    if not dladdr(address, ctypes.byref(info)) or not info.fname:
        return ""
    return os.path.realpath(os.fsdecode(info.fname))


@functools.cache  # once per process and executable: ldd and dlopen are not free
def gemmas(binary: str = "gemma", path: str | None = None) -> Blas:
    """The first of GEMMA's libraries that defines cblas_dgemm (the one GEMMA's calls
    reach), or numpy's BLAS with the reason."""
    found = shutil.which(binary, path=path or os.environ.get("PATH"))
    # read when the library loads: its idle threads then sleep at once rather than spin
    # for the GEMMA processes beside them, as GEMMA's own do (commands.GEMMA_ENV)
    for name, value in GEMMA_ENV.items():
        os.environ.setdefault(name, value)
    if found is None:
        return Blas("numpy", f"numpy's BLAS: GEMMA ({binary!r}) is not on PATH")
    for library in linked_libraries(os.path.realpath(found)):
        try:
            dgemm = ctypes.CDLL(library).cblas_dgemm
        except (OSError, AttributeError):
            continue
        if _defined_in(dgemm) != os.path.realpath(library):
            continue  # found in one of its own dependencies (libgsl -> libgslcblas)
        dgemm.restype = None
        return Blas(library, f"GEMMA's BLAS ({library})", dgemm)
    return Blas("numpy", f"numpy's BLAS: no library of {found} that this process can load "
                         "defines cblas_dgemm; GEMMA's own kinship may differ in a last digit")
