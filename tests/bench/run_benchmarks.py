#!/usr/bin/python3
"""Runs every callsession benchmark in one go and writes the results.

    run_benchmarks.py BUILD_DIR OUT_DIR [--quick] [--only=SECTION,...] [--repeats=N]

SECTION: micro, transport, loadgen, memory, durability, sync-cost, tenants, ha
(default: all).

Starts what it needs on loopback (callsessiond, the empty-handler baseline
server, redis-server) and runs, in order:
  1. the handle table microbenchmarks (Google Benchmark);
  2. h2load (gRPC unary framing, authorization header) against GetCallInfo on
     callsessiond and on the baseline, and redis-benchmark HSET / HGETALL /
     DEL with the same client concurrency;
  3. callsession-loadgen: get-call-info (closed loop to saturation, then open
     loop at half that rate for latency), lifecycle and inbound;
  4. memory: RSS per live call and per extra handle at 1e5 and 1e6 calls,
     and after everything is deallocated.
  5. durability: this machine's fsync latency; GetCallInfo on the RocksDB
     store vs the memory store (h2load, alternating); lifecycle throughput
     and latency on memory, RocksDB --sync=true and --sync=false (alternating
     triples), then the same with callsessiond and the load generator
     pinned to one CPU each; bytes written per lifecycle; recovery of 1e6 live calls
     (time, RSS before the kill and after), the data directory's size, and
     the space given back once every call is deallocated.
  5b. sync-cost: the lifecycle on memory, RocksDB --sync=true and
     --sync=false, and --sync=true with fdatasync() replaced by a shim that
     does no I/O (tests/bench/fdatasync_shim.cc): returning at once, or
     blocking the thread for 40 or 100 us. It splits the cost of --sync=true
     into the wait for the sync and the CPU the kernel spends doing it.
  6. tenants: GetCallInfo with a 1,000-tenant file vs open mode.
  7. ha: a 3-member etcd cluster on loopback and callsessiond --store=etcd
     (a leader and two standbys): GetCallInfo on the leader vs the memory
     store (h2load, alternating); lifecycle throughput at 64 and 256 in
     flight on memory, RocksDB --sync=true and etcd (alternating triples);
     journal bytes and etcd's disk writes per lifecycle. etcd, the service
     and the load generator share the machine's cores.
Sections 1-4 run on the memory store (--store=memory), as before the
durable store existed.
Writes OUT_DIR/results.json and OUT_DIR/BENCHMARKS-tables.md. Every figure is
the median of the repetitions shown. The machine is shared and noisy: compare
the ratios, which are measured in the same run.
"""
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BUILD, OUT = sys.argv[1], sys.argv[2]
QUICK = "--quick" in sys.argv
ONLY = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")),
            ["micro", "transport", "loadgen", "memory", "durability", "sync-cost", "tenants",
             "ha"])
REPEATS = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--repeats=")),
               1 if QUICK else 3)
TOKEN = "bench-provider-token"
H2_CONNECTIONS, H2_STREAMS = 4, 16  # 64 requests in flight
H2_REQUESTS = 50_000 if QUICK else 200_000
CONCURRENCY = H2_CONNECTIONS * H2_STREAMS
LOAD_SECONDS = "3s" if QUICK else "10s"
MEMORY_SIZES = [100_000] if QUICK else [100_000, 1_000_000]
RECOVERY_CALLS = 100_000 if QUICK else 1_000_000

os.makedirs(OUT, exist_ok=True)
results = {"machine": {}, "microbenchmarks": {}, "h2load": {}, "redis": {}, "loadgen": {},
           "memory": {}, "durability": {}, "sync_cost": {}, "tenants": {}, "ha": {},
           "targets": {}}


def log(message):
    print(f"[bench] {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": model, "kernel": os.uname().release}


