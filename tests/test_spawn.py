"""process.posix_spawn_nogil: posix_spawn through glibc with the GIL let go, doing what
os.posix_spawn did for a piece's program."""

from __future__ import annotations

import os
import signal

import pytest

from sheepdog import process


def _run(argv: list[str], **kw) -> tuple[int, str]:
    read, write = os.pipe()
    try:
        pid = process.posix_spawn_nogil(argv[0], argv, {"PATH": os.defpath, "SD_X": "a b"},
                          [(write, 1)], **kw)
    finally:
        os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


def test_glibcs_own_spawn_is_the_one_used_here():
    assert process._spawn_lib() is not None  # else every test below runs os.posix_spawn instead


def test_the_program_gets_its_argv_environment_and_output():
    code, out = _run(["/bin/sh", "-c", 'echo "$0|$1|$SD_X"; exit 3', "zero", "one two"])
    assert (code, out) == (3, "zero|one two|a b\n")


def test_signals_python_ignores_are_reset_only_when_asked():
    # Python ignores SIGPIPE; a program started with it ignored would not die of it
    def ignored(**kw) -> bool:
        _, out = _run(["/bin/sh", "-c", "grep SigIgn /proc/$$/status"], **kw)
        return bool(int(out.split()[1], 16) & (1 << (signal.SIGPIPE - 1)))

    assert ignored() and not ignored(default_signals=[signal.SIGPIPE])


def test_setsid_starts_a_session_of_its_own():
    def pid_and_session(**kw) -> tuple[str, str]:
        _, out = _run(["/bin/sh", "-c", "cat /proc/$$/stat"], **kw)
        return out.split()[0], out.rsplit(")", 1)[1].split()[3]

    pid, session = pid_and_session(setsid=True)
    assert session == pid
    assert pid_and_session()[1] == str(os.getsid(0))


def test_errors_are_oserrors_naming_the_program_and_nul_bytes_are_refused():
    with pytest.raises(FileNotFoundError) as e:
        process.posix_spawn_nogil("/no/such/program", ["x"], {}, [])
    assert e.value.filename == "/no/such/program"
    with pytest.raises(ValueError, match="null byte"):
        process.posix_spawn_nogil("/bin/true", ["true", "a\0b"], {}, [])
    with pytest.raises(ValueError):
        process.posix_spawn_nogil("/bin/true", ["true"], {"A=B": "c"}, [])


def test_the_gil_is_let_go_while_a_program_is_started_and_kept_while_it_is_set_up():
    """os.posix_spawn holds the GIL through vfork and exec; a ctypes function of a CDLL
    (not a PyDLL, whose functions keep it) lets it go for the call. The dozen calls that
    set the start up keep it: each let-go lets another thread in, this one waiting."""
    import ctypes

    libc = process._spawn_lib()
    assert not libc.posix_spawn._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    for name in ("posix_spawn_file_actions_init", "posix_spawn_file_actions_adddup2",
                 "posix_spawn_file_actions_addchdir_np", "sigemptyset", "sigaddset",
                 "posix_spawnattr_setsigdefault", "posix_spawnattr_setflags",
                 "posix_spawn_file_actions_destroy", "posix_spawnattr_destroy"):
        assert getattr(libc, name)._flags_ & ctypes._FUNCFLAG_PYTHONAPI, name


def test_the_child_moves_to_its_directory_itself(tmp_path, monkeypatch):
    assert process.spawn_moves_child()  # glibc 2.29 and later: Debian's and Ubuntu's
    code, out = _run(["/bin/pwd"], cwd=str(tmp_path))
    assert (code, out) == (0, f"{tmp_path}\n") and os.getcwd() != str(tmp_path)
    with pytest.raises(FileNotFoundError):
        _run(["/bin/pwd"], cwd=str(tmp_path / "gone"))
    monkeypatch.setattr(process, "spawn_moves_child", lambda: False)
    with pytest.raises(OSError, match="cannot change directory"):  # never the wrong one
        _run(["/bin/pwd"], cwd=str(tmp_path))


def test_the_environment_is_decoded_once_and_again_when_it_changed(monkeypatch, tmp_path):
    """A piece's environment is os.environ's as it is when the piece starts: decoded
    once while it stays the same, again after any change."""
    first = process.environment()
    assert first == dict(os.environ)
    assert process.environment() is first  # unchanged: not decoded again
    monkeypatch.setenv("SHEEPDOG_SPAWN_TEST", "one")
    assert process.environment()["SHEEPDOG_SPAWN_TEST"] == "one"
    monkeypatch.setenv("SHEEPDOG_SPAWN_TEST", "two")  # same names, another value
    now = process.environment()
    assert now["SHEEPDOG_SPAWN_TEST"] == "two" and now == dict(os.environ)
    monkeypatch.delenv("SHEEPDOG_SPAWN_TEST")
    assert "SHEEPDOG_SPAWN_TEST" not in process.environment()
    out = tmp_path / "env"
    pid = process.posix_spawn_nogil("/bin/sh", ["sh", "-c", f"env > {out}"],
                                    dict(process.environment(), ITEM="é 1"), [])
    assert os.waitpid(pid, 0)[1] == 0
    assert "ITEM=é 1" in out.read_text(encoding="utf-8").splitlines()
