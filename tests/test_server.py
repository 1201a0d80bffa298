"""`dspark serve` end to end: a real server process on a free loopback port, driven over HTTP.

One server (bundled target copied with a chat template added, bundled DSpark drafter, 1 slot,
queue of 1) serves every test in this module: streaming and non-streaming completions equal
greedy `generate()`, chat through the template, OpenAI-shaped 400/404/429 errors, cancellation
when a client disconnects (the queued request then gets the slot), Prometheus metrics, and a
graceful shutdown on SIGTERM that lets the in-flight request finish. The "no chat template" 400
and stop strings are checked on the app in process (no engine needed for them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TARGET, DRAFT = REPO / "models" / "pystd-qwen3-target", REPO / "models" / "pystd-dspark-k7"
PROMPT = "def add(a, b):\n"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
START_TIMEOUT_S = 600  # model load + compile on a loaded 2-core machine


def _target_with_chat_template(root: Path) -> Path:
    out = root / "pystd-chat"
    out.mkdir()
    for f in TARGET.iterdir():
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg["chat_template"] = CHAT_TEMPLATE
            (out / f.name).write_text(json.dumps(cfg))
        else:
            os.symlink(f, out / f.name)
    return out


class _Server:
    def __init__(self, proc: subprocess.Popen, url: str, target_dir: Path):
        self.proc, self.url, self.target_dir = proc, url, target_dir
        self.log: list[str] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    target_dir = _target_with_chat_template(tmp_path_factory.mktemp("serve"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "dspark_cli.main", "serve", "--target", str(target_dir), "--draft", str(DRAFT),
           "--slots", "1", "--max-queue", "1", "--max-len", "1024", "--host", "127.0.0.1", "--port", "0",
           "--shutdown-grace", "30", "--model-name", "pystd"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m and not found.is_set():
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not found.wait(1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("server did not start:\n" + "".join(lines[-30:]))
    srv = _Server(proc, url[0], target_dir)
    srv.log = lines
    for _ in range(100):  # the socket is bound before uvicorn's loop runs: wait for /health
        try:
            if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield srv
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _sse(resp) -> list[dict]:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def _first_data(lines) -> dict:
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("stream ended without data")


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def reference_text():
    from dspark_jax.sampling import SamplingConfig
    from infer import generate, load_target_bundle

    target = load_target_bundle(TARGET)
    return generate(target, [PROMPT], max_new_tokens=24, sampling=SamplingConfig(temperature=0.0)).texts[0]


def test_models_and_health(server):
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "pystd"
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["policy"] == "dspark" and health["slots"] == 1


def test_greedy_stream_and_non_stream_equal_generate(server, reference_text):
    body = {"model": "pystd", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=300) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(resp)
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == reference_text
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    usage = final["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 24
    assert usage["speculative"]["acceptance_length"] >= 1.0 and usage["speculative"]["rounds"] >= 1
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "text_completion" and data["choices"][0]["text"] == reference_text
    assert data["usage"]["completion_tokens"] == usage["completion_tokens"]


def test_chat_completion_through_template(server):
    body = {"messages": [{"role": "user", "content": "write a function"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    data = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300).json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] == 8 and data["choices"][0]["finish_reason"] == "length"
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=300) as r:
        chunks = _sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == data["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body,status,param", [
    ({"max_tokens": 4}, 400, "prompt"),                                     # missing prompt
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),               # longer than a slot
    ({"prompt": [999999]}, 400, "prompt"),                                  # id outside the vocabulary
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_invalid_requests_get_openai_errors(server, body, status, param):
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param


def test_queue_full_429_and_disconnect_frees_the_slot(server):
    url = server.url + "/v1/completions"
    long = {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    cancelled0 = _metric(server.url, "dspark_requests_finished_total", '{finish_reason="cancelled"}')
    with httpx.Client(timeout=120) as a_client, httpx.Client(timeout=120) as b_client:
        with a_client.stream("POST", url, json=long) as a:  # takes the only slot
            assert a.status_code == 200
            a_lines = a.iter_lines()  # keep it: a dropped line iterator closes the connection
            _first_data(a_lines)  # its first token arrived: it is running
            with b_client.stream("POST", url, json=long) as b:  # waits in the queue (size 1)
                assert b.status_code == 200
                c = httpx.post(url, json=long | {"stream": False}, timeout=60)
                assert c.status_code == 429, c.text
                assert c.json()["error"]["type"] == "rate_limit_error" and c.json()["error"]["code"] == "queue_full"
                a.close()  # client A disconnects: its request is cancelled, B takes the slot
                deadline = time.monotonic() + 120
                while _metric(server.url, "dspark_requests_finished_total",
                              '{finish_reason="cancelled"}') < cancelled0 + 1:
                    assert time.monotonic() < deadline, "disconnect did not cancel the request"
                    time.sleep(0.1)
                b_lines = b.iter_lines()
                assert _first_data(b_lines)["choices"][0]["finish_reason"] is None
    deadline = time.monotonic() + 120
    while _metric(server.url, "dspark_requests_finished_total", '{finish_reason="cancelled"}') < cancelled0 + 2:
        assert time.monotonic() < deadline, "B's disconnect did not cancel it"
        time.sleep(0.1)
    assert _metric(server.url, "dspark_active_slots") == 0 or httpx.get(server.url + "/health").json()["in_flight"] == 0


def test_prometheus_metrics(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("dspark_generation_tokens_total", "dspark_acceptance_length", "dspark_mean_verify_budget",
                 "dspark_queue_depth", "dspark_tokens_per_second", "dspark_time_to_first_token_seconds_bucket",
                 "dspark_time_per_output_token_seconds_bucket", 'dspark_requests_rejected_total{reason="queue_full"}'):
        assert name in text, name
    assert _metric(server.url, "dspark_acceptance_length") >= 1.0
    assert _metric(server.url, "dspark_generation_tokens_total") > 0


def test_bench_serve_against_the_server(server, tmp_path, capsys):
    from dspark_cli.bench_serve_cmd import main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--url", server.url, "--requests", "3", "--rate", "inf", "--max-tokens", "6", "--warmup", "0",
                       "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]  # 1 slot + a queue of 1: a burst of 3 may see a 429
    assert row["ok"] >= 1 and row["ok"] + row["rejected_429"] == 3 and row["errors"] == 0
    assert row["tokens"] == 6 * row["ok"] and row["policy"] == "dspark" and row["mode"] == "http"
    assert row["throughput_tok_s"] > 0 and row["tau"] >= 1.0 and row["ttft_ms_p50"] > 0
    assert bench_main(["--url", "http://127.0.0.1:9", "--requests", "1"]) == 2  # nothing listens there
    assert "no dspark server answers /health" in capsys.readouterr().err


def test_graceful_shutdown_finishes_in_flight(server):
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as resp:
        lines = resp.iter_lines()
        _first_data(lines)
        server.proc.send_signal(signal.SIGTERM)
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 40
    assert server.proc.wait(timeout=60) == 0
    assert any("server stopped" in line for line in server.log)


def test_app_errors_and_stop_strings_in_process():
    """No chat template -> 400 naming it; stop strings cut the text (the app over a stub runner)."""
    import asyncio

    from infer.engine import RequestOutput
    from infer.server.app import _TextStream, create_app
    from infer.server.metrics import ServerMetrics

    class Tok:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

        def encode(self, text):
            return [ord(c) for c in text]

    class Target:
        tokenizer = Tok()

    class Runner:
        alive = accepting = True
        in_flight = 0

    app = create_app(Runner(), target=Target(), model_name="m", chat_template=None, metrics=ServerMetrics())

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})

    resp = asyncio.run(go())
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "no_chat_template"
    ts = _TextStream(Tok(), ["END"])
    assert ts.add([ord(c) for c in "abcE"]) == ("ab", False)  # "cE" held back: could start "END"
    assert ts.add([ord(c) for c in "NDxyz"]) == ("c", True)
    assert RequestOutput  # the runner hands RequestOutput objects to the app


def test_serve_bad_options_one_line_errors(tmp_path, capsys):
    from dspark_cli.serve_cmd import main as serve_main

    assert serve_main(["--target", str(tmp_path / "nope")]) == 2
    assert "--target directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        serve_main(["--port", "70000"])
    assert exc.value.code == 2
