"""Every interval, time limit and batch size sheepdog uses, named in one place.

Settings (config.py) holds what a deployment tunes; these are the fixed timings the
code is written around, each with the reason for its value.
"""

from __future__ import annotations

# -- a worker and the piece it runs
WATCH_POLL = 0.2  # s: a running piece is looked at this often (quiet output flushed too)
CANCEL_CHECK = 1.0  # s: at most this long before a cancel or revoked lease is noticed
TAKE_WAIT = 1.0  # s: a worker's blocking dequeue; bounds how long a stop takes
# s: a live taker claims its entry within milliseconds of taking it; an entry unclaimed at
# two sightings this far apart was lost with its taker (sent again: a twin is harmless,
# only one claim can win)
TAKE_TO_CLAIM = 0.5
SILENT_GRACE = 3.0  # heartbeat timeouts a live same-host piece may stay silent (an outage)
TAKE_WAIT_INLINE = 0.05  # s: a client's own helper must notice its job ended at once
MAINTAIN_FAST = 0.1  # s: upkeep round of a burst or inline worker
KILL_GRACE = 3.0  # s: between SIGTERM and SIGKILL of a piece's process group
# s: `serve` gives gunicorn and its local worker this long to stop before SIGKILL; a
# worker hands its pieces back within KILL_GRACE, gunicorn drains within SERVE_GRACE
WORKER_STOP_WAIT = 8.0
SERVE_READY_ENV = "SHEEPDOG_SERVE_READY"  # the pipe a web process says it is ready on (fd)
SERVE_GRACE = 5.0  # s: gunicorn's graceful timeout (websockets are told to go at once)
SERVE_NICE = 19  # `serve`'s own worker (and its pieces) at the lowest CPU priority: requests first
SERVE_WARM_CONNECTIONS = 40  # Redis connections each web process opens before serving
SERVE_CONNECTIONS = 4096  # connections `serve` holds open at once (greenlets, not threads)
SERVE_HEAD_TIMEOUT = 5.0  # s: a request's head (and an idle keep-alive) gets this long
BURST_OUTAGE_LIMIT = 60.0  # s: a burst (one-off) worker stops waiting for Redis after this
# s: the burst worker a detached `run` starts stays this long with nothing to do: the next
# job of a shell loop of `run --detach` finds it (going at once, every other job of the
# loop started a worker of its own: 8 jobs/s against 12 with one waiting)
DETACHED_LINGER = 10.0
# connections one process may open to Redis: each open websocket stream holds one in a
# blocking read, and redis-py's own default cap (100) refused the 101st follower
REDIS_MAX_CONNECTIONS = 4096
REDIS_RETRY = 1.0  # s: a worker's upkeep tries again this often while Redis is down
PARENT_WATCH = 0.25  # s: an Executor's worker checks this often that its parent lives
OUTAGE_PATIENCE = 600.0  # s: a waiting command (map, result, logs -f, the Executor) waits
SCRATCH_SWEEP_EVERY = 3600.0  # s: a worker looks for abandoned scratch this often

# -- pull workers (HTTPS)
PULL_PROTOCOL = 1  # the worker protocol's version; both sides must speak the same one
PULL_HEADER = "X-Sheepdog-Protocol"  # the header each side names its version in
PULL_CLAIM_WAIT = 30.0  # s: a claim long-polls this long; an idle worker's one request
PULL_TAKE_SLICE = 0.5  # s: one blocking take in a claim (a server going, a revoked token: noticed)
PULL_PUT_BACK_PAUSE = 1.0  # s: after handing a piece for ssh/Slurm back to its queue
PULL_RENEW_EVERY = 2.0  # s: a pull worker renews its leases (and hears of cancels) this often
PULL_REPORT_DEADLINE = 20.0  # s: a request records through a Redis outage this long, then 503
PULL_BACKOFF_MAX = 10.0  # s: a pull worker's longest pause between tries of one request
PULL_SEGMENT = 64 << 20  # bytes of one upload request: a dropped one resumes at its start
PULL_CHUNK = 1 << 20  # bytes read and written at a time while streaming a file
# pieces a pull worker holds beyond its slots: the next one's claim and inputs travel
# while one runs (one, not more: a long piece held back is a piece another worker could run)
PULL_PREFETCH = 1
# ... unless pieces are shorter than a report's round trip: then as many as keep the slots
# busy meanwhile (each held at most two round trips), up to this many: at 16, no-op pieces
# (2-3 ms) left the slot idle while a busy service took 40-80 ms to answer a report
PULL_PREFETCH_MOST = 64
# connections a pull worker keeps open to the service: one per piece in hand, and more
PULL_CONNECTIONS = PULL_PREFETCH_MOST + 8
PULL_LOG_EVERY = 0.5  # s between a pull worker's log batches (a short piece's go with its end)
PULL_ANNOUNCE_EVERY = 1.0  # s: a claiming pull worker registered again at most this often
PULL_INLINE = 1 << 20  # bytes of small files a report or a fetch carries inside its JSON

