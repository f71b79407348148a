"""`servelm serve`'s live dashboard end to end: the page and its assets (no external ones),
/dashboard/data after real traffic (steps, timelines, derived figures, ``since``), the API key
on the data but not on the page, a dead engine core answered with 503 (not a hang), and the
page itself rendered by headless Chromium against a live server: every chart has drawn data
(a screenshot is kept where $SERVELM_DASHBOARD_SCREENSHOT says, e.g.
benchmarks/results/dashboard.png). Two tiny random Llama servers, started side by side."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model

KEY = "dashboard-test-key"
CHARTS = ("c-batch", "c-tput", "c-reqs", "c-kv", "c-gantt")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium")
                                        else None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-dashboard-model")))


@pytest.fixture(scope="module")
def servers(model_dir):
    """(open server, server with an API key). Few batch slots and a small token budget, so
    requests queue and prompts are chunked: every chart has something to show."""
    args = [model_dir, "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory",
            str(4 << 20), "--served-model-name", "tiny", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "64"]
    with ThreadPoolExecutor(2) as pool:  # both start at once: half the wait
        futs = [pool.submit(ServerProcess, args),
                pool.submit(ServerProcess, args + ["--api-key", KEY])]
    started = [f.result() for f in futs if f.exception() is None]
    if len(started) < 2:
        for srv in started:
            srv.close()
        raise next(f.exception() for f in futs if f.exception() is not None)
    yield started[0], started[1]
    log = started[0].close()
    assert "Traceback" not in log and "never retrieved" not in log, log
    started[1].close()  # its core is killed on purpose (the last test)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def keyed(servers):
    return servers[1]


def complete(base_url: str, prompt: str, max_tokens: int, headers=None) -> dict:
    r = httpx.post(base_url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r, status: int, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- the page ----------------------------------------------------------------------------------
def test_page_and_assets_are_self_contained(server):
    r = httpx.get(server.base_url + "/dashboard", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    for chart in CHARTS:
        assert f'id="{chart}"' in page
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(refs) == ["/dashboard/static/dashboard.css", "/dashboard/static/dashboard.js"]
    types = {"css": "text/css", "js": "text/javascript"}
    for ref in refs:
        a = httpx.get(server.base_url + ref, timeout=10)
        assert a.status_code == 200
        assert a.headers["content-type"].startswith(types[ref.rsplit(".", 1)[1]])
        assert "http:" not in a.text and "https:" not in a.text  # no CDN, no web fonts
    assert "http:" not in page and "https:" not in page
    assert_error(httpx.get(server.base_url + "/dashboard/static/nope.js", timeout=10), 404,
                 "not_found")


# ---- the data ----------------------------------------------------------------------------------
def test_data_after_traffic(server):
    url = server.base_url
    shared = "The quick brown fox jumps over the lazy dog. " * 6  # > 64 tokens: chunked prefill
    for prompt in [shared, shared, "Hello world", "Once upon a time"]:  # the 2nd hits the cache
        complete(url, prompt, 8)
    r = httpx.get(url + "/dashboard/data", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    d = r.json()
    assert d["model"] == "tiny"
    steps, finished = d["steps"], d["finished"]
    assert steps and len(finished) >= 4 and d["num_finished"] >= 4
    assert [s["step"] for s in steps] == list(range(steps[0]["step"], d["num_steps"]))
    assert any(s["num_prefill_tokens"] > 0 for s in steps)
    assert any(s["num_decode_tokens"] > 0 for s in steps)
    assert max(s["num_prefill_tokens"] + s["num_decode_tokens"] for s in steps) <= 64
    for t in finished:
        assert t["arrival_time"] <= t["first_scheduled_time"] <= t["first_token_time"] \
            <= t["finished_time"] <= d["time"]
        assert t["num_output_tokens"] == 8 and t["finish_reason"] == "length"
    ttft, tpot = d["ttft_ms"], d["tpot_ms"]
    assert ttft["count"] >= 4 and 0 <= ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    assert tpot["count"] >= 4 and 0 <= tpot["p50"] <= tpot["p90"] <= tpot["p99"]
    assert d["total_tokens_per_s"] >= d["output_tokens_per_s"] > 0
    assert 0 < d["prefix_cache_hit_rate"] <= 1
    assert d["slo_attainment"] is None and d["num_shed"] == 0  # no request set an SLO
    assert (d["num_running"], d["num_waiting"], d["live"]) == (0, 0, [])

    # since: only the steps after it, the rest of the snapshot as before
    last = d["num_steps"] - 1
    later = httpx.get(url + "/dashboard/data", params={"since": last - 2}, timeout=10).json()
    assert [s["step"] for s in later["steps"]] == [last - 1, last]
    assert httpx.get(url + f"/dashboard/data?since={last}", timeout=10).json()["steps"] == []
    for bad in ["abc", "-2", "1.5", "1" * 30]:
        err = assert_error(httpx.get(url + "/dashboard/data", params={"since": bad}, timeout=10),
                           400)
        assert err["param"] == "since"


def test_data_needs_the_api_key_but_the_page_does_not(keyed):
    url = keyed.base_url
    assert httpx.get(url + "/dashboard", timeout=10).status_code == 200
    assert httpx.get(url + "/dashboard/static/dashboard.js", timeout=10).status_code == 200
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
        assert_error(httpx.get(url + "/dashboard/data", headers=headers, timeout=10), 401,
                     "invalid_api_key")
    auth = {"Authorization": f"Bearer {KEY}"}
    complete(url, "Hello world", 4, headers=auth)
    r = httpx.get(url + "/dashboard/data", headers=auth, timeout=10)
    assert r.status_code == 200 and r.json()["steps"] and r.json()["num_finished"] >= 1


# ---- the page in a browser ---------------------------------------------------------------------
def chromium(url: str, workdir, budget_ms: int, screenshot=None) -> str:
    """The page's DOM after ``budget_ms`` of (virtual) time in headless Chromium."""
    # nice: on a machine of few cores the browser would otherwise starve the engine it watches
    cmd = (["nice", "-n", "10"] if shutil.which("nice") else []) + [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={workdir / 'profile'}", "--window-size=1400,1000",
        # virtual time: the page's 1 s polls run back to back, each waiting for its fetch
        f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    if screenshot is not None:
        cmd.insert(-1, f"--screenshot={screenshot}")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def page_status(dom: str) -> tuple[str, str]:
    m = re.search(r'<span id="status"[^>]*data-state="(\w+)"[^>]*>([^<]*)<', dom)
    assert m, dom[-3000:]
    return m.group(1), m.group(2)


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium): the browser "
                             "tests of /dashboard are skipped")


