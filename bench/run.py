#!/usr/bin/env python3
"""Benchmarks redis-relay against the real alternative, a redis-server chained replica.

    python3 bench/run.py            # full run, writes docs/benchmarks.md and docs/benchmarks/*.png
    python3 bench/run.py --quick    # a couple of minutes, writes target/bench-quick/benchmarks.md

A real master on loopback, and in turn (a) nothing in the middle (replicas on the master), (b) a
redis-server chained replica in the middle, (c) redis-relay in the middle; below them real
redis-server replicas or lightweight sink replicas (examples/bench_sink.rs). Scenarios:

  throughput  a burst of SETs (redis-benchmark) until it reached all N replicas; master write time;
              middle node CPU seconds and peak RSS; for the relay also with --log-memory 4mb (relay-disk)
              and 1gb (relay-1gb) and with --fanout-priority normal / idle (relay-normal, relay-idle) at the larger N, the bytes it sent by source (INFO stream_sent_*), its
              idle RSS and how soon after the burst RSS is back under 2x idle; the kernel's copy floor
              (examples/copy_floor.rs, write() and sendfile()) for the same bytes and sinks
  profile     (--profile, on in the full run when perf is installed) perf record of the relay during
              one extra relay and relay-disk burst to the largest N: top symbols and buckets
  latency     SET lat:<seq> <unix-ns> at a steady rate on the master, arrival time at a sink below
              the middle node and at a sink on the master, per message
  storm       N real replicas full-syncing at once, and one by one, through the middle node (dataset
              from DEBUG POPULATE): master forks, time until all online, master PING latency
  restart     middle node restarted (SIGTERM, same dir) under write load: master forks and full
              syncs, replica full syncs, time until every replica is back at the master's offset
  memory      middle node RSS with 1, 100 and 1000 idle sink replicas; RSS with a large dataset
  longrun     a stream of several times the relay's log_size in bursts, a late joiner or a replica
              restarted without data after each burst: forks on the master, on the middle node and on
              the replicas (the relay's snapshot sources), with the relay taking snapshots from its
              replicas and with the relay taking them from the master only

Not part of the test suite. Every process it starts is in its own process group and is killed at
the end, on errors and on Ctrl-C; data directories are temporary directories under /tmp.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024


def log(*parts):
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes, ports, directories
# ---------------------------------------------------------------------------------------------


class Registry:
    """Every child process and temporary directory of the run, torn down at the end."""

    def __init__(self):
        self.procs = []
        self.dirs = []
        self.lock = threading.Lock()

    def spawn(self, cmd, logfile=None, stdin=None, stdout=None, env=None):
        out = open(logfile, "ab") if logfile else subprocess.DEVNULL
        proc = subprocess.Popen(
            cmd,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else out,
            stderr=out,
            start_new_session=True,  # own process group: killed as a group, untouched by our Ctrl-C
            env=env,
            cwd=ROOT,
        )
        if logfile:
            out.close()
        with self.lock:
            self.procs.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM, timeout=15):
        """Signals the process group, waits, then SIGKILLs it."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        else:
            # The leader is gone; make sure nothing else is left in its group.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)

    def tempdir(self, prefix):
        path = tempfile.mkdtemp(prefix=f"relay-bench-{prefix}-", dir="/tmp")
        with self.lock:
            self.dirs.append(path)
        return path

    def remove_dir(self, path):
        shutil.rmtree(path, ignore_errors=True)
        with self.lock:
            if path in self.dirs:
                self.dirs.remove(path)

    def cleanup(self):
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 5
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        with self.lock:
            self.procs.clear()
            dirs = list(self.dirs)
            self.dirs.clear()
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)


REG = Registry()
_used_ports = set()
_run_dir = []


def run_dir():
    """A temporary directory for this run's tool logs."""
    if not _run_dir:
        _run_dir.append(REG.tempdir("run"))
    return _run_dir[0]


def free_port():
    """A loopback port that binds now, below the ephemeral range, not handed out before in this run."""
    for _ in range(1000):
        port = random.randint(20000, 32000)
        if port in _used_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise RuntimeError("no free port")


def proc_cpu(pid):
    """utime + stime (+ reaped children's, e.g. a BGSAVE fork) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / CLK_TCK
    except (FileNotFoundError, ProcessLookupError):
        return None


def proc_schedstat(pid):
    """(seconds on a CPU, seconds runnable but waiting for one) of the process's main thread
    (/proc/PID/schedstat), or None."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run_ns, wait_ns, _ = (int(x) for x in f.read().split())
        return run_ns / 1e9, wait_ns / 1e9
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def threads_cpu_by_priority(pid):
    """The process's CPU seconds so far split by its threads' scheduling now: (threads at the
    default priority, threads below it: nice > 0 or SCHED_IDLE), or None."""
    normal = lowered = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        nice, policy = int(fields[16]), int(fields[38])
        if nice > 0 or policy == 5:  # SCHED_IDLE
            lowered += cpu
        else:
            normal += cpu
    return normal, lowered


def proc_mem(pid):
    """(VmRSS, VmHWM) in bytes."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return rss, hwm


def wait_until(what, probe, timeout, interval=0.02):
    """Polls probe() until it returns a truthy value, which is returned; raises on timeout."""
    deadline = time.time() + timeout
    last = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except (OSError, RedisError) as error:
            last = error
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last})")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# A minimal RESP client
# ---------------------------------------------------------------------------------------------


class RedisError(Exception):
    pass


class Client:
    def __init__(self, port, timeout=60):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            data = self.sock.recv(max(65536, n + 2 - len(self.buf)))
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError(f"bad reply {line!r}")

    def cmd(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def info(self, section=None):
        raw = self.cmd("INFO", section) if section else self.cmd("INFO")
        fields = {}
        for line in raw.decode(errors="replace").splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                fields[k] = v
        return fields


def info(port, section=None):
    c = Client(port, timeout=10)
    try:
        return c.info(section)
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------

REDIS_COMMON = [
    "--bind", "127.0.0.1",
    "--save", "",
    "--appendonly", "no",
    "--daemonize", "no",
    # Disk-based full syncs: replicas arriving during a BGSAVE share it (7.0's default is diskless
    # with a 5 s delay; disk-based is the mode that shares forks best without that delay).
    "--repl-diskless-sync", "no",
    "--repl-backlog-size", "256mb",
    "--client-output-buffer-limit", "replica 0 0 0",
    "--maxclients", "10100",
    "--enable-debug-command", "yes",
    # DEBUG POPULATE values are zero-padded: without compression the RDB is as large as the dataset.
    "--rdbcompression", "no",
]


class RedisNode:
    def __init__(self, name, replicaof=None, extra=(), dir=None):
        self.name = name
        self.port = free_port()
        self.dir = dir or REG.tempdir(name)
        self.logfile = os.path.join(self.dir, "redis.log")
        self.extra = list(extra)
        self.replicaof = replicaof
        self.proc = None
        self.start()

    def start(self):
        cmd = ["redis-server", "--port", str(self.port), "--dir", self.dir, "--logfile", self.logfile]
        cmd += REDIS_COMMON + self.extra
        if self.replicaof:
            cmd += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        self.proc = REG.spawn(cmd, logfile=os.path.join(self.dir, "stdout.log"))
        wait_until(f"{self.name} to answer PING", self._pings, 60)

    def _pings(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {tail(self.logfile)}")
        try:
            c = Client(self.port, timeout=5)
        except OSError:
            return False
        try:
            c.cmd("PING")
            return True
        except RedisError:  # LOADING
            return False
        finally:
            c.close()

    @property
    def pid(self):
        return self.proc.pid

    def client(self):
        return Client(self.port)

    def info(self, section=None):
        return info(self.port, section)

    def offset(self):
        return int(self.info("replication")["master_repl_offset"])

    def stop(self, sig=signal.SIGTERM):
        REG.stop(self.proc, sig, timeout=60)

    def synced(self):
        r = self.info("replication")
        return r.get("master_link_status") == "up" and r.get("master_sync_in_progress") == "0"

    def log_count(self, pattern):
        try:
            with open(self.logfile, errors="replace") as f:
                return sum(1 for line in f if pattern in line)
        except FileNotFoundError:
            return 0


class RelayNode:
    def __init__(self, binary, upstream_port, extra=()):
        self.name = "relay"
        self.binary = binary
        self.upstream_port = upstream_port
        self.port = free_port()
        self.dir = REG.tempdir("relay")
        self.data = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "relay.log")
        self.extra = list(extra)
        self.proc = None
        self.start()

    def start(self):
        cmd = [
            self.binary,
            "--upstream", f"127.0.0.1:{self.upstream_port}",
            "--listen", f"127.0.0.1:{self.port}",
            "--dir", self.data,
        ] + self.extra
        self.proc = REG.spawn(cmd, logfile=self.logfile)

        def answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited: {tail(self.logfile)}")
            try:
                c = Client(self.port, timeout=5)
            except OSError:
                return False
            try:
                return c.cmd("PING") == "PONG"
            finally:
                c.close()

        wait_until("the relay to answer PING", answers, 30)

    @property
    def pid(self):
        return self.proc.pid

    def info(self, section=None):
        return info(self.port, section)

    def offset(self):
        return int(self.info("replication")["master_repl_offset"])

    def stop(self, sig=signal.SIGTERM):
        REG.stop(self.proc, sig, timeout=30)

    def synced(self):
        r = self.info("replication")
        relay = self.info("relay")
        return r.get("master_link_status") == "up" and int(relay.get("snapshot_size", "0") or 0) > 0


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


class Tool:
    """A bench_sink process driven through stdin/stdout, one JSON line per request."""

    def __init__(self, binary, args, name):
        self.name = name
        self.logfile = os.path.join(run_dir(), f"{name}.err")
        self.proc = REG.spawn([binary] + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, logfile=self.logfile)
        self.lock = threading.Lock()

    def request(self, line, timeout=60):
        with self.lock:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
            out = self.proc.stdout.readline()
            if not out:
                raise RuntimeError(f"{self.name} closed its stdout")
            return json.loads(out)

    def finish(self, timeout=30):
        """Sends quit, returns the summary line if the tool prints one."""
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        out = b""
        try:
            out = self.proc.stdout.readline()
        except ValueError:
            pass
        REG.stop(self.proc, timeout=timeout)
        return json.loads(out) if out.strip() else None


class Sinks(Tool):
    def __init__(self, binary, port, count, lat=False, port_base=None):
        args = ["sink", "--addr", f"127.0.0.1:{port}", "--count", str(count)]
        args += ["--port-base", str(port_base or random.randint(33000, 60000))]
        if lat:
            args.append("--lat")
        super().__init__(binary, args, f"sinks-{port}-{random.randint(0, 1 << 30)}")
        self.count = count

    def status(self):
        return self.request("status")

    def wait_online(self, timeout):
        def online():
            s = self.status()
            if s["failed"]:
                raise RuntimeError(f"{s['failed']} sink(s) failed: {s['errors']}")
            return s["online"] == self.count

        wait_until(f"{self.count} sinks online", online, timeout, interval=0.05)

    def wait_offset(self, offset, timeout):
        def reached():
            s = self.status()
            if s["failed"]:
                raise RuntimeError(f"{s['failed']} sink(s) failed: {s['errors']}")
            return s["online"] == self.count and s["min_offset"] >= offset

        wait_until(f"sinks at offset {offset}", reached, timeout, interval=0.02)
        return [t for t in self.request(f"when {offset}")["times"]]


class ReplicaSet:
    """Real redis-server replicas of one upstream, with a poller recording their offsets."""

    def __init__(self, upstream_port, count, extra=()):
        self.nodes = []
        self.upstream_port = upstream_port
        for i in range(count):
            self.add(extra)
        self.history = None
        self.stop_poll = threading.Event()
        self.poller = None

    def add(self, extra=()):
        node = RedisNode(f"replica{len(self.nodes)}", replicaof=self.upstream_port, extra=extra)
        self.nodes.append(node)
        return node

    def wait_online(self, timeout):
        for node in self.nodes:
            wait_until(f"{node.name} synced", node.synced, timeout, interval=0.05)

    def start_polling(self):
        self.history = [[] for _ in self.nodes]
        self.stop_poll.clear()
        clients = [Client(n.port) for n in self.nodes]

        def poll():
            while not self.stop_poll.is_set():
                for i, c in enumerate(clients):
                    try:
                        off = int(c.info("replication")["master_repl_offset"])
                    except (OSError, RedisError, KeyError, ValueError):
                        continue
                    self.history[i].append((time.time_ns(), off))
                time.sleep(0.005)
            for c in clients:
                c.close()

        self.poller = threading.Thread(target=poll, daemon=True)
        self.poller.start()

    def wait_offset(self, offset, timeout):
        def reached():
            return all(h and h[-1][1] >= offset for h in self.history)

        wait_until(f"replicas at offset {offset}", reached, timeout, interval=0.02)
        self.stop_poll.set()
        self.poller.join()
        return [next(t for t, o in h if o >= offset) for h in self.history]

    def stop(self):
        self.stop_poll.set()
        for node in self.nodes:
            node.stop(signal.SIGKILL)
            REG.remove_dir(node.dir)


class Cluster:
    """A master and, depending on the mode, a middle node; `upstream` is where replicas connect."""

    def __init__(self, opts, mode, populate=None, middle_extra=()):
        self.opts = opts
        self.mode = mode
        self.populate = populate
        self.middle_extra = middle_extra
        self.master = None
        self.middle = None
        self.others = []

    def __enter__(self):
        try:
            self.master = RedisNode("master")
            if self.populate:
                keys, size = self.populate
                c = self.master.client()
                c.cmd("DEBUG", "POPULATE", keys, "key", size)
                c.close()
            if self.mode == "chained":
                self.middle = RedisNode("chained", replicaof=self.master.port, extra=self.middle_extra)
            elif self.mode == "relay-master-src":
                extra = ["--snapshot-sources", "master", "--snapshot-min-interval", "1s"] + list(self.middle_extra)
                self.middle = RelayNode(self.opts.relay_bin, self.master.port, extra=extra)
            elif self.mode in RELAY_LOG_MEMORY:
                extra = list(self.middle_extra)
                if self.mode != "relay":
                    extra = ["--log-memory", RELAY_LOG_MEMORY[self.mode]] + RELAY_EXTRA.get(self.mode, []) + extra
                self.middle = RelayNode(self.opts.relay_bin, self.master.port, extra=extra)
            if self.middle:
                wait_until(f"{self.mode} synced with the master", self.middle.synced, 300, interval=0.05)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def upstream(self):
        return (self.middle or self.master).port

    def __exit__(self, *exc):
        for other in self.others:
            try:
                other()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                log("teardown:", e)
        for node in (self.middle, self.master):
            if node and node.proc:
                node.stop(signal.SIGKILL)
                REG.remove_dir(node.dir)
        return False


MODES = ["direct", "chained", "relay"]
# The relay's throughput modes by --log-memory: the default (256 MB: a 200 MB burst fits, the sinks
# that trail stay in memory), a 4 MB tail (nearly all of it from disk), and a 1 GB tail (all from
# memory whatever the burst), so the disk tier's cost shows against the all-memory tail.
RELAY_LOG_MEMORY = {"relay": "256mb", "relay-disk": "4mb", "relay-1gb": "1gb", "relay-normal": "256mb",
                    "relay-idle": "256mb"}
# relay-normal / relay-idle: the default tail with --fanout-priority normal / idle instead of the
# default low, so the master's write time shows what the fan-out's scheduling buys.
RELAY_EXTRA = {"relay-normal": ["--fanout-priority", "normal"], "relay-idle": ["--fanout-priority", "idle"]}
RELAY_MODES = list(RELAY_LOG_MEMORY)
# The same middle nodes with the sink process stopped (SIGSTOP) during the master's write and
# continued after it: the fan-out stalls once the sockets fill, so beside the master only the middle
# node's ingest runs. The master's write time then shows what ingest alone costs it, apart from the
# fan-out and the sinks sharing its CPUs.
HELD_MODES = {"chained-held": "chained", "relay-held": "relay"}
SENT_SOURCES = (("memory", "stream_sent_from_memory"), ("disk", "stream_sent_from_disk"),
                ("sendfile", "stream_sent_by_sendfile"))
RSS_WATCH_S, RSS_WATCH_STEP = 10.0, 0.2


def size_bytes(text):
    """'64mb' -> bytes (redis-server units: k/kb/m/mb/g/gb, kb-style ones 1024-based)."""
    t = text.lower()
    for suffix, mult in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10), ("g", 10**9), ("m", 10**6), ("k", 1000)):
        if t.endswith(suffix):
            return int(t[: -len(suffix)]) * mult
    return int(t)


def sent_counters(node):
    """The relay's stream bytes sent so far, by source (INFO relay)."""
    fields = node.info("relay")
    return {name: int(fields.get(key, 0) or 0) for name, key in SENT_SOURCES}


