"""The one class that talks to vLLM's OpenAI-compatible chat API.

Candidate verification: either one multiple-choice request per image, or one yes/no request
per candidate sharing the image prefix. The one-token answer is constrained to the options'
tokens with ``allowed_token_ids`` (a logits mask: no grammar to compile or advance), and the
server, started with ``--logprobs-mode processed_logprobs``, returns the logprobs after that
mask, i.e. the distribution over the options. ``constraint="grammar"`` uses
``structured_outputs`` instead, for servers started without that flag. Requests go to the
least-loaded of several server URLs, with a timeout and bounded, jittered retries on
transient errors. ``explain`` asks, on request, for a short free-text rationale: a separate,
unconstrained completion with a token cap, after the scoring (vlm_stage/rationale.py). A
request's ``priority`` goes into the body for vLLM's priority scheduling (lower first);
``request_headers`` (e.g. W3C ``traceparent``) go on every HTTP request, and a call's own
``headers`` on top of them.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import httpx
from PIL import Image

from catcascade.errors import CatcascadeError
from catcascade.vlm_stage.prompts import Prompt, ScoringMode, build_multiple_choice, build_rationale, build_yes_no
from catcascade.vlm_stage.rationale import (DEFAULT_MAX_TOKENS, Rationale, RationaleError, check_max_tokens, clean_text,
                                 min_tokens)
from catcascade.vlm_stage.scoring import (CandidateScores, ScoringError, check_constrained, first_token_ids, letter_distribution,
                               scores_from_letter_logprobs, scores_from_yes_probs)


class VlmUnavailableError(CatcascadeError, RuntimeError):
    """No server answered usefully within the timeout and retries."""


_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class VlmClientConfig:
    urls: list[str]
    model: str = "cats"
    """vLLM model name: the LoRA adapter's name, or the base model's served name."""
    scoring_mode: ScoringMode = ScoringMode.MULTIPLE_CHOICE
    include_none: bool = True
    timeout_s: float = 10.0
    max_retries: int = 2
    backoff_s: float = 0.05
    max_image_side: int = 448
    jpeg_quality: int = 90
    max_connections: int = 64
    constraint: Literal["allowed_tokens", "grammar"] = "allowed_tokens"
    """How the answer is restricted to the options: a token mask (needs the server's
    ``--logprobs-mode processed_logprobs``) or vLLM's structured-output grammar."""

    def __post_init__(self) -> None:
        if self.constraint not in ("allowed_tokens", "grammar"):
            raise ValueError(f"constraint must be 'allowed_tokens' or 'grammar', got {self.constraint!r}")
        if not self.urls:
            raise ValueError("at least one vLLM server URL is required")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.scoring_mode = ScoringMode(self.scoring_mode)


def image_to_data_url(img: Image.Image, max_side: int = 448, quality: int = 90) -> str:
    """Re-encodes a (possibly large) image as a bounded JPEG data URL, bounding image tokens."""
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def prefix_cache_counters(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """vLLM's cumulative prefix-cache ``queries`` and ``hits`` (in tokens) from its /metrics."""
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout_s).text
    out = {"queries": 0.0, "hits": 0.0}
    for line in text.splitlines():
        for key in out:
            if line.startswith(f"vllm:prefix_cache_{key}"):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def answer_logprobs(payload) -> tuple[list[tuple[str, float]], int]:
    """The answer token's top logprobs and the prompt's token count, from a chat completion.

    A server can answer HTTP 200 with a body of another shape (a proxy's error page, an
    incompatible vLLM version, a bug): that is a ScoringError, so the caller answers CNN-only,
    never an exception of whatever type the bad field happens to raise.
    """
    try:
        content = payload["choices"][0]["logprobs"]["content"]
        if not content:
            raise ScoringError("vLLM returned no logprobs for the answer token")
        top = [(str(t["token"]), float("-inf") if t["logprob"] is None else float(t["logprob"]))
               for t in content[0]["top_logprobs"]]
        prompt_tokens = int((payload.get("usage") or {}).get("prompt_tokens") or 0)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ScoringError(f"vLLM answered with malformed logprobs ({type(e).__name__}: {e}): "
                           f"{str(payload)[:200]}") from None
    return top, prompt_tokens