@needs_chromium
def test_page_asks_for_the_key_in_chromium(keyed, tmp_path):
    dom = chromium(keyed.base_url + "/dashboard", tmp_path, 1500)
    assert page_status(dom)[0] == "auth"
    form = re.search(r'<form id="keyform"[^>]*>', dom).group(0)
    assert "hidden" not in form, form  # shown: the page asks for the key
    assert re.search(r'<input id="apikey" type="password"', dom)


def wait_for_a_finished_request(base_url: str, timeout_s: float = 60.0) -> None:
    start = httpx.get(base_url + "/dashboard/data", timeout=10).json()["num_finished"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if httpx.get(base_url + "/dashboard/data", timeout=10).json()["num_finished"] > start:
            return
    pytest.fail(f"no request finished within {timeout_s:g} s")


class Traffic:
    """Streamed completions of mixed lengths from a few threads, so the page sees requests
    queued, prefilling and decoding while it renders. Leaving cuts the streams (the server
    aborts them): no waiting for long requests on a slow machine."""

    def __init__(self, base_url: str, clients: int = 6) -> None:
        self.base_url, self.stop = base_url, threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                # prompts of 10 to 140 tokens: with 64 new ones within max_model_len (256)
                body = {"model": "tiny", "stream": True, "ignore_eos": True,
                        "prompt": "The quick brown fox " * rng.choice([1, 4, 8, 14]),
                        "max_tokens": rng.choice([16, 32, 64]),
                        # objectives some requests meet and some miss: SLO attainment shows
                        "ttft_slo_ms": rng.choice([50, 400, 5000]), "tpot_slo_ms": 200}
                with c.stream("POST", self.base_url + "/v1/completions", json=body) as r:
                    self.statuses.append(r.status_code)
                    for _ in r.iter_lines():
                        if self.stop.is_set():
                            break

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@needs_chromium
def test_page_renders_live_data_in_chromium(server, tmp_path):
    shot = tmp_path / "dashboard.png"
    dest = os.environ.get("SERVELM_DASHBOARD_SCREENSHOT")
    with Traffic(server.base_url) as traffic:
        wait_for_a_finished_request(server.base_url)  # history for the page's first poll
        if dest:  # a picture to keep: some seconds of history on the time axes, polled as an
            for _ in range(16):  # open page would, so the server keeps every step
                httpx.get(server.base_url + "/dashboard/data", timeout=10)
                time.sleep(0.5)
        dom = chromium(server.base_url + "/dashboard", tmp_path, 4000, screenshot=shot)
    assert traffic.statuses and set(traffic.statuses) == {200}, Counter(traffic.statuses)
    assert page_status(dom)[0] == "live", page_status(dom)
    points = dict(re.findall(r'id="(c-[\w-]+)"[^>]*data-points="(\d+)"', dom))
    assert set(points) == set(CHARTS), points
    assert all(int(n) > 0 for n in points.values()), points
    tiles = dict(re.findall(r'id="(t-[\w-]+)"[^>]*>([^<]*)<', dom))
    assert re.fullmatch(r"[\d.]+k? tok/s", tiles["t-tput"]), tiles
    assert re.fullmatch(r"[\d.]+ m?s", tiles["t-ttft"]), tiles
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if dest:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.copyfile(shot, dest)


# ---- last: it kills the keyed server's engine core ----------------------------------------------
def test_dead_core_is_503_not_a_hang(keyed):
    os.kill(keyed.core_pid(), signal.SIGKILL)
    auth = {"Authorization": f"Bearer {KEY}"}
    t0 = time.monotonic()
    deadline = t0 + 15
    while True:  # the client notices the death within a second or so
        r = httpx.get(keyed.base_url + "/dashboard/data", headers=auth, timeout=15)
        if r.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert_error(r, 503)
    assert time.monotonic() - t0 < 10