class Server:
    """A server process on a free loopback port."""

    def __init__(self, argv, env=None, ready=None, stderr=None):
        self.port = free_port()
        self.argv = [a.replace("PORT", str(self.port)) for a in argv]
        self.process = subprocess.Popen(self.argv, env=env, stdout=subprocess.DEVNULL,
                                        stderr=stderr or subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{argv[0]} did not start")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def pinned(cpu):
    """The argv prefix that runs a program on one CPU (None: anywhere)."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def callsessiond(extra=(), store=("--store=memory",), log_level="warning", stderr=None, cpu=None,
                 env=None):
    env = {"CALLSESSION_PROVIDER_TOKEN": TOKEN, "CALLSESSION_LOG_LEVEL": log_level, **(env or {})}
    return Server([*pinned(cpu), f"{BUILD}/server/callsessiond", "--listen=127.0.0.1:PORT",
                   "--shutdown_grace=1s",
                   # Leases stay on (their per-RPC cost is measured), long
                   # enough that set-up apps outlive the idle phases.
                   "--app_ttl=10m", *store, *extra], env=env, stderr=stderr)


def run(argv, **kwargs):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def callctl(port, *args, token="", api_key=""):
    argv = [f"{BUILD}/client/callctl", f"--server=127.0.0.1:{port}"]
    if token:
        argv.append(f"--token={token}")
    env = dict(os.environ, CALLSESSION_API_KEY=api_key) if api_key else None
    return json.loads(run(argv + list(args), env=env).stdout)


# --- 1. microbenchmarks ----------------------------------------------------

def microbenchmarks():
    log("handle table microbenchmarks")
    out = os.path.join(OUT, "handle_table_bench.json")
    run([f"{BUILD}/tests/bench/handle_table_bench", f"--benchmark_out={out}",
         "--benchmark_out_format=json", f"--benchmark_repetitions={REPEATS}",
         "--benchmark_min_time=" + ("0.05" if QUICK else "0.3")])
    with open(out) as f:
        data = json.load(f)
    table = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        if REPEATS > 1 and b.get("run_type") != "aggregate":
            continue
        name = b["run_name"] if "run_name" in b else b["name"]
        m = re.match(r"BM_(\w+)<(\w+)>/live:(\d+)/real_time/threads:(\d+)", name)
        if not m:
            continue
        workload, kind, live, threads = m.groups()
        table.setdefault(workload, {}).setdefault(kind, {})[f"{live}/{threads}"] = \
            b["items_per_second"]
    results["microbenchmarks"] = table


# --- 2. h2load and redis -----------------------------------------------------

def grpc_frame(call_handle):
    """A GetCallInfoRequest{call_handle} in gRPC's length-prefixed framing."""
    body = bytearray([0x08])  # field 1, varint
    value = call_handle
    while True:
        byte = value & 0x7F
        value >>= 7
        body.append(byte | (0x80 if value else 0))
        if not value:
            break
    return bytes([0]) + len(body).to_bytes(4, "big") + bytes(body)


def h2load_once(port, token, body):
    out = run(["h2load", "-n", str(H2_REQUESTS), "-c", str(H2_CONNECTIONS),
               "-m", str(H2_STREAMS), "-d", body,
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               "-H", f"authorization: Bearer {token}",
               f"http://127.0.0.1:{port}/callsession.v1.CallSessionService/GetCallInfo"]).stdout
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
    if ok != H2_REQUESTS:
        raise RuntimeError(f"h2load: only {ok} of {H2_REQUESTS} succeeded:\n{out}")
    return rate


def h2load_pairs(ours_port, base_port, token, call_handle):
    """Alternates callsessiond and baseline runs, so that both see the same
    noise; returns the medians and the median of the per-pair ratios."""
    with tempfile.NamedTemporaryFile(delete=False, suffix=".bin") as f:
        f.write(grpc_frame(call_handle))
        body = f.name
    ours, base = [], []
    for _ in range(max(REPEATS, 5) if not QUICK else 1):
        ours.append(h2load_once(ours_port, token, body))
        base.append(h2load_once(base_port, token, body))
    os.unlink(body)
    ratios = [o / b for o, b in zip(ours, base)]
    return statistics.median(ours), statistics.median(base), statistics.median(ratios)


def live_handle(port, api_key=""):
    init = callctl(port, "init", "bench", api_key=api_key)
    token = init["app_token"]
    line = callctl(port, "line-open", "0", token=token)["line_handle"]
    call = callctl(port, "make-call", line, "+15550100", token=token)
    return token, int(call["call_handle"])


def transport_and_redis():
    server = callsessiond()
    baseline = Server([f"{BUILD}/tests/bench/baseline_server", "--listen=127.0.0.1:PORT"])
    try:
        token, handle = live_handle(server.port)
        # The baseline answers any handle; the token is sent to keep the
        # request bytes identical.
        log(f"h2load GetCallInfo, {H2_CONNECTIONS}x{H2_STREAMS} in flight, alternating with the "
            "baseline")
        ours, base, ratio = h2load_pairs(server.port, baseline.port, token, handle)
        results["h2load"] = {"callsessiond_rps": ours, "baseline_rps": base,
                             "ratio": ratio, "connections": H2_CONNECTIONS,
                             "streams_per_connection": H2_STREAMS, "requests": H2_REQUESTS}
    finally:
        server.stop()
        baseline.stop()

    log(f"redis-benchmark, {CONCURRENCY} clients")
    redis = Server(["redis-server", "--port", "PORT", "--save", "", "--appendonly", "no",
                    "--bind", "127.0.0.1"])
    try:
        cli = ["redis-cli", "-p", str(redis.port)]
        run(cli + ["HSET", "call:1", "line_handle", "1234", "call_id", "5678", "origin", "1",
                   "called_id", "+15550100", "num_owners", "1", "create_time", "1700000000"])
        out = {}
        commands = {
            "HSET": ["HSET", "call:__rand_int__", "called_id", "+15550100", "origin", "1"],
            "HGETALL": ["HGETALL", "call:1"],
            "DEL": ["DEL", "call:__rand_int__"],
        }
        for name, command in commands.items():
            rates = []
            for _ in range(REPEATS):
                csv = run(["redis-benchmark", "-p", str(redis.port), "-c", str(CONCURRENCY),
                           "-n", str(H2_REQUESTS), "-r", "100000", "--csv"] + command).stdout
                rates.append(float(csv.strip().splitlines()[-1].split(",")[1].strip('"')))
            out[name] = statistics.median(rates)
        results["redis"] = out
    finally:
        redis.stop()


# --- 3. loadgen ------------------------------------------------------------------

def loadgen(port, scenario, *extra, cpu=None):
    out = os.path.join(OUT, f"loadgen-{scenario}-{len(results['loadgen'])}.json")
    argv = [*pinned(cpu), f"{BUILD}/client/callsession-loadgen", f"--server=127.0.0.1:{port}",
            f"--scenario={scenario}", f"--duration={LOAD_SECONDS}", "--warmup=1s",
            f"--provider_token={TOKEN}", f"--json={out}", *extra]
    text = run(argv).stdout
    print(text, end="")
    with open(out) as f:
        return json.load(f)


def loadgen_scenarios():
    server = callsessiond()
    try:
        log("loadgen get-call-info, closed loop")
        saturation = loadgen(server.port, "get-call-info", f"--concurrency={CONCURRENCY}",
                             "--channels=4")
        rate = saturation["requests_per_second"] / 2
        log(f"loadgen get-call-info, open loop at half saturation ({rate:.0f}/s)")
        half = loadgen(server.port, "get-call-info", f"--rate={rate:.0f}",
                       f"--concurrency={CONCURRENCY}", "--channels=4")
        log("loadgen lifecycle")
        lifecycle = loadgen(server.port, "lifecycle", f"--concurrency={CONCURRENCY}",
                            "--channels=4")
        log("loadgen inbound")
        inbound = loadgen(server.port, "inbound", f"--concurrency={CONCURRENCY}", "--channels=4")
    finally:
        server.stop()
    baseline = Server([f"{BUILD}/tests/bench/baseline_server", "--listen=127.0.0.1:PORT"])
    try:
        log("loadgen against the empty-handler baseline (the same client's limit)")
        base = loadgen(baseline.port, "get-call-info", "--fixed_handle=1",
                       f"--concurrency={CONCURRENCY}", "--channels=4")
        log(f"loadgen against the baseline, open loop at the same rate ({rate:.0f}/s)")
        base_half = loadgen(baseline.port, "get-call-info", "--fixed_handle=1",
                            f"--rate={rate:.0f}", f"--concurrency={CONCURRENCY}", "--channels=4")
    finally:
        baseline.stop()
    results["loadgen"] = {"baseline_get_call_info": base,
                          "baseline_get_call_info_half_rate": base_half,
                          "get_call_info_saturation": saturation,
                          "get_call_info_half_rate": half,
                          "lifecycle": lifecycle, "inbound": inbound}


# --- 4. memory ---------------------------------------------------------------------

def memory():
    for calls in MEMORY_SIZES:
        log(f"memory with {calls} calls")
        server = callsessiond(["--event_buffer=1000", "--max_call_handles_per_app=0"])
        try:
            out = os.path.join(OUT, f"memory-{calls}.json")
            run([f"{BUILD}/client/callsession-loadgen", f"--server=127.0.0.1:{server.port}",
                 "--scenario=memory", f"--calls={calls}", "--concurrency=8",
                 f"--server_pid={server.process.pid}", f"--json={out}"])
            with open(out) as f:
                results["memory"][str(calls)] = json.load(f)
        finally:
            server.stop()


# --- 5. durability -----------------------------------------------------------------

def fsync_latency(directory, count=500):
    """fdatasync after a 512-byte append, as a WAL sync does: p50/p99 in us."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    samples = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 512)
            start = time.perf_counter()
            os.fdatasync(fd)
            samples.append((time.perf_counter() - start) * 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
    samples.sort()
    return {"p50_us": samples[len(samples) // 2], "p99_us": samples[int(len(samples) * 0.99)]}


def metric(port, name):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    m = re.search(rf"^{name} ([0-9.e+]+)$", text.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def written_bytes(pid):
    with open(f"/proc/{pid}/io") as f:
        return int(re.search(r"^write_bytes: (\d+)", f.read(), re.M).group(1))


def cpu_jiffies():
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    jiffies = []
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields]
                idle = values[3] + values[4]  # idle + iowait
                jiffies.append((sum(values) - idle, sum(values)))
    return jiffies


def process_cpu_seconds(pid):
    """User and system CPU time of the process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_per_lifecycle(server, cpu_before, calls):
    """Microseconds of the server's CPU per call created (one per lifecycle,
    warm-up included on both sides of the division)."""
    return (process_cpu_seconds(server.process.pid) - cpu_before) * 1e6 / max(calls, 1)


def with_capacity(summary, reports, memory_reports):
    """Adds the server's CPU per lifecycle and its capacity against memory:
    memory's CPU per lifecycle over this store's (median of per-run ratios),
    the throughput ratio a server bound by its own CPU would see."""
    summary["server_cpu_us_per_lifecycle"] = statistics.median(
        r["server_cpu_us_per_lifecycle"] for r in reports)
    summary["capacity_ratio"] = statistics.median(
        m["server_cpu_us_per_lifecycle"] / r["server_cpu_us_per_lifecycle"]
        for r, m in zip(reports, memory_reports))
    return summary


def cpu_busy(before, after):
    """Per CPU: the fraction of the time between two cpu_jiffies() it was busy."""
    return [(b1 - b0) / max(t1 - t0, 1) for (b0, t0), (b1, t1) in zip(before, after)]


def directory_bytes(path):
    """(bytes of the files, bytes allocated on disk): RocksDB preallocates its
    log file, which du counts and ls does not."""
    files = int(run(["du", "-sb", "--apparent-size", path]).stdout.split()[0])
    allocated = int(run(["du", "-sB1", path]).stdout.split()[0])
    return files, allocated


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


STORES = {"memory": ["--store=memory"], "rocksdb-sync": ["--sync=true"],
          "rocksdb-nosync": ["--sync=false"]}


def durable_server(data, name, extra=(), stores=STORES, **kwargs):
    store = stores[name]
    if "--store=memory" not in store:
        store = [*store, f"--data_dir={data}/{name}-{time.monotonic_ns()}"]
    metrics_port = free_port()
    server = callsessiond([f"--metrics_listen=127.0.0.1:{metrics_port}", *extra], store=store,
                          **kwargs)
    server.metrics_port = metrics_port
    # The port opens before the store has loaded (UNAVAILABLE until then).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if metric(metrics_port, "callsession_serving") == 1:
                return server
        except OSError:
            pass
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"callsessiond --store={name} did not start serving")