@dataclass
class _Endpoint:
    url: str
    outstanding: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class VllmVerifier:
    """Scores an image's candidate breeds with a VLM behind one or more vLLM servers."""

    def __init__(self, config: VlmClientConfig, transport: httpx.AsyncBaseTransport | None = None,
                 request_headers: Callable[[], Mapping[str, str]] | None = None):
        """``transport`` replaces the network (unit tests of routing and retries only).
        ``request_headers`` is called per HTTP request for extra headers, such as the caller's
        trace context (this stage knows nothing of tracing; the server passes it in)."""
        self.config = config
        self.request_headers = request_headers
        self._endpoints = [_Endpoint(u) for u in config.urls]
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s, connect=min(2.0, config.timeout_s)),
            limits=httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections),
            transport=transport,
        )
        self.requests_sent = 0
        self.prompt_tokens = 0
        """Prompt tokens over all answered requests, from vLLM's ``usage`` field."""
        self._option_ids: dict[tuple[str, ...], list[int]] = {}

    @property
    def model_name(self) -> str:
        """The name vLLM serves the model under (an adapter's, or the base model's)."""
        return self.config.model

    def latencies_ms(self) -> dict[str, list[float]]:
        """Recent per-call latencies (the last 1,000 per server URL), retries included."""
        return {e.url: list(e.latencies_ms) for e in self._endpoints}

    def probe(self, timeout_s: float) -> "VllmVerifier":
        """A verifier for start-up checks (one attempt, a long timeout) that shares this one's
        option tokens, so what the warm-up learns serves the first user request."""
        probe = VllmVerifier(dataclasses.replace(self.config, timeout_s=timeout_s, max_retries=0),
                             request_headers=self.request_headers)
        probe._option_ids = self._option_ids
        return probe

    async def aclose(self) -> None:
        await self._client.aclose()

    def _pick(self, avoid: set[str] = frozenset()) -> _Endpoint:
        """The server with the fewest requests in flight (ties at random), preferring servers
        that have not failed this call yet."""
        pool = [e for e in self._endpoints if e.url not in avoid] or self._endpoints
        low = min(e.outstanding for e in pool)
        return random.choice([e for e in pool if e.outstanding == low])

    async def _option_token_ids(self, choices: tuple[str, ...]) -> list[int]:
        """The options' first tokens, from the server's own tokenizer (``/tokenize``), once per
        option set: every server behind one model name shares a tokenizer."""
        if choices not in self._option_ids:
            encodings = []
            for c in choices:
                answer = await self._post("/tokenize", {"model": self.config.model, "prompt": c,
                                                        "add_special_tokens": False})
                tokens = answer.get("tokens") if isinstance(answer, dict) else None
                if not isinstance(tokens, list):
                    raise ScoringError(f"vLLM's /tokenize answered without a token list: {str(answer)[:200]}")
                encodings.append(tokens)
            self._option_ids[choices] = first_token_ids(choices, encodings)
        return self._option_ids[choices]

    async def _chat(self, prompt: Prompt, image_url: str, priority: int = 0,
                    headers: Mapping[str, str] | None = None) -> tuple[list[tuple[str, float]], int]:
        """One constrained, one-token chat completion; returns the options' logprobs and the
        prompt's token count."""
        body = {
            "model": self.config.model,
            "messages": prompt.messages({"type": "image_url", "image_url": {"url": image_url}}),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": len(prompt.choices),
        }
        if self.config.constraint == "grammar":
            # The grammar admits every first token of every option's spellings ("y", "ye",
            # "yes"): look a little further and renormalise over the whole-option tokens.
            body["structured_outputs"] = {"choice": list(prompt.choices)}
            body["top_logprobs"] = min(20, len(prompt.choices) + 2)
        else:
            body["allowed_token_ids"] = await self._option_token_ids(prompt.choices)
        if priority:
            body["priority"] = priority
        payload = await self._post("/v1/chat/completions", body, headers)
        self.requests_sent += 1
        top, prompt_tokens = answer_logprobs(payload)
        self.prompt_tokens += prompt_tokens
        if self.config.constraint == "allowed_tokens":
            check_constrained(top, prompt.choices)
        return top, prompt_tokens

    async def _post(self, path: str, body: dict, headers: Mapping[str, str] | None = None) -> dict:
        """POST to the least-loaded server, retrying transient failures on another one, with
        ``request_headers()`` and this call's ``headers``."""
        last_error: Exception | None = None
        failed: set[str] = set()
        for attempt in range(self.config.max_retries + 1):
            endpoint = self._pick(failed)
            endpoint.outstanding += 1
            t0 = time.perf_counter()
            try:
                resp = await self._client.post(f"{endpoint.url}{path}", json=body, headers=self._headers(headers))
                if resp.status_code in _TRANSIENT_STATUS:
                    raise httpx.HTTPStatusError(f"HTTP {resp.status_code}", request=resp.request, response=resp)
                if resp.status_code != 200:
                    raise VlmUnavailableError(f"vLLM at {endpoint.url} answered HTTP {resp.status_code}: {resp.text[:300]}")
                try:
                    return resp.json()
                except ValueError:
                    raise VlmUnavailableError(f"vLLM at {endpoint.url} answered HTTP 200 with a body that is not "
                                              f"JSON: {resp.text[:100]!r}") from None
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                last_error = e
                failed.add(endpoint.url)
                if attempt < self.config.max_retries:
                    await asyncio.sleep(self.config.backoff_s * (2**attempt) * (0.5 + random.random()))
            finally:
                endpoint.outstanding -= 1
                endpoint.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
                del endpoint.latencies_ms[:-1000]
        raise VlmUnavailableError(f"vLLM unavailable after {self.config.max_retries + 1} attempts: {last_error!r}")

    def _headers(self, headers: Mapping[str, str] | None) -> dict[str, str] | None:
        merged = dict(self.request_headers()) if self.request_headers is not None else {}
        merged.update(headers or {})
        return merged or None

    async def verify(self, image: Image.Image, candidates: list[str] | tuple[str, ...], *,
                     priority: int = 0, headers: Mapping[str, str] | None = None) -> CandidateScores:
        """Probabilities for each candidate (in the given order) and for "none of these".
        ``priority``: vLLM's request priority (lower is scheduled first; needs a server
        started with ``--scheduling-policy priority``, which `serve-vlm` passes); ``headers``:
        extra HTTP headers of this call (e.g. its W3C trace context)."""
        t0 = time.perf_counter()
        url = image_to_data_url(image, self.config.max_image_side, self.config.jpeg_quality)
        if self.config.scoring_mode == ScoringMode.MULTIPLE_CHOICE:
            prompt = build_multiple_choice(candidates, self.config.include_none)
            top, n_tokens = await self._chat(prompt, url, priority, headers)
            scores = scores_from_letter_logprobs(top, candidates, prompt.choices, self.config.include_none, self.config.model)
            n_requests = 1
        else:
            prompts = [build_yes_no(c) for c in candidates]
            answers = await asyncio.gather(*(self._chat(p, url, priority, headers) for p in prompts))
            yes = [letter_distribution(top, p.choices)[p.choices[0]] for (top, _), p in zip(answers, prompts)]
            scores = scores_from_yes_probs(yes, candidates, self.config.model)
            n_requests, n_tokens = len(prompts), sum(n for _, n in answers)
        return CandidateScores(scores.candidates, scores.probabilities, scores.none_probability, scores.model,
                               scores.mode, (time.perf_counter() - t0) * 1000.0, n_requests, n_tokens)

    async def explain(self, image: Image.Image, breed: str, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                      priority: int = 0, headers: Mapping[str, str] | None = None) -> Rationale:
        """A sentence or two on why the photo suggests ``breed``: greedy decoding, at most
        ``max_tokens`` tokens. Raises RationaleError when the model returns no text.
        ``priority`` and ``headers`` as for ``verify``."""
        t0 = time.perf_counter()
        max_tokens = check_max_tokens(max_tokens)
        url = image_to_data_url(image, self.config.max_image_side, self.config.jpeg_quality)
        body = {
            "model": self.config.model,
            "messages": build_rationale(breed).messages({"type": "image_url", "image_url": {"url": url}}),
            "max_tokens": max_tokens,
            "min_tokens": min_tokens(max_tokens),
            "temperature": 0.0,
        }
        if priority:
            body["priority"] = priority
        payload = await self._post("/v1/chat/completions", body, headers)
        self.requests_sent += 1
        try:  # a 200 of another shape is a RationaleError, like an empty answer
            usage = payload.get("usage") or {}
            prompt_tokens, tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            choice = payload["choices"][0]
            text, finish = clean_text(str(choice["message"].get("content") or "")), choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise RationaleError(f"vLLM answered the rationale request with a malformed body "
                                 f"({type(e).__name__}: {e}): {str(payload)[:200]}") from None
        self.prompt_tokens += prompt_tokens
        if not text:
            raise RationaleError(f"the VLM returned no text for the rationale (finish_reason {finish!r})")
        return Rationale(text, breed, tokens, self.config.model, (time.perf_counter() - t0) * 1000.0)

    async def warm_up(self, candidates: tuple[str, ...]) -> None:
        """The first request per option set tokenizes the options (and, with the grammar
        constraint, makes vLLM compile the grammar: seconds on a CPU): pay that before serving,
        not on a user's request."""
        img = Image.new("RGB", (64, 64), (128, 128, 128))
        await self.verify(img, candidates)


