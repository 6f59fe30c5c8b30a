"""OpenAI-compatible API: a real server on loopback, driven by the official ``openai`` client and httpx.

Access control (``--api-key``) is tested in-process with FastAPI's ``TestClient`` (an ``httpx.Client``,
so the ``openai`` client can use it too), and the CLI's key and warning logic without starting a server.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from openai import OpenAI
from PIL import Image

import orion_mllm.cli.serve as serve_cli
from orion_mllm.cli import build_parser, main
from orion_mllm.cli.serve import announce_access, is_loopback, resolve_api_key
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.serve.app import create_app
from orion_mllm.serve.background import BackgroundServer
from orion_mllm.serve.openai_api import ApiKeyCheck, ServeConfig, key_matches
from serve_utils import micro_pipeline


@pytest.fixture(scope="module")
def pipeline() -> OrionPipeline:
    return micro_pipeline()


@pytest.fixture(scope="module")
def server(pipeline):
    srv = BackgroundServer(
        create_app(
            pipeline,
            ServeConfig(
                model_name="orion-micro", max_image_bytes=200_000, max_prompt_tokens=300, max_queue=64
            ),
        )
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _data_url(seed: int = 0, size=(40, 56), fmt="PNG") -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_health_and_chat_with_an_image(client, server):
    assert [m.id for m in client.models.list().data] == ["orion-micro"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url()}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    out = client.chat.completions.create(model="orion-micro", messages=messages, max_tokens=6)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and out.usage.prompt_tokens > 20
    # Streaming gives chunks that add up to the same (greedy) answer.
    stream = client.chat.completions.create(model="orion-micro", messages=messages, max_tokens=6, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == choice.message.content and len(pieces) >= 2


def test_images_generate_and_edit_return_pngs(client):
    res = client.images.generate(model="orion-micro", prompt="a red circle", n=2, response_format="b64_json")
    imgs = [_png(d.b64_json) for d in res.data]
    assert [im.size for im in imgs] == [(48, 48), (48, 48)] and imgs[0].format == "PNG"
    src = io.BytesIO(base64.b64decode(_data_url(3).split(",", 1)[1]))
    edited = client.images.edit(
        model="orion-micro", image=("src.png", src, "image/png"), prompt="make it blue"
    )
    assert _png(edited.data[0].b64_json).size == (48, 48)


@pytest.mark.parametrize(
    "path, kwargs, status, message",
    [
        (
            "/v1/chat/completions",
            {
                "json": {
                    "model": "orion-micro",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "data:image/png;base64,@@notbase64@@"},
                                }
                            ],
                        }
                    ],
                }
            },
            400,
            "invalid base64",
        ),
        (
            "/v1/chat/completions",
            {
                "json": {
                    "model": "orion-micro",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": _data_url(1, size=(400, 400))}}
                            ],
                        }
                    ],
                }
            },
            413,
            "over the limit of 200000",
        ),
        (
            "/v1/chat/completions",
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "send application/json",
        ),
        (
            "/v1/chat/completions",
            {"json": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}},
            404,
            "model 'gpt-4o' does not exist",
        ),
        ("/v1/chat/completions", {"json": {"model": "orion-micro", "messages": []}}, 400, "non-empty list"),
        (
            "/v1/chat/completions",
            {"json": {"model": "orion-micro", "messages": [{"role": "user", "content": "word " * 400}]}},
            400,
            "over this server's limit of 300",
        ),
        (
            "/v1/chat/completions",
            {
                "json": {
                    "model": "orion-micro",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
                            ],
                        }
                    ],
                }
            },
            400,
            "only base64 data URLs",
        ),
        (
            "/v1/images/generations",
            {"json": {"model": "orion-micro", "prompt": "x", "size": "1024x1024"}},
            400,
            "this model generates 48x48",
        ),
        (
            "/v1/images/generations",
            {"json": {"model": "orion-micro", "prompt": "x", "response_format": "url"}},
            400,
            "use 'b64_json'",
        ),
        (
            "/v1/images/generations",
            {"json": {"model": "orion-micro", "prompt": "x", "guidance": "strong"}},
            400,
            "guidance: 'strong' is not a number",
        ),
        (
            "/v1/images/generations",
            {"json": {"model": "orion-micro", "prompt": "x", "guidance": -2}},
            400,
            "guidance: -2 is outside 0..20",
        ),
        (
            "/v1/images/edits",
            {"files": {"image": ("a.txt", b"plain text", "text/plain")}, "data": {"prompt": "x"}},
            400,
            "is not an image type",
        ),
    ],
)
def test_bad_requests_get_openai_style_errors(server, path, kwargs, status, message):
    r = httpx.post(server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving


def test_concurrent_generations_are_batched_and_equal_single_ones(server, pipeline):
    body = {"model": "orion-micro", "prompt": "a blue square", "seed": 7}
    single = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120).json()["data"][0][
        "b64_json"
    ]
    before = server.app.state.api.scheduler.batches_run

    def one(_):
        return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r.status_code == 200 for r in results)
    decoded = [np.asarray(_png(r.json()["data"][0]["b64_json"])) for r in results]
    ref = np.asarray(_png(single))
    assert all(np.abs(d.astype(int) - ref.astype(int)).max() <= 1 for d in decoded)
    batches = server.app.state.api.scheduler.batches_run - before
    assert batches < 16  # requests shared engine batches


def test_a_full_queue_answers_429(pipeline):
    srv = BackgroundServer(
        create_app(pipeline, ServeConfig(model_name="orion-micro", max_queue=2, batch_wait_s=0.3))
    )
    try:
        body = {"model": "orion-micro", "prompt": "a green star"}

        def one(_):
            return httpx.post(f"{srv.url}/v1/images/generations", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            codes = [r.status_code for r in pool.map(one, range(16))]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2
        assert one(0).status_code == 200  # and it serves again once the queue drains
    finally:
        srv.stop()


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(pipeline):
    srv = BackgroundServer(
        create_app(pipeline, ServeConfig(model_name="orion-micro", request_timeout_s=0.001, batch_wait_s=0.2))
    )
    try:
        r = httpx.post(f"{srv.url}/v1/images/generations", json={"model": "orion-micro", "prompt": "a star"})
        assert r.status_code == 504 and "longer than 0.001 s" in r.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    finally:
        srv.stop()


def test_image_guidance_parameter_reaches_the_engine(server, pipeline):
    """``guidance`` (token-space CFG) changes the image; 1 equals the default of this untrained model."""
    body = {"model": "orion-micro", "prompt": "a blue square", "seed": 3}

    def png(**extra) -> str:
        r = httpx.post(f"{server.url}/v1/images/generations", json={**body, **extra}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    assert pipeline.default_guidance == 1.0
    assert png() == png(guidance=1)
    assert png(guidance=4) != png()


# ---------------------------------------------------------------------------------------------- API key

KEY = "sk-test-Zq8 key/+="  # a space, a slash, base64 padding: the token is compared whole, never parsed
MISSING = "missing API key: send the header 'Authorization: Bearer YOUR_KEY'"
WRONG_SCHEME = "the Authorization header must use the Bearer scheme: 'Authorization: Bearer YOUR_KEY'"
WRONG_KEY = "incorrect API key"


def _bearer(key: str) -> dict:
    return {"authorization": b"Bearer " + key.encode()}


@pytest.fixture(scope="module")
def keyed(pipeline):
    """The API with a key, in-process (the lifespan runs, so requests that pass the check are served)."""
    app = create_app(pipeline, ServeConfig(model_name="orion-micro", api_key=KEY))
    with TestClient(app) as c:
        yield c


_CHAT = {"model": "orion-micro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
_PNG = base64.b64decode(_data_url().split(",", 1)[1])
# Requests that would succeed with the key, so a route left unprotected shows as a 200.
_ROUTES = [
    ("GET", "/v1/models", {}),
    ("POST", "/v1/chat/completions", {"json": _CHAT}),
    ("POST", "/v1/images/generations", {"json": {"model": "orion-micro", "prompt": "a red circle"}}),
    ("POST", "/v1/images/edits", {"files": {"image": ("a.png", _PNG, "image/png")}, "data": {"prompt": "x"}}),
    ("GET", "/v1/no-such-route", {}),
    ("POST", "/v1", {}),
    ("GET", "/v1/chat/completions", {}),  # a known path with the wrong method: 401, not 405
    ("GET", "/openapi.json", {}),  # outside /v1 but the API app's: it lists the routes
    ("GET", "/no-such-page", {}),
]
_BAD_CREDENTIALS = [
    ({}, MISSING),
    (_bearer("wrong"), WRONG_KEY),
    (_bearer(KEY[:-1]), WRONG_KEY),
    (_bearer(KEY + "x"), WRONG_KEY),
    ({"authorization": "Bearer "}, WRONG_KEY),
    ({"authorization": b"Basic " + base64.b64encode(b"user:" + KEY.encode())}, WRONG_SCHEME),
    ({"authorization": KEY.encode()}, WRONG_SCHEME),
    ({"x-api-key": KEY.encode()}, MISSING),
]


@pytest.mark.parametrize("headers, message", _BAD_CREDENTIALS)
@pytest.mark.parametrize("method, path, kwargs", _ROUTES)
def test_with_a_key_every_route_refuses_a_request_without_it(keyed, method, path, kwargs, headers, message):
    r = keyed.request(method, path, headers=headers, **kwargs)
    assert r.status_code == 401, r.text
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    assert r.json() == {"error": error}
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY.encode() not in r.content and b"sk-test" not in r.content


def test_with_the_right_key_requests_are_served(keyed):
    r = keyed.get("/v1/models", headers=_bearer(KEY))
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["orion-micro"]
    r = keyed.get("/v1/models", headers={"authorization": b"bearer  " + KEY.encode()})  # scheme: any case
    assert r.status_code == 200
    r = keyed.get("/v1/no-such-route", headers=_bearer(KEY))
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # The official client's api_key= is the Bearer header.
    client = OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=keyed, max_retries=0)
    out = client.chat.completions.create(
        model="orion-micro", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens >= 1
    wrong = OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_with_a_key_health_stays_open(keyed):
    for headers in ({}, _bearer("wrong")):
        r = keyed.get("/health", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "orion-micro"


def test_without_a_key_nothing_is_checked(pipeline):
    app = create_app(pipeline, ServeConfig(model_name="orion-micro"))
    assert not any(m.cls is ApiKeyCheck for m in app.user_middleware)
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models", headers=_bearer("anything")).status_code == 200
        assert c.get("/v1/no-such-route").status_code == 404


def test_the_key_stays_out_of_the_config_repr():
    assert "api_key" not in repr(ServeConfig(api_key=KEY)) and KEY not in repr(ServeConfig(api_key=KEY))
    with pytest.raises(ValueError, match="non-empty"):
        ApiKeyCheck(None, api_key="", self_authenticating=list)


def test_key_matches_compares_whole_keys_as_bytes():
    assert key_matches("clé", "clé") and key_matches("clé".encode(), "clé")
    assert not key_matches("cle", "clé") and not key_matches("", "k") and not key_matches("k ", "k")


def test_cli_api_key_comes_from_the_flag_else_the_environment(monkeypatch, capsys):
    assert resolve_api_key("flag", {"ORION_API_KEY": "env"}) == "flag"
    assert resolve_api_key(None, {"ORION_API_KEY": "env"}) == "env"
    assert resolve_api_key("", {"ORION_API_KEY": "env"}) is None  # an empty flag: no key
    assert resolve_api_key(None, {"ORION_API_KEY": ""}) is None
    assert resolve_api_key(None, {}) is None
    monkeypatch.setenv("ORION_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.api_key is None and resolve_api_key(args.api_key) == "from-env"
    args = build_parser().parse_args(["serve", "--model", "m", "--api-key", "k1"])
    assert resolve_api_key(args.api_key) == "k1"
    monkeypatch.delenv("ORION_API_KEY")
    assert resolve_api_key(build_parser().parse_args(["serve", "--model", "m"]).api_key) is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--api-key KEY" in help_text and "$ORION_API_KEY" in help_text and "empty string" in help_text


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
        ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("128.0.0.1", False),
        ("192.168.1.20", False), ("10.0.0.1", False), ("example.com", False), ("localhost.example", False),
    ],
)  # fmt: skip
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_cli_warns_when_serving_beyond_loopback_without_a_key(capsys):
    announce_access("0.0.0.0", 8123, None)
    out, err = capsys.readouterr()
    assert out == "no API key: every request is accepted\n"
    assert err.count("\n") == 1 and err.startswith("warning: serving on 0.0.0.0 without an API key")
    assert "anyone who can reach port 8123 can use the model" in err
    assert "ORION_API_KEY=KEY" in err and "--api-key KEY" in err
    announce_access("127.0.0.1", 8123, None)
    out, err = capsys.readouterr()
    assert out == "no API key: every request is accepted\n" and err == ""
    announce_access("0.0.0.0", 8123, "s3cret-key")
    out, err = capsys.readouterr()
    assert out.startswith("API key required: 'Authorization: Bearer KEY'") and err == ""
    assert "s3cret" not in out


def test_cli_serve_passes_the_key_to_the_app_and_never_prints_it(pipeline, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr(serve_cli, "load_pipeline", lambda args: pipeline)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("ORION_API_KEY", "env-key-123")
    assert main(["serve", "--model", "m", "--host", "0.0.0.0", "--port", "8124", "--no-web"]) == 0
    out, err = capsys.readouterr()
    assert "API key required" in out and err == "" and "env-key-123" not in out + err
    assert served["host"] == "0.0.0.0" and served["port"] == 8124
    with TestClient(served["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers=_bearer("env-key-123")).status_code == 200
    monkeypatch.delenv("ORION_API_KEY")
    assert main(["serve", "--model", "m", "--host", "0.0.0.0", "--no-web"]) == 0
    out, err = capsys.readouterr()
    assert "no API key" in out and err.startswith("warning: serving on 0.0.0.0 without an API key")
    with TestClient(served["app"]) as c:
        assert c.get("/v1/models").status_code == 200