# Per-lifecycle figures of a lifecycle run: each from a counter of the
# server's (None: the bytes the process wrote, from /proc/PID/io).
PER_LIFECYCLE_FIELDS = {
    "journal_bytes_per_lifecycle": "callsession_journal_bytes_total",
    "journal_batches_per_lifecycle": "callsession_journal_batches_total",
    "journal_syncs_per_lifecycle": "callsession_journal_syncs_total",
    "disk_bytes_per_lifecycle": None,
}


def lifecycle_rounds(data, rounds, pinned=False, stores=STORES, envs=None):
    """Alternating rounds of the lifecycle scenario on each of stores (name:
    flags; envs: name: more environment for that server); returns each store's
    loadgen reports, with
    the server's CPU per lifecycle, PER_LIFECYCLE_FIELDS and, pinned
    (callsessiond on CPU 1, the load generator on CPU 0), each CPU's busy
    share."""
    runs = {name: [] for name in stores}
    for _ in range(rounds):
        for name in stores:
            server = durable_server(data, name, stores=stores, cpu=1 if pinned else None,
                                    env=(envs or {}).get(name))
            try:
                pid = server.process.pid
                bytes_before = written_bytes(pid)
                jiffies_before = cpu_jiffies()
                cpu_before = process_cpu_seconds(pid)
                report = loadgen(server.port, "lifecycle", f"--concurrency={CONCURRENCY}",
                                 "--channels=4", cpu=0 if pinned else None)
                if pinned:
                    report["busy"] = cpu_busy(jiffies_before, cpu_jiffies())
                calls = metric(server.metrics_port, "callsession_calls_created_total")
                report["server_cpu_us_per_lifecycle"] = server_cpu_per_lifecycle(
                    server, cpu_before, calls)
                for field, counter in PER_LIFECYCLE_FIELDS.items():
                    total = (metric(server.metrics_port, counter) if counter
                             else written_bytes(pid) - bytes_before)
                    report[field] = total / calls
                runs[name].append(report)
            finally:
                server.stop()
    return runs


def median_rate(reports):
    return statistics.median(r["lifecycles_per_second"] for r in reports)


def ratio_to_memory(reports, memory_reports):
    """The median of the per-round ratios to the memory run of the same round."""
    return statistics.median(r["lifecycles_per_second"] / m["lifecycles_per_second"]
                             for r, m in zip(reports, memory_reports))


