"""The gunicorn worker `sheepdog serve` runs the web app in: gevent's, with two changes.
It is not in the `web` package: gunicorn imports it before gevent patches the standard
library, so it imports nothing that opens sockets (redis-py, Flask) until then.

- Each web process takes every connection waiting on its socket at once. gunicorn's
  gevent worker takes one per turn of the event loop whenever there are several
  workers, so that they share one socket evenly; but with --reuse-port (which `serve`
  uses) each worker has a socket of its own and the kernel shares the connections out.
  One per turn made the fiftieth of 50 clients arriving together wait ~25 turns (a
  third of a second under load) before its first request was even read.
- Its log records (an access line each request) do not look for their caller's file and
  line or their thread's name (a greenlet lookup under gevent): 50 -> 28 us a line.
- Once its app is loaded, a web process says so on the pipe `serve` gave it
  (SHEEPDOG_SERVE_READY), so `serve` can say when the whole service answers: until then
  a burst meets one process while the others are still importing.
"""

from __future__ import annotations

import logging
import os
import socket

import gunicorn
from gevent.server import StreamServer
from gunicorn.workers import ggevent

from .defaults import SERVE_READY_ENV


class _OwnSocketServer(StreamServer):
    """A server that takes all waiting connections each turn (gevent's default, 100)."""

    @property
    def max_accept(self) -> int:
        return int(StreamServer.max_accept)

    @max_accept.setter
    def max_accept(self, _value: int) -> None:
        pass  # gunicorn's 1 is for a socket shared by the workers: theirs is their own


class Worker(ggevent.GeventWorker):
    """gunicorn's gevent worker, taking connections in batches on a socket of its own."""

    def run(self) -> None:
        if own_sockets(self.cfg.reuse_port):
            # gunicorn's run() builds its servers from this module-level name
            ggevent.StreamServer = _OwnSocketServer
        super().run()

    def load_wsgi(self) -> None:
        # no log format of a web process (gunicorn's) shows a caller or a thread name:
        # not looked up for every record (the logging HOWTO's "Optimization")
        logging._srcfile = None
        logging.logThreads = False
        logging.logMultiprocessing = False
        super().load_wsgi()
        say_ready()


def own_sockets(reuse_port: bool) -> bool:
    """Whether each worker listens on a socket of its own: --reuse-port, where the
    system has it, from gunicorn 24 on (before, the workers shared the arbiter's)."""
    return reuse_port and hasattr(socket, "SO_REUSEPORT") and gunicorn.version_info >= (24,)


def say_ready() -> None:
    """One byte on serve's pipe, if there is one (a worker restarted later says it too)."""
    fd = os.environ.get(SERVE_READY_ENV, "")
    if fd.isdigit():
        try:
            os.write(int(fd), b".")
        except OSError:
            pass  # serve stopped listening: nobody is waiting for it
