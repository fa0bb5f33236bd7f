"""Service load test (RELIABILITY section 6): the real `run_server` in a subprocess on 127.0.0.1, port 0,
hammered by client threads for a fixed time, once per in-flight search cap (`max_concurrency`).

Hermetic: a synthetic index of --n random unit vectors (exact Flat, dim of the model) and a random `tiny`
model. Traffic: 90 % valid (text queries, and image uploads) and 10 % malformed (k=10**9, empty q,
k=ten, unknown parameter, corrupt image, TIFF, JSON body). Side probes during the run: a 1 MiB body
must get 413, --slow sockets stall mid-body, and --half-open sockets hold one partial header line each,
reopened as fast as the server sheds them (all from 127.0.0.1, the clients' own address). Reports the
status histogram (connection errors counted apart), throughput, p50/p95/p99 of the 200s, server
RSS/fds/threads before and after, and whether a fixed probe query returns the same ids before and after.
After the load, the upload bomb (a ~150 KiB fully transparent 6300 x 6300 RGBA PNG): 4 at once (statuses,
peak RSS growth, sampled every 10 ms) and 10 in a row (RSS change); once more on a server whose pixel cap
is raised above the bomb (--raised-pixels), where the decode budget is what bounds memory.

    python benchmarks/bench_service.py                      # 100k x 256, 16 clients, 10 s, caps 4 and 64
    python benchmarks/bench_service.py --quick              # 20k vectors, 4 s
"""
from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import clipkit
from clipkit.search import SearchIndex

WORDS = "red green blue cat dog smiling face tree car house flag heart star moon sun fish bird hand".split()
UPLOAD_CAP = 512 * 1024  # below the 1 MiB probe body, far above the 12 KB query images
SERVE = ("import json, sys\nfrom clipkit.app.service import run_server\n"
         "run_server(sys.argv[1], sys.argv[2], on_ready=lambda url: print('listening on', url, flush=True),\n"
         "           **json.loads(sys.argv[3]))")


def build(root: Path, n: int, seed: int = 0) -> tuple[Path, Path, int]:
    """A saved random `tiny` model and an exact (Flat) index of n random unit vectors of its dim."""
    torch.manual_seed(seed)
    model, tok = clipkit.create_model_and_tokenizer("tiny")
    model_dir = clipkit.save(model, tok, root / "model")
    x = np.random.default_rng(seed).standard_normal((n, model.embed_dim), np.float32)
    meta = pd.DataFrame({"path": [f"img/{i:06d}.png" for i in range(n)],
                         "caption": [f"synthetic item {i}" for i in range(n)],
                         "style": np.where(np.arange(n) % 2, "emoji", "photo")})
    SearchIndex.build(x, meta, kind="flat").save(root / "index")
    return Path(model_dir), root / "index", model.embed_dim