class AdapterLoadError(CatcascadeError, RuntimeError):
    """A vLLM server refused to load (or could not be asked to load) a LoRA adapter."""


class AdapterServersUnreachable(AdapterLoadError):
    """Some servers could not be reached; the others (``loaded_on``) hold the adapter."""

    def __init__(self, message: str, unreachable: list[str], loaded_on: list[str]):
        super().__init__(message)
        self.unreachable = unreachable
        self.loaded_on = loaded_on


class VllmAdapterAdmin:
    """Loads and unloads LoRA adapters in running vLLM servers, by name, without a restart.

    Needs servers started with ``--enable-lora`` and the environment variable
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (``catcascade serve-vlm`` sets both), which
    enable ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``. The adapter folder
    must be readable by every server at the path given.
    """

    def __init__(self, urls: list[str], timeout_s: float = 120.0, transport: httpx.AsyncBaseTransport | None = None):
        if not urls:
            raise ValueError("at least one vLLM server URL is required")
        self.urls = [u.rstrip("/") for u in urls]
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
                                         transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def served_models(self, url: str) -> dict[str, str | None]:
        """Model names one server answers to (base and adapters), each with its ``root``
        (an adapter's folder)."""
        resp = await self._client.get(f"{url}/v1/models")
        resp.raise_for_status()
        return {m["id"]: m.get("root") for m in resp.json().get("data", [])}

    async def load(self, name: str, path: str, urls: list[str] | None = None) -> None:
        """Loads the adapter at ``path`` under ``name`` on every server (or on ``urls``). A
        server that already serves ``name`` from the same folder counts as loaded. On a
        refusal the servers that took it drop it again, so all servers agree, and
        AdapterLoadError is raised; servers that cannot be reached are skipped and named in
        AdapterServersUnreachable (the reachable ones keep the adapter)."""
        done: list[str] = []
        unreachable: list[str] = []
        for url in urls or self.urls:
            try:
                resp = await self._client.post(f"{url}/v1/load_lora_adapter",
                                               json={"lora_name": name, "lora_path": path})
            except httpx.TransportError as e:
                unreachable.append(f"{url} ({type(e).__name__})")
                continue
            if resp.status_code == 200:
                done.append(url)
                continue
            if resp.status_code == 400 and "already been loaded" in resp.text:
                if (await self.served_models(url)).get(name) == path:
                    continue
            await self._undo(done, name)
            if resp.status_code in (404, 405):
                raise AdapterLoadError(f"vLLM at {url} has no runtime LoRA loading (HTTP {resp.status_code}): start it "
                                       "with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                                       "(catcascade serve-vlm does)")
            raise AdapterLoadError(f"vLLM at {url} refused adapter {name!r} from {path} "
                                   f"(HTTP {resp.status_code}): {_error_message(resp)}")
        if unreachable:
            raise AdapterServersUnreachable(f"cannot reach vLLM at {', '.join(unreachable)} to load adapter {name!r}",
                                            unreachable, done)

    async def unload(self, name: str) -> None:
        """Unloads ``name`` from every server; a server that does not have it is fine."""
        errors = []
        for url in self.urls:
            try:
                resp = await self._client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name})
            except httpx.HTTPError as e:
                errors.append(f"{url}: {e!r}")
                continue
            if resp.status_code not in (200, 404):
                errors.append(f"{url}: HTTP {resp.status_code}: {_error_message(resp)}")
        if errors:
            raise AdapterLoadError(f"unloading adapter {name!r} failed on " + "; ".join(errors))

    async def _undo(self, urls: list[str], name: str) -> None:
        for url in urls:
            try:
                await self._client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name})
            except httpx.HTTPError:
                pass


def _error_message(resp: httpx.Response) -> str:
    """vLLM's error message from an error response (its JSON ``error.message``), else the text."""
    try:
        body = resp.json()
        err = body.get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except ValueError:
        return resp.text[:500]