# -- logs
LOG_FLUSH = 0.2  # s: buffered lines are sent at least this often (a few round trips/s)
# s between a piece's log batches: a line after a quiet spell goes at once (live logs
# without added delay), a burst goes in batches (a LOCO scan's GEMMA pieces print ten
# lines each at once: one round trip per line made the cold scan 0.3 s slower)
LOG_SEND_GAP = 0.02
LOG_FLUSHER_IDLE = 1.0  # s: a writer's flusher thread goes after this long without lines
LOG_BATCH_LINES = 200  # lines per Lua call: one call holds Redis for a few ms at most
LOG_MAX_BYTES = 256 << 20  # bytes of text a job's log keeps, whatever its line count
LOG_MAX_LINE = 64 << 10  # characters of one log line; the rest is cut, saying so
LOG_BUFFER_LINES = 100_000  # lines a piece's log keeps while Redis is unreachable
FOLLOW_BLOCK_MS = 250  # ms: a log follower's XREAD block
FOLLOW_COUNT = 1000  # lines per XREAD of a follower
FOLLOW_GAP = 0.01  # s: a follower's pause after lines came, so that more come per read
SLOTS_LOOK_AGAIN = 0.5  # s: a piece waiting for a worker's slots looks whether it is leaving
# cores and MiB of memory cwltool may hand out at once to invocations that run on ssh hosts
# or Slurm (the cluster schedules them; cwltool would count this machine's)
CWL_REMOTE_CORES = 256
CWL_REMOTE_RAM_MB = 1 << 30
CWL_LOOK_AGAIN = 1.0  # s: a CWL invocation looks at its piece this often even when no line woke it
CWL_LISTEN_MS = 1000  # ms: a CWL run's log reader blocks this long per read
ENDED_CHECK = 1.0  # s: a follower asks whether its job ended at least this often
STREAM_LEASE = 30.0  # s: an open stream's place under its job's and token's caps, renewed
PROGRESS_EVERY = 1.0  # s: the websocket's progress event when nothing else happens
TERMINAL_REDRAW = 0.5  # s: the terminal's progress line

# -- input
MAX_INPUT_LINE = 8 << 20  # characters in one line of an input file (100,000 genotypes fit)
MAX_CHROMOSOMES = 100  # per genotype set: each is two pieces and an open file in the split
MAX_QUOTED = 300  # characters of a user's value quoted in an error message

# -- finishing
FINALIZE_LOCK = 60  # s: one process exports a finished job's results; others wait
FINALIZE_WAIT = 0.02  # s: how often the others look

# -- GN3's queue
GN3_TAKE_WAIT = 1  # s: BLPOP on GN3's list
GN3_JOB_POLL = 0.05  # s: how often running GN3 commands' jobs are looked at
GN3_START_GRACE = 30.0  # s: a claimed GN3 command with no job after this lost its worker
GN3_RECOVER_EVERY = 5.0  # s: a serving GN3 worker looks for dead workers' taken ids
# s: after `status` is queued, GN3 may still be writing `email` and `env`: its next round
# trips, from the same client, under a millisecond later here (GN3's own worker waits not
# at all)
GN3_SETTLE = 0.02

# -- ssh and Slurm
SSH_KEEPALIVE = 5  # s: a dead link is noticed within a few of these
SSH_CONNECT_TIMEOUT = 10.0  # s
SSH_READ_POLL = 0.05  # s: a remote command's output is looked for this often
SSH_EOF_GRACE = 2.0  # s: output a command's background child holds open, after it exited
SSH_EOF_POLL = 0.002  # s: how often its EOF is looked for meanwhile
REMOTE_KILL_TIMEOUT = 30.0  # s: stopping a remote process group (TERM, 2 s, KILL)
REMOTE_COMMAND_TIMEOUT = 120.0  # s: one command run on a host to its end
SLURM_CALL_TIMEOUT = 20.0  # s: one sbatch/squeue/scancel
SLURM_DEADLINE = 120.0  # s: transient Slurm failures are retried until then
SLURM_FILES_EVERY = 0.25  # s: output and exit files of a host's pieces, one look for all
SLURM_SQUEUE_EVERY = 2.0  # s: one squeue for all of a host's pieces
SLURM_SQUEUE_MAX_PAUSE = 60.0  # s: back-off ceiling while the controller does not answer

# a job view lists at most this many pieces (the rest by page): the web page, the
# websocket's progress events and `sheepdog status` stay small for any job size
PIECES_PAGE = 200

# sheepdog.Executor: submits gathered this long go to Redis in one transaction
EXECUTOR_FLUSH = 0.002  # s
EXECUTOR_AHEAD = 4  # pieces sent ahead per worker thread; the rest wait in the client
EXECUTOR_PIECE_SECONDS = 0.1  # s of calls a packed piece aims at (joblib aims at 0.2-2)
EXECUTOR_MAX_PACK = 1000  # calls in one packed piece, at most
# s of calls a piece is not split below to spread calls over more worker threads: a
# piece costs a few ms of bookkeeping itself
EXECUTOR_MIN_PIECE_SECONDS = 0.02
EXECUTOR_THREADS = 4  # task threads of each worker it starts (they wait on Redis)
EXECUTOR_STOP_WAIT = 10.0  # s: its own workers get this long to hand back and stop
EXECUTOR_WORKERS_CHECK = 1.0  # s: how often it looks whether its workers still live
# s: how often an Executor looks for a worker of its own that died (a waitpid each): its
# pieces go back to the queue then, not after the heartbeat
EXECUTOR_DEATH_CHECK = 0.2