def _png(seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _multipart(data: bytes, k: str = "10") -> tuple[bytes, str]:
    b = "benchboundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n--{b}\r\nContent-Disposition: "
            f"form-data; name=\"file\"; filename=\"q.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    return body + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def make_requests() -> tuple[list, list]:
    """(valid, malformed) request templates: (method, url, body, content type)."""
    valid = [("GET", f"/search?q={a}+{b}&k=10", None, None) for a in WORDS for b in WORDS[:5]]
    valid += [("GET", f"/search?q={w}&k=20&style=emoji", None, None) for w in WORDS]
    images = [_multipart(_png(i)) for i in range(8)]
    valid += [("POST", "/search", body, ctype) for body, ctype in images] * 3  # ~15 % of valid are uploads
    bad_image, _ = _multipart(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    malformed = [("GET", "/search?q=x&k=1000000000", None, None), ("GET", "/search?q=&k=10", None, None),
                 ("GET", "/search?q=x&k=ten", None, None), ("GET", "/search?q=x&nprobe=1", None, None),
                 ("POST", "/search", bad_image, _multipart(b"")[1]),
                 ("POST", "/search", *_multipart(_png(0, "TIFF"))),
                 ("POST", "/search", b'{"q": NaN, "k": 1e999}', "application/json")]
    return valid, malformed


def start(index: Path, model: Path, log: Path, **options) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-c", SERVE, str(index), str(model), json.dumps({"port": 0, **options})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
    line = proc.stdout.readline()
    match = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line)
    if not match:
        proc.kill()
        sys.exit(f"server did not start: {line!r}; see {log}")
    return proc, int(match.group(1))


def proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    grab = lambda key: int(re.search(rf"{key}:\s+(\d+)", status).group(1))  # noqa: E731
    return {"rss_mib": round(grab("VmRSS") / 1024, 1), "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "threads": grab("Threads")}


def call(conn: http.client.HTTPConnection, req: tuple) -> tuple[int, bytes]:
    method, url, body, ctype = req
    conn.request(method, url, body=body, headers={"Content-Type": ctype} if ctype else {})
    resp = conn.getresponse()
    return resp.status, resp.read()


def probe_ids(port: int) -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, body = call(conn, ("GET", "/search?q=probe+query&k=10", None, None))
    conn.close()
    return [r["id"] for r in json.loads(body)["results"]] if status == 200 else []


def baseline_ms(port: int, reqs: list, n: int = 20) -> float:
    """Median latency of sequential valid text queries on an idle server."""
    conn, times = http.client.HTTPConnection("127.0.0.1", port, timeout=30), []
    for req in reqs[:n]:
        t0 = time.perf_counter()
        call(conn, req)
        times.append(time.perf_counter() - t0)
    conn.close()
    return 1000 * float(np.median(times))


def client(port: int, stop: float, valid: list, malformed: list, seed: int, out: list) -> None:
    """One keep-alive client: 90 % valid, 10 % malformed, until `stop`; appends (kind, status, seconds)."""
    rng, conn = random.Random(seed), None
    while time.perf_counter() < stop:
        kind = "bad" if rng.random() < 0.1 else "ok"
        req = rng.choice(malformed if kind == "bad" else valid)
        conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.perf_counter()
        try:
            status, _ = call(conn, req)
        except (OSError, http.client.HTTPException) as e:  # counted apart from HTTP statuses
            status = type(e).__name__
            conn.close()
            conn = None
        out.append((kind, status, time.perf_counter() - t0))
    if conn:
        conn.close()


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (6300, 6300), (0, 0, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _post_bomb(port: int, body: bytes, ctype: str) -> int | str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        return call(conn, ("POST", "/search", body, ctype))[0]
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def bomb_probe(pid: int, port: int) -> dict:
    """4 bombs at once (statuses, peak RSS growth) and 10 in a row (RSS after minus before), in MiB."""
    body, ctype = _multipart(bomb_png())
    rss = lambda: proc_stats(pid)["rss_mib"]  # noqa: E731
    start, peak, stop = rss(), [0.0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], rss())
    watcher = threading.Thread(target=watch)
    watcher.start()
    statuses: list = []
    threads = [threading.Thread(target=lambda: statuses.append(_post_bomb(port, body, ctype))) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    peak4 = round(max(peak[0], rss()) - start, 1)
    row = [_post_bomb(port, body, ctype) for _ in range(10)]
    stop.set()
    watcher.join()
    time.sleep(0.5)
    hist = lambda xs: dict(sorted(collections.Counter(str(x) for x in xs).items()))  # noqa: E731
    return {"bomb_4": hist(statuses), "bomb_4_peak_mib": peak4, "bomb_10": hist(row),
            "bomb_10_rss_mib": round(rss() - start, 1)}


PARTIAL = b"GET /search?q=x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def half_open(port: int, n: int, stop: float, result: dict) -> None:
    """Hold n sockets with one partial header line each until `stop`, reopening any the server closes."""
    import select

    def opened() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(PARTIAL)
        return s
    socks, reopened = [opened() for _ in range(n)], 0
    while socks and time.perf_counter() < stop:
        readable, _, _ = select.select(socks, [], [], 0.05)
        for s in readable:
            try:
                alive = bool(s.recv(1, socket.MSG_PEEK))
            except OSError:
                alive = False
            if not alive:
                socks[socks.index(s)] = opened()
                s.close()
                reopened += 1
    for s in socks:
        s.close()
    result["half_open_reopened"] = reopened


def side_probes(port: int, n_slow: int, result: dict) -> None:
    """Mid-run: a 1 MiB body must get 413; `n_slow` sockets send 1 of 100 body bytes and stall."""
    time.sleep(1.0)
    socks = []
    for _ in range(n_slow):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100\r\n\r\nx")
        socks.append((s, time.perf_counter()))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        result["1MiB_body"] = call(conn, ("POST", "/search", b"x" * (1 << 20), "application/json"))[0]
    except OSError as e:
        result["1MiB_body"] = type(e).__name__
    closed = []
    for s, t0 in socks:
        s.settimeout(30)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        closed.append(time.perf_counter() - t0)
        s.close()
    result["slow_closed_after_s"] = round(max(closed), 1) if closed else None


def run_one(index: Path, model: Path, cap: int, args: argparse.Namespace, tmp: Path) -> dict:
    proc, port = start(index, model, tmp / f"server_cap{cap}.log", max_concurrency=cap,
                       queue_timeout=args.queue_timeout, max_upload_bytes=UPLOAD_CAP)
    try:
        valid, malformed = make_requests()
        base = baseline_ms(port, valid)
        ids_before, before = probe_ids(port), proc_stats(proc.pid)
        records, probes = [], {}
        stop = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=client, args=(port, stop, valid, malformed, i, records))
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=side_probes, args=(port, args.slow, probes)))
        if args.half_open:
            threads.append(threading.Thread(target=half_open, args=(port, args.half_open, stop, probes)))
        [t.start() for t in threads]
        [t.join() for t in threads]
        time.sleep(1.0)  # let closed connections settle before counting fds
        after, ids_after = proc_stats(proc.pid), probe_ids(port)
        probes.update(bomb_probe(proc.pid, port))
    finally:
        proc.terminate()
        proc.wait(30)
    return summarize(cap, records, base, before, after, ids_before == ids_after and bool(ids_before), probes,
                     args.seconds)


