"""posix_spawn without holding the GIL. Python's os.posix_spawn keeps the GIL while the
child is made and execs (vfork: until exec, a few tenths of a millisecond here), so every
other thread of a worker (its other slots, a pull worker's reports and claims) waits for
each program started. glibc's own posix_spawn called through ctypes lets them run; where
it cannot be had (another libc), os.posix_spawn is used as before."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

# glibc's flag values (spawn.h); POSIX_SPAWN_SETSID since glibc 2.26
_SETSIGDEF = 0x04
_SETSID = 0x80
_ROOM = 1024  # bytes for glibc's opaque structures (80, 336 and 128 on x86-64)


@functools.cache
def _libc() -> Any:
    """glibc's spawn functions, or None where they are not glibc's."""
    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is let go in each call
        libc.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p,
                                     ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_char_p),
                                     ctypes.POINTER(ctypes.c_char_p)]
        libc.posix_spawn.restype = ctypes.c_int
        libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
    except (OSError, AttributeError):
        return None
    return libc


def _strings(values: Sequence[bytes]) -> Any:
    """A NULL-ended array of C strings; a NUL inside one would end it early: refused, as
    os.posix_spawn refuses it."""
    if any(b"\0" in v for v in values):
        raise ValueError("embedded null byte")
    return (ctypes.c_char_p * (len(values) + 1))(*values, None)


def spawn(path: str, argv: Sequence[str], env: dict[str, str], dup2: Sequence[tuple[int, int]],
          default_signals: Sequence[int] = (), setsid: bool = False) -> int:
    """Start `path` with `argv` and `env`, each (fd, target) of `dup2` made the child's
    target fd, `default_signals` at their default disposition, in a session of its own
    with `setsid`; the pid (OSError as os.posix_spawn raises it)."""
    libc = _libc()
    if libc is None or any("=" in k or not k for k in env):  # the latter: Python's words
        return os.posix_spawn(path, list(argv), env, setsigdef=tuple(default_signals),
                              setsid=setsid,
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, to) for fd, to in dup2])
    actions = ctypes.create_string_buffer(_ROOM)
    attr = ctypes.create_string_buffer(_ROOM)
    signals = ctypes.create_string_buffer(_ROOM)
    libc.posix_spawn_file_actions_init(actions)
    libc.posix_spawnattr_init(attr)
    try:
        for fd, to in dup2:
            _check(libc.posix_spawn_file_actions_adddup2(actions, fd, to), path)
        libc.sigemptyset(signals)
        for signo in default_signals:
            libc.sigaddset(signals, int(signo))
        _check(libc.posix_spawnattr_setsigdefault(attr, signals), path)
        _check(libc.posix_spawnattr_setflags(attr, _SETSIGDEF | (_SETSID if setsid else 0)),
               path)
        pid = ctypes.c_int()
        _check(libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), actions, attr,
                                _strings([os.fsencode(a) for a in argv]),
                                _strings([os.fsencode(f"{k}={v}") for k, v in env.items()])),
               path)
        return pid.value
    finally:
        libc.posix_spawn_file_actions_destroy(actions)
        libc.posix_spawnattr_destroy(attr)


def _check(code: int, path: str) -> None:
    """posix_spawn's functions return the error number itself (not -1 and errno)."""
    if code:
        raise OSError(code, os.strerror(code), path)