def watch_rss(pid, idle, seconds=RSS_WATCH_S, step=RSS_WATCH_STEP):
    """Polls VmRSS every `step` s for up to `seconds` until it is under 2× `idle`: (seconds until it
    first was, or None; the RSS then, or at the end)."""
    t0 = time.time()
    while True:
        rss, _ = proc_mem(pid)
        elapsed = time.time() - t0
        if rss is not None and rss < 2 * idle:
            return elapsed, rss
        if rss is None or elapsed >= seconds:
            return None, rss
        time.sleep(step)

# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def run_burst(opts, port, n, keyspace=100000):
    """redis-benchmark SET burst over `keyspace` keys; returns (t0, t1) in unix ns."""
    cmd = [
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set", "-d", str(opts.value_size),
        "-n", str(n), "-P", "16", "-r", str(keyspace), "-q",
    ]
    t0 = time.time_ns()
    proc = REG.spawn(cmd, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=600)
    t1 = time.time_ns()
    REG.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {out!r}")
    return t0, t1


def throughput_case(opts, mode, kind, n, profile=None):
    """One burst to n replicas below `mode`. With `profile` (a file path), perf records the middle node
    from just before the burst to the end of delivery (the result then goes to the profile section,
    not to the throughput tables: perf costs the relay CPU)."""
    hold_sinks = mode in HELD_MODES
    base_mode = HELD_MODES.get(mode, mode)
    with Cluster(opts, base_mode) as cl:
        if kind == "real":
            replicas = ReplicaSet(cl.upstream, n)
            cl.others.append(replicas.stop)
            replicas.wait_online(120)
        else:
            replicas = Sinks(opts.sink_bin, cl.upstream, n)
            cl.others.append(replicas.finish)
            replicas.wait_online(120)
        time.sleep(1.0)
        mid = cl.middle
        relay = base_mode in RELAY_MODES
        idle_rss = proc_mem(mid.pid)[0] if relay else None
        sent0 = sent_counters(mid) if relay else None
        perf = start_perf(mid.pid, profile) if profile else None
        cpu0 = proc_cpu(mid.pid) if mid else None
        mcpu0 = proc_cpu(cl.master.pid)
        msched0 = proc_schedstat(cl.master.pid)
        mid_prio0 = threads_cpu_by_priority(mid.pid) if mid else None
        start_offset = cl.master.offset()
        if kind == "real":
            replicas.start_polling()
        scpu0 = proc_cpu(replicas.proc.pid) if kind == "sink" else None
        stat0 = cpu_stat()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if hold_sinks:
            os.kill(replicas.proc.pid, signal.SIGSTOP)
        try:
            t0, t1 = run_burst(opts, cl.master.port, opts.burst)
        finally:
            if hold_sinks:
                os.kill(replicas.proc.pid, signal.SIGCONT)
        # CPU of every process during the master's write window: who took the cores from the master.
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        stat_w = cpu_stat()
        msched_w = proc_schedstat(cl.master.pid)
        mid_prio_w = threads_cpu_by_priority(mid.pid) if mid else None
        cpu_w = proc_cpu(mid.pid) if mid else None
        scpu_w = proc_cpu(replicas.proc.pid) if kind == "sink" else None
        final = cl.master.offset()
        mcpu1 = proc_cpu(cl.master.pid)
        times = replicas.wait_offset(final, opts.deliver_timeout)
        stat1 = cpu_stat()
        t_done = max(times)
        cpu1 = proc_cpu(mid.pid) if mid else None
        scpu1 = proc_cpu(replicas.proc.pid) if kind == "sink" else None
        rss, hwm = proc_mem(mid.pid) if mid else (None, None)
        perf_file = stop_perf(perf) if perf else None
        sent1 = sent_counters(mid) if relay else None
        under_2x_s, rss_after = watch_rss(mid.pid, idle_rss) if relay and idle_rss else (None, None)
        stream = final - start_offset
        write_s = (t1 - t0) / 1e9
        deliver_s = (t_done - t0) / 1e9
        result = {
            "mode": mode, "kind": kind, "n": n, "stream_bytes": stream,
            "write_s": write_s, "deliver_s": deliver_s, "ratio": deliver_s / write_s,
            "master_cpu_s": mcpu1 - mcpu0,
            "middle_cpu_s": (cpu1 - cpu0) if mid else None,
            "middle_rss": rss, "middle_hwm": hwm,
            "delivered_mb": stream * n / MB,
            "sink_cpu_s": (scpu1 - scpu0) if kind == "sink" else None,
            "machine_busy": 1 - (stat1[1] - stat0[1]) / max(1, stat1[0] - stat0[0]),
            # The master's CPU (master_cpu_s above) is already taken at the end of its write.
            "write_window": {
                "benchmark_cpu_s": (children1.ru_utime + children1.ru_stime)
                - (children0.ru_utime + children0.ru_stime),
                "middle_cpu_s": (cpu_w - cpu0) if mid else None,
                "sink_cpu_s": (scpu_w - scpu0) if kind == "sink" else None,
                "machine_busy": 1 - (stat_w[1] - stat0[1]) / max(1, stat_w[0] - stat0[0]),
                # The master's event loop thread: on a CPU, and runnable but waiting for one (the
                # rest of the window it slept, waiting for its clients).
                "master_thread_run_s": (msched_w[0] - msched0[0]) if msched0 and msched_w else None,
                "master_thread_wait_s": (msched_w[1] - msched0[1]) if msched0 and msched_w else None,
                # The middle node's threads at the master's priority, and below it (the relay's
                # fan-out with --fanout-priority low / idle). Threads that ended in the window are
                # not counted.
                "middle_normal_cpu_s": (mid_prio_w[0] - mid_prio0[0]) if mid_prio0 and mid_prio_w else None,
                "middle_lowered_cpu_s": (mid_prio_w[1] - mid_prio0[1]) if mid_prio0 and mid_prio_w else None,
            },
        }
        if mid:
            result["cpu_ms_per_mb"] = result["middle_cpu_s"] * 1000 / result["delivered_mb"]
        if relay:
            result["log_memory"] = size_bytes(RELAY_LOG_MEMORY[base_mode])
            result["sent_bytes"] = {k: sent1[k] - sent0[k] for k in sent1}
            result["idle_rss"] = idle_rss
            result["rss_under_2x_idle_s"] = under_2x_s
            result["rss_after"] = rss_after
        sent = result.get("sent_bytes")
        log(
            f"throughput {mode:7} {kind:4} N={n:3}: stream {stream / MB:.0f} MB, write {write_s:.2f}s, "
            f"delivered {deliver_s:.2f}s ({deliver_s / write_s:.2f}x)"
            + (f", middle CPU {result['middle_cpu_s']:.2f}s, HWM {hwm / MB:.0f} MB" if mid else "")
            + (" sent " + "/".join(f"{k} {v / MB:.0f}" for k, v in sent.items()) + " MB" if sent else "")
            + (f", idle RSS {idle_rss / MB:.0f} MB, < 2x idle after {fmt(under_2x_s, '.1f')} s "
               f"({rss_after / MB:.0f} MB)" if relay and idle_rss and rss_after else "")
            + f", machine busy {result['machine_busy'] * 100:.0f}%"
        )
        if perf_file:
            result["perf_file"] = perf_file
        return result


# Buckets for the profile's symbols, first match wins: (name, predicate on the symbol name).
PROFILE_BUCKETS = [
    ("copy from user (`_copy_from_iter`: socket sends; `copy_user*`)",
     lambda s: s.startswith("_copy_from_iter") or s.startswith("copy_user") or s.startswith("rep_movs_alternative")),
    ("copy to user (`_copy_to_iter`: socket receives and file reads; `copy_page_to_iter`, `filemap_*`)",
     lambda s: s.startswith("_copy_to_iter") or s.startswith("copy_page_to_iter") or s.startswith("filemap_")),
    ("sendfile / splice (`splice*`, `*sendfile*`)", lambda s: "splice" in s or "sendfile" in s),
    ("log append: file write copy (`copy_folio_from_iter_atomic`, `generic_perform_write`, ext4)",
     lambda s: s.startswith(("copy_folio_from_iter", "generic_perform_write", "ext4_", "__es_", "es_",
                             "jbd2_", "__block_commit_write", "block_write_end", "mark_buffer_dirty"))),
    ("CRC-32C (`crc32c*`, crc crate)", lambda s: "crc32" in s.lower() or s.startswith("crc::")),
    ("memcpy / memset (`__mem*`, `mem*_erms`)",
     lambda s: s.startswith("__mem") or s.startswith("memcpy") or s.startswith("memset") or s.startswith("memmove")),
    ("wakeups / scheduling (`_raw_spin_unlock_irqrestore`, `finish_task_switch`, `try_to_wake_up`, `__schedule`, "
     "futex)",
     lambda s: s.startswith(("_raw_spin_unlock_irq", "finish_task_switch", "try_to_wake_up", "__schedule",
                             "schedule", "__wake_up", "futex", "__futex", "ep_poll", "do_epoll", "__x64_sys_epoll",
                             "pick_next", "update_curr", "dequeue_", "enqueue_", "ttwu_", "select_task_rq"))),
    ("page faults, page and slab allocation (`exc_page_fault`, `clear_page*`, `*slab*`, `__alloc_pages`)",
     lambda s: s.startswith(("exc_page_fault", "handle_mm_fault", "__handle_mm_fault", "do_anonymous_page",
                             "clear_page", "do_user_addr_fault", "___slab_alloc", "__slab_free", "kmem_cache_",
                             "__kmalloc", "kmalloc", "kfree", "__alloc_pages", "alloc_pages", "get_page_from_freelist",
                             "__free_pages", "__free_frozen_pages", "free_unref_page", "free_pcppages_bulk",
                             "rmqueue", "__rmqueue", "__get_pfnblock_flags_mask", "lruvec_stat", "__mod_lruvec",
                             "__mod_memcg", "mod_memcg", "__memcg", "memcg_", "get_mem_cgroup", "folio_",
                             "__folio", "zap_", "unmap_page_range", "release_pages"))),
    ("allocator (`malloc`, `_int_*`, `cfree`, ...)",
     lambda s: s.startswith(("malloc", "_int_", "cfree", "__libc_malloc", "__libc_free", "__libc_realloc",
                             "__libc_calloc", "sysmalloc", "unlink_chunk", "tcache", "__rust_alloc",
                             "__rust_dealloc", "__rust_realloc"))
     or s in ("free", "realloc", "calloc")),
    ("TCP/IP stack (`tcp_*`, `ip_*`, `skb_*`, `__dev_queue_xmit`, ...)",
     lambda s: s.startswith(("tcp_", "__tcp", "ip_", "__ip", "skb_", "__skb", "kfree_skb", "__kfree_skb",
                             "__dev_queue_xmit", "dev_hard_start_xmit", "loopback_xmit", "__netif", "netif_",
                             "net_rx_action", "process_backlog", "__napi", "sock_", "__sock", "release_sock",
                             "lock_sock", "sk_", "__sk_", "inet_", "__inet", "__sys_sendto", "__sys_recvfrom",
                             "__x64_sys_sendto", "__x64_sys_recvfrom", "sock_sendmsg", "sock_recvmsg",
                             "validate_xmit", "__local_bh_enable_ip", "do_softirq", "__do_softirq",
                             "handle_softirqs", "get_netmem", "put_netmem", "__alloc_skb", "__build_skb",
                             "napi_", "__napi_", "dst_release", "nf_", "__nf_"))),
    ("syscall entry / exit", lambda s: s.startswith(("entry_SYSCALL", "syscall_", "do_syscall", "__x64_sys",
                                                     "syscall_exit", "exit_to_user_mode", "__entry_text"))),
]