def durability():
    d = results["durability"]
    data = tempfile.mkdtemp(prefix="durability-", dir=OUT)
    d["fsync"] = fsync_latency(data)
    log(f"fsync (fdatasync) on the data directory's file system: {d['fsync']}")

    log("h2load GetCallInfo: RocksDB store vs memory store, alternating")
    with tempfile.NamedTemporaryFile(delete=False, suffix=".bin") as f:
        body = f.name
    ours, base = [], []
    for _ in range(max(REPEATS, 5) if not QUICK else 1):
        for name, rates in (("rocksdb-sync", ours), ("memory", base)):
            server = durable_server(data, name)
            try:
                token, handle = live_handle(server.port)
                with open(body, "wb") as out:
                    out.write(grpc_frame(handle))
                rates.append(h2load_once(server.port, token, body))
            finally:
                server.stop()
    os.unlink(body)
    d["get_call_info"] = {"rocksdb_rps": statistics.median(ours),
                          "memory_rps": statistics.median(base),
                          "ratio": statistics.median(o / b for o, b in zip(ours, base))}

    log(f"loadgen lifecycle, {CONCURRENCY} in flight: memory, RocksDB sync, RocksDB no sync, "
        "alternating")
    runs = lifecycle_rounds(data, max(REPEATS, 3) if not QUICK else 1)
    lifecycle = {}
    for name, reports in runs.items():
        middle = sorted(reports, key=lambda r: r["lifecycles_per_second"])[len(reports) // 2]
        lifecycle[name] = {"lifecycles_per_second": median_rate(reports),
                           "runs": [r["lifecycles_per_second"] for r in reports],
                           "rpcs": middle["rpcs"],
                           **{field: middle[field] for field in PER_LIFECYCLE_FIELDS}}
        with_capacity(lifecycle[name], reports, runs["memory"])
        if name != "memory":
            lifecycle[name]["ratio"] = ratio_to_memory(reports, runs["memory"])
    d["lifecycle"] = lifecycle

    if (os.cpu_count() or 1) >= 2:
        log(f"loadgen lifecycle, {CONCURRENCY} in flight, callsessiond on CPU 1 and the load "
            "generator on CPU 0: memory, RocksDB sync, RocksDB no sync, alternating")
        runs = lifecycle_rounds(data, max(REPEATS, 5) if not QUICK else 1, pinned=True)
        pinned_lifecycle = {}
        for name, reports in runs.items():
            pinned_lifecycle[name] = {
                "lifecycles_per_second": median_rate(reports),
                "runs": [r["lifecycles_per_second"] for r in reports],
                "load_generator_cpu_busy": statistics.median(r["busy"][0] for r in reports),
                "server_cpu_busy": statistics.median(r["busy"][1] for r in reports),
                "ratio": ratio_to_memory(reports, runs["memory"])}
            with_capacity(pinned_lifecycle[name], reports, runs["memory"])
        d["lifecycle_pinned"] = pinned_lifecycle

    log(f"recovery of {RECOVERY_CALLS} live calls")
    store = f"{data}/recovery"
    server = callsessiond(["--max_call_handles_per_app=0", "--sync=false"],
                          store=[f"--data_dir={store}"])
    try:
        out = os.path.join(OUT, "populate.json")
        run([f"{BUILD}/client/callsession-loadgen", f"--server=127.0.0.1:{server.port}",
             "--scenario=populate", f"--calls={RECOVERY_CALLS}", "--concurrency=16",
             f"--json={out}"])
        with open(out) as f:
            token = json.load(f)["token"]
        rss_before = rss(server.process.pid)
        size_live = directory_bytes(store)
    finally:
        server.process.kill()  # kill -9: nothing is flushed or closed
        server.process.wait()
    log_path = os.path.join(OUT, "recovery.log")
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        server = callsessiond(["--max_call_handles_per_app=0"], store=[f"--data_dir={store}"],
                              log_level="info", stderr=log_file)
    try:
        deadline = time.monotonic() + 120
        recovered = None
        while time.monotonic() < deadline and recovered is None:
            with open(log_path) as f:
                for line in f:
                    entry = json.loads(line)
                    if entry.get("event") == "recovered":
                        recovered = entry
            time.sleep(0.02)
        to_serving = time.monotonic() - started
        time.sleep(2)  # let the allocator settle, as before the kill
        rss_after = rss(server.process.pid)
        out = os.path.join(OUT, "drain.json")
        run([f"{BUILD}/client/callsession-loadgen", f"--server=127.0.0.1:{server.port}",
             "--scenario=drain", f"--token={token}", "--concurrency=16", f"--json={out}"])
        size_drained = directory_bytes(store)
        time.sleep(10)
        size_drained_later = directory_bytes(store)
    finally:
        server.stop()
    size_stopped = directory_bytes(store)
    d["recovery"] = {"calls": RECOVERY_CALLS, "recovered": recovered,
                     "seconds_to_serving": to_serving,
                     "rss_before_kill": rss_before, "rss_after_recovery": rss_after,
                     "rss_ratio": rss_after / rss_before,
                     "data_dir_bytes_live": size_live,
                     "data_dir_bytes_per_million_calls": [b * 1e6 / RECOVERY_CALLS
                                                          for b in size_live],
                     "data_dir_bytes_after_drain": size_drained,
                     "data_dir_bytes_10s_after_drain": size_drained_later,
                     "data_dir_bytes_after_stop": size_stopped}
    run(["rm", "-rf", data])


# --- 5b. what a sync costs ----------------------------------------------------

SYNC_SHIM_WAITS_US = (0, 40, 100)


def sync_shim_env(wait_us):
    return {"LD_PRELOAD": os.path.abspath(f"{BUILD}/tests/bench/libfdatasync_shim.so"),
            "CALLSESSION_BENCH_SYNC_WAIT_US": str(wait_us)}


def sync_shim_latency(wait_us, count=300):
    """The shim's fdatasync() as one idle thread sees it: p50/p99 in us."""
    probe = ("import json, os, time\n"
             "fd = os.open(os.devnull, os.O_WRONLY)\n"
             "samples = []\n"
             f"for _ in range({count}):\n"
             "    start = time.perf_counter()\n"
             "    os.fdatasync(fd)\n"
             "    samples.append((time.perf_counter() - start) * 1e6)\n"
             "samples.sort()\n"
             "print(json.dumps({'p50_us': samples[len(samples) // 2],\n"
             "                  'p99_us': samples[int(len(samples) * 0.99)]}))\n")
    out = run([sys.executable, "-c", probe], env={**os.environ, **sync_shim_env(wait_us)})
    return json.loads(out.stdout)


def sync_cost():
    c = results["sync_cost"]
    data = tempfile.mkdtemp(prefix="sync-cost-", dir=OUT)
    c["fsync"] = fsync_latency(data)
    stores = {"memory": STORES["memory"], "rocksdb-sync": STORES["rocksdb-sync"]}
    envs, c["shim_latency"] = {}, {}
    for wait_us in SYNC_SHIM_WAITS_US:
        name = f"sync-shim-wait-{wait_us}us"
        stores[name], envs[name] = STORES["rocksdb-sync"], sync_shim_env(wait_us)
        c["shim_latency"][name] = sync_shim_latency(wait_us)
    stores["rocksdb-nosync"] = STORES["rocksdb-nosync"]
    log(f"what a sync costs: loadgen lifecycle, {CONCURRENCY} in flight, on "
        f"{', '.join(stores)}, alternating; shims' fdatasync: {c['shim_latency']}")
    c["rounds"] = max(REPEATS, 5) if not QUICK else 1
    runs = lifecycle_rounds(data, c["rounds"], stores=stores, envs=envs)
    c["lifecycle"] = {}
    for name, reports in runs.items():
        summary = {"lifecycles_per_second": median_rate(reports),
                   "runs": [r["lifecycles_per_second"] for r in reports],
                   "ratio": ratio_to_memory(reports, runs["memory"]),
                   "journal_syncs_per_lifecycle": statistics.median(
                       r["journal_syncs_per_lifecycle"] for r in reports)}
        c["lifecycle"][name] = with_capacity(summary, reports, runs["memory"])
    run(["rm", "-rf", data])


# --- 6. tenants --------------------------------------------------------------

TENANTS = 1000


def tenants_file(path, devices=16):
    """TENANTS tenants, each with a key, a client identity, two device
    grants and quotas; tenant-0000's key is "bench-key-0000"."""
    with open(path, "w") as f:
        for i in range(TENANTS):
            key = hashlib.sha256(f"bench-key-{i:04d}".encode()).hexdigest()
            first = i % devices
            f.write(f'tenants {{\n  name: "tenant-{i:04d}"\n  api_key_sha256: "{key}"\n'
                    f'  client_identities {{ uri: "spiffe://bench.example/tenant-{i:04d}" }}\n'
                    f'  devices {{ first: {first} last: {first} privileges: '
                    f'[DEVICE_PRIVILEGE_NONE, DEVICE_PRIVILEGE_OWNER] }}\n'
                    f'  devices {{ first: {(first + 1) % devices} last: {(first + 1) % devices} '
                    f'privileges: DEVICE_PRIVILEGE_MONITOR }}\n'
                    f'  quotas {{ max_apps: 100 }}\n}}\n')


def tenants():
    """GetCallInfo under h2load with a 1000-tenant file against open mode
    (no file), alternating fresh servers (memory store)."""
    t = results["tenants"]
    path = os.path.join(OUT, "tenants-bench.textproto")
    tenants_file(path)
    log(f"h2load GetCallInfo: {TENANTS}-tenant file vs open mode, alternating")
    with tempfile.NamedTemporaryFile(delete=False, suffix=".bin") as f:
        body = f.name
    ours, base = [], []
    for _ in range(max(REPEATS, 5) if not QUICK else 1):
        for extra, key, rates in (([f"--tenants_file={path}"], "bench-key-0000", ours),
                                  ([], "", base)):
            server = callsessiond(extra)
            try:
                token, handle = live_handle(server.port, api_key=key)
                with open(body, "wb") as out:
                    out.write(grpc_frame(handle))
                rates.append(h2load_once(server.port, token, body))
            finally:
                server.stop()
    os.unlink(body)
    t.update({"tenants": TENANTS, "tenants_rps": statistics.median(ours),
              "open_mode_rps": statistics.median(base),
              "ratio": statistics.median(o / b for o, b in zip(ours, base)),
              "runs": {"tenants": ours, "open_mode": base}})
    log(f"tenants: {t}")


class EtcdCluster:
    """Three etcd members on loopback (Debian's etcd-server)."""

    def __init__(self, data):
        ports = [(free_port(), free_port()) for _ in range(3)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        self.endpoints = [f"127.0.0.1:{client}" for client, _ in ports]
        self.members = []
        for i, (client, peer) in enumerate(ports):
            self.members.append(subprocess.Popen(
                ["etcd", f"--name=m{i}", f"--data-dir={data}/etcd-m{i}",
                 f"--listen-client-urls=http://127.0.0.1:{client}",
                 f"--advertise-client-urls=http://127.0.0.1:{client}",
                 f"--listen-peer-urls=http://127.0.0.1:{peer}",
                 f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                 f"--initial-cluster={cluster}", "--initial-cluster-state=new",
                 "--max-txn-ops=1024", "--log-level=error"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 30
        while time.time() < deadline:
            health = subprocess.run(["etcdctl", f"--endpoints={','.join(self.endpoints)}",
                                     "endpoint", "health"], capture_output=True, text=True)
            if health.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("etcd did not start")

    def written_bytes(self):
        return sum(written_bytes(m.pid) for m in self.members)

    def stop(self):
        for member in self.members:
            member.terminate()
        for member in self.members:
            member.wait()


def etcd_servers(cluster, prefix):
    """A leader and two standbys on `prefix`; returns them, leader first,
    once the leader serves."""
    servers = []
    for i in range(3):
        metrics_port = free_port()
        server = callsessiond(
            [f"--metrics_listen=127.0.0.1:{metrics_port}", "--advertise_address=127.0.0.1:PORT",
             f"--member_name=bench-{i}", "--etcd_max_txn_ops=1024"],
            store=["--store=etcd", f"--etcd_endpoints={','.join(cluster.endpoints)}",
                   f"--etcd_prefix={prefix}"])
        server.metrics_port = metrics_port
        servers.append(server)
        if i == 0:
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    callctl(server.port, "list-calls", token="none")
                except subprocess.CalledProcessError as error:
                    if "NOT_LEADER" not in (error.stdout or "") + (error.stderr or ""):
                        break  # answered (UNAUTHENTICATED): it leads
                time.sleep(0.1)
    return servers


def ha():
    h = results["ha"]
    data = tempfile.mkdtemp(prefix="ha-", dir=OUT)
    cluster = EtcdCluster(data)
    runs_done = [0]

    def fresh_etcd():
        runs_done[0] += 1
        return etcd_servers(cluster, f"/bench-{runs_done[0]}/")

    try:
        log("h2load GetCallInfo: etcd leader vs memory store, alternating")
        with tempfile.NamedTemporaryFile(delete=False, suffix=".bin") as f:
            body = f.name
        ours, base = [], []
        for _ in range(max(REPEATS, 5) if not QUICK else 1):
            for name, rates in (("etcd", ours), ("memory", base)):
                servers = fresh_etcd() if name == "etcd" else [durable_server(data, "memory")]
                try:
                    token, handle = live_handle(servers[0].port)
                    with open(body, "wb") as out:
                        out.write(grpc_frame(handle))
                    rates.append(h2load_once(servers[0].port, token, body))
                finally:
                    for server in servers:
                        server.stop()
        os.unlink(body)
        h["get_call_info"] = {"etcd_rps": statistics.median(ours),
                              "memory_rps": statistics.median(base),
                              "ratio": statistics.median(o / b for o, b in zip(ours, base)),
                              "runs": {"etcd": ours, "memory": base}}
        log(f"ha get_call_info: {h['get_call_info']}")

        h["lifecycle"] = {}
        for in_flight in (64, 256):
            log(f"loadgen lifecycle, {in_flight} in flight: memory, RocksDB sync, etcd, "
                "alternating")
            runs = {"memory": [], "rocksdb-sync": [], "etcd": []}
            for _ in range(REPEATS):
                for name in runs:
                    servers = (fresh_etcd() if name == "etcd"
                               else [durable_server(data, name)])
                    leader = servers[0]
                    try:
                        etcd_before = cluster.written_bytes()
                        report = loadgen(leader.port, "lifecycle", f"--concurrency={in_flight}",
                                         "--channels=4")
                        calls = metric(leader.metrics_port, "callsession_calls_created_total")
                        if name != "memory":
                            report["journal_bytes_per_lifecycle"] = metric(
                                leader.metrics_port, "callsession_journal_bytes_total") / calls
                        if name == "etcd":
                            report["etcd_disk_bytes_per_lifecycle"] = (
                                cluster.written_bytes() - etcd_before) / calls
                        runs[name].append(report)
                    finally:
                        for server in servers:
                            server.stop()
            summary = {}
            for name, reports in runs.items():
                rates = [r["lifecycles_per_second"] for r in reports]
                middle = sorted(reports, key=lambda r: r["lifecycles_per_second"])[len(reports) // 2]
                summary[name] = {"lifecycles_per_second": statistics.median(rates), "runs": rates,
                                 "rpcs": middle["rpcs"]}
                for key in ("journal_bytes_per_lifecycle", "etcd_disk_bytes_per_lifecycle"):
                    if key in middle:
                        summary[name][key] = middle[key]
                summary[name]["ratio_to_memory"] = statistics.median(
                    r["lifecycles_per_second"] / m["lifecycles_per_second"]
                    for r, m in zip(reports, runs["memory"]))
            h["lifecycle"][str(in_flight)] = summary
            log(f"ha lifecycle {in_flight}: " + json.dumps(
                {n: {k: v for k, v in r.items() if k != "rpcs"} for n, r in summary.items()}))
    finally:
        cluster.stop()


def targets():
    t = {}
    if not results["h2load"]:
        return durability_targets(t)
    h2 = results["h2load"]
    t["GetCallInfo h2load vs empty baseline >= 0.90"] = h2["ratio"]
    t["GetCallInfo h2load vs Redis HGETALL >= 1.0"] = h2["callsessiond_rps"] / results["redis"]["HGETALL"]
    base_rps = results["loadgen"]["baseline_get_call_info"]["requests_per_second"]
    lifecycle_rps = results["loadgen"]["lifecycle"]["requests_per_second"]
    t["lifecycle RPC rate vs baseline (same client) >= 0.85"] = lifecycle_rps / base_rps
    t["GetCallInfo loadgen vs baseline (same client)"] = \
        results["loadgen"]["get_call_info_saturation"]["requests_per_second"] / base_rps
    half = results["loadgen"]["get_call_info_half_rate"]["rpcs"]["GetCallInfo"]
    t["GetCallInfo p99 at half saturation < 1000 us"] = half["p99_us"]
    t["(bound) empty baseline p99 at the same rate, us"] = \
        results["loadgen"]["baseline_get_call_info_half_rate"]["rpcs"]["GetCallInfo"]["p99_us"]
    mixed = results["microbenchmarks"].get("Mixed", {})
    if mixed:
        t["mixed 2 threads sharded vs global mutex >= 1.5 (1e5 live)"] = \
            mixed["ShardedTable"]["100000/2"] / mixed["GlobalMutexTable"]["100000/2"]
        lookup = results["microbenchmarks"]["Lookup"]["ShardedTable"]
        t["lookup cost 1e6 / 1e3 live <= 2 (uniform random handles)"] = \
            lookup["1000/1"] / lookup["1000000/1"]
        plain = results["microbenchmarks"]["Lookup"]["PlainMap"]
        t["(bound) unlocked flat_hash_map, same ratio"] = plain["1000/1"] / plain["1000000/1"]
        hot = results["microbenchmarks"]["LookupHot"]["ShardedTable"]
        t["lookup cost 1e6 / 1e3 live <= 2 (1000 hot handles)"] = hot["1000/1"] / hot["1000000/1"]
    for calls, m in results["memory"].items():
        t[f"bytes per live call at {calls} <= 256"] = m["bytes_per_call"]
        t[f"bytes per extra handle at {calls} <= 64"] = m["bytes_per_extra_handle"]
        t[f"RSS after / before at {calls} <= 1.25"] = m["after_over_before"]
    durability_targets(t)


def durability_targets(t):
    h = results["ha"]
    if h:
        t["GetCallInfo on the etcd store's leader vs memory store >= 0.95"] = \
            h["get_call_info"]["ratio"]
        for in_flight, summary in h["lifecycle"].items():
            t[f"lifecycle at {in_flight} in flight, etcd vs memory (reported)"] = \
                summary["etcd"]["ratio_to_memory"]
            t[f"lifecycle at {in_flight} in flight, RocksDB sync vs memory (reported)"] = \
                summary["rocksdb-sync"]["ratio_to_memory"]
    if results["tenants"]:
        t[f"GetCallInfo with a {TENANTS}-tenant file vs none >= 0.97"] = \
            results["tenants"]["ratio"]
    d = results["durability"]
    if d:
        t["GetCallInfo RocksDB store vs memory store >= 0.95"] = d["get_call_info"]["ratio"]
        t["lifecycle RocksDB --sync=true vs memory >= 0.75 (all on 2 shared cores)"] = \
            d["lifecycle"]["rocksdb-sync"]["ratio"]
        t["lifecycle RocksDB --sync=false vs memory >= 0.85 (all on 2 shared cores)"] = \
            d["lifecycle"]["rocksdb-nosync"]["ratio"]
        if "lifecycle_pinned" in d:
            p = d["lifecycle_pinned"]
            t["lifecycle RocksDB --sync=true vs memory >= 0.75 (server and client 1 core each)"] = \
                p["rocksdb-sync"]["ratio"]
            t["lifecycle RocksDB --sync=false vs memory >= 0.85 (server and client 1 core each)"] = \
                p["rocksdb-nosync"]["ratio"]
            for name in ("rocksdb-sync", "rocksdb-nosync"):
                t[f"server capacity, {name} vs memory: its CPU per lifecycle (reported)"] = \
                    p[name]["capacity_ratio"]
        r = d["recovery"]
        t[f"recovery of {r['calls']} live calls, seconds <= 5"] = r["recovered"]["seconds"]
        t["RSS after recovery / before the kill <= 1.1"] = r["rss_ratio"]
    c = results["sync_cost"]
    if c:
        for name, l in c["lifecycle"].items():
            if name.startswith("sync-shim-"):
                t[f"lifecycle, --sync=true with {name} (no I/O) vs memory (reported)"] = l["ratio"]
    results["targets"] = t


def tables():
    r = results
    lines = [f"Machine: {r['machine']['cores']} cores, {r['machine']['cpu']}, "
             f"kernel {r['machine']['kernel']}. Medians of {REPEATS} runs.", ""]
    h2 = r["h2load"]
    if h2:
        lines += transport_tables(r, h2)
    return durability_and_targets(r, lines)


def transport_tables(r, h2):
    lines = []
    lines += ["### Transport: GetCallInfo under h2load, and Redis", "",
              f"{h2['connections']} connections x {h2['streams_per_connection']} streams "
              f"= {CONCURRENCY} in flight; redis-benchmark with {CONCURRENCY} clients.", "",
              "Runs alternate between callsessiond and the baseline; the ratio is the median "
              "of the per-pair ratios.", "",
              "| server | requests/s | vs baseline |", "|---|---:|---:|",
              f"| empty-handler baseline | {h2['baseline_rps']:,.0f} | 1.00 |",
              f"| callsessiond GetCallInfo | {h2['callsessiond_rps']:,.0f} | {h2['ratio']:.2f} |"]
    for name, rps in r["redis"].items():
        lines.append(f"| redis {name} | {rps:,.0f} | {rps / h2['baseline_rps']:.2f} |")
    lines += ["", "### Load generator (callback API client)", "",
              "| scenario | requests/s | lifecycles/s | RPC | p50 us | p90 us | p99 us | p99.9 us |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, run_ in r["loadgen"].items():
        first = True
        for rpc, p in run_["rpcs"].items():
            lead = (f"| {name} | {run_['requests_per_second']:,.0f} | "
                    f"{run_['lifecycles_per_second']:,.0f} ") if first else "| | | "
            lines.append(f"{lead}| {rpc} | {p['p50_us']:.0f} | {p['p90_us']:.0f} | "
                         f"{p['p99_us']:.0f} | {p['p999_us']:.0f} |")
            first = False
    micro = r["microbenchmarks"]
    if micro:
        lines += ["", "### Handle table (million operations/s; live entries / threads)", ""]
        columns = ["1000/1", "1000/2", "100000/1", "100000/2", "1000000/1", "1000000/2"]
        lines += ["| workload | table | " + " | ".join(columns) + " |",
                  "|---|---|" + "---:|" * len(columns)]
        for workload, kinds in micro.items():
            for kind, values in kinds.items():
                cells = [f"{values[c] / 1e6:.1f}" if c in values else "" for c in columns]
                lines.append(f"| {workload} | {kind} | " + " | ".join(cells) + " |")
    if r["memory"]:
        lines += ["", "### Memory (RSS of callsessiond)", "",
                  "| live calls | bytes per call | bytes per extra handle | RSS before MiB | "
                  "RSS with calls MiB | RSS after all gone MiB | after / before |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for calls, m in r["memory"].items():
            lines.append(f"| {int(calls):,} | {m['bytes_per_call']:.0f} | "
                         f"{m['bytes_per_extra_handle']:.0f} | {m['rss_before'] / 2**20:.1f} | "
                         f"{m['rss_with_calls'] / 2**20:.1f} | {m['rss_after'] / 2**20:.1f} | "
                         f"{m['after_over_before']:.2f} |")
    return lines


def durability_and_targets(r, lines):
    d = r["durability"]
    if d:
        fs = d["fsync"]
        lines += ["", "### Durability", "",
                  f"fdatasync of a 512-byte append on this machine: p50 {fs['p50_us']:.0f} us, "
                  f"p99 {fs['p99_us']:.0f} us.", "",
                  f"GetCallInfo under h2load: RocksDB store {d['get_call_info']['rocksdb_rps']:,.0f}"
                  f" req/s, memory store {d['get_call_info']['memory_rps']:,.0f} req/s, ratio "
                  f"{d['get_call_info']['ratio']:.2f} (median of alternating pairs).", "",
                  f"Lifecycle (MakeCall, GetCallInfo, Drop, DeallocateCall), {CONCURRENCY} in "
                  "flight; the ratio is the median of per-run ratios to the memory store run "
                  "beside it. Server CPU: the server process's CPU time per lifecycle; "
                  "capacity: memory's over this store's (median of per-run ratios), what a "
                  "server bound by its own CPU would see.", "",
                  "| store | lifecycles/s | vs memory | server CPU us per lifecycle | capacity "
                  "vs memory | RPC | p50 us | p99 us | journal bytes per lifecycle | disk bytes "
                  "per lifecycle | lifecycles per write | lifecycles per sync |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for name, l in d["lifecycle"].items():
            first = True
            for rpc, p in l["rpcs"].items():
                if first:
                    ratio = f"{l['ratio']:.2f}" if "ratio" in l else "1.00"
                    batches = l["journal_batches_per_lifecycle"]
                    syncs = l.get("journal_syncs_per_lifecycle", 0)
                    per_write = f"{1 / batches:.1f}" if batches else ""
                    per_sync = f"{1 / syncs:.1f}" if syncs else ""
                    lead = (f"| {name} | {l['lifecycles_per_second']:,.0f} | {ratio} "
                            f"| {l['server_cpu_us_per_lifecycle']:.1f} "
                            f"| {l['capacity_ratio']:.2f} ")
                    tail = (f"| {l['journal_bytes_per_lifecycle']:,.0f} | "
                            f"{l['disk_bytes_per_lifecycle']:,.0f} | {per_write} | {per_sync} |")
                else:
                    lead, tail = "| | | | | ", "| | | | |"
                lines.append(f"{lead}| {rpc} | {p['p50_us']:.0f} | {p['p99_us']:.0f} {tail}")
                first = False
        if "lifecycle_pinned" in d:
            lines += ["", "The same, with callsessiond on CPU 1 and the load generator on CPU 0 "
                      "(`taskset`): the server's own cost, as with a client on another host. "
                      "CPU busy: the median share of the run each CPU was not idle.", "",
                      "| store | lifecycles/s | vs memory | server CPU us per lifecycle | capacity "
                      "vs memory | load generator's CPU busy | server's CPU busy |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for name, p in d["lifecycle_pinned"].items():
                lines.append(f"| {name} | {p['lifecycles_per_second']:,.0f} | {p['ratio']:.2f} | "
                             f"{p['server_cpu_us_per_lifecycle']:.1f} | "
                             f"{p['capacity_ratio']:.2f} | "
                             f"{p['load_generator_cpu_busy']:.0%} | {p['server_cpu_busy']:.0%} |")
        rec = d["recovery"]
        mib = lambda pair: f"{pair[0] / 2**20:.1f} MiB ({pair[1] / 2**20:.0f} MiB allocated)"
        lines += ["", f"Recovery of {rec['calls']:,} live calls after kill -9: "
                  f"{rec['recovered']['seconds']:.2f} s to load ({rec['seconds_to_serving']:.2f} s"
                  f" from exec to serving); RSS {rec['rss_before_kill'] / 2**20:.0f} MiB before "
                  f"the kill, {rec['rss_after_recovery'] / 2**20:.0f} MiB after recovery "
                  f"({rec['rss_ratio']:.2f}x).", "",
                  "Data directory, files' bytes (and bytes allocated, which include the log "
                  "RocksDB preallocates):", "",
                  f"| with the {rec['calls']:,} calls live | just after all were deallocated | "
                  "10 s later | after a graceful stop |", "|---:|---:|---:|---:|",
                  f"| {mib(rec['data_dir_bytes_live'])} | {mib(rec['data_dir_bytes_after_drain'])} "
                  f"| {mib(rec['data_dir_bytes_10s_after_drain'])} | "
                  f"{mib(rec['data_dir_bytes_after_stop'])} |"]
    if r["sync_cost"]:
        lines += sync_cost_table(r["sync_cost"])
    tn = r["tenants"]
    if tn:
        lines += ["", "### Tenants", "",
                  f"GetCallInfo under h2load with a {tn['tenants']:,}-tenant file: "
                  f"{tn['tenants_rps']:,.0f} req/s; in open mode (no file) "
                  f"{tn['open_mode_rps']:,.0f} req/s; ratio {tn['ratio']:.2f} (median of "
                  "alternating pairs of fresh servers)."]
    lines += ["", "### Targets", "", "| target | measured |", "|---|---:|"]
    for name, value in r["targets"].items():
        lines.append(f"| {name} | {value:,.2f} |")
    return "\n".join(lines) + "\n"


def sync_cost_table(c):
    shims = "; ".join(f"{name.removeprefix('sync-shim-')} p50 {latency['p50_us']:.0f} us"
                      for name, latency in c["shim_latency"].items())
    rounds = f"{c['rounds']} alternating round{'s' if c['rounds'] != 1 else ''}"
    lines = ["", "### What a sync costs", "",
             f"Lifecycle, {CONCURRENCY} in flight, medians of {rounds} (the ratio: of the "
             f"per-round ratios to memory). fdatasync of a 512-byte append: p50 "
             f"{c['fsync']['p50_us']:.0f} us, p99 {c['fsync']['p99_us']:.0f} us. The shim's "
             f"fdatasync (no I/O): {shims}.", "",
             "| store | lifecycles/s | vs memory | server CPU us per lifecycle | capacity vs "
             "memory | lifecycles per sync |", "|---|---:|---:|---:|---:|---:|"]
    for name, l in c["lifecycle"].items():
        syncs = l["journal_syncs_per_lifecycle"]
        lines.append(f"| {name} | {l['lifecycles_per_second']:,.0f} | {l['ratio']:.2f} | "
                     f"{l['server_cpu_us_per_lifecycle']:.1f} | {l['capacity_ratio']:.2f} | "
                     f"{f'{1 / syncs:.1f}' if syncs else ''} |")
    return lines


def main():
    results["machine"] = machine()
    results["quick"] = QUICK
    for section, run_section in (("micro", microbenchmarks), ("transport", transport_and_redis),
                                 ("loadgen", loadgen_scenarios), ("memory", memory),
                                 ("durability", durability), ("sync-cost", sync_cost),
                                 ("tenants", tenants), ("ha", ha)):
        if section in ONLY:
            run_section()
    targets()
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    text = tables()
    with open(os.path.join(OUT, "BENCHMARKS-tables.md"), "w") as f:
        f.write(text)
    print(text)
    log(f"wrote {OUT}/results.json and {OUT}/BENCHMARKS-tables.md")


if __name__ == "__main__":
    main()