def summarize(cap: int, records: list, base: float, before: dict, after: dict, same_ids: bool, probes: dict,
              seconds: float) -> dict:
    hist = collections.Counter(str(s) for _, s, _ in records)
    ok = np.array([t for _, s, t in records if s == 200]) * 1000
    is_4xx = lambda s: isinstance(s, int) and 400 <= s < 500  # noqa: E731
    bad_ok = sum(1 for kind, s, _ in records if kind == "bad" and s != 503 and not is_4xx(s))
    errors_5xx = sum(1 for _, s, _ in records if isinstance(s, int) and s >= 500 and s != 503)
    pct = lambda q: round(float(np.percentile(ok, q)), 1) if ok.size else None  # noqa: E731
    return {"cap": cap, "statuses": dict(sorted(hist.items())), "ok_per_s": round(ok.size / seconds, 1),
            "req_per_s": round(len(records) / seconds, 1), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "baseline_ms": round(base, 1), "malformed_not_4xx": bad_ok, "5xx_not_503": errors_5xx,
            "rss_mib": (before["rss_mib"], after["rss_mib"]),
            "fds": (before["fds"], after["fds"]), "threads": (before["threads"], after["threads"]),
            "same_probe_ids": same_ids, **probes}


def raised_cap(index: Path, model: Path, args: argparse.Namespace, tmp: Path) -> dict:
    """The bomb on an idle server whose pixel cap admits it: what the decode budget alone bounds."""
    proc, port = start(index, model, tmp / "server_raised.log", max_pixels=args.raised_pixels,
                       decode_memory=900 << 20, max_upload_bytes=UPLOAD_CAP)
    try:
        return {"max_pixels": args.raised_pixels, "rss_mib": proc_stats(proc.pid)["rss_mib"],
                **bomb_probe(proc.pid, port)}
    finally:
        proc.terminate()
        proc.wait(30)


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", out)
    flags = re.search(r"Flags:\s*(.+)", out)
    wanted = [f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx512f", "amx", "avx2"))]
    return f"{model.group(1).strip() if model else platform.machine()} ({' '.join(wanted) or 'no avx2'})"


def report(rows: list[dict], args: argparse.Namespace, dim: int, raised: dict) -> str:
    lines = [f"{args.n} x {dim} Flat index, tiny random model, {args.clients} clients x {args.seconds:g} s, "
             f"90 % valid / 10 % malformed, {args.slow} stalled sockets, {args.half_open} half-open header "
             f"sockets (reopened when shed), queue_timeout {args.queue_timeout:g} s; {cpu_model()}, "
             f"{os.cpu_count()} CPUs", "",
             "| max_concurrency | statuses | 200/s | req/s | p50 ms | p95 ms | p99 ms | idle p50 ms "
             "| RSS MiB before→after | fds | 1 MiB body | stalled closed after | same probe ids |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['cap']} | {r['statuses']} | {r['ok_per_s']} | {r['req_per_s']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['p99_ms']} | {r['baseline_ms']} | {r['rss_mib'][0]}→{r['rss_mib'][1]} | "
                     f"{r['fds'][0]}→{r['fds'][1]} | {r.get('1MiB_body')} | {r.get('slow_closed_after_s')} s | "
                     f"{r['same_probe_ids']} |")
    lines += ["", "| max_concurrency | half-open reopened | bomb x4 at once | peak RSS growth MiB | bomb x10 in a row "
              "| RSS change MiB |", "|" + "---|" * 6]
    for r in rows + [dict(raised, cap=f"idle, max_pixels {raised['max_pixels']}")]:
        lines.append(f"| {r['cap']} | {r.get('half_open_reopened', '-')} | {r['bomb_4']} | {r['bomb_4_peak_mib']} | "
                     f"{r['bomb_10']} | {r['bomb_10_rss_mib']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="index size")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--caps", type=int, nargs="+", default=[4, 64], help="max_concurrency values to compare")
    p.add_argument("--queue-timeout", type=float, default=0.05, help="seconds a search may wait for a slot")
    p.add_argument("--slow", type=int, default=20, help="stalled sockets held during each run")
    p.add_argument("--half-open", type=int, default=256, help="sockets holding a partial header line during each run")
    p.add_argument("--raised-pixels", type=int, default=40_000_000, help="pixel cap of the bomb-only server run")
    p.add_argument("--quick", action="store_true", help="20k vectors, 4 s")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.seconds = 20_000, 4.0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, index, dim = build(Path(tmp), args.n)
        print(f"built model + {args.n}-vector index in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = [run_one(index, model, cap, args, Path(tmp)) for cap in args.caps]
        raised = raised_cap(index, model, args, Path(tmp))
    for r in rows + [raised]:
        print(json.dumps(r), file=sys.stderr)
    print(report(rows, args, dim, raised))
    bounded = all(r["bomb_4_peak_mib"] < 600 and abs(r["bomb_10_rss_mib"]) < 100 for r in rows + [raised])
    return 0 if bounded and all(r["malformed_not_4xx"] == r["5xx_not_503"] == 0 and r["same_probe_ids"]
                                for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