# Each sample by what the relay was doing, from its kernel call chain (complete even where the user
# space one is not): the first class any of whose functions is on the chain; samples with no kernel
# frame by their user-space symbol.
PROFILE_OPERATIONS = [
    ("sendfile from the segment file (`do_sendfile`, splice)", ("do_sendfile", "splice_direct_to_actor",
                                                                 "__x64_sys_sendfile64")),
    ("socket send, write/writev (`tcp_sendmsg`)", ("tcp_sendmsg", "tcp_sendmsg_locked")),
    ("socket receive (`tcp_recvmsg`: upstream stream, replica ACKs)", ("tcp_recvmsg", "tcp_recvmsg_locked")),
    ("file read, pread (`filemap_read`, `vfs_read`)", ("filemap_read", "ksys_pread64", "__x64_sys_pread64",
                                                       "ext4_file_read_iter", "vfs_read")),
    ("file write, log append (`vfs_write` to the segment)", ("ext4_buffered_write_iter", "generic_perform_write",
                                                            "ext4_file_write_iter", "ksys_pwrite64")),
    ("fsync (`fdatasync`)", ("__x64_sys_fdatasync", "__x64_sys_fsync", "do_fsync", "vfs_fsync_range")),
    ("page faults (`exc_page_fault`)", ("exc_page_fault", "asm_exc_page_fault")),
    ("munmap / madvise (memory returned)", ("__x64_sys_munmap", "__x64_sys_madvise", "__vm_munmap",
                                            "do_madvise")),
    ("network softirq outside a send (`handle_softirqs`)", ("handle_softirqs", "__do_softirq", "net_rx_action")),
    ("waits and wakeups (`futex`, `epoll_wait`, scheduler)", ("__x64_sys_futex", "__x64_sys_epoll_wait",
                                                              "do_epoll_wait", "futex_wake", "futex_wait",
                                                              "schedule", "__schedule", "try_to_wake_up")),
]
USER_OPERATIONS = [
    ("relay user space: CRC-32C", lambda s: "crc32" in s.lower() or s.startswith("crc::")),
    ("relay user space: memcpy / memset", lambda s: s.startswith(("__mem", "memcpy", "memset", "memmove"))),
    ("relay user space: allocator", lambda s: s.startswith(("malloc", "_int_", "cfree", "__libc_malloc",
                                                            "__libc_free", "__libc_realloc", "sysmalloc",
                                                            "unlink_chunk", "tcache")) or s in ("free", "realloc")),
]


def parse_perf_script(text):
    """`perf script` output: (samples per thread name, samples per operation)."""
    import re

    header = re.compile(r"^(.*?)\s+(\d+)(?:/\d+)?\s+\[?\d*\]?\s*[\d.]+:")
    threads, ops = {}, {}
    samples = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            m = header.match(line)
            samples.append([m.group(1).strip() if m else "?", []])
            continue
        if samples:
            parts = line.split(None, 1)
            if len(parts) == 2:
                addr, rest = parts
                sym = rest.split(" (")[0].rsplit("+0x", 1)[0]
                dso = rest.rsplit("(", 1)[-1].rstrip(")") if "(" in rest else ""
                samples[-1][1].append((sym, "kernel" in dso))
    for comm, frames in samples:
        threads[comm] = threads.get(comm, 0) + 1
        kernel = {sym for sym, k in frames if k}
        op = None
        if kernel:
            for name, funcs in PROFILE_OPERATIONS:
                if any(f in kernel for f in funcs):
                    op = name
                    break
            else:
                op = "kernel, other"
        else:
            leaf = frames[0][0] if frames else ""
            op = next((name for name, match in USER_OPERATIONS if match(leaf)), "relay user space, other")
        ops[op] = ops.get(op, 0) + 1
    return threads, ops


def parse_perf_report(text):
    """`perf report --no-children --sort sym --stdio -g none` output: (samples, event, [(pct, kind, sym)])."""
    samples, event, rows = None, None, []
    for line in text.splitlines():
        if line.startswith("# Samples:"):
            # "# Samples: 12K of event 'cpu-clock:pppH'"
            parts = line.split()
            count = parts[2]
            mult = {"K": 1000, "M": 1000000}.get(count[-1], 1)
            samples = int(float(count.rstrip("KM")) * mult)
            if "'" in line:
                event = line.split("'")[1]
            continue
        if line.startswith("#") or "%" not in line:
            continue
        head, _, rest = line.strip().partition("%")
        try:
            pct = float(head)
        except ValueError:
            continue
        rest = rest.strip()
        kind = ""
        if rest.startswith("[") and "]" in rest:
            kind, rest = rest[1:rest.index("]")], rest[rest.index("]") + 1:].strip()
        rows.append((pct, kind, rest))
    return samples, event, rows


def profile_buckets(rows):
    sums = {name: 0.0 for name, _ in PROFILE_BUCKETS}
    sums["other"] = 0.0
    for pct, _, sym in rows:
        for name, match in PROFILE_BUCKETS:
            if match(sym):
                sums[name] += pct
                break
        else:
            sums["other"] += pct
    return [(name, pct) for name, pct in sums.items()]


def profile_case(opts, mode, n):
    """One extra burst to n sinks below `mode` with perf recording the relay; the top symbols and the
    buckets they add up to, plus the burst's own figures (slowed by perf)."""
    path = os.path.join(run_dir(), f"perf-{mode}-{n}.data")
    result = throughput_case(opts, mode, "sink", n, profile=path)
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", "sym", "--stdio", "-g", "none"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"perf report failed: {out.stderr[-500:]}")
    samples, event, rows = parse_perf_report(out.stdout)
    if not rows:
        raise RuntimeError(f"perf report listed no symbols: {out.stderr[-500:]}")
    rows.sort(key=lambda r: -r[0])
    script = subprocess.run(["perf", "script", "-i", path], capture_output=True, text=True, cwd=ROOT, timeout=600)
    threads, ops = parse_perf_script(script.stdout) if script.returncode == 0 else ({}, {})
    profile = {
        "mode": mode, "n": n, "samples": samples, "event": event, "frequency": 999,
        "top": [list(r) for r in rows[:40]], "symbols": [list(r) for r in rows if r[0] >= 0.01],
        "buckets": profile_buckets(rows), "threads": threads, "operations": ops,
        "burst": {k: result.get(k) for k in ("stream_bytes", "write_s", "deliver_s", "middle_cpu_s", "cpu_ms_per_mb",
                                             "delivered_mb", "sent_bytes", "middle_hwm")},
    }
    top = ", ".join(f"{sym} {pct:.1f}%" for pct, _, sym in rows[:5])
    log(f"profile {mode} N={n}: {samples} samples ({event}); top: {top}")
    os.remove(path)
    return profile


def start_perf(pid, path):
    """perf record of `pid` (every thread, call graphs) into `path`; returns the perf process once it
    has attached (it prints nothing until then, so the file's header is the sign)."""
    proc = REG.spawn(["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", path],
                     logfile=path + ".log")
    wait_until("perf record to attach", lambda: os.path.exists(path) and os.path.getsize(path) > 0, 30,
               interval=0.05)
    time.sleep(0.3)
    return proc, path


def stop_perf(perf):
    """SIGINT to perf record (it then writes its file and exits); returns the file."""
    proc, path = perf
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        log("perf record did not exit after SIGINT:", tail(path + ".log"))
    REG.stop(proc)
    return path


FLOORS = ["floor-write", "floor-sendfile"]


def floor_case(opts, how, n):
    """The kernel's copy floor: examples/copy_floor.rs sends the burst's bytes to n sinks and does nothing
    else, with write() from memory or sendfile() from the page cache; same fields as throughput_case."""
    command = len(f"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000000000\r\n${opts.value_size}\r\n") + opts.value_size + 2
    floor = Tool(opts.floor_bin, ["--bytes", str(opts.burst * command), "--value-size", str(opts.value_size)],
                 f"floor-{random.randint(0, 1 << 30)}")
    try:
        hello = floor.request("port")
        sinks = Sinks(opts.sink_bin, hello["port"], n)
        try:
            sinks.wait_online(120)
            wait_until(f"{n} sinks past the floor's handshake", lambda: floor.request("count")["online"] == n, 60)
            time.sleep(opts.settle)
            start = sinks.status()["min_offset"]
            cpu0 = proc_cpu(floor.proc.pid)
            stat0 = cpu_stat()
            t0 = time.time_ns()
            floor.request(f"go {how.split('-')[1]}", timeout=600)
            times = sinks.wait_offset(start + hello["bytes"], opts.deliver_timeout)
            stat1 = cpu_stat()
            cpu1 = proc_cpu(floor.proc.pid)
            deliver_s = (max(times) - t0) / 1e9
            result = {
                "mode": how, "kind": "sink", "n": n, "stream_bytes": hello["bytes"],
                "write_s": None, "deliver_s": deliver_s, "ratio": None, "master_cpu_s": None,
                "middle_cpu_s": cpu1 - cpu0, "middle_rss": None, "middle_hwm": None,
                "delivered_mb": hello["bytes"] * n / MB, "sink_cpu_s": None,
                "machine_busy": 1 - (stat1[1] - stat0[1]) / max(1, stat1[0] - stat0[0]),
            }
            result["cpu_ms_per_mb"] = result["middle_cpu_s"] * 1000 / result["delivered_mb"]
            log(f"throughput {how} N={n:3}: {hello['bytes'] / MB:.0f} MB, delivered {deliver_s:.2f}s, "
                f"CPU {result['middle_cpu_s']:.2f}s ({result['cpu_ms_per_mb']:.3f} ms/MB)")
            return result
        finally:
            sinks.finish()
    finally:
        floor.finish()


def ccdf(sorted_values, points=160):
    """[(value, fraction of samples above it)] on a log grid of fractions, for the CCDF plot."""
    n = len(sorted_values)
    if not n:
        return []
    out = []
    for i in range(points + 1):
        frac = 10 ** (-5 * i / points)  # 1 .. 1e-5
        k = min(n - 1, max(0, int(n * (1 - frac))))
        out.append((sorted_values[k], max(frac, 0.5 / n)))
    out.append((sorted_values[-1], 0.5 / n))
    return out


def write_gap(relay, chained, relay_held, chained_held):
    """Where the master's extra write time went, from the write-window accounting: how long its
    thread waited for a CPU beside each middle node, and the write time with the sinks held."""
    def waited(r):
        return ((r or {}).get("write_window") or {}).get("master_thread_wait_s")

    parts = []
    if waited(relay) is not None and waited(chained) is not None:
        parts.append(f"the master's thread waited for a CPU {waited(relay):.2f} s beside the relay and "
                     f"{waited(chained):.2f} s beside the chained replica, while the sinks (on the same CPUs) "
                     f"took {fmt(relay['write_window'].get('sink_cpu_s'))} s / "
                     f"{fmt(chained['write_window'].get('sink_cpu_s'))} s")
    if relay_held and chained_held:
        parts.append(f"with the sinks held during the write (ingest alone): {relay_held['write_s']:.2f} s / "
                     f"{chained_held['write_s']:.2f} s = {relay_held['write_s'] / chained_held['write_s']:.2f}×")
    return ("; " + "; ".join(parts)) if parts else ""


