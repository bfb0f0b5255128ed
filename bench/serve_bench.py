"""pipe serve's latent-table queries against pandas doing the same on the same parquet table.

Usage: python bench/serve_bench.py URL PARQUET [ROUNDS]
  URL      a running `pipe serve` (e.g. http://127.0.0.1:8765), serving pipeline `tiny`
  PARQUET  the scale stage's latents.parquet it serves

Prints, per query, the median wall time over ROUNDS of: pipe serve over HTTP (warm: the table is
parsed once and kept), pandas on the DataFrame in memory (the notebook dashboard's workflow), and
the cold variants (pipe serve's first request after a restart is measured by the caller; pandas
read_parquet + query here).
"""
import json
import statistics
import sys
import time
import urllib.request

import pandas as pd

url, parquet = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 20

QUERIES = {
    "chat-only by nu_error": (
        "class=Chat%20only&sort=nu_error&limit=100",
        lambda df: df[df["class"] == "Chat only"].sort_values("nu_error", na_position="last").head(100),
    ),
    "all by frequency, desc": (
        "sort=frequency&desc=1&limit=100",
        lambda df: df.sort_values("frequency", ascending=False, na_position="last").head(100),
    ),
    "frequency band, by max_activation": (
        "min.frequency=0.001&max.frequency=0.5&sort=max_activation&desc=1&limit=100",
        lambda df: df[(df["frequency"] >= 0.001) & (df["frequency"] <= 0.5)]
        .sort_values("max_activation", ascending=False, na_position="last")
        .head(100),
    ),
}


def median_time(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def http(q):
    with urllib.request.urlopen(f"{url}/api/p/tiny/t/scale/latents?{q}") as r:
        return json.loads(r.read())


df = pd.read_parquet(parquet)
print(f"table: {len(df)} latents x {len(df.columns)} columns ({parquet})")
cold_pd = median_time(lambda: pd.read_parquet(parquet), 5)
print(f"pandas read_parquet: {cold_pd * 1e3:.1f} ms")
for name, (q, f) in QUERIES.items():
    page = http(q)
    want = f(df)
    # The same sort-key values in the same order (latents tied on the key may differ).
    key = dict(x.split("=") for x in q.split("&"))["sort"]
    got = [r[page["columns"].index(key)] for r in page["rows"]]
    same = got == [None if pd.isna(x) else x for x in want[key]]
    t_http = median_time(lambda: http(q), rounds)
    t_pd = median_time(lambda: f(df).to_dict("split"), rounds)
    print(
        f"{name:36s} pipe serve (HTTP, warm) {t_http * 1e3:7.2f} ms | pandas in memory {t_pd * 1e3:7.2f} ms"
        f" | ratio pandas/pipe {t_pd / t_http:5.2f}x | total {page['total']} | same rows: {same}"
    )

# A latent page: the row and 10 examples per bucket from examples.db.
top = http("sort=frequency&desc=1&limit=1")
j = top["rows"][0][top["columns"].index("latent")]


def latent_page():
    with urllib.request.urlopen(f"{url}/api/p/tiny/t/scale/latent/{j}?per_bucket=10") as r:
        return r.read()


size = len(latent_page())
print(f"latent {j} page: {median_time(latent_page, rounds) * 1e3:.2f} ms, {size} bytes")


def steer(n):
    body = json.dumps({"prompt": "What is the capital of France?", "latents": [{"latent": j, "strength": 1.0}],
                       "max_new_tokens": n}).encode()
    req = urllib.request.Request(f"{url}/api/p/tiny/t/scale/steer", data=body,
                                 headers={"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        events = [json.loads(line) for line in r.read().decode().splitlines()]
    dt = time.perf_counter() - t
    tokens = sum(e["tokens"] for e in events if e["event"] == "end")
    return tokens, dt


steer(1)  # loads the models and the decoder
tokens, dt = steer(64)
print(f"steering: {tokens} tokens (steered + plain) in {dt:.2f} s = {tokens / dt:.0f} tokens/s")
