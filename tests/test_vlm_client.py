"""Routing, retries and usage accounting of VllmVerifier. The network is replaced by
httpx.MockTransport (a fake of what the client calls); vLLM itself is exercised in
test_integration_vllm.py."""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from PIL import Image

from catcascade.vlm_stage.vllm_client import VlmClientConfig, VllmVerifier, VlmUnavailableError

CANDIDATES = ("Persian", "Siamese", "Bengal")
IMAGE = Image.new("RGB", (40, 30), (10, 200, 30))


VOCAB = {"A": 11, "B": 12, "C": 13, "D": 14, "yes": 21, "no": 22}


def _completion(request: httpx.Request, prompt_tokens: int = 70) -> httpx.Response:
    """A vLLM-shaped answer: /tokenize from a small vocabulary; chat completions with
    top_logprobs over the allowed choices and usage with prompt_tokens."""
    body = json.loads(request.content)
    if request.url.path == "/tokenize":
        return httpx.Response(200, json={"tokens": [VOCAB[body["prompt"]]], "count": 1})
    if "structured_outputs" in body:
        choices = body["structured_outputs"]["choice"]
    else:
        by_id = {i: t for t, i in VOCAB.items()}
        choices = [by_id[i] for i in body["allowed_token_ids"]]
    top = [{"token": c, "logprob": math.log(1.0 / len(choices))} for c in choices]
    return httpx.Response(200, json={
        "choices": [{"message": {"content": choices[0]}, "logprobs": {"content": [{"token": choices[0], "top_logprobs": top}]}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1},
    })


def _chat_only(handler):
    """Answers /tokenize itself, so ``handler`` sees (and counts) chat completions only."""
    async def wrapped(request: httpx.Request):
        if request.url.path == "/tokenize":
            return _completion(request)
        out = handler(request)
        return await out if asyncio.iscoroutine(out) else out

    return wrapped


def _run(coro_fn, config: VlmClientConfig, handler):
    async def go():
        v = VllmVerifier(config, transport=httpx.MockTransport(handler))
        try:
            return await coro_fn(v), v
        finally:
            await v.aclose()

    return asyncio.run(go())


def test_least_outstanding_server_gets_the_next_request():
    """While a call is held open on server a, every new call goes to the idle server b."""
    seen: list[str] = []
    release = asyncio.Event()

    async def handler(request: httpx.Request):
        if request.url.path == "/tokenize":
            return _completion(request)
        seen.append(request.url.host)
        if request.url.host == "a":
            await release.wait()
        return _completion(request)

    async def scenario(v: VllmVerifier):
        a, b = v._endpoints
        b.outstanding = 1  # steer the first call to a
        slow = asyncio.create_task(v.verify(IMAGE, CANDIDATES))
        while not seen:
            await asyncio.sleep(0.001)
        b.outstanding = 0
        assert a.outstanding == 1
        fast = [await v.verify(IMAGE, CANDIDATES) for _ in range(4)]
        release.set()
        await slow
        return fast

    cfg = VlmClientConfig(urls=["http://a:1", "http://b:1"])
    fast, v = _run(scenario, cfg, handler)
    assert seen == ["a", "b", "b", "b", "b"]
    assert all(math.isclose(sum(s.probabilities) + s.none_probability, 1.0) for s in fast)
    assert [e.outstanding for e in v._endpoints] == [0, 0]


def test_pick_prefers_the_fewest_outstanding_and_avoids_failed_servers():
    v = VllmVerifier(VlmClientConfig(urls=["http://a:1", "http://b:1", "http://c:1"]))
    try:
        a, b, c = v._endpoints
        a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
        assert all(v._pick() is b for _ in range(20))
        assert all(v._pick(avoid={"http://b:1"}) is c for _ in range(20))
        assert v._pick(avoid={e.url for e in v._endpoints}) is b  # all failed: fall back to the least loaded
    finally:
        asyncio.run(v.aclose())


@pytest.mark.parametrize("failure", ["status_503", "connect_error"])
def test_transient_errors_are_retried_on_another_server(failure):
    calls: list[tuple[str, str]] = []

    def handler(request: httpx.Request):
        calls.append((request.url.host, request.url.path))
        if request.url.host == "bad":
            if failure == "status_503":
                return httpx.Response(503, text="overloaded")
            raise httpx.ConnectError("refused", request=request)
        return _completion(request, prompt_tokens=81)

    cfg = VlmClientConfig(urls=["http://bad:1", "http://good:1"], max_retries=2, backoff_s=0.001)
    scores, v = _run(lambda v: asyncio.gather(*(v.verify(IMAGE, CANDIDATES) for _ in range(6))), cfg, handler)
    assert len(scores) == 6 and all(s.requests == 1 and s.prompt_tokens == 81 for s in scores)
    assert calls.count(("good", "/v1/chat/completions")) == 6  # every image answered by the healthy server
    assert v.requests_sent == 6 and v.prompt_tokens == 6 * 81
    bad = sum(host == "bad" for host, _ in calls)
    assert bad >= 1 and len(v.latencies_ms()["http://bad:1"]) == bad  # failed calls are timed too


def test_retries_are_bounded_and_the_error_names_the_attempts():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(502, text="bad gateway")

    cfg = VlmClientConfig(urls=["http://x:1"], max_retries=3, backoff_s=0.001)
    with pytest.raises(VlmUnavailableError, match="after 4 attempts"):
        _run(lambda v: v.verify(IMAGE, CANDIDATES), cfg, handler)
    assert len(calls) == 4


def test_client_errors_are_not_retried():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(400, json={"error": "The model `nope` does not exist."})

    with pytest.raises(VlmUnavailableError, match="HTTP 400.*does not exist"):
        _run(lambda v: v.verify(IMAGE, CANDIDATES), VlmClientConfig(urls=["http://x:1"], max_retries=3), handler)
    assert len(calls) == 1


def test_timeouts_are_transient():
    calls = []

    async def handler(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return _completion(request)

    cfg = VlmClientConfig(urls=["http://x:1"], max_retries=1, backoff_s=0.001, timeout_s=0.5)
    s, _ = _run(lambda v: v.verify(IMAGE, CANDIDATES), cfg, _chat_only(handler))
    assert len(calls) == 2 and s.probabilities == pytest.approx((0.25, 0.25, 0.25))


def test_yes_no_mode_sends_one_request_per_candidate_and_sums_usage():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return _completion(request, prompt_tokens=50)

    cfg = VlmClientConfig(urls=["http://x:1"], scoring_mode="yes_no")
    s, v = _run(lambda v: v.verify(IMAGE, CANDIDATES), cfg, _chat_only(handler))
    assert s.requests == 3 and s.prompt_tokens == 150 and v.requests_sent == 3
    assert [b["allowed_token_ids"] for b in bodies] == [[VOCAB["yes"], VOCAB["no"]]] * 3
    assert all("structured_outputs" not in b for b in bodies)
    # All three share the instruction + image prefix (prefix caching); only the question differs.
    assert len({json.dumps(b["messages"][0]["content"][:2]) for b in bodies}) == 1


def test_options_are_tokenized_once_per_option_set_and_sent_as_allowed_token_ids():
    paths, bodies = [], []

    def handler(request):
        paths.append(request.url.path)
        if request.url.path != "/tokenize":
            bodies.append(json.loads(request.content))
        return _completion(request)

    s, _ = _run(lambda v: asyncio.gather(*(v.verify(IMAGE, CANDIDATES) for _ in range(3))),
                VlmClientConfig(urls=["http://x:1"]), handler)
    assert paths.count("/tokenize") <= 2 * 4  # concurrent first calls may race; later ones hit the cache
    assert paths[-1] == "/v1/chat/completions" and paths.count("/v1/chat/completions") == 3
    assert all(b["allowed_token_ids"] == [VOCAB[x] for x in "ABCD"] and b["top_logprobs"] == 4 for b in bodies)
    paths.clear()
    _run(lambda v: v.verify(IMAGE, CANDIDATES), VlmClientConfig(urls=["http://x:1"]), handler)
    assert paths == ["/tokenize"] * 4 + ["/v1/chat/completions"]


def test_grammar_constraint_sends_structured_outputs_instead():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return _completion(request)

    _run(lambda v: v.verify(IMAGE, CANDIDATES), VlmClientConfig(urls=["http://x:1"], constraint="grammar"), handler)
    assert len(bodies) == 1 and bodies[0]["structured_outputs"] == {"choice": ["A", "B", "C", "D"]}
    assert bodies[0]["top_logprobs"] == 6
    assert "allowed_token_ids" not in bodies[0]
    with pytest.raises(ValueError, match="constraint"):
        VlmClientConfig(urls=["http://x:1"], constraint="regex")


def test_unconstrained_logprobs_are_refused_with_the_server_flag_to_fix_it():
    """A server started without --logprobs-mode processed_logprobs returns the raw distribution,
    where the letters hold only part of the mass: that must not be renormalised silently."""
    def handler(request):
        if request.url.path == "/tokenize":
            return _completion(request)
        top = [{"token": t, "logprob": math.log(0.1)} for t in "ABCD"]
        return httpx.Response(200, json={"choices": [{"message": {"content": "A"}, "logprobs": {
            "content": [{"token": "A", "top_logprobs": top}]}}], "usage": {"prompt_tokens": 5}})

    from catcascade.vlm_stage.scoring import ScoringError

    with pytest.raises(ScoringError, match="processed_logprobs"):
        _run(lambda v: v.verify(IMAGE, CANDIDATES), VlmClientConfig(urls=["http://x:1"]), handler)


def test_unreachable_server_raises_clear_error():
    """Nothing listens on the port: connection refused, retried, then one clear error."""
    from catcascade.vlm_stage.vllm_server import free_port

    async def go():
        v = VllmVerifier(VlmClientConfig(urls=[f"http://127.0.0.1:{free_port()}"], max_retries=1, backoff_s=0.01))
        try:
            await v.verify(IMAGE, CANDIDATES)
        finally:
            await v.aclose()

    with pytest.raises(VlmUnavailableError, match="after 2 attempts.*ConnectError"):
        asyncio.run(go())


def _answer(top_logprobs=None, **replace) -> dict:
    """A well-formed chat completion body, with parts replaced by ``replace`` (None drops them)."""
    top = top_logprobs if top_logprobs is not None else [{"token": t, "logprob": math.log(0.25)} for t in "ABCD"]
    body = {"choices": [{"message": {"content": "A"}, "logprobs": {"content": [{"token": "A", "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 7}}
    body.update(replace)
    return body


MALFORMED = {
    "no choices": _answer(choices=[]),
    "choices null": _answer(choices=None),
    "logprobs null": _answer(choices=[{"message": {"content": "A"}, "logprobs": None}]),
    "content empty": _answer(choices=[{"message": {"content": "A"}, "logprobs": {"content": []}}]),
    "top_logprobs null": _answer(choices=[{"logprobs": {"content": [{"token": "A", "top_logprobs": None}]}}]),
    "entry without logprob": _answer([{"token": "A"}]),
    "logprob a string": _answer([{"token": t, "logprob": "-1.4"} for t in "ABCD"]),
    "logprob a list": _answer([{"token": t, "logprob": [-1.4]} for t in "ABCD"]),
    "logprob positive": _answer([{"token": t, "logprob": 800.0} for t in "ABCD"]),
    "every logprob null": _answer([{"token": t, "logprob": None} for t in "ABCD"]),
    "logprobs NaN": _answer([{"token": t, "logprob": float("nan")} for t in "ABCD"]),
    "usage not a number": _answer(usage={"prompt_tokens": "many"}),
    "body a list": [1, 2, 3],
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_logprobs_in_a_200_answer_are_a_scoring_error(body):
    """The pipeline answers CNN-only on ScoringError; any other exception type would escape it."""
    from catcascade.vlm_stage.scoring import ScoringError

    def handler(request):
        return httpx.Response(200, content=json.dumps(body, allow_nan=True).encode())

    with pytest.raises(ScoringError):
        _run(lambda v: v.verify(IMAGE, CANDIDATES), VlmClientConfig(urls=["http://x:1"]), _chat_only(handler))


def test_a_200_answer_that_is_not_json_is_a_clear_error():
    def handler(request):
        return httpx.Response(200, text="<html>proxy error</html>")

    with pytest.raises(VlmUnavailableError, match="not JSON.*proxy error"):
        _run(lambda v: v.verify(IMAGE, CANDIDATES), VlmClientConfig(urls=["http://x:1"]), handler)


def test_tokenize_without_tokens_is_a_scoring_error():
    from catcascade.vlm_stage.scoring import ScoringError

    def handler(request):
        return httpx.Response(200, json={"count": 1})

    with pytest.raises(ScoringError, match="token list"):
        _run(lambda v: v.verify(IMAGE, CANDIDATES), VlmClientConfig(urls=["http://x:1"]), handler)


def test_well_formed_answer_parses_to_scores_and_usage():
    from catcascade.vlm_stage.vllm_client import answer_logprobs

    top, n = answer_logprobs(_answer([{"token": "A", "logprob": -0.5}, {"token": " B", "logprob": None}]))
    assert top == [("A", -0.5), (" B", float("-inf"))] and n == 7
    assert answer_logprobs(_answer(usage=None))[1] == 0


def test_explain_is_a_separate_capped_free_text_request():
    from catcascade.vlm_stage.rationale import RationaleError

    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        text = "  A flat face and\n a long coat.  " if "Persian" in json.dumps(body["messages"]) else ""
        return httpx.Response(200, json={"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 90, "completion_tokens": 9}})

    cfg = VlmClientConfig(urls=["http://vlm"])
    why, v = _run(lambda v: v.explain(IMAGE, "Persian", max_tokens=20), cfg, handler)
    assert why.text == "A flat face and a long coat." and why.tokens == 9 and why.label == "Persian"
    body = seen[0]
    assert body["max_tokens"] == 20 and body["min_tokens"] == 8 and body["temperature"] == 0.0
    assert "logprobs" not in body and "allowed_token_ids" not in body  # free text, not a scoring call
    assert v.requests_sent == 1 and v.prompt_tokens == 90
    with pytest.raises(RationaleError, match="no text"):
        _run(lambda v: v.explain(IMAGE, "Bengal"), cfg, handler)
    with pytest.raises(ValueError, match="max_tokens"):
        _run(lambda v: v.explain(IMAGE, "Persian", max_tokens=0), cfg, handler)


@pytest.mark.parametrize("body", [{"choices": []}, {"choices": [{"message": None}]}, [1], {"choices": [{}]},
                                  {"choices": [{"message": {"content": "ok"}}], "usage": {"completion_tokens": "x"}}],
                         ids=["no choices", "message null", "a list", "no message", "usage not a number"])
def test_malformed_rationale_answer_is_a_rationale_error(body):
    from catcascade.vlm_stage.rationale import RationaleError

    with pytest.raises(RationaleError, match="malformed body"):
        _run(lambda v: v.explain(IMAGE, "Persian"), VlmClientConfig(urls=["http://x:1"]),
             lambda request: httpx.Response(200, json=body))


def test_each_call_carries_its_own_headers_and_priority_on_top_of_the_clients():
    """Per-call headers (a request's W3C trace context) go on every HTTP request of that call,
    over the constructor's ``request_headers``; priority reaches vLLM for scoring and rationale."""
    seen = []

    def handler(request):
        seen.append((request.url.path, dict(request.headers), json.loads(request.content)))
        if request.url.path == "/v1/chat/completions" and "allowed_token_ids" not in seen[-1][2]:
            return httpx.Response(200, json={"choices": [{"message": {"content": "Long fur."}, "finish_reason": "stop"}],
                                             "usage": {"prompt_tokens": 9, "completion_tokens": 3}})
        return _completion(request)

    async def calls(v: VllmVerifier):
        await v.verify(IMAGE, CANDIDATES[:2], priority=1, headers={"traceparent": "00-aa-01-01", "x-a": "call"})
        await v.explain(IMAGE, "Persian", 8, priority=1, headers={"traceparent": "00-bb-02-01"})
        await v.verify(IMAGE, CANDIDATES[:2])

    cfg = VlmClientConfig(urls=["http://vlm"], scoring_mode="yes_no")

    async def go():
        v = VllmVerifier(cfg, transport=httpx.MockTransport(handler), request_headers=lambda: {"x-a": "client",
                                                                                               "x-b": "client"})
        try:
            await calls(v)
        finally:
            await v.aclose()
        return v

    v = asyncio.run(go())
    assert v.model_name == cfg.model
    chats = [(h, b) for path, h, b in seen if path == "/v1/chat/completions"]
    assert len(chats) == 2 + 1 + 2  # yes/no: one request per candidate
    for headers, body in chats[:2]:  # the first verify: its own trace context, its header over the client's
        assert headers["traceparent"] == "00-aa-01-01" and headers["x-a"] == "call" and headers["x-b"] == "client"
        assert body["priority"] == 1
    rationale_headers, rationale_body = chats[2]
    assert rationale_headers["traceparent"] == "00-bb-02-01" and rationale_headers["x-a"] == "client"
    assert rationale_body["priority"] == 1 and rationale_body["max_tokens"] == 8
    for headers, body in chats[3:]:  # a call without headers: the client's only, default priority
        assert "traceparent" not in headers and headers["x-a"] == "client" and "priority" not in body
