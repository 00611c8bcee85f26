"""The fused CPU kernel of the engine's bounded token softmax, compiled once per machine.

torch's separate operations make five passes over a chunk's scores (the product, exp2, the
token sum, the normalisation, the head sum); ``_fused_maps.c`` makes none: a block of pixels
of a few prompts stays in L1 from the product to the summed map. It is plain C (GCC/Clang
vector extensions), compiled with the system's C compiler on first use for the machine it runs
on (``-march=native``) and cached under ``$OVSTORE_KERNEL_CACHE`` (default
``~/.cache/ovstore/kernels``; a temporary folder where that cannot be written), keyed by the
source, the compiler and the CPU. Where no compiler
works the engine keeps torch's operations (same maps within float32 rounding);
``OVSTORE_FUSED_KERNEL=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch

__all__ = ["fused_kernel", "fused_maps", "MAX_TOKENS"]

log = logging.getLogger(__name__)

#: prompts longer than this take torch's path (the kernel's per-prompt buffers)
MAX_TOKENS = 512
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared")
#: pixels per block in 16-lane vectors: 4 where AVX-512 gives 32 wide registers for the 4 × 4
#: accumulators, 2 elsewhere (AVX2's 16 registers, NEON), so that they stay in registers
_WIDE_CPU_FLAGS = ("avx512f",)
_lock = threading.Lock()
_loaded: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    root = os.environ.get("OVSTORE_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ovstore" / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [l for l in text.splitlines() if l.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _flags(cpu: str) -> tuple[str, ...]:
    """The compiler flags for the CPU of signature ``cpu`` (:func:`_cpu_signature`)."""
    features = set(cpu.split())
    return (*_FLAGS, "-DNV=4" if any(f in features for f in _WIDE_CPU_FLAGS) else "-DNV=2")


def _compile(source: bytes, compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "fused_maps.c"
        src.write_bytes(source)
        built = Path(tmp) / target.name
        for flags in (flags, tuple(f for f in flags if f != "-march=native")):
            result = subprocess.run([compiler, *flags, str(src), "-o", str(built)], capture_output=True, text=True,
                                    timeout=120)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: concurrent processes race harmlessly
                return
        errors = [l for l in result.stderr.splitlines() if "error" in l]
        raise RuntimeError(errors[0].strip() if errors else f"{compiler} failed")


def fused_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; ``None`` where it cannot be built
    (no C compiler) or is turned off (``OVSTORE_FUSED_KERNEL=0``)."""
    global _loaded
    if _loaded is not False:
        return _loaded or None
    with _lock:
        if _loaded is not False:
            return _loaded or None
        _loaded = None
        if os.environ.get("OVSTORE_FUSED_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            log.info("no C compiler found: the maps engine uses torch's operations")
            return None
        source = resources.files("ovstore.analyze").joinpath("_fused_maps.c").read_bytes()
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            version = ""
        cpu = _cpu_signature()
        flags = _flags(cpu)
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), version.encode(), cpu.encode(),
                                         " ".join(flags).encode()])).hexdigest()[:16]
        error: Exception | None = None
        # the user's cache, else (a read-only home, as on some cluster workers) a temporary folder
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"ovstore-kernels-{os.getuid()}"):
            target = folder / f"fused_maps-{key}.so"
            try:
                if not target.exists():
                    _compile(source, compiler, flags, target)
                lib = _load(target)
            except RuntimeError as exc:  # the compiler refused: another folder will not help
                error = exc
                break
            except (OSError, subprocess.SubprocessError) as exc:
                error = exc
                continue
            _loaded = lib
            return lib
        log.warning("the fused maps kernel could not be built (%s): the engine uses torch's operations", error)
        return None


def _load(path: Path) -> ctypes.CDLL:
    """A built kernel library with its function's signature declared."""
    lib = ctypes.CDLL(str(path))
    fn = lib.ovstore_fused_maps
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, ptr, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def _after_fork() -> None:
    """In a forked child the pool's threads do not exist and a lock may be held by one of them."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="ovstore-maps")
    return _pool


def fused_maps(keys_log2e: torch.Tensor, start: int, stop: int, n_tokens: int, shared: int, q: torch.Tensor,
               steps: int, pixels: int, out: torch.Tensor, threads: int = 1, accumulate: bool = True) -> bool:
    """Add (or with ``accumulate=False`` write) the step- and head-summed token softmax maps of
    prompts in engine columns ``start:stop`` (``n_tokens`` each, the first ``shared`` rows
    common to all) into ``out[start:stop]`` ``(token, pixel)``. ``keys_log2e``
    ``(head, token, channel)`` and ``out`` are contiguous float32 CPU tensors, ``q``
    ``(head, channel, step*pixel)`` float32 with contiguous rows (a slice of the steps of prepared
    queries will do), and every score is bounded. Returns False (nothing done) where the kernel
    is unavailable."""
    lib = fused_kernel()
    if lib is None or n_tokens > MAX_TOKENS:
        return False
    heads, total, channels = keys_log2e.shape
    prompts = (stop - start) // n_tokens
    kptr = keys_log2e.data_ptr() + start * channels * 4
    optr = out.data_ptr() + start * pixels * 4
    args = (kptr, total * channels, q.data_ptr(), q.stride(0), q.stride(1), pixels, heads, channels, steps)

    def run(first: int, last: int) -> int:
        return lib.ovstore_fused_maps(*args, first, last, 0, prompts, n_tokens, shared, optr, pixels, int(accumulate))

    threads = max(1, min(int(threads), -(-pixels // 64)))
    if threads == 1:
        codes = [run(0, pixels)]
    else:  # pixel ranges in 64-pixel blocks, one per thread (ctypes releases the GIL)
        blocks = -(-pixels // 64)
        edges = [min(pixels, 64 * round(i * blocks / threads)) for i in range(threads + 1)]
        codes = list(_workers().map(lambda span: run(*span), zip(edges[:-1], edges[1:])))
    if any(codes):
        raise RuntimeError("fused maps kernel refused its arguments")
    return True