def median_runs(runs):
    """Per (mode, replicas, N), the run with the median delivery time, with every run's times attached."""
    groups = {}
    for r in runs:
        groups.setdefault((r["mode"], r["kind"], r["n"]), []).append(r)
    out = []
    for key, group in groups.items():
        group.sort(key=lambda r: r["deliver_s"])
        chosen = dict(group[(len(group) - 1) // 2])
        chosen["runs"] = len(group)
        chosen["deliver_s_all"] = [r["deliver_s"] for r in group]
        chosen["middle_cpu_s_all"] = [r["middle_cpu_s"] for r in group]
        out.append(chosen)
    return out


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, int(-(-len(s) * p // 1)) - 1))
    return s[i]


PCTS = (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))


def latency_case(opts, load_rate):
    """One master with a chained replica and a relay side by side; a sink on the master, one below each
    middle node; the same messages through every path. Returns one result per path."""
    modes = [m for m in opts.modes_list if m in MODES]
    with Cluster(opts, "direct") as cl:
        middles = {}
        if "chained" in modes:
            middles["chained"] = RedisNode("chained", replicaof=cl.master.port)
        if "relay" in modes:
            middles["relay"] = RelayNode(opts.relay_bin, cl.master.port)
        for name, node in middles.items():
            cl.others.append(lambda node=node: (node.stop(signal.SIGKILL), REG.remove_dir(node.dir)))
            wait_until(f"{name} synced", node.synced, 120, interval=0.05)
        sinks = {"direct": Sinks(opts.sink_bin, cl.master.port, 1, lat=True)}
        for name, node in middles.items():
            sinks[name] = Sinks(opts.sink_bin, node.port, 1, lat=True)
        for s in sinks.values():
            cl.others.append(s.finish)
            s.wait_online(60)
        load = None
        if load_rate:
            load = Tool(
                opts.sink_bin,
                ["write", "--addr", f"127.0.0.1:{cl.master.port}", "--rate", str(load_rate), "--prefix", "load:",
                 "--keyspace", "100000", "--value-size", "1000"],
                "latency-load",
            )
            cl.others.append(load.finish)
        time.sleep(1)
        writer = Tool(
            opts.sink_bin,
            ["write", "--addr", f"127.0.0.1:{cl.master.port}", "--rate", str(opts.lat_rate), "--prefix", "lat:",
             "--duration", str(opts.lat_seconds)],
            "writer",
        )
        writer.proc.wait(opts.lat_seconds + 60)
        summary = writer.finish()
        time.sleep(0.5)
        arrivals = {name: {seq: ns for seq, ns in s.request("lat")["conns"][0]} for name, s in sinks.items()}
        d = arrivals["direct"]
        results = []
        for name in ["direct"] + list(middles):
            a = arrivals[name]
            values = list(a.values())
            r = {
                "mode": name, "load_rate": load_rate, "sent": summary["sent"] if summary else None,
                "count": len(a), "pct": {k: percentile(values, q) / 1e3 for k, q in PCTS},
                "ccdf": ccdf(sorted(v / 1e3 for v in values)),
            }
            if name != "direct":
                added = [a[seq] - d[seq] for seq in a if seq in d]
                r["added"] = {k: percentile(added, q) / 1e3 for k, q in PCTS}
            results.append(r)
            desc = ", ".join(f"{k} {v:.0f}us" for k, v in r["pct"].items())
            if "added" in r:
                desc += " | added " + ", ".join(f"{k} {v:.0f}us" for k, v in r["added"].items())
            log(f"latency{' (loaded)' if load_rate else ''} {name:7}: {r['count']} messages: {desc}")
        return results


def steady_writer(opts, port, name):
    """A background load on the master: 500 SETs/s of 100 bytes over 10,000 keys `<name>:...`."""
    return Tool(
        opts.sink_bin,
        ["write", "--addr", f"127.0.0.1:{port}", "--rate", "500", "--prefix", f"{name}:",
         "--keyspace", "10000", "--value-size", "100"],
        f"{name}-load",
    )


REDIS_LOG_TIME = re.compile(r"^\d+:[A-Z] (\d+ \w+ \d+ \d+:\d+:\d+\.\d+) ")


def sync_phases(logfile):
    """From a replica's log, its first full sync in seconds: (waiting: from its start until its
    upstream answered +FULLRESYNC, receiving: the RDB transfer, loading: until the sync finished),
    or None when the log does not show all of them."""
    marks = {}
    steps = (("start", "Server initialized"), ("fullresync", "Full resync from master"),
             ("received", "MASTER <-> REPLICA sync: Flushing old data"),
             ("loaded", "MASTER <-> REPLICA sync: Finished with success"))
    try:
        with open(logfile, errors="replace") as f:
            for line in f:
                m = REDIS_LOG_TIME.match(line)
                if not m:
                    continue
                for key, text in steps:
                    if key not in marks and text in line:
                        marks[key] = datetime.datetime.strptime(m.group(1), "%d %b %Y %H:%M:%S.%f").timestamp()
    except FileNotFoundError:
        return None
    if len(marks) < len(steps):
        return None
    return (marks["fullresync"] - marks["start"], marks["received"] - marks["fullresync"],
            marks["loaded"] - marks["received"])


def storm_case(opts, mode, order):
    with Cluster(opts, mode, populate=(opts.storm_keys, opts.storm_value)) as cl:
        load = steady_writer(opts, cl.master.port, "storm")
        cl.others.append(load.finish)
        pinger = Tool(opts.sink_bin, ["ping", "--addr", f"127.0.0.1:{cl.master.port}", "--interval-ms", "5"], "ping")
        cl.others.append(pinger.finish)
        time.sleep(1)
        m0 = cl.master.info("stats")
        mid0 = cl.middle.info("stats") if cl.middle else None
        replicas = ReplicaSet(cl.upstream, 0)
        cl.others.append(replicas.stop)
        t0 = time.time()
        if order == "at once":
            for _ in range(opts.storm_replicas):
                replicas.add()
            replicas.wait_online(600)
        else:
            for _ in range(opts.storm_replicas):
                node = replicas.add()
                wait_until(f"{node.name} synced", node.synced, 600, interval=0.05)
        elapsed = time.time() - t0
        ping = pinger.finish()
        cl.others.remove(pinger.finish)
        m1 = cl.master.info("stats")
        mid1 = cl.middle.info("stats") if cl.middle else None
        rss, hwm = proc_mem(cl.middle.pid) if cl.middle else (None, None)
        result = {
            "mode": mode, "order": order, "replicas": opts.storm_replicas, "seconds": elapsed,
            "master_forks": int(m1["total_forks"]) - int(m0["total_forks"]),
            "master_sync_full": int(m1["sync_full"]) - int(m0["sync_full"]),
            "middle_forks": (int(mid1.get("total_forks", 0)) - int(mid0.get("total_forks", 0))) if mid1 else None,
            "middle_sync_full": (int(mid1["sync_full"]) - int(mid0["sync_full"])) if mid1 else None,
            "ping": ping, "middle_rss": rss, "middle_hwm": hwm,
            # Summed over the replicas: where the time until they were online went.
            "replica_phases": [sum(p[i] for p in phases) for i in range(3)]
            if (phases := [sync_phases(node.logfile) for node in replicas.nodes]) and all(phases) else None,
            "rdb_bytes": os.path.getsize(os.path.join(replicas.nodes[0].dir, "dump.rdb"))
            if os.path.exists(os.path.join(replicas.nodes[0].dir, "dump.rdb")) else None,
        }
        log(
            f"storm {mode:7} {order:11}: {elapsed:.1f}s, master forks {result['master_forks']}, "
            f"master sync_full {result['master_sync_full']}, middle forks {result['middle_forks']}, "
            f"PING p99 {ping['p99_us'] / 1000:.2f} ms max {ping['max_us'] / 1000:.1f} ms"
        )
        return result


FULL_LINE = "Full resync from master"
PARTIAL_LINE = "Successful partial resynchronization"


def restart_case(opts, mode):
    extra = ["--save", "86400 1"] if mode == "chained" else []  # SIGTERM saves the RDB (with repl info)
    with Cluster(opts, mode, populate=(opts.storm_keys, opts.storm_value), middle_extra=extra) as cl:
        replicas = ReplicaSet(cl.upstream, opts.restart_replicas)
        cl.others.append(replicas.stop)
        replicas.wait_online(600)
        load = Tool(
            opts.sink_bin,
            ["write", "--addr", f"127.0.0.1:{cl.master.port}", "--rate", str(opts.restart_rate), "--prefix", "load:",
             "--keyspace", "100000", "--value-size", "1000"],
            "restart-load",
        )
        cl.others.append(load.finish)
        time.sleep(2)
        m0 = cl.master.info("stats")
        full0 = [r.log_count(FULL_LINE) for r in replicas.nodes]
        part0 = [r.log_count(PARTIAL_LINE) for r in replicas.nodes]
        t0 = time.time()
        cl.middle.stop(signal.SIGTERM)
        t_stopped = time.time()
        cl.middle.start()
        t_started = time.time()
        state = {"prev": None}

        def recovered():
            m = cl.master.offset()
            prev, state["prev"] = state["prev"], m
            if prev is None:
                return False
            for r in replicas.nodes:
                rep = r.info("replication")
                if rep.get("master_link_status") != "up" or int(rep["master_repl_offset"]) < prev:
                    return False
            return True

        wait_until("replicas back at the master's offset", recovered, 600, interval=0.02)
        elapsed = time.time() - t0
        m1 = cl.master.info("stats")
        mid = cl.middle.info("stats")
        full = sum(r.log_count(FULL_LINE) for r in replicas.nodes) - sum(full0)
        part = sum(r.log_count(PARTIAL_LINE) for r in replicas.nodes) - sum(part0)
        result = {
            "mode": mode, "replicas": opts.restart_replicas, "seconds": elapsed,
            "stop_s": t_stopped - t0, "start_s": t_started - t_stopped,
            "master_forks": int(m1["total_forks"]) - int(m0["total_forks"]),
            "master_sync_full": int(m1["sync_full"]) - int(m0["sync_full"]),
            "master_sync_partial_ok": int(m1["sync_partial_ok"]) - int(m0["sync_partial_ok"]),
            "middle_sync_full": int(mid["sync_full"]), "middle_sync_partial_ok": int(mid["sync_partial_ok"]),
            "replica_full_syncs": full, "replica_partial_syncs": part,
        }
        log(
            f"restart {mode:7}: recovered in {elapsed:.2f}s (stop {result['stop_s']:.2f}s), master forks "
            f"{result['master_forks']}, master sync_full {result['master_sync_full']}, replica full syncs {full}, "
            f"partial {part}"
        )
        return result


LONGRUN_MODES = ["chained", "relay", "relay-master-src"]


def longrun_case(opts, mode):
    """Bursts of `longrun_phase_mb` of stream; after each, a new empty replica joins (even phases) or the
    oldest replica is killed and started again without its data (odd phases). Counts forks everywhere."""
    extra = ["--log-size", f"{opts.longrun_log_mb}mb"] if mode.startswith("relay") else []
    with Cluster(opts, mode, populate=(opts.longrun_keys, opts.longrun_value), middle_extra=extra) as cl:
        replicas = ReplicaSet(cl.upstream, 1)
        cl.others.append(replicas.stop)
        replicas.wait_online(600)
        load = steady_writer(opts, cl.master.port, "longrun")
        cl.others.append(load.finish)
        m0 = cl.master.info("stats")
        mid0 = cl.middle.info("stats")
        off0 = cl.master.offset()
        # Replica forks are counted per process (a restarted one starts from 0 again).
        replica_forks = 0
        burst_n = opts.longrun_phase_mb * MB // (opts.value_size + 60)
        events = []
        t0 = time.time()
        for phase in range(opts.longrun_phases):
            run_burst(opts, cl.master.port, burst_n, keyspace=10000)
            if phase % 2 == 0:
                node = replicas.add()
                what = "late joiner"
            else:
                node = replicas.nodes[0]
                replica_forks += int(node.info("stats")["total_forks"])
                node.stop(signal.SIGKILL)
                for name in os.listdir(node.dir):
                    if name.endswith(".rdb"):
                        os.remove(os.path.join(node.dir, name))
                node.start()
                what = "restarted without data"
            target = cl.master.offset()

            def caught_up():
                if not node.synced():
                    return False
                return all(int(n.info("replication")["master_repl_offset"]) >= target for n in replicas.nodes)

            ts = time.time()
            wait_until(f"{mode} phase {phase}: every replica at the master's offset", caught_up, 600, interval=0.05)
            m = cl.master.info("stats")
            events.append({"phase": phase, "event": what, "stream_bytes": cl.master.offset() - off0,
                           "sync_s": time.time() - ts,
                           "master_forks": int(m["total_forks"]) - int(m0["total_forks"])})
            log(f"longrun {mode:16} phase {phase}: {what}, {(cl.master.offset() - off0) / MB:.0f} MB of stream, "
                f"master forks so far {events[-1]['master_forks']}")
        elapsed = time.time() - t0
        load.finish()
        cl.others.remove(load.finish)
        m1 = cl.master.info("stats")
        mid1 = cl.middle.info("stats")
        replica_forks += sum(int(n.info("stats")["total_forks"]) for n in replicas.nodes)
        relay = cl.middle.info("relay") if mode.startswith("relay") else {}
        result = {
            "mode": mode, "phases": opts.longrun_phases, "seconds": elapsed,
            "stream_bytes": cl.master.offset() - off0,
            "log_size": opts.longrun_log_mb * MB if mode.startswith("relay") else None,
            "master_forks": int(m1["total_forks"]) - int(m0["total_forks"]),
            "master_sync_full": int(m1["sync_full"]) - int(m0["sync_full"]),
            "middle_forks": int(mid1.get("total_forks", 0)) - int(mid0.get("total_forks", 0)),
            "middle_sync_full": int(mid1["sync_full"]) - int(mid0["sync_full"]),
            "replica_forks": replica_forks,
            "refreshes_replica": int(relay["snapshot_refreshes_replica"]) if relay else None,
            "refreshes_master": int(relay["snapshot_refreshes_master"]) if relay else None,
            "rate_limited": int(relay["snapshot_master_rate_limited"]) if relay else None,
            "events": events,
        }
        log(
            f"longrun {mode:16}: {result['stream_bytes'] / MB:.0f} MB in {elapsed:.0f}s, master forks "
            f"{result['master_forks']}, middle forks {result['middle_forks']}, replica forks {replica_forks}, "
            f"full syncs served by the middle {result['middle_sync_full']}"
        )
        return result


def memory_case(opts, mode, populate, counts):
    with Cluster(opts, mode, populate=populate) as cl:
        node = cl.middle or cl.master
        rows = []
        sinks = []
        connected = 0
        time.sleep(1)
        base_rss, _ = proc_mem(node.pid)
        for n in counts:
            if n > connected:
                s = Sinks(opts.sink_bin, node.port, n - connected)
                sinks.append(s)
                cl.others.append(s.finish)
                s.wait_online(600)
                connected = n
            time.sleep(opts.settle)
            rss, hwm = proc_mem(node.pid)
            rows.append({"n": n, "rss": rss, "hwm": hwm})
            log(f"memory {mode:7} dataset {populate[0]:>8} keys: {n:5} idle replicas: RSS {rss / MB:.1f} MB")
        return {"mode": mode, "keys": populate[0], "value": populate[1], "base_rss": base_rss, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_info():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])

    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "unavailable"

    commit = run("git", "rev-parse", "--short", "HEAD")
    dirty = run("git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    return {
        "nproc": os.cpu_count(),
        "memory_gib": mem_kb / 1024 / 1024,
        "cpu": cpu,
        "kernel": platform.release(),
        "redis": run("redis-server", "--version"),
        "rustc": run("rustc", "--version"),
        "commit": commit + (" (src/ modified in the working tree)" if dirty else ""),
        "relay_bin": opts_global.relay_bin,
    }


def cpu_stat():
    """(total, idle, steal) jiffies of all CPUs, from /proc/stat; steal is the time the hypervisor
    gave to others while this machine's CPUs wanted it."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4], (v[7] if len(v) > 7 else 0)


def usage_snapshot():
    """(wall, machine busy CPU s without steal, CPU s of this driver and its reaped children, steal
    CPU s)."""
    total, idle, steal = cpu_stat()
    t = os.times()
    return (time.time(), (total - idle - steal) / CLK_TCK,
            t.user + t.system + t.children_user + t.children_system, steal / CLK_TCK)


def foreign_load(before, after):
    """CPU used by processes that are not ours between two snapshots taken when every child of ours
    was reaped: (CPU seconds, share of the machine)."""
    wall = after[0] - before[0]
    foreign = max(0.0, (after[1] - before[1]) - (after[2] - before[2]))
    return foreign, foreign / max(1e-9, wall * (os.cpu_count() or 1))


def cpu_busy_fraction(seconds):
    """Share of all CPUs busy over `seconds` (system-wide), to tell whether the machine was idle."""

    t0, i0, _ = cpu_stat()
    time.sleep(seconds)
    t1, i1, _ = cpu_stat()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def ratio(a, b, spec=".2f"):
    if a is None or b is None or b == 0:
        return "–"
    return format(a / b, spec) + "×"


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        pass
    log("matplotlib missing: installing it with pip")
    for extra in ([], ["--user"], ["--break-system-packages"]):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"] + extra)
        if r.returncode == 0:
            try:
                import importlib

                importlib.invalidate_caches()
                importlib.import_module("matplotlib")
                return True
            except ImportError:
                continue
    log("could not install matplotlib: no plots")
    return False


COLORS = {"direct": "#888888", "chained": "#d62728", "relay": "#1f77b4", "relay-1gb": "#17becf", "relay-disk": "#9467bd",
          "relay-normal": "#ff7f0e", "relay-idle": "#bcbd22", "floor-write": "#2ca02c", "floor-sendfile": "#98df8a"}


def profile_gap(profiles):
    """Where the relay's CPU went in this run's profile, for a CPU or delivery target it missed."""
    pr = next((p for p in profiles if p.get("mode") == "relay" and p.get("operations")), None)
    if not pr:
        return ""
    ops = pr["operations"]
    total = max(1, sum(ops.values()))
    share = lambda *names: sum(ops.get(k, 0) for k in ops if k.startswith(names)) * 100 / total  # noqa: E731
    send = share("socket send", "sendfile")
    waits = share("waits and wakeups")
    user = share("relay user space")
    reads = share("file read")
    return (f"; where it goes (profile, N = {pr['n']}): {send:.0f}% of the relay's samples in the kernel's "
            f"socket send and sendfile paths (the work the copy floor does too), {waits:.0f}% waits and wakeups, "
            f"{reads:.0f}% file reads, {user:.0f}% the relay's own code")


def delivery_gap(relay, relay_1gb, chained, n):
    """What else bounds delivery on this machine: the all-memory tail and the sinks' share."""
    parts = []
    if relay_1gb and chained.get("deliver_s"):
        parts.append(f"all in memory (relay-1gb) {relay_1gb['deliver_s'] / chained['deliver_s']:.2f}×")
    if relay.get("sink_cpu_s") and relay.get("middle_cpu_s"):
        parts.append(f"the sink process used {relay['sink_cpu_s']:.2f} CPU s beside the relay's "
                     f"{relay['middle_cpu_s']:.2f} on the same {relay.get('nproc') or 2} CPUs, "
                     f"{relay.get('machine_busy', 0) * 100:.0f}% busy")
    return ("; " + ", ".join(parts)) if parts else ""


def plots(results, outdir, rel):
    if not ensure_matplotlib():
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    files = {}

    tp = [r for r in results.get("throughput", []) if r.get("kind") == "sink"]
    if tp:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for mode in MODES + RELAY_MODES[1:]:
            rows = sorted((r for r in tp if r["mode"] == mode), key=lambda r: r["n"])
            if not rows:
                continue
            ns = [r["n"] for r in rows]
            a1.plot(ns, [r["deliver_s"] for r in rows], "o-", color=COLORS[mode], label=f"{mode}: delivered to all")
            a1.plot(ns, [r["write_s"] for r in rows], "x--", color=COLORS[mode], alpha=0.6,
                    label=f"{mode}: master write")
            if mode != "direct":
                a2.plot(ns, [r["cpu_ms_per_mb"] for r in rows], "o-", color=COLORS[mode], label=mode)
        for mode in FLOORS:
            rows = sorted((r for r in tp if r["mode"] == mode), key=lambda r: r["n"])
            if rows:
                ns = [r["n"] for r in rows]
                a1.plot(ns, [r["deliver_s"] for r in rows], "s:", color=COLORS[mode], label=f"{mode}: delivered")
                a2.plot(ns, [r["cpu_ms_per_mb"] for r in rows], "s:", color=COLORS[mode], label=mode)
        all_ns = sorted({r["n"] for r in tp})
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ns, [str(n) for n in all_ns])
            ax.minorticks_off()
        a1.set_xlabel("sink replicas (N)")
        a1.set_ylabel("seconds")
        a1.set_title(f"{tp[0]['stream_bytes'] / MB:.0f} MB burst reaching N replicas")
        a1.legend(fontsize=7)
        a2.set_xlabel("sink replicas (N)")
        a2.set_ylabel("middle node CPU ms per delivered MB")
        a2.set_title("middle node CPU cost")
        a2.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files["throughput"] = os.path.join(rel, "throughput.png")

    lat = results.get("latency", [])
    if lat and all(r.get("ccdf") for r in lat):
        loads = sorted({r["load_rate"] for r in lat})
        fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 4), squeeze=False)
        for ax, load_rate in zip(axes[0], loads):
            for r in (r for r in lat if r["load_rate"] == load_rate):
                points = r.get("ccdf") or []
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], color=COLORS[r["mode"]], label=r["mode"])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("write on master → arrival at sink (µs)")
            ax.set_ylabel("fraction of writes slower (CCDF)")
            ax.set_title("replication latency, " + ("idle master" if not load_rate else f"+{load_rate} SET/s load"))
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "latency.png"), dpi=110)
        plt.close(fig)
        files["latency"] = os.path.join(rel, "latency.png")
    elif lat and os.path.exists(os.path.join(outdir, "latency.png")):
        files["latency"] = os.path.join(rel, "latency.png")  # from the run itself (no CCDF in this json)

    mem = [m for m in results.get("memory", []) if len(m["rows"]) > 1]
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in mem:
            style = "x--" if m["mode"] == "direct" else "o-"
            ax.plot([r["n"] for r in m["rows"]], [r["rss"] / MB for r in m["rows"]], style, color=COLORS[m["mode"]],
                    label=m["mode"] if m["mode"] != "direct" else "master (direct)")
        ax.set_xscale("log")
        ax.set_xlabel("idle sink replicas")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title("middle node memory per idle replica")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "memory.png"), dpi=110)
        plt.close(fig)
        files["memory"] = os.path.join(rel, "memory.png")

    storm = results.get("storm", [])
    if storm:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        labels = [f"{r['mode']}\n{r['order']}" for r in storm]
        xs = range(len(storm))
        a1.bar(xs, [r["seconds"] for r in storm], color=[COLORS[r["mode"]] for r in storm])
        a1.set_xticks(list(xs), labels, fontsize=7)
        a1.set_ylabel("seconds until all replicas online")
        a1.set_title(f"full-sync storm ({storm[0]['replicas']} replicas)")
        a2.bar(xs, [r["master_forks"] for r in storm], color=[COLORS[r["mode"]] for r in storm], label="master")
        a2.bar(xs, [r["middle_forks"] or 0 for r in storm], bottom=[r["master_forks"] for r in storm],
               color="white", edgecolor=[COLORS[r["mode"]] for r in storm], hatch="//", label="middle node")
        a2.set_xticks(list(xs), labels, fontsize=7)
        a2.set_ylabel("forks (BGSAVE)")
        a2.set_title("forks on the master (solid) and on the middle node (hatched)")
        a2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "storm.png"), dpi=110)
        plt.close(fig)
        files["storm"] = os.path.join(rel, "storm.png")
    return files


