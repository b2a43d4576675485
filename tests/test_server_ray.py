"""kiln serve as a Ray Serve deployment: Ray on this machine, two replicas with one
thread each, answers through Ray Serve's HTTP proxy with the openai client."""
import socket

import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve test needs ray[serve] (extra ray)")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve test needs ray[serve] (extra ray)")
openai = pytest.importorskip("openai", reason="the server tests need the openai client (extra dev)")

pytestmark = pytest.mark.oracle


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_endpoint(smollm2_path):
    from engine.cli.serve.ray_serve import deployment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(smollm2_path, num_replicas=2, threads=1, parallel=2, n_ctx=512),
                  name="kiln", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_through_the_proxy(ray_endpoint, smollm2_path):
    from engine import LLM
    client = openai.OpenAI(base_url=ray_endpoint + "/v1", api_key="none", max_retries=2, timeout=120)
    prompts = ["The sky is", "Python is a", "In 1969,", "Cats"]
    with LLM(smollm2_path, n_ctx=512, n_threads=1) as llm:
        want = [llm.generate(p, max_tokens=12, temperature=0).text for p in prompts]
    got = [client.completions.create(model="kiln", prompt=p, max_tokens=12, temperature=0).choices[0].text
           for p in prompts]
    assert got == want
    chat = client.chat.completions.create(model="kiln", messages=[{"role": "user", "content": "Hi!"}],
                                          max_tokens=16, temperature=0)
    assert chat.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="kiln", messages=[{"role": "user", "content": "Hi!"}], max_tokens=16, temperature=0,
        stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content
    # both replicas are up
    status = serve.status().applications["kiln"].deployments["kiln"]
    assert status.replica_states.get("RUNNING", 0) == 2
