"""Token budgets through the OpenAI routes, across two gateway processes: the shape of
``tests/test_admission.py``'s exact-budget test, with tokens (issue 17, Done-when 3).

No worker runs, so every admitted request stays queued until its short deadline: nothing is
settled or refunded while the burst is counted, and a request either passed admission (it waits,
then answers 504) or was refused at once (429)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion.demo import text_models as demo
from bastion.text.chat import Message
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.tokenizer import load_tokenizer
from tests.support import Stack, running, wait_until

TEXT = "tokens are counted before a request is queued"
BURSTING = {"max_connections_per_client": 2048}


@pytest.fixture(scope="module")
def no_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("tokens"), workers=0, gateways=2, **BURSTING) as stack:
        stack.admin.register(
            demo.ENCODER_NAME,
            demo.encoder_onnx(),
            tokenizer=demo.tokenizer_json(),
            text={"task": "embedding", "config": demo.embedding_config()},
        )
        stack.admin.register(
            demo.CHAT_NAME,
            demo.causal_lm_onnx(),
            tokenizer=demo.tokenizer_json(),
            text={"task": "generation", "config": demo.generation_config()},
        )
        yield stack


def _tokens(text: str) -> int:
    config = EmbeddingConfig.from_dict(demo.embedding_config())
    tokenizer = load_tokenizer(demo.tokenizer_json(), config.special)
    return len(tokenizer.encode(text, add_special_tokens=config.add_special_tokens))


def _key(stack: Stack, tenant: str, **limits: Any) -> str:
    stack.admin.set_tenant(tenant, None, limits=limits)
    key: str = stack.admin.create_key(tenant, "tokens")["key"]

    def known_everywhere() -> bool:  # the key and the text models are known to both gateways
        return all(
            httpx.get(f"{url}/v1/models/{demo.ENCODER_NAME}", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
            for url in stack.gateway_urls
        )

    wait_until(known_everywhere, 20, "both gateways to know the new key and the text models")
    return key


async def _burst(stack: Stack, key: str, path: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send every body at once, alternating between the two gateways; admitted ones wait 3 s."""
    limits = httpx.Limits(max_connections=1000)
    headers = {"Authorization": f"Bearer {key}", "X-Bastion-Timeout-Ms": "3000"}
    clients = [
        httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) for url in stack.gateway_urls
    ]
    try:
        return list(await asyncio.gather(*(clients[i % 2].post(path, json=body) for i, body in enumerate(bodies))))
    finally:
        for c in clients:
            await c.aclose()


def test_a_token_budget_admits_exactly_its_tokens_across_two_gateways(no_workers: Stack) -> None:
    per_request = _tokens(TEXT)
    budget = per_request * 50
    key = _key(no_workers, "tokens-exact", tokens_per_min=0, tokens_burst=budget)  # no refill meanwhile
    body = {"model": demo.ENCODER_NAME, "input": TEXT}
    answers = asyncio.run(_burst(no_workers, key, "/v1/embeddings", [body] * 400))
    admitted = [r for r in answers if r.status_code == 504]  # passed admission, then waited for no worker
    refused = [r for r in answers if r.status_code == 429]
    others = Counter((r.status_code, r.text[:160]) for r in answers if r.status_code not in (504, 429))
    assert not others, others
    print(f"400 concurrent {per_request}-token requests, budget {budget}: {len(admitted)} admitted")
    assert len(admitted) == 50 and len(refused) == 350
    for r in refused[:50]:
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and "token budget is spent" in error["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-policy"].startswith(f'"tenant-model-tokens";q={budget};w=')
        assert r.headers["ratelimit"].startswith('"tenant-model-tokens";r=')


def test_a_chat_request_reserves_its_prompt_and_max_tokens_across_two_gateways(no_workers: Stack) -> None:
    """Each request reserves prompt + max_tokens: with random max_tokens, the admitted reservations
    never pass the budget, and every refused one would have."""
    key = _key(no_workers, "tokens-chat", tokens_per_min=0, tokens_burst=5000)
    bodies = [
        {"model": demo.CHAT_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10 + (i * 37) % 90}
        for i in range(200)
    ]
    answers = asyncio.run(_burst(no_workers, key, "/v1/chat/completions", bodies))
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {504, 429}, statuses
    admitted = [b["max_tokens"] for b, r in zip(bodies, answers, strict=True) if r.status_code == 504]
    refused = [b["max_tokens"] for b, r in zip(bodies, answers, strict=True) if r.status_code == 429]
    assert admitted and refused
    # the prompt's tokens: the same for every request (the rendered template with its pinned system prompt)
    prompt = _prompt_tokens()
    reserved = sum(prompt + m for m in admitted)
    assert reserved <= 5000
    assert min(prompt + m for m in refused) > 5000 - reserved


def _prompt_tokens() -> int:
    """The prompt tokens of the chat body above: its template rendered with the pinned system prompt
    (the model has no guard policy, so no canary marker is added)."""
    config = GenerationConfig.from_dict(demo.generation_config())
    tokenizer = load_tokenizer(demo.tokenizer_json(), config.special)
    assert config.chat_template is not None
    return len(config.chat_template.encode(tokenizer, [Message("user", "Hi")]))