NO_WORSE = 1.1  # "no worse" than the earlier run: within 10% (run-to-run noise on a shared 2-core machine)


def comparable_figures(results):
    """The figures issue 14 asks to stay no worse, from a results dict (this run's or an earlier one's):
    relay added p99 latency per master load, storm seconds per order, restart seconds, RSS KiB per idle
    replica; each as {"relay": value, "chained": the chained replica's in the same run or None};
    missing ones are left out."""
    out = {}

    def put(name, mode, value):
        if mode in ("relay", "chained"):
            out.setdefault(name, {"relay": None, "chained": None})[mode] = value

    for r in results.get("latency", []):
        if r.get("added"):
            label = "idle" if not r["load_rate"] else f"{r['load_rate']} SET/s"
            put(f"added p99 latency µs ({label})", r["mode"], r["added"]["p99"])
    for r in results.get("storm", []):
        put(f"storm s until all online ({r['order']})", r["mode"], r["seconds"])
    for r in results.get("restart", []):
        put("restart s until recovered", r["mode"], r["seconds"])
    for m in results.get("memory", []):
        if len(m["rows"]) > 1:
            a, b = m["rows"][0], m["rows"][-1]
            put("RSS KiB per idle replica", m["mode"], (b["rss"] - a["rss"]) / (b["n"] - a["n"]) / 1024)
    return {name: v for name, v in out.items() if v["relay"] is not None}


