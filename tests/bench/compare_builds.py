#!/usr/bin/python3
"""Compares two callsessiond builds on the memory store, alternating runs:
GetCallInfo under h2load (4 connections x 16 streams, 200,000 requests) and
callsession-loadgen's lifecycle scenario (64 in flight, 6 s). Prints each
median and the median of the per-pair ratios (new / old).

    compare_builds.py OLD_CALLSESSIOND NEW_BUILD_DIR [PAIRS] [--journal]

NEW_BUILD_DIR provides callsessiond, callctl and callsession-loadgen. An old
build from before --store existed is run without it.

With --journal it compares the two builds' RocksDB journals instead: for
--sync=true and --sync=false, triples of lifecycle runs (the new build's
memory store, the old build's journal, the new build's journal), each in a
fresh data directory, and prints each journal's median ratio to the memory
run of its triple.
"""
import json, re, shutil, socket, statistics, subprocess, sys, tempfile, time

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
OLD = ARGS[0]
NEW = f"{ARGS[1]}/server/callsessiond"
CTL = f"{ARGS[1]}/client/callctl"
LOADGEN = f"{ARGS[1]}/client/callsession-loadgen"
PAIRS = int(ARGS[2]) if len(ARGS) > 2 else 7
JOURNAL = "--journal" in sys.argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, extra):
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--listen=127.0.0.1:{port}", "--app_ttl=10m", "--max_call_handles_per_app=0",
         *extra], stderr=subprocess.DEVNULL, env={"CALLSESSION_PROVIDER_TOKEN": "compare"})
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    raise RuntimeError(f"{binary} did not start")


def callctl(port, *args):
    out = subprocess.run([CTL, f"--server=127.0.0.1:{port}", *args], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def frame(handle):
    body = bytearray([0x08])
    while True:
        byte = handle & 0x7F
        handle >>= 7
        body.append(byte | (0x80 if handle else 0))
        if not handle:
            return bytes([0]) + len(body).to_bytes(4, "big") + bytes(body)


def h2load(binary, extra):
    process, port = start(binary, extra)
    try:
        token = callctl(port, "init", "compare")["app_token"]
        line = callctl(port, f"--token={token}", "line-open", "0")["line_handle"]
        call = callctl(port, f"--token={token}", "make-call", line, "+15550100")["call_handle"]
        with open("/tmp/compare-builds.bin", "wb") as f:
            f.write(frame(int(call)))
        out = subprocess.run(
            ["h2load", "-n", "200000", "-c", "4", "-m", "16", "-d", "/tmp/compare-builds.bin",
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-H", f"authorization: Bearer {token}",
             f"http://127.0.0.1:{port}/callsession.v1.CallSessionService/GetCallInfo"],
            capture_output=True, text=True, check=True).stdout
        return float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    finally:
        process.terminate()
        process.wait()


def lifecycle(binary, extra):
    process, port = start(binary, extra)
    try:
        out = subprocess.run(
            [LOADGEN, f"--server=127.0.0.1:{port}", "--scenario=lifecycle", "--concurrency=64",
             "--channels=4", "--duration=6s", "--warmup=1s"],
            capture_output=True, text=True, check=True).stdout
        return float(re.search(r"lifecycles/s ([\d.]+)", out).group(1))
    finally:
        process.terminate()
        process.wait()


def compare_journals():
    data = tempfile.mkdtemp(prefix="compare-builds-")
    try:
        for sync in ("true", "false"):
            old_ratios, new_ratios = [], []
            for i in range(PAIRS):
                memory = lifecycle(NEW, ["--store=memory"])
                flags = lambda name: ["--store=rocksdb", f"--data_dir={data}/{name}-{i}-{sync}",
                                      f"--sync={sync}"]
                old_ratios.append(lifecycle(OLD, flags("old")) / memory)
                new_ratios.append(lifecycle(NEW, flags("new")) / memory)
            print(f"lifecycles, rocksdb --sync={sync} / memory: "
                  f"old {statistics.median(old_ratios):.2f} "
                  f"({', '.join(f'{r:.2f}' for r in old_ratios)}), "
                  f"new {statistics.median(new_ratios):.2f} "
                  f"({', '.join(f'{r:.2f}' for r in new_ratios)})")
    finally:
        shutil.rmtree(data, ignore_errors=True)


if JOURNAL:
    compare_journals()
    sys.exit(0)

new_flags = ["--store=memory"]
# An old build that has --store runs on the memory store too (not in a
# callsession-data directory of the working directory).
old_help = subprocess.run([OLD, "--help"], capture_output=True, text=True).stdout
old_flags = new_flags if "--store" in old_help else []
for name, measure in (("h2load GetCallInfo requests/s", h2load),
                      ("loadgen lifecycles/s", lifecycle)):
    old, new = [], []
    for _ in range(PAIRS):
        old.append(measure(OLD, old_flags))
        new.append(measure(NEW, new_flags))
    ratios = [n / o for n, o in zip(new, old)]
    print(f"{name}: new {statistics.median(new):,.0f}, old {statistics.median(old):,.0f}, "
          f"median ratio {statistics.median(ratios):.3f} "
          f"(pairs {', '.join(f'{r:.2f}' for r in ratios)})")
