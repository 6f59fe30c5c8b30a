"""OpenAI-compatible API: a real server on loopback, driven by the official ``openai`` client and httpx."""

from __future__ import annotations

import base64
import concurrent.futures
import io

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.serve.app import create_app
from orion_mllm.serve.background import BackgroundServer
from orion_mllm.serve.openai_api import ServeConfig
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
