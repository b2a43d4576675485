"""`kiln serve` against the official openai client, on loopback, with the SmolLM2 model:
the endpoints, streaming, stops, errors, authentication, parallel slots and disconnects."""
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (extra dev)")

KEY = "test-key-123"
START_TIMEOUT = 120
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours of the rainbow."}]


class Server:
    def __init__(self, model, *args):
        cmd = [sys.executable, "-m", "engine", "serve", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        deadline = time.monotonic() + START_TIMEOUT
        self.lines = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("kiln serve exited: " + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"on http://([\d.]+):(\d+)", line)
            if m:
                self.url = f"http://{m[1]}:{m[2]}"
                break
            if time.monotonic() > deadline:
                raise RuntimeError("kiln serve did not start")

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def get(self, path, key=KEY):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()

    def post_raw(self, path, body: bytes, key=KEY, headers=None):
        h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=body, headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "--api-key", KEY, "--parallel", "4", "--threads", "1", "--ctx", "512",
               "--max-body", "65536")
    yield s
    s.close()
    assert s.proc.returncode is not None


def test_completion_and_models(server):
    c = server.client()
    r = c.completions.create(model="kiln", prompt="The capital of France is", max_tokens=8, temperature=0)
    ch = r.choices[0]
    assert ch.text and ch.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ids = [m.id for m in c.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1"]


def test_completion_matches_the_library(server, smollm2_path):
    """The server's greedy text is LLM.generate's for the same prompt."""
    from engine import LLM
    r = server.client().completions.create(model="kiln", prompt="Once upon a time", max_tokens=20,
                                           temperature=0)
    with LLM(smollm2_path, n_ctx=512, n_threads=1) as llm:
        want = llm.generate("Once upon a time", max_tokens=20, temperature=0).text
    assert r.choices[0].text == want


def test_chat_stream_concatenates_to_the_plain_reply(server):
    c = server.client()
    plain = c.chat.completions.create(model="kiln", messages=CHAT, max_tokens=40, temperature=0)
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant" and text
    chunks = list(c.chat.completions.create(model="kiln", messages=CHAT, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # the chat template's end of turn never shows up in the text
    assert "<|im_end|>" not in text


def test_stop_sequence_is_never_emitted(server):
    c = server.client()
    base = c.completions.create(model="kiln", prompt="1, 2, 3, 4,", max_tokens=24, temperature=0).choices[0].text
    # stop at a piece of text the greedy reply is known to contain
    stop = base.strip()[2:5] if len(base.strip()) >= 5 else base.strip()[:1]
    assert stop and stop in base
    r = c.completions.create(model="kiln", prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[stop])
    out = r.choices[0].text
    assert stop not in out and r.choices[0].finish_reason == "stop"
    assert base.startswith(out)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="kiln", prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert streamed == out


def test_completion_logprobs(server, smollm2_path):
    """logprobs: each generated token's log probability under the model (log-softmax of
    its logits) and the most likely alternatives, as the library computes them."""
    import numpy as np
    from engine import LLM
    r = server.client().completions.create(model="kiln", prompt="The capital of France is",
                                           max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    with LLM(smollm2_path, n_ctx=512, n_threads=1) as llm:
        ids = llm.tokenize("The capital of France is", special=True)
        out = llm.generate(ids, max_tokens=5, temperature=0)
        logits = llm.logits(ids + out.tokens[:-1])[len(ids) - 1:]
    for i, (tok, row) in enumerate(zip(out.tokens, logits)):
        x = row.astype(np.float64)
        want = x[tok] - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert abs(lp.token_logprobs[i] - want) < 1e-9
        # greedy: the chosen token is the most likely one, so it leads its alternatives
        assert len(lp.top_logprobs[i]) == 3
        assert max(lp.top_logprobs[i].values()) == lp.token_logprobs[i]
    assert "".join(lp.tokens).startswith(r.choices[0].text)
    status, out = server.post_raw("/v1/completions", b'{"prompt": "hi", "logprobs": 9}')
    assert status == 400


def test_authentication(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").models.list()
    assert e.value.status_code == 401 and "not valid" in str(e.value)
    status, body = server.post_raw("/v1/completions", b'{"prompt": "hi"}', key="")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    # health needs no key
    assert json.loads(server.get("/health", key="")[1])["status"] == "ok"


def test_bad_requests_get_400_with_an_error_object(server):
    for body in (b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": "hi", "max_tokens": -1}',
                 b'{"prompt": "hi", "temperature": "hot"}', b'{"prompt": "hi", "n": 3}',
                 b'{"prompt": "hi", "top_p": 7}', b'{"prompt": [999999999]}', b'{"prompt": ""}',
                 b'{"prompt": "hi", "echo": true}', b'{"prompt": "hi", "logprobs": -1}'):
        status, out = server.post_raw("/v1/completions", body)
        assert status == 400, (body, out)
        assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"], body
    status, out = server.post_raw("/v1/chat/completions", b'{"messages": []}')
    assert status == 400
    status, out = server.post_raw("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}')
    assert status == 400 and "role" in out["error"]["message"]


def test_over_long_prompt_gives_both_lengths(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="kiln", prompt="hello " * 600, max_tokens=4)
    msg = str(e.value)
    assert "512" in msg and re.search(r"prompt is \d+ tokens", msg)


def test_oversized_body_is_refused(server):
    status, out = server.post_raw("/v1/completions", json.dumps({"prompt": "x" * 70000}).encode())
    assert status == 413 and "limit" in out["error"]["message"]
    # the same without a Content-Length (chunked transfer)
    import http.client
    host, port = server.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    for k, v in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                 ("Transfer-Encoding", "chunked")):
        conn.putheader(k, v)
    conn.endheaders()
    piece = b"x" * 8192
    try:
        for _ in range(10):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
    except OSError:  # the server may answer and close before the whole body is sent
        pass
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]["message"]
    conn.close()
    # a small chunked body still works
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
    conn.putrequest("POST", "/v1/completions")
    for k, v in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                 ("Transfer-Encoding", "chunked")):
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] is not None
    conn.close()


def _batch_counters(server):
    text = server.get("/metrics")[1]
    return [int(re.search(rf"{name} (\d+)", text)[1])
            for name in ("kiln_batch_steps_total", "kiln_batch_slot_steps_total")]


def test_batched_decoding_is_exact(server, smollm2_path):
    """More requests than slots, decoded together in batches: each gets exactly the
    tokens it gets alone (LLM.generate in this process), and the steps did carry several
    slots at once."""
    from engine import LLM
    prompts = ["The sky is", "My favourite food is", "Python is a", "In 1969,", "The ocean", "Cats"]
    with LLM(smollm2_path, n_ctx=512, n_threads=1) as llm:
        alone = [llm.generate(p, max_tokens=24, temperature=0).text for p in prompts]
    c = server.client()
    steps0, slot_steps0 = _batch_counters(server)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(lambda p: c.completions.create(
            model="kiln", prompt=p, max_tokens=24, temperature=0).choices[0].text, prompts))
    assert together == alone
    steps, slot_steps = (b - a for a, b in zip((steps0, slot_steps0), _batch_counters(server)))
    assert slot_steps > steps, "no step decoded more than one slot"


def test_a_client_that_goes_away_frees_its_slot(server):
    c = server.client()
    stream = c.chat.completions.create(model="kiln", messages=CHAT, max_tokens=400, temperature=0.8,
                                       seed=1, stream=True)
    it = iter(stream)
    next(it), next(it)
    stream.close()
    deadline = time.monotonic() + 60
    while json.loads(server.get("/health")[1])["slots_busy"] != 0:
        assert time.monotonic() < deadline, "the slot of a closed stream is still busy"
        time.sleep(0.2)
    # and the server still answers
    assert c.completions.create(model="kiln", prompt="Hi", max_tokens=2, temperature=0).choices[0].text


def test_metrics_count_requests_and_tokens(server):
    c = server.client()
    c.completions.create(model="kiln", prompt="Count", max_tokens=3, temperature=0)
    status, text = server.get("/metrics")
    assert status == 200
    ok = re.search(r'kiln_requests_total\{endpoint="/v1/completions",status="200"\} (\d+)', text)
    assert ok and int(ok[1]) >= 1
    assert int(re.search(r"kiln_generated_tokens_total (\d+)", text)[1]) >= 3
    assert re.search(r"kiln_slots 4\b", text)
    assert re.search(r"kiln_time_to_first_token_seconds_count [1-9]", text)


def test_chat_page_is_served(server):
    status, page = server.get("/", key="")
    assert status == 200 and "/v1/chat/completions" in page and "<script" in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


def test_serve_refuses_bad_arguments(smollm2_path):
    for args in (["--parallel", "0"], ["--ctx", "-5"], ["--port", "70000"], ["--timeout", "0"],
                 ["--timeout", "nan"], ["--timeout", "inf"]):
        r = subprocess.run([sys.executable, "-m", "engine", "serve", str(smollm2_path), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "must be" in r.stderr and "Traceback" not in r.stderr, args