def load_baseline(path):
    """An earlier run's comparable figures (the results.json the report is about to replace)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return {"file": os.path.relpath(path, ROOT), "commit": saved.get("machine", {}).get("commit"),
            "started": saved.get("started"), "figures": comparable_figures(saved.get("results", {}))}


REPORT_OPTS = ("quick", "command", "value_size", "burst", "repeat", "lat_seconds", "lat_rate", "lat_load_rate",
               "storm_keys", "storm_value", "storm_replicas", "restart_replicas", "restart_rate", "mem_small_keys",
               "settle", "longrun_phases", "longrun_phase_mb", "longrun_log_mb", "longrun_keys", "longrun_value")


def report(opts, results, machine, busy, started, finished, out_md):
    outdir = os.path.dirname(os.path.abspath(out_md))
    stem = os.path.splitext(os.path.basename(out_md))[0]
    files = plots(results, os.path.join(outdir, stem), stem)
    L = []
    w = L.append
    w("# Benchmarks: redis-relay vs a redis-server chained replica" + (" (quick run)" if opts.quick else ""))
    w("")
    w("Generated by `bench/run.py`; do not edit by hand. Re-run with:")
    w("")
    w("```sh")
    w(opts.command)
    w("```")
    w("")
    w("A real master on loopback and, in turn, **direct** (replicas on the master), **chained** (a")
    w("redis-server replica in the middle, replicas below it) and **relay** (redis-relay in the middle;")
    w("in the throughput section also **relay-disk**, `--log-memory 4mb`, **relay-1gb**, `--log-memory 1gb`, and "
      "**relay-normal** / **relay-idle**, `--fanout-priority normal` / `idle` instead of the default `low`, and "
      "**chained-held** / **relay-held**, the sink process stopped during the master's write).")
    w("Replicas are real redis-server processes or sink replicas (`examples/bench_sink.rs`: handshake,")
    w("discard the RDB, count stream bytes, ACK every second and on GETACK; many per process).")
    w("")
    w("## Machine and versions")
    w("")
    w(f"- {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']:.1f} GiB, Linux {machine['kernel']}")
    w(f"- {machine['redis']}")
    w(f"- {machine['rustc']}; redis-relay commit {machine['commit']}")
    w(f"- run {started} → {finished}")
    w(f"- background load: {busy[0] * 100:.0f}% of all CPUs busy in the 5 s before the run, "
      f"{busy[1] * 100:.0f}% in the 5 s after it")
    loads = results.get("foreign_load") or {}
    if loads:
        parts = []
        busiest = 0.0
        steals = []
        for name, (cpu, wall, *steal) in loads.items():
            share = cpu / max(1e-9, wall * (machine["nproc"] or 1))
            busiest = max(busiest, share)
            parts.append(f"{name} {cpu:.0f} CPU·s in {wall:.0f} s ({share * 100:.0f}% of the machine)")
            if steal:
                steals.append(f"{name} {steal[0] / max(1e-9, wall * (machine['nproc'] or 1)) * 100:.1f}%")
        w("- other processes on the machine (not started by this run) during each scenario: " + ", ".join(parts)
          + (" — **the machine was shared with other jobs during the run: timing and CPU figures are noisy**"
             if busiest > 0.05 else " — the machine was otherwise idle"))
        if steals:
            w("- CPU steal (time the hypervisor ran something else while this machine's CPUs were runnable), "
              "share of the machine's CPU time per scenario: " + ", ".join(steals))
    w("- redis-server settings (master, chained replica, replicas): `save \"\"`, `appendonly no`, "
      "`repl-diskless-sync no` (disk-based: replicas arriving during a BGSAVE share it), "
      "`repl-backlog-size 256mb`, `client-output-buffer-limit replica 0 0 0`, `maxclients 10100`, "
      "`rdbcompression no`; "
      "redis-relay with its defaults (`--log-memory 256mb`, `--log-size 1gb`, `--appendfsync everysec`, `--threads auto`, `--fanout-priority low`).")
    w("")
    targets = []

    tp = results.get("throughput", [])
    if tp:
        w("## 1. Stream throughput")
        w("")
        w(f"A burst of `redis-benchmark -t set -d {opts.value_size} -n {opts.burst} -P 16 -r 100000` on the master "
          f"({tp[0]['stream_bytes'] / MB:.0f} MB of stream). *write*: redis-benchmark's wall time; *delivered*: "
          "from the burst's start until every replica's offset reached the master's final offset; "
          "*ratio* = delivered / write. Middle CPU: utime+stime of the middle process from just before the burst to "
          "the end of delivery; CPU per MB is per MB delivered (stream × N). Peak RSS: VmHWM."
          + (f" Each case ran {opts.repeat} times (interleaved); the run with the median delivery time is shown, "
             "all delivery times are in the json next to this file." if opts.repeat > 1 else ""))
        w("")
        w("| replicas | N | write s (direct / chained / relay) | delivered s (direct / chained / relay) | "
          "ratio (direct / chained / relay) | master CPU s (direct / chained / relay) |")
        w("|---|---|---|---|---|---|")
        keys = sorted({(r["kind"], r["n"]) for r in tp}, key=lambda k: (k[0] != "real", k[1]))
        by = {(r["mode"], r["kind"], r["n"]): r for r in tp}
        for kind, n in keys:
            rows = [by.get((m, kind, n)) for m in MODES]
            cell = lambda f, spec=".2f": " / ".join(fmt(r.get(f) if r else None, spec) for r in rows)  # noqa: E731
            w(f"| {'redis-server' if kind == 'real' else 'sink'} | {n} | {cell('write_s')} | {cell('deliver_s')} | "
              f"{cell('ratio')} | {cell('master_cpu_s')} |")
        w("")
        w("Middle node cost:")
        w("")
        w("| replicas | N | CPU s chained | CPU s relay | CPU ms/MB chained | CPU ms/MB relay | **CPU/MB relay ÷ chained** "
          "| peak RSS MiB chained | peak RSS MiB relay | delivered relay ÷ chained |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for kind, n in keys:
            c, r = by.get(("chained", kind, n)), by.get(("relay", kind, n))
            g = lambda x, f: x.get(f) if x else None  # noqa: E731
            w(f"| {'redis-server' if kind == 'real' else 'sink'} | {n} | {fmt(g(c, 'middle_cpu_s'))} | "
              f"{fmt(g(r, 'middle_cpu_s'))} | {fmt(g(c, 'cpu_ms_per_mb'), '.3f')} | {fmt(g(r, 'cpu_ms_per_mb'), '.3f')} | "
              f"**{ratio(g(r, 'cpu_ms_per_mb'), g(c, 'cpu_ms_per_mb'))}** | "
              f"{fmt(g(c, 'middle_hwm') and g(c, 'middle_hwm') / MB, '.0f')} | "
              f"{fmt(g(r, 'middle_hwm') and g(r, 'middle_hwm') / MB, '.0f')} | "
              f"{ratio(g(r, 'deliver_s'), g(c, 'deliver_s'))} |")
        w("")
        w("Where the CPU went with sink replicas (all processes share the 2 CPUs): CPU seconds of the middle node, "
          "the master and the sink process from the burst's start to the end of delivery, and how busy the whole "
          "machine was over that window.")
        w("")
        w("| N | middle | wall s | middle CPU s | master CPU s | sink process CPU s | machine busy |")
        w("|---|---|---|---|---|---|---|")
        for kind, n in keys:
            if kind != "sink":
                continue
            for mode in MODES + RELAY_MODES[1:]:
                r = by.get((mode, kind, n))
                if r:
                    w(f"| {n} | {mode} | {r['deliver_s']:.2f} | {fmt(r.get('middle_cpu_s'))} | {r['master_cpu_s']:.2f} "
                      f"| {fmt(r.get('sink_cpu_s'))} | {r['machine_busy'] * 100:.0f}% |")
        w("")
        windowed = [(kind, n) for kind, n in keys if kind == "sink"
                    and any((by.get((m, kind, n)) or {}).get("write_window") for m in MODES + RELAY_MODES[1:])]
        window_modes = MODES + RELAY_MODES[1:] + list(HELD_MODES)
        if windowed:
            cpus = machine.get("nproc") or 1
            w("The same processes during the master's write window only (from the burst's start until "
              f"redis-benchmark ended): the master's write time is set by how much of the {cpus} CPUs the master "
              "and redis-benchmark get while the middle node and the sinks also run. *Others' share*: the middle "
              f"node's and the sink process's CPU seconds over the {cpus} × write-s CPU seconds the window had. "
              "*Middle CPU s at the master's priority / below it*: the middle node's threads by their "
              "scheduling (below: nice > 0 or SCHED_IDLE, the relay's fan-out). "
              "*Master thread on CPU / waiting / asleep*: the master's event-loop thread over the window "
              "(`/proc/PID/schedstat`): running, runnable but waiting for a CPU, and neither (waiting for its "
              "clients' next requests). *chained-held* / *relay-held*: the same middle nodes with the sink "
              "process stopped (SIGSTOP) during the write and continued after it, so the fan-out stalls once "
              "the sockets are full and only the middle node's ingest runs beside the master: what ingest alone "
              "costs the master's write.")
            w("")
            w("| N | middle | write s | master CPU s | redis-benchmark CPU s | middle CPU s "
              "| middle CPU s at the master's priority / below it | sink process CPU s "
              "| others' share | machine busy | master thread on CPU / waiting / asleep s |")
            w("|---|---|---|---|---|---|---|---|---|---|---|")
            for kind, n in windowed:
                for mode in window_modes:
                    r = by.get((mode, kind, n))
                    ww = (r or {}).get("write_window")
                    if not ww:
                        continue
                    others = (ww.get("middle_cpu_s") or 0) + (ww.get("sink_cpu_s") or 0)
                    run, wait = ww.get("master_thread_run_s"), ww.get("master_thread_wait_s")
                    normal, lowered = ww.get("middle_normal_cpu_s"), ww.get("middle_lowered_cpu_s")
                    split = f"{normal:.2f} / {lowered:.2f}" if normal is not None and lowered is not None else "–"
                    sched = (f"{run:.2f} / {wait:.2f} / {max(0.0, r['write_s'] - run - wait):.2f}"
                             if run is not None and wait is not None else "–")
                    w(f"| {n} | {mode} | {r['write_s']:.2f} | {r['master_cpu_s']:.2f} | "
                      f"{ww['benchmark_cpu_s']:.2f} | {fmt(ww.get('middle_cpu_s'))} | {split} | {fmt(ww.get('sink_cpu_s'))} | "
                      f"{others / (cpus * r['write_s']) * 100:.0f}% | {ww['machine_busy'] * 100:.0f}% | {sched} |")
            w("")
        relay_ns = [n for kind, n in keys if kind == "sink" and any(by.get((m, "sink", n)) for m in RELAY_MODES)]
        if relay_ns:
            w("The relay keeps the newest `--log-memory` bytes of the stream in memory (256 MB by default); replicas "
              "that trail by more are served from the disk log, where each record is checked (CRC-32C) once, by "
              "its first reader, and then sent to plain-TCP replicas from the segment file with `sendfile`. The "
              "same bursts with a 4 MB tail (*relay-disk*: nearly all of it behind the tail) and a 1 GB tail "
              "(*relay-1gb*: all of it in memory) show what the disk tier costs. *Sent from*: the relay's INFO "
              "counters `stream_sent_from_memory` / `stream_sent_from_disk` (disk records read into memory: the "
              "first reader's check, or read-backs for TLS) / `stream_sent_by_sendfile`, their change over the "
              "burst as a share of the bytes delivered (stream × N). *Idle RSS*: VmRSS just before the burst; "
              f"*< 2× idle*: seconds after delivery until VmRSS was first under twice that, polled every "
              f"{RSS_WATCH_STEP} s for {RSS_WATCH_S:.0f} s (– if it was not), and the RSS then (or at the end).")
            w("")
            w("| N | middle | `--log-memory` | delivered s | CPU s | CPU ms/MB | ÷ write floor | ÷ sendfile floor | "
              "sent from memory / disk / sendfile % | peak RSS MiB | idle RSS MiB | s to < 2× idle (RSS MiB then) |")
            w("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for n in relay_ns:
                fw, fs = by.get(("floor-write", "sink", n)), by.get(("floor-sendfile", "sink", n))
                g = lambda y, f: y.get(f) if y else None  # noqa: E731
                for mode in RELAY_MODES:
                    r = by.get((mode, "sink", n))
                    if not r:
                        continue
                    sent = r.get("sent_bytes")
                    total = r["stream_bytes"] * r["n"]
                    shares = (" / ".join(f"{sent[k] * 100 / total:.0f}" for k, _ in SENT_SOURCES)
                              if sent and total else "–")
                    back = r.get("rss_under_2x_idle_s")
                    after = r.get("rss_after")
                    w(f"| {n} | {mode} | {RELAY_LOG_MEMORY[mode]} | {r['deliver_s']:.2f} | {fmt(r.get('middle_cpu_s'))} | "
                      f"{fmt(r.get('cpu_ms_per_mb'), '.3f')} | {ratio(r.get('cpu_ms_per_mb'), g(fw, 'cpu_ms_per_mb'))} | "
                      f"{ratio(r.get('cpu_ms_per_mb'), g(fs, 'cpu_ms_per_mb'))} | {shares} | "
                      f"{fmt(r.get('middle_hwm') and r['middle_hwm'] / MB, '.0f')} | "
                      f"{fmt(r.get('idle_rss') and r['idle_rss'] / MB, '.0f')} | "
                      f"{fmt(back, '.1f')} ({fmt(after and after / MB, '.0f')}) |")
            w("")
        floors = [n for kind, n in keys if kind == "sink" and by.get(("floor-write", "sink", n))]
        if floors:
            w("The kernel's copy floor (`examples/copy_floor.rs`, the same bytes as the burst to the same sinks "
              "from one thread, nothing else done: *write* = 1 MiB `write()`s from memory, socket after socket; "
              "*sendfile* = the same from the file in the page cache) and the relay as a ratio to it:")
            w("")
            w("| N | delivered s floor write / sendfile | CPU ms/MB floor write / sendfile | CPU ms/MB relay | "
              "**relay ÷ write floor** | relay ÷ sendfile floor | chained ÷ write floor |")
            w("|---|---|---|---|---|---|---|")
            for n in floors:
                fw, fs = by.get(("floor-write", "sink", n)), by.get(("floor-sendfile", "sink", n))
                r, c = by.get(("relay", "sink", n)), by.get(("chained", "sink", n))
                g = lambda y, f: y.get(f) if y else None  # noqa: E731
                w(f"| {n} | {fmt(g(fw, 'deliver_s'))} / {fmt(g(fs, 'deliver_s'))} | "
                  f"{fmt(g(fw, 'cpu_ms_per_mb'), '.3f')} / {fmt(g(fs, 'cpu_ms_per_mb'), '.3f')} | "
                  f"{fmt(g(r, 'cpu_ms_per_mb'), '.3f')} | **{ratio(g(r, 'cpu_ms_per_mb'), g(fw, 'cpu_ms_per_mb'))}** | "
                  f"{ratio(g(r, 'cpu_ms_per_mb'), g(fs, 'cpu_ms_per_mb'))} | "
                  f"{ratio(g(c, 'cpu_ms_per_mb'), g(fw, 'cpu_ms_per_mb'))} |")
            w("")
        if "throughput" in files:
            w(f"![throughput]({files['throughput']})")
            w("")
        I14 = "issue 14"
        cpu_gap = profile_gap(results.get("profile", []))
        for n in (32, 64):
            r, c = by.get(("relay", "sink", n)), by.get(("chained", "sink", n))
            fw, fs = by.get(("floor-write", "sink", n)), by.get(("floor-sendfile", "sink", n))
            if r and c:
                write_met = r["write_s"] <= 1.1 * c["write_s"]
                targets.append((I14, f"master write time with the relay ≤ 1.1× with the chained replica at N = {n}",
                                write_met,
                                f"{r['write_s']:.2f} s / {c['write_s']:.2f} s = {r['write_s'] / c['write_s']:.2f}×"
                                + ("" if write_met else write_gap(r, c, by.get(("relay-held", "sink", n)),
                                                                  by.get(("chained-held", "sink", n))))))
                delivered_met = r["deliver_s"] <= 0.6 * c["deliver_s"]
                gap = ""
                if not delivered_met:
                    gap = delivery_gap(r, by.get(("relay-1gb", "sink", n)), c, n) + cpu_gap
                targets.append((I14, f"all delivered ≤ 0.6× the chained replica's at N = {n}", delivered_met,
                                f"{r['deliver_s']:.2f} s / {c['deliver_s']:.2f} s = "
                                f"{r['deliver_s'] / c['deliver_s']:.2f}×{gap}"))
            if r and fw and fw.get("cpu_ms_per_mb"):
                cpu_met = r["cpu_ms_per_mb"] <= 1.2 * fw["cpu_ms_per_mb"]
                targets.append((I14, f"relay CPU per delivered MB ≤ 1.2× the write() floor at N = {n}", cpu_met,
                                f"{r['cpu_ms_per_mb']:.3f} / {fw['cpu_ms_per_mb']:.3f} ms/MB = "
                                f"{r['cpu_ms_per_mb'] / fw['cpu_ms_per_mb']:.2f}×" + ("" if cpu_met else cpu_gap)))
            if r and fs and fs.get("cpu_ms_per_mb"):
                c_part = ""
                if c and c.get("cpu_ms_per_mb"):
                    c_part = (f"; sendfile floor ÷ chained = {fs['cpu_ms_per_mb'] / c['cpu_ms_per_mb']:.2f}× "
                              "(the issue expects ≤ 1/3)")
                targets.append((I14, f"stretch: relay CPU per delivered MB ≤ the sendfile() floor at N = {n}",
                                r["cpu_ms_per_mb"] <= fs["cpu_ms_per_mb"],
                                f"{r['cpu_ms_per_mb']:.3f} / {fs['cpu_ms_per_mb']:.3f} ms/MB = "
                                f"{r['cpu_ms_per_mb'] / fs['cpu_ms_per_mb']:.2f}×" + c_part))
            missing = [m for m, x in (("relay", r), ("chained", c), ("floor-write", fw), ("floor-sendfile", fs))
                       if not x]
            if missing:
                targets.append((I14, f"master write, delivery and CPU-per-MB targets at N = {n}", None,
                                f"not measured in this run: no {', '.join(missing)} result with {n} sinks"))
        for mode in ("relay", "relay-disk"):
            for n in (32, 64):
                r = by.get((mode, "sink", n))
                if not r or not r.get("middle_hwm"):
                    if mode == "relay":
                        targets.append((I14, f"relay: peak RSS and RSS after the burst at N = {n}", None,
                                        f"not measured in this run: no relay result with {n} sinks"))
                    continue
                limit = size_bytes(RELAY_LOG_MEMORY[mode]) + 32 * MB
                targets.append((I14, f"{mode}: peak RSS ≤ --log-memory + 32 MB during the burst at N = {n}",
                                r["middle_hwm"] <= limit,
                                f"peak {r['middle_hwm'] / MB:.0f} MiB (VmHWM) ≤ {RELAY_LOG_MEMORY[mode]} + 32 MB = "
                                f"{limit / MB:.0f} MiB"))
                if r.get("idle_rss"):
                    back = r.get("rss_under_2x_idle_s")
                    targets.append((I14, f"{mode}: RSS back under 2× idle within {RSS_WATCH_S:.0f} s after the burst "
                                         f"at N = {n}",
                                    back is not None,
                                    f"idle {r['idle_rss'] / MB:.0f} MiB, 2× = {2 * r['idle_rss'] / MB:.0f} MiB; "
                                    + (f"under it {back:.1f} s after delivery ({r['rss_after'] / MB:.0f} MiB)"
                                       if back is not None else
                                       f"{fmt(r.get('rss_after') and r['rss_after'] / MB, '.0f')} MiB "
                                       f"{RSS_WATCH_S:.0f} s after delivery")))
        for n in (32, 64):
            r = by.get(("relay", "sink", n))
            if r:
                targets.append((f"relay delivery within 1.2× the master's write time at N = {n}",
                                r["ratio"] <= 1.2,
                                f"{r['deliver_s']:.2f} s delivered / {r['write_s']:.2f} s write = {r['ratio']:.2f}×"))
        cpu_ratios = []
        for kind, n in keys:
            c, r = by.get(("chained", kind, n)), by.get(("relay", kind, n))
            if c and r and c.get("cpu_ms_per_mb") and r.get("cpu_ms_per_mb") is not None:
                cpu_ratios.append((kind, n, r["cpu_ms_per_mb"] / c["cpu_ms_per_mb"]))
        if cpu_ratios:
            worst = max(cpu_ratios, key=lambda x: x[2])
            targets.append(("relay CPU per delivered MB ≤ 1/3 of the chained replica's",
                            worst[2] <= 1 / 3,
                            "relay ÷ chained = " + ", ".join(f"{x[2]:.2f} ({'redis' if x[0] == 'real' else 'sink'} N={x[1]})"
                                                             for x in cpu_ratios)))

    lat = results.get("latency", [])
    if lat:
        w("## 2. Added latency")
        w("")
        w(f"`SET lat:<seq> <unix-ns>` at {opts.lat_rate}/s for {opts.lat_seconds} s on the master. One master with a "
          "chained replica and a relay side by side, a sink on the master and a sink below each middle node, so "
          "every path carries the same messages at the same time. Latency: from the value (taken just before the "
          "write to the master) to the read that brought the command into the sink. *Added* is per message: "
          "arrival below the middle node minus arrival at the sink on the master. Idle: nothing else written; "
          f"loaded: plus {opts.lat_load_rate} SETs/s of 1000-byte values (~{opts.lat_load_rate * 1050 / MB:.0f} MB/s) "
          "on the master. Microseconds.")
        w("")
        w("| master load | path | messages | p50 | p99 | p999 | added p50 | added p99 | added p999 |")
        w("|---|---|---|---|---|---|---|---|---|")
        relay_rows = {}
        for load_rate in sorted({r["load_rate"] for r in lat}):
            rows = {r["mode"]: r for r in lat if r["load_rate"] == load_rate}
            label = "idle" if not load_rate else f"{load_rate} SET/s"
            for mode in MODES:
                r = rows.get(mode)
                if not r:
                    continue
                path = "master → sink" if mode == "direct" else f"master → {mode} → sink"
                a = r.get("added") or {}
                w(f"| {label} | {path} | {r['count']} | {r['pct']['p50']:.0f} | {r['pct']['p99']:.0f} | "
                  f"{r['pct']['p999']:.0f} | {fmt(a.get('p50'), '.0f')} | {fmt(a.get('p99'), '.0f')} | "
                  f"{fmt(a.get('p999'), '.0f')} |")
            c, r = rows.get("chained"), rows.get("relay")
            if c and r:
                w(f"| {label} | **relay ÷ chained** | | {ratio(r['pct']['p50'], c['pct']['p50'])} | "
                  f"{ratio(r['pct']['p99'], c['pct']['p99'])} | {ratio(r['pct']['p999'], c['pct']['p999'])} | "
                  f"{ratio(r['added']['p50'], c['added']['p50'])} | {ratio(r['added']['p99'], c['added']['p99'])} | "
                  f"{ratio(r['added']['p999'], c['added']['p999'])} |")
            if r:
                relay_rows[label] = r
        w("")
        if "latency" in files:
            w(f"![latency]({files['latency']})")
            w("")
        if relay_rows:
            targets.append(("relay added p99 latency ≤ 0.5 ms", all(r["added"]["p99"] <= 500 for r in relay_rows.values()),
                            "; ".join(f"{label}: added p99 {r['added']['p99']:.0f} µs (p50 {r['added']['p50']:.0f}, "
                                      f"p999 {r['added']['p999']:.0f})" for label, r in relay_rows.items())))

    storm = results.get("storm", [])
    if storm:
        s0 = storm[0]
        w("## 3. Full-sync storm")
        w("")
        w(f"Dataset `DEBUG POPULATE {opts.storm_keys} key {opts.storm_value}` "
          + (f"(RDB {s0['rdb_bytes'] / MB:.0f} MB) " if s0.get("rdb_bytes") else "")
          + f"on the master, 500 SETs/s of background writes; {s0['replicas']} redis-server replicas "
          "full-sync through the middle node all at once, then (fresh cluster) one by one. The middle node's own "
          "initial sync happened before and is not counted. Master PING latency sampled every 5 ms meanwhile. "
          "*Replica s waiting / receiving / loading*: from the replicas' logs, summed over them: from each "
          "replica's start until its upstream answered `+FULLRESYNC` (a replica connects from its once-a-second "
          "cron), the RDB transfer, and the replica loading it; one by one, the time until all were online is "
          "about their sum.")
        w("")
        w("| middle | order | seconds until all online | master forks | master sync_full | middle forks | "
          "middle full syncs served | master PING p50 / p99 / max ms | middle RSS MiB after "
          "| replica s waiting / receiving / loading |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for r in storm:
            p = r["ping"] or {}
            w(f"| {r['mode']} | {r['order']} | {r['seconds']:.1f} | {r['master_forks']} | {r['master_sync_full']} | "
              f"{fmt(r['middle_forks'], 'd')} | {fmt(r['middle_sync_full'], 'd')} | "
              f"{p.get('p50_us', 0) / 1000:.2f} / {p.get('p99_us', 0) / 1000:.2f} / {p.get('max_us', 0) / 1000:.1f} | "
              f"{fmt(r['middle_rss'] and r['middle_rss'] / MB, '.0f')} | "
              + (" / ".join(f"{x:.1f}" for x in r["replica_phases"]) if r.get("replica_phases") else "–") + " |")
        by = {(r["mode"], r["order"]): r for r in storm}
        for order in ("at once", "one by one"):
            c, r = by.get(("chained", order)), by.get(("relay", order))
            if c and r:
                w(f"| **relay ÷ chained** | {order} | {ratio(r['seconds'], c['seconds'])} | | | | | "
                  f"p99 {ratio(r['ping']['p99_us'], c['ping']['p99_us'])} | "
                  f"{ratio(r['middle_rss'], c['middle_rss'])} | |")
        w("")
        if "storm" in files:
            w(f"![storm]({files['storm']})")
            w("")
        relay_storm = [r for r in storm if r["mode"] == "relay"]
        if relay_storm:
            targets.append(("master forks 0 beyond the first (the relay's own sync) in the storm",
                            all(r["master_forks"] == 0 for r in relay_storm),
                            ", ".join(f"{r['order']}: {r['master_forks']} forks" for r in relay_storm)))

    rs = results.get("restart", [])
    if rs:
        w("## 4. Middle node restart under load")
        w("")
        w(f"Same dataset, {rs[0]['replicas']} redis-server replicas below the middle node, {opts.restart_rate} SETs/s of "
          "1000-byte values on the master. The middle node gets SIGTERM and is started again on the same "
          "directory (the chained replica with `save 86400 1`, so it saves its RDB on SIGTERM and reloads it). "
          "*Recovered*: from the SIGTERM until every replica's link is up and its offset has reached the master's "
          "offset sampled 20 ms before. Replica syncs are counted in the replicas' logs.")
        w("")
        w("| middle | recovered s | stop s | master forks | master sync_full | master partial syncs | replica full syncs "
          "| replica partial syncs | middle's full / partial syncs served after restart |")
        w("|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            w(f"| {r['mode']} | {r['seconds']:.2f} | {r['stop_s']:.2f} | {r['master_forks']} | {r['master_sync_full']} | "
              f"{r['master_sync_partial_ok']} | {r['replica_full_syncs']} | {r['replica_partial_syncs']} | "
              f"{r['middle_sync_full']} / {r['middle_sync_partial_ok']} |")
        by = {r["mode"]: r for r in rs}
        if "chained" in by and "relay" in by:
            w(f"| **relay ÷ chained** | {ratio(by['relay']['seconds'], by['chained']['seconds'])} | | | | | | | |")
        w("")
        if "relay" in by:
            r = by["relay"]
            targets.append(("master forks 0 on a relay restart", r["master_forks"] == 0 and r["master_sync_full"] == 0,
                            f"{r['master_forks']} forks, {r['master_sync_full']} full syncs on the master; "
                            f"{r['replica_full_syncs']} replica full syncs"))

    mem = results.get("memory", [])
    if mem:
        w("## 5. Memory per downstream replica")
        w("")
        w("Middle node VmRSS with idle sink replicas connected (after they are online, "
          f"{opts.settle:.0f} s settle). Small dataset: `DEBUG POPULATE {opts.mem_small_keys}`; large: "
          f"`DEBUG POPULATE {opts.storm_keys} key {opts.storm_value}`.")
        w("")
        counts = sorted({row["n"] for m in mem for row in m["rows"]})
        w("| node | dataset keys | " + " | ".join(f"RSS MiB @ {n}" for n in counts) + " | growth KiB / replica |")
        w("|---|---|" + "---|" * len(counts) + "---|")
        growth = {}
        for m in mem:
            rows = {row["n"]: row["rss"] for row in m["rows"]}
            g = None
            if len(m["rows"]) > 1:
                a, b = m["rows"][0], m["rows"][-1]
                g = (b["rss"] - a["rss"]) / (b["n"] - a["n"]) / 1024
                growth[m["mode"]] = g
            name = "master (direct)" if m["mode"] == "direct" else m["mode"]
            w(f"| {name} | {m['keys']} | " + " | ".join(fmt(rows.get(n) and rows[n] / MB, '.1f') for n in counts)
              + f" | {fmt(g, '.1f')} |")
        if "chained" in growth and "relay" in growth:
            w("| **relay ÷ chained** | | " + " | ".join("" for _ in counts) + f" | {ratio(growth['relay'], growth['chained'])} |")
        w("")
        if "memory" in files:
            w(f"![memory]({files['memory']})")
            w("")
        relay_small = next((m for m in mem if m["mode"] == "relay" and len(m["rows"]) > 1), None)
        relay_large = next((m for m in mem if m["mode"] == "relay" and m["keys"] == opts.storm_keys), None)
        if relay_small and "relay" in growth:
            targets.append(("relay RSS growth ≤ 64 KiB per idle replica", growth["relay"] <= 64,
                            f"{growth['relay']:.1f} KiB per replica "
                            f"({relay_small['rows'][0]['n']} → {relay_small['rows'][-1]['n']} replicas)"))
        if relay_small and relay_large:
            small1 = relay_small["rows"][0]["rss"]
            large1 = relay_large["rows"][0]["rss"]
            targets.append(("relay RSS independent of the dataset", abs(large1 - small1) <= 16 * MB,
                            f"{small1 / MB:.1f} MiB with {relay_small['keys']} keys vs {large1 / MB:.1f} MiB with "
                            f"{relay_large['keys']} keys (1 replica)"))

    lr = results.get("longrun", [])
    if lr:
        r0 = lr[0]
        relay_log = next((r["log_size"] for r in lr if r.get("log_size")), None)
        w("## 6. Forks over a long run")
        w("")
        w(f"Dataset `DEBUG POPULATE {opts.longrun_keys} key {opts.longrun_value}` on the master and 500 SETs/s of "
          f"background writes; {r0['phases']} bursts of {opts.longrun_phase_mb} MB of stream (redis-benchmark, "
          f"{opts.value_size}-byte values over 10,000 keys)"
          + (f", {relay_log / MB:.0f} MB `--log-size` on the relay" if relay_log else "")
          + ". One redis-server replica below the middle node from the start; after each burst a new empty "
          "replica joins (even bursts) or the oldest replica is killed and started again without its data (odd "
          "bursts), and the next burst starts when every replica has the master's offset. Every such replica "
          "needs a full sync. *relay*: snapshots from its replicas first (the default); *relay-master-src*: "
          "`--snapshot-sources master --snapshot-min-interval 1s`, the relay before snapshot sources. Forks are "
          "counted from after the middle node's own first sync (INFO `total_forks`); replica forks are summed "
          "over every replica process.")
        w("")
        w("| middle | stream MB | seconds | full syncs below | master forks | master sync_full | middle forks | "
          "replica forks | relay snapshots from replicas / master |")
        w("|---|---|---|---|---|---|---|---|---|")
        for r in lr:
            w(f"| {r['mode']} | {r['stream_bytes'] / MB:.0f} | {r['seconds']:.0f} | {r['middle_sync_full']} | "
              f"{r['master_forks']} | {r['master_sync_full']} | {r['middle_forks']} | {r['replica_forks']} | "
              + (f"{r['refreshes_replica']} / {r['refreshes_master']}" if r.get("refreshes_replica") is not None
                 else "–") + " |")
        extra = [r for r in lr if r["mode"].startswith("relay") and r["middle_sync_full"] > r["phases"]]
        if extra:
            w("")
            w("Full syncs below beyond one per burst (" + ", ".join(f"{r['mode']}: {r['middle_sync_full']}" for r in extra)
              + "): a replica still loading its RDB when the next burst passed the relay's log (the bursts run at "
              f"tens of MB/s against a {relay_log / MB:.0f} MB log) fell off it and full-synced again, from a snapshot "
              "like the others.")
        w("")
        day_gib = 86400 / 1024  # GiB of stream a day at 1 MB/s
        w(f"Per day at 1 MB/s of stream ({day_gib:.0f} GiB) with F full syncs below. Forks that follow the "
          "stream (a snapshot outdated every so many bytes) are scaled from the measured forks per GiB of stream, "
          "for this run's `--log-size` and for the default 1 GiB (they scale inversely with it); forks that "
          "follow the full syncs below are counted per full sync. Without a middle node every full sync below "
          "is a BGSAVE on the master: F master forks a day.")
        w("")
        w("| middle | master forks / day | forks elsewhere / day |")
        w("|---|---|---|")
        for r in lr:
            gib = r["stream_bytes"] / (1024 * MB)
            scale_1g = (r["log_size"] or MB) / (1024 * MB)
            if r["mode"] == "chained":
                w(f"| chained | {r['master_forks'] / gib * day_gib:.0f} (one per full sync of the chained replica "
                  f"itself) | F on the chained replica ({r['middle_forks']} for {r['middle_sync_full']} full syncs "
                  "here) |")
            elif r["mode"] == "relay":
                per_day = r["replica_forks"] / gib * day_gib
                w(f"| relay | {r['master_forks'] / gib * day_gib:.0f} | about {per_day:.0f} on the replicas "
                  f"({r['log_size'] / MB:.0f} MB log; {per_day * scale_1g:.0f} with 1 GiB), whatever F; "
                  f"{r['replica_forks']} here |")
            else:
                per_day = r["master_forks"] / gib * day_gib
                w(f"| {r['mode']} | min(F, {per_day:.0f}) ({r['log_size'] / MB:.0f} MB log; {per_day * scale_1g:.0f} "
                  f"with 1 GiB); {r['master_forks']} here | 0 |")
        w("")
        relay_lr = next((r for r in lr if r["mode"] == "relay"), None)
        if relay_lr:
            targets.append(("master forks 0 beyond the first over a long run with late joiners and restarts",
                            relay_lr["master_forks"] == 0,
                            f"{relay_lr['master_forks']} master forks over {relay_lr['stream_bytes'] / MB:.0f} MB and "
                            f"{relay_lr['middle_sync_full']} full syncs below; {relay_lr['refreshes_replica']} "
                            "snapshots from replicas"))

    w("## Notes")
    w("")
    w("- Every process shares the same CPUs: the sink process reads N × the stream over loopback (its CPU "
      "seconds are in the throughput section), and the sending side (master or middle node) spends CPU in "
      "the kernel's TCP send path. The *direct* rows show the same limit on the master itself: there it is the "
      "master that does the fan-out.")
    w("- The relay keeps the newest `--log-memory` bytes of the stream in memory; a replica that trails by more "
      "is served from the disk log. There each record is checked (CRC-32C) once, by its first reader, which notes "
      "where its payload lies; plain-TCP replicas after it get the records sent from the segment file with "
      "`sendfile` (never copied into the relay), TLS replicas read them back into memory without a second check. "
      "Compare *relay*, *relay-disk* and *relay-1gb* in the throughput section; the *sent from* columns show "
      "which path carried the bytes.")
    w("- The chained replica holds the dataset; the relay holds the memory tail and per-replica state, not the "
      "dataset (section 5 shows its RSS with a small and a large dataset).")
    w("")
    w("## Where the time goes (profile)")
    w("")
    profiles = results.get("profile", [])
    if profiles:
        p0 = profiles[0]
        w(f"Taken in this run: one extra burst each to N = {p0['n']} sink replicas with "
          f"`perf record -F {p0['frequency']} -g -p <relay pid>` attached once the sinks were online and stopped "
          "(SIGINT) after delivery, then `perf report --no-children --sort sym --stdio -g none`: the share of the "
          "relay's samples (all its threads, user and kernel) whose own code is that symbol. These bursts are not "
          "in the tables above (perf costs the relay CPU); their own figures:")
        w("")
        w("| middle | perf samples (event) | delivered s | relay CPU s | CPU ms/MB | sent from memory / disk / "
          "sendfile % |")
        w("|---|---|---|---|---|---|")
        for pr in profiles:
            b = pr["burst"]
            sent = b.get("sent_bytes")
            total = (b.get("stream_bytes") or 0) * pr["n"]
            shares = " / ".join(f"{sent[k] * 100 / total:.0f}" for k, _ in SENT_SOURCES) if sent and total else "–"
            w(f"| {pr['mode']} | {pr['samples']} ({pr['event']}) | {fmt(b.get('deliver_s'))} | "
              f"{fmt(b.get('middle_cpu_s'))} | {fmt(b.get('cpu_ms_per_mb'), '.3f')} | {shares} |")
        w("")
        if all(pr.get("operations") for pr in profiles):
            w("By what the relay was doing (`perf script`: each sample by the first of these found on its kernel "
              "call chain, so a copy or a page fault counts under the send or read it served; samples without a "
              "kernel frame by their user-space symbol), % of samples:")
            w("")
            w("| operation | " + " | ".join(f"{pr['mode']} %" for pr in profiles) + " |")
            w("|---|" + "---|" * len(profiles))
            order = [name for name, _ in PROFILE_OPERATIONS] + ["kernel, other"] + \
                [name for name, _ in USER_OPERATIONS] + ["relay user space, other"]
            for name in order:
                cells = [pr["operations"].get(name, 0) * 100 / max(1, sum(pr["operations"].values()))
                         for pr in profiles]
                if any(cells):
                    w(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
            w("")
            names = sorted({t for pr in profiles for t in pr.get("threads", {})},
                           key=lambda t: -sum(pr["threads"].get(t, 0) for pr in profiles))
            w("By thread: " + "; ".join(
                f"{pr['mode']}: " + ", ".join(f"{t} {pr['threads'][t] * 100 / max(1, sum(pr['threads'].values())):.0f}%"
                                            for t in names if pr["threads"].get(t))
                for pr in profiles) + ".")
            w("")
        w("The same samples grouped by the name of the function they were in (`perf report`; a copy counts "
          "as a copy whichever call it served), % of samples:")
        w("")
        w("| bucket | " + " | ".join(f"{pr['mode']} %" for pr in profiles) + " |")
        w("|---|" + "---|" * len(profiles))
        buckets = [profile_buckets(pr["symbols"]) if pr.get("symbols") else pr["buckets"] for pr in profiles]
        names = [name for name, _ in buckets[0]]
        for name in names:
            cells = [next((pct for nm, pct in b if nm == name), None) for b in buckets]
            w(f"| {name} | " + " | ".join(fmt(c, '.1f') for c in cells) + " |")
        w("")
        top_n = 15
        w(f"Top {top_n} symbols (`[k]` kernel, `[.]` user space):")
        w("")
        w("| # | " + " | ".join(f"{pr['mode']}: symbol | %" for pr in profiles) + " |")
        w("|---|" + "---|---|" * len(profiles))
        for i in range(top_n):
            cells = []
            for pr in profiles:
                if i < len(pr["top"]):
                    pct, kind, sym = pr["top"][i]
                    cells.append(f"`[{kind}] {sym}` | {pct:.1f}")
                else:
                    cells.append(" | ")
            w(f"| {i + 1} | " + " | ".join(cells) + " |")
        w("")
    else:
        w(results.get("profile_note") or "No profile was taken in this run (`--profile` takes one).")
        w("")
    base = results.get("baseline")
    now = comparable_figures(results)
    if not base:
        targets.append(("issue 14", "latency, storm, restart and memory-per-replica figures no worse than the "
                        "previous run's", None, "not compared: no earlier results.json (`--baseline`)"))
    elif not set(base["figures"]) & set(now):
        targets.append(("issue 14", "latency, storm, restart and memory-per-replica figures no worse than the "
                        "previous run's", None, f"not compared: this run measured none of them ({base['file']} has "
                        f"{len(base['figures'])})"))
    else:
        for name, before in base["figures"].items():
            if name not in now:
                continue
            # Measured, not assumed: on a shared machine absolute times move with the machine (both
            # middle nodes alike), so where both runs measured the chained replica too the verdict
            # is on relay ÷ chained, each in its own run; the absolute figures are shown beside it.
            a = now[name]
            # A baseline stored by an earlier version of this script holds the relay's figure alone.
            b = before if isinstance(before, dict) else {"relay": before, "chained": None}
            figures = (f"{a['relay']:.1f} now vs {b['relay']:.1f} in the previous run (commit {base['commit']}, "
                       f"{base['started']}) = {ratio(a['relay'], b['relay'])}")
            if a["chained"] and b["chained"]:
                r_now, r_before = a["relay"] / a["chained"], b["relay"] / b["chained"]
                met = r_now <= NO_WORSE * r_before
                figures = (f"relay ÷ chained {r_now:.2f}× now vs {r_before:.2f}× then ({ratio(r_now, r_before)}); "
                           f"absolute: {figures}, chained {a['chained']:.1f} now vs {b['chained']:.1f} then")
            else:
                met = a["relay"] <= NO_WORSE * b["relay"]
            targets.append(("issue 14", f"{name} no worse than the previous run's (≤ {NO_WORSE}×)", met, figures))
    if targets:
        w("## Targets")
        w("")
        groups = {}
        for t in targets:
            group, name, ok, figures = t if len(t) == 4 else ("earlier issues", *t)
            groups.setdefault(group, []).append((name, ok, figures))
        for group in sorted(groups, key=lambda g: g != "issue 14"):
            if group == "issue 14":
                w("Issue 14 (performance): same run, same machine, N = 32 and 64 sinks; the relay with its default "
                  "`--log-memory 256mb` unless named.")
            else:
                w("Targets of earlier issues:")
            w("")
            w("| target | met? | figures |")
            w("|---|---|---|")
            for name, ok, figures in groups[group]:
                verdict = "–" if ok is None else "met" if ok else "**not met**"
                w(f"| {name} | {verdict} | {figures} |")
            w("")
    if results.get("errors"):
        w("## Errors during the run")
        w("")
        for e in results["errors"]:
            w(f"- {e}")
        w("")
    os.makedirs(outdir, exist_ok=True)
    with open(out_md, "w") as f:
        f.write("\n".join(L))
    saved = {k: getattr(opts, k) for k in REPORT_OPTS if hasattr(opts, k)}
    os.makedirs(os.path.join(outdir, stem), exist_ok=True)
    with open(os.path.join(outdir, stem, "results.json"), "w") as f:
        json.dump({"machine": machine, "busy": busy, "started": started, "finished": finished, "opts": saved,
                   "results": results}, f, indent=1)
    log(f"wrote {out_md}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

opts_global = None


def main():
    global opts_global
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small bursts, N up to 16, fewer replicas (a few minutes)")
    p.add_argument("--only", default="throughput,latency,storm,restart,memory,longrun",
                   help="comma-separated scenarios to run")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated middle modes")
    p.add_argument("--out", help="markdown report (default docs/benchmarks.md, --quick: target/bench-quick/benchmarks.md)")
    p.add_argument("--relay-bin", default=os.path.join(ROOT, "target/release/redis-relay"))
    p.add_argument("--sink-bin", default=os.path.join(ROOT, "target/release/examples/bench_sink"))
    p.add_argument("--floor-bin", default=os.path.join(ROOT, "target/release/examples/copy_floor"))
    p.add_argument("--no-build", action="store_true", help="do not run cargo build --release first")
    p.add_argument("--report-from", metavar="JSON", help="only rewrite the report from a results.json of an earlier run")
    p.add_argument("--sink-ns", dest="sink_ns_arg", help="override the sink replica counts, e.g. 1,4,16,32,64")
    p.add_argument("--burst", dest="burst_arg", type=int, help="override the number of SETs in the burst")
    p.add_argument("--repeat", dest="repeat_arg", type=int, help="throughput rounds (median reported)")
    p.add_argument("--baseline", metavar="JSON",
                   help="an earlier run's results.json for the 'no worse' targets (default: the one next to the "
                        "report, before this run replaces it)")
    p.add_argument("--mem-ns", dest="mem_ns_arg",
                   help="sink counts that also run relay-disk (--log-memory 4mb) and relay-1gb, e.g. 32,64 "
                        "(full run: 32,64; --quick: none)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="perf record the relay during one extra relay and relay-disk burst to the largest N "
                        "(64 in the full run); default: on in the full run when perf is installed")
    opts = p.parse_args()
    opts_global = opts
    opts.command = "python3 bench/run.py" + (" --quick" if opts.quick else "")
    opts.value_size = 1000
    if opts.quick:
        opts.burst = 50000
        opts.real_ns = [1]
        opts.sink_ns = [1, 4, 16]
        opts.lat_seconds, opts.lat_rate, opts.lat_load_rate = 5, 1000, 10000
        opts.mem_ns = []
        opts.storm_keys, opts.storm_value, opts.storm_replicas = 200000, 100, 4
        opts.restart_replicas, opts.restart_rate = 2, 2000
        opts.mem_counts = [1, 100, 1000]
        opts.settle = 1.0
        opts.longrun_phases, opts.longrun_phase_mb, opts.longrun_log_mb = 4, 32, 16
    else:
        opts.burst = 200000
        opts.real_ns = [1, 4]
        opts.sink_ns = [1, 4, 16, 32, 64]
        opts.lat_seconds, opts.lat_rate, opts.lat_load_rate = 30, 1000, 10000
        opts.mem_ns = [32, 64]
        opts.storm_keys, opts.storm_value, opts.storm_replicas = 1000000, 100, 8
        opts.restart_replicas, opts.restart_rate = 4, 2000
        opts.mem_counts = [1, 100, 1000]
        opts.settle = 3.0
        opts.longrun_phases, opts.longrun_phase_mb, opts.longrun_log_mb = 8, 64, 64
    if opts.sink_ns_arg:
        opts.sink_ns = [int(x) for x in opts.sink_ns_arg.split(",")]
    if opts.burst_arg:
        opts.burst = opts.burst_arg
    if opts.mem_ns_arg is not None:
        opts.mem_ns = [int(x) for x in opts.mem_ns_arg.split(",") if x]
    opts.profile_note = None
    if opts.profile is None:
        opts.profile = not opts.quick
    if opts.profile and not shutil.which("perf"):
        opts.profile = False
        opts.profile_note = "perf is not installed: no profile was taken (Debian: apt-get install linux-perf)"
    elif not opts.profile:
        opts.profile_note = "no profile was taken in this run (`--profile` takes one)"
    opts.repeat = opts.repeat_arg or (1 if opts.quick else 3)
    opts.mem_small_keys = 1000
    opts.longrun_keys, opts.longrun_value = 200000, 100
    opts.deliver_timeout = 600
    out_md = opts.out or os.path.join(ROOT, "target/bench-quick/benchmarks.md" if opts.quick else "docs/benchmarks.md")
    if opts.report_from:
        with open(opts.report_from) as f:
            saved = json.load(f)
        for k, v in saved.get("opts", {}).items():
            setattr(opts, k, v)
        opts.relay_bin = saved["machine"].get("relay_bin", opts.relay_bin)
        if opts.baseline:
            saved["results"]["baseline"] = load_baseline(opts.baseline)
        report(opts, saved["results"], saved["machine"], saved["busy"], saved.get("started", "?"),
               saved.get("finished", "?"), out_md)
        return
    scenarios = opts.only.split(",")
    modes = opts.modes.split(",")
    opts.modes_list = modes

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, on_signal)  # also when started in the background with SIGINT ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(REG.cleanup)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 20000 if hard == resource.RLIM_INFINITY else min(hard, 20000)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 12000:
        log(f"warning: open files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}: 1000 replicas may not fit")
    for tool in ("redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (Debian: apt-get install redis-server redis-tools)")
    if not opts.no_build:
        log("cargo build --release --bin redis-relay --example bench_sink --example copy_floor")
        subprocess.run(["cargo", "build", "--release", "--bin", "redis-relay", "--example", "bench_sink",
                        "--example", "copy_floor"],
                       cwd=ROOT, check=True)
    ensure_matplotlib()

    results = {"errors": []}
    baseline = opts.baseline or os.path.join(os.path.dirname(os.path.abspath(out_md)),
                                             os.path.splitext(os.path.basename(out_md))[0], "results.json")
    results["baseline"] = load_baseline(baseline)
    if results["baseline"]:
        log(f"comparing with {baseline} (commit {results['baseline']['commit']})")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    busy_before = cpu_busy_fraction(5)
    log(f"machine busy before the run: {busy_before * 100:.0f}% of all CPUs")
    machine = machine_info()

    loads = results.setdefault("foreign_load", {})

    def attempt(name, fn, *args):
        before = usage_snapshot()
        try:
            value = fn(*args)
            results.setdefault(name, []).extend(value if isinstance(value, list) else [value])
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one failed case must not lose the others
            msg = f"{name} {args[1:]}: {type(error).__name__}: {error}"
            log("ERROR", msg)
            results["errors"].append(msg)
        finally:
            after = usage_snapshot()
            cpu, _ = foreign_load(before, after)
            acc = loads.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += cpu
            acc[1] += after[0] - before[0]
            if len(acc) < 3:
                acc.append(0.0)
            acc[2] += after[3] - before[3]

    try:
        if "throughput" in scenarios:
            for rep in range(opts.repeat):
                if opts.repeat > 1:
                    log(f"throughput: round {rep + 1} of {opts.repeat}")
                for n in opts.real_ns:
                    for mode in modes:
                        attempt("throughput", throughput_case, opts, mode, "real", n)
                for n in opts.sink_ns:
                    for mode in modes:
                        attempt("throughput", throughput_case, opts, mode, "sink", n)
                    if "relay" in modes and n in opts.mem_ns:
                        for mode in RELAY_MODES[1:]:
                            if mode not in modes:
                                attempt("throughput", throughput_case, opts, mode, "sink", n)
                    if n in opts.mem_ns:
                        for mode in HELD_MODES:
                            if HELD_MODES[mode] in modes:
                                attempt("throughput", throughput_case, opts, mode, "sink", n)
                    for how in FLOORS:
                        attempt("throughput", floor_case, opts, how, n)
            results["throughput"] = median_runs(results.get("throughput", []))
        if opts.profile and ("throughput" in scenarios or "profile" in scenarios):
            pn = 64 if 64 in opts.sink_ns else max(opts.sink_ns)
            for mode in ("relay", "relay-disk"):
                attempt("profile", profile_case, opts, mode, pn)
        elif opts.profile_note:
            results["profile_note"] = opts.profile_note
        if "latency" in scenarios:
            for load_rate in (0, opts.lat_load_rate):
                attempt("latency", latency_case, opts, load_rate)
        if "storm" in scenarios:
            for order in ("at once", "one by one"):
                for mode in modes:
                    attempt("storm", storm_case, opts, mode, order)
        if "restart" in scenarios:
            for mode in modes:
                if mode != "direct":
                    attempt("restart", restart_case, opts, mode)
        if "memory" in scenarios:
            for mode in modes:
                attempt("memory", memory_case, opts, mode, (opts.mem_small_keys, 100), opts.mem_counts)
            for mode in modes:
                if mode != "direct":
                    attempt("memory", memory_case, opts, mode, (opts.storm_keys, opts.storm_value), [1])
        if "longrun" in scenarios:
            for mode in LONGRUN_MODES:
                if mode in modes or (mode == "relay-master-src" and "relay" in modes):
                    attempt("longrun", longrun_case, opts, mode)
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        REG.cleanup()
        sys.exit(130)
    finally:
        REG.cleanup()
    busy_after = cpu_busy_fraction(5)
    finished = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report(opts, results, machine, (busy_before, busy_after), started, finished, out_md)


if __name__ == "__main__":
    main()
