"""The handlers behind each OpenAI route: validate, turn a request into sequences, submit them to the
engine, and shape the replies (streamed or whole); a disconnected client cancels its sequences."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorakit.lora.adapters import configs
from lorakit.serve import adapters_admin, tools
from lorakit.serve.engine import Engine, QueueFull, ShuttingDown, UnknownAdapter
from lorakit.serve.limits import ShutdownSwitch
from lorakit.serve.logprobs import LogprobFormatter
from lorakit.serve.names import shown
from lorakit.serve.params import (
    Reply,
    best,
    candidates,
    check_scale,
    per_choice,
    refuse_surrogates,
    refuse_unknown,
    sampling_controls,
)
from lorakit.serve.protocol import (
    AdapterBody,
    APIError,
    ChatBody,
    ClassifyBody,
    CompletionBody,
    chat_text,
    completion_object,
    new_id,
    sse,
    stops,
    usage,
)
from lorakit.serve.resolver import AdapterResolver
from lorakit.serve.sequence import Event, SamplingParams, Sequence
from lorakit.serve.settings import ServeSettings
from lorakit.serve.structured import Grammar, Grammars


class Routes:
    """The /v1 handlers over one engine.

    Args:
        engine: the engine all requests go through.
        settings: limits and identity.
        switch: closed by a forced shutdown (None: never).
    """

    def __init__(self, engine: Engine, settings: ServeSettings, switch: ShutdownSwitch | None = None) -> None:
        self.engine, self.settings = engine, settings
        self.switch = switch or ShutdownSwitch()
        self.tokenizer = engine.tokenizer
        self.resolver = None
        if settings.adapter_roots:
            self.resolver = AdapterResolver(engine, list(settings.adapter_roots), settings.max_loaded_adapters,
                                            settings.task, settings.untrained_heads)
            engine.metrics.resident.set_function(self.resolver.resident)
        # Tokenisation leaves the event loop (other clients and /health keep being answered); one worker, so
        # requests never tokenise in parallel with each other (the engine thread only decodes).
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lorakit-tokenize")
        # No token is longer than the longest vocabulary entry, so a text longer than this many characters
        # cannot fit the context, and is refused before it is tokenised.
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = settings.max_model_len * max(longest, 1)
        vocab = getattr(getattr(engine.model, "config", None), "vocab_size", None) or len(self.tokenizer)
        self.grammars = Grammars(self.tokenizer, vocab, engine.eos_ids)

    async def _off_loop(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    def _check_chars(self, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters: more than this model's maximum context of "
                           f"{self.settings.max_model_len} tokens can hold (at most {self.max_prompt_chars} "
                           "characters)", code="context_length_exceeded", param="prompt")

    # -- models and adapters -------------------------------------------------------------------------
    async def models(self) -> dict[str, Any]:
        created = int(time.time())
        base = self.settings.base_name
        data = [{"id": base, "object": "model", "created": created, "owned_by": "lorakit", "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "lorakit", "parent": base}
                 for n in self.engine.adapters()]
        return {"object": "list", "data": data}

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's ``model`` picks (None: the base); 404 for an unknown id."""
        if model == self.settings.base_name:
            return None
        if model in self.engine.adapters():
            return model
        raise APIError(404, f"the model {shown(model)} does not exist; GET /v1/models lists "
                       f"{[self.settings.base_name, *self.engine.adapters()]}", code="model_not_found",
                       param="model")

    async def _adapter(self, model: str) -> str | None:
        """``adapter_for``, loading ``model`` from an ``--adapter-root`` first when it is there."""
        if self.resolver is not None and model != self.settings.base_name:
            await self.resolver.ensure(model)
            self.resolver.touch(model)
        return self.adapter_for(model)

    async def load_adapter(self, body: AdapterBody) -> dict[str, Any]:
        if body.name == self.settings.base_name:
            raise APIError(400, f"{body.name!r} is the base model's id", param="name")
        future = self.engine.call(lambda: adapters_admin.load(self.engine.model, body.name, body.path,
                                                               self.settings.task,
                                                               need_heads=self.settings.untrained_heads))
        await asyncio.wrap_future(future)  # AdapterFileError etc. become 400/409 in adapters_admin
        return {"id": body.name, "object": "model", "owned_by": "lorakit", "parent": self.settings.base_name,
                "path": body.path}

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        try:
            future = self.engine.unload(name)
        except UnknownAdapter as exc:
            raise APIError(404, str(exc), code="model_not_found") from exc
        await asyncio.wrap_future(future)  # resolves once its accepted requests have finished
        return {"id": name, "object": "model", "deleted": True}

    # -- generation ----------------------------------------------------------------------------------
    async def completions(self, body: CompletionBody, request: Request) -> Response:
        self._need_task("causal-lm", "/v1/completions")
        self._check_body(body)
        prompts = body.prompt
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, (str, list)) for p in prompts)):
            prompts = [prompts]  # one string or one list of token ids
        if len(prompts) > self.settings.max_prompts:
            raise APIError(400, f"prompt: {len(prompts)} prompts; this server takes at most "
                           f"{self.settings.max_prompts} per request", param="prompt")
        self._check_chars(sum(len(p) for p in prompts if isinstance(p, str)))
        batch = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = (await self._off_loop(self.tokenizer, prompt, add_special_tokens=True)).input_ids
            else:
                ids = [int(t) for t in prompt]
                if any(t < 0 or t >= len(self.tokenizer) for t in ids):
                    raise APIError(400, "prompt: token id out of the vocabulary", param="prompt")
            echo = "" if not body.echo else prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
            batch.append((ids, echo))
        return await self._generate(body, batch, body.max_tokens, request, chat=False)

    @staticmethod
    def _check_body(body: CompletionBody | ChatBody) -> None:
        """400 for unimplemented fields and text that is not Unicode, before anything is tokenised."""
        refuse_unknown(body)
        for field in ("prompt", "messages", "stop"):
            refuse_surrogates(getattr(body, field, None), field)

    async def chat(self, body: ChatBody, request: Request) -> Response:
        self._need_task("causal-lm", "/v1/chat/completions")
        self._check_body(body)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, f"{self.settings.base_name} has no chat template; use /v1/completions")
        tool_plan = tools.plan(body, self.tokenizer)
        messages = chat_text(body.messages)
        tools.history(body.messages, messages, self.tokenizer)
        self._check_chars(sum(len(m["content"]) for m in messages))
        extra = {"tools": tool_plan.tools} if tool_plan else {}
        try:
            text = await self._off_loop(self.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                        tokenize=False, **extra)
        except Exception as exc:  # a template error is the request's fault (bad roles, order)
            raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages") from exc
        ids = (await self._off_loop(self.tokenizer, text, add_special_tokens=False)).input_ids
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await self._generate(body, [(ids, "")], max_tokens, request, chat=True, tool_plan=tool_plan)

    def _need_task(self, task: str, path: str) -> None:
        if self.settings.task != task:
            raise APIError(400, f"{path} needs a server started with --task {task}; this one serves "
                           f"{self.settings.task}")

    def _params(self, body: CompletionBody | ChatBody, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        s = self.settings
        if prompt_len == 0:
            raise APIError(400, "prompt: it is empty", param="prompt")
        if max_tokens is None:
            max_tokens = max(1, min(s.max_tokens_cap, s.max_model_len - prompt_len))
        least = 0 if getattr(body, "echo", False) else 1  # echo with max_tokens 0 scores the prompt only
        if max_tokens < least or max_tokens > s.max_tokens_cap:
            raise APIError(400, f"max_tokens: {max_tokens} is outside {least}..{s.max_tokens_cap} (this server's "
                           "cap; 0 only with echo)", param="max_tokens")
        if prompt_len + max_tokens > s.max_model_len:
            raise APIError(400, f"this model's maximum context length is {s.max_model_len} tokens; you requested "
                           f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
                           code="context_length_exceeded", param="prompt")
        logprobs, echo = _logprobs_wanted(body)
        return SamplingParams(max_tokens, body.temperature, body.top_p, stops(body.stop), body.seed,
                              lora_scale=body.lora_scale, logprobs=logprobs,
                              prompt_logprobs=echo and logprobs is not None,
                              **sampling_controls(body, len(self.tokenizer)),
                              track_score=candidates(body, s.max_n) > body.n)

    async def _generate(self, body: CompletionBody | ChatBody, prompts: list[tuple[list[int], str]],
                        max_tokens: int | None, request: Request, *, chat: bool,
                        tool_plan: tools.ToolPlan | None = None) -> Response:
        """Run every prompt's candidates (``best_of`` or ``n``) in the engine and answer for all of them;
        prompt p's choice k has index p * n + k, as OpenAI numbers them."""
        params = [self._params(body, len(ids), max_tokens) for ids, _ in prompts]
        count = candidates(body, self.settings.max_n)
        # Compiled off the event loop: a large schema takes a while, and a bad one is a 400 before queueing.
        grammar = await self._off_loop(self._grammar, body, tool_plan)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def make(index: int, ids: list[int], adapter: str | None, choice: SamplingParams) -> Sequence:
            return Sequence(ids, adapter, choice, lambda ev: loop.call_soon_threadsafe(events.put_nowait, (index, ev)),
                            kind="chat" if chat else "completion", grammar=grammar.constraint() if grammar else None)

        seqs = await self._queue(body, [ids for ids, _ in prompts], params, count, make)
        self.engine.metrics.requests.labels(body.model, seqs[0].kind).inc()
        reply = Reply(new_id("chatcmpl" if chat else "cmpl"), body.model, chat, seqs, events,
                      sum(len(ids) for ids, _ in prompts), tool_plan.family if tool_plan else None)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(reply, include_usage, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts = await self._collect(reply, request)
        if texts is None:  # the client hung up: nobody reads an answer
            return Response(status_code=499)
        obj = completion_object(reply.rid, body.model, "", None, chat=chat, chunk=False)
        obj["choices"] = await self._choices(reply, [echo for _, echo in prompts], texts, count, body.n)
        obj["usage"] = usage(reply.prompt_tokens, sum(s.completion_tokens for s in seqs))
        return JSONResponse(obj)

    async def _queue(self, body: CompletionBody | ChatBody, prompts: list[list[int]], params: list[SamplingParams],
                     count: int, make: Callable[[int, list[int], str | None, SamplingParams], Sequence]
                     ) -> list[Sequence]:
        """Make each prompt's ``count`` sequences (``make(index, ids, adapter, params)``) for the adapter
        ``body.model`` picks, and queue them; an adapter evicted before they were queued loads again, once."""
        retry = self.resolver is not None
        while True:
            adapter = await self._adapter(body.model)
            check_scale(body.lora_scale, adapter, configs(self.engine.model).get(adapter) if adapter else None,
                        self.engine.batching)
            seqs = [make(p * count + j, ids, adapter, per_choice(params[p], j))
                    for p, ids in enumerate(prompts) for j in range(count)]
            try:
                self._submit(seqs)
                return seqs
            except APIError as exc:  # evicted between loading and queueing (idle then): load it again, once
                if exc.status != 404 or not retry:
                    raise
                retry = False

    def _grammar(self, body: CompletionBody | ChatBody, tool_plan: tools.ToolPlan | None) -> Grammar | None:
        """The grammar every sequence of the request follows: a forced tool call's, or response_format's."""
        if tool_plan is not None and tool_plan.forced is not None:
            grammar = self.grammars.lark(tool_plan.forced, "tools")
        else:
            grammar = self.grammars.response_format(body.response_format)
        for field in ("stop", "stop_token_ids"):
            if grammar is not None and getattr(body, field):
                raise APIError(400, f"{field}: not with a response_format or a forced tool call (it could cut the "
                               "output short of what the grammar requires; the grammar ends the text)", param=field)
        return grammar

    async def _choices(self, reply: Reply, echoes: list[str], texts: dict[int, str], count: int,
                       n: int) -> list[dict[str, Any]]:
        """Each prompt's ``n`` best of its ``count`` finished sequences as choices, numbered in order."""
        choices = []
        for p, echo in enumerate(echoes):
            for seq in best(reply.seqs[p * count : (p + 1) * count], n):
                one = completion_object(reply.rid, reply.model, echo + texts[seq.id], seq.finish_reason,
                                        chat=reply.chat, chunk=False)["choices"][0]
                if seq.params.logprobs is not None:
                    one["logprobs"] = await self._off_loop(self._choice_logprobs, seq, reply.chat)
                if reply.tools is not None:
                    tools.tool_message(one, reply.tools)
                choices.append({**one, "index": len(choices)})
        return choices

    def _choice_logprobs(self, seq: Sequence, chat: bool) -> dict[str, Any]:
        formatter = LogprobFormatter(self.tokenizer, chat=chat)
        if seq.prompt_logprobs is not None:
            return formatter.format_prompt(seq.prompt_ids, [*seq.prompt_logprobs, *seq.logprobs])
        return formatter.format(list(seq.logprobs))

    def _submit(self, seqs: list[Sequence]) -> None:
        done: list[Sequence] = []
        try:
            for seq in seqs:
                self.engine.submit(seq)
                done.append(seq)
        except QueueFull as exc:
            self._cancel(done)
            raise APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from exc
        except UnknownAdapter as exc:
            self._cancel(done)
            raise APIError(404, str(exc), code="model_not_found", param="model") from exc
        except ShuttingDown as exc:
            self._cancel(done)
            raise APIError(503, str(exc), "server_error", headers={"Retry-After": "5"}) from exc

    def _cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if not seq.done:
                self.engine.cancel(seq)

    def _watch(self, seqs: list[Sequence], request: Request) -> asyncio.Task:
        """A task that cancels ``seqs`` the moment their client hangs up, whether or not tokens are flowing."""

        async def watch() -> None:
            # The body has been read, so the next ASGI message can only be the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self._cancel(seqs)

        return asyncio.ensure_future(watch())

    async def _next(self, events: asyncio.Queue[tuple[int, Event]]) -> tuple[int, Event] | None:
        """The next (choice, event); None after 0.25 s without one; a 503 once a shutdown is forced (the
        answer goes out at once, not after the engine's current step)."""
        try:
            return await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if self.switch.closed:
                return 0, Event(finish_reason="error", error="the server is shutting down", status=503)
            return None

    async def _collect(self, reply: Reply, request: Request) -> dict[int, str] | None:
        """Each sequence's whole text by id once all finished; None when the client hung up."""
        parts: dict[int, list[str]] = {seq.id: [] for seq in reply.seqs}
        open_ = set(range(len(reply.seqs)))
        watcher = self._watch(reply.seqs, request)
        try:
            while open_:
                got = await self._next(reply.events)
                if got is None:
                    continue
                index, ev = got
                if ev.error:
                    raise APIError(ev.status, ev.error, "server_error")
                if ev.finish_reason == "cancelled":
                    return None
                parts[reply.seqs[index].id].append(ev.text)
                if ev.finish_reason:
                    open_.discard(index)
        finally:
            watcher.cancel()
            self._cancel(reply.seqs)
        return {key: "".join(texts) for key, texts in parts.items()}

    async def _stream(self, reply: Reply, include_usage: bool, request: Request) -> AsyncIterator[str]:
        watcher = self._watch(reply.seqs, request)
        logprobs = reply.seqs[0].params.logprobs is not None
        formatters = [LogprobFormatter(self.tokenizer, chat=reply.chat) if logprobs else None for _ in reply.seqs]
        open_ = set(range(len(reply.seqs)))
        held = [tools.Held() for _ in reply.seqs]
        try:
            if reply.chat:
                for index in open_:
                    yield sse(reply.chunk(index, "", None, role=True))
            while open_:
                got = await self._next(reply.events)
                if got is None:
                    continue
                index, ev = got
                if ev.error:
                    yield sse(APIError(ev.status, ev.error, "server_error").body())
                    break
                if ev.finish_reason == "cancelled":  # the client hung up
                    return
                if reply.tools is not None:  # calls are parsed from the whole text: it goes out at the end
                    ev = held[index].hold(ev)
                if ev.text or ev.finish_reason:
                    entries = formatters[index].format(ev.logprobs) if formatters[index] else None
                    chunk = reply.chunk(index, ev.text, ev.finish_reason, logprobs=entries)
                    if reply.tools is not None:
                        tools.tool_message(chunk["choices"][0], reply.tools)
                    yield sse(chunk)
                if ev.finish_reason:
                    open_.discard(index)
            else:
                if include_usage:
                    last = reply.chunk(0, "", None)
                    last["choices"] = []
                    last["usage"] = usage(reply.prompt_tokens, sum(s.completion_tokens for s in reply.seqs))
                    yield sse(last)
            yield sse("[DONE]")
        finally:
            # A client that disconnects mid-stream ends up here (Starlette cancels the generator).
            watcher.cancel()
            self._cancel(reply.seqs)

    # -- classification ------------------------------------------------------------------------------
    async def classify(self, body: ClassifyBody) -> dict[str, Any]:
        self._need_task("seq-cls", "/v1/classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        models = [body.model] * len(texts) if isinstance(body.model, str) else body.model
        if not texts or len(texts) > self.settings.max_classify_inputs:
            raise APIError(400, f"input: 1..{self.settings.max_classify_inputs} texts", param="input")
        if len(models) != len(texts):
            raise APIError(400, "model: a list of models needs one per input", param="model")
        adapters = [await self._adapter(m) for m in models]
        if None in adapters and self.settings.untrained_heads:
            raise APIError(400, f"{self.settings.base_name} has no trained classifier head "
                           f"({', '.join(self.settings.untrained_heads)} is random until an adapter trains it): "
                           f"ask for an adapter, one of {self.engine.adapters()}", param="model")
        # Inputs are truncated to max_model_len tokens: characters past what that many tokens can cover never
        # count, so they are not tokenised at all.
        texts = [t[: self.max_prompt_chars] for t in texts]
        for m in set(models):
            self.engine.metrics.requests.labels(m, "classify").inc()
        start = time.perf_counter()
        try:
            future = self.engine.call(lambda: adapters_admin.classify(self.engine.model, self.tokenizer, texts,
                                                                      adapters, self.settings.max_model_len))
        except ShuttingDown as exc:
            raise APIError(503, str(exc), "server_error") from exc
        rows, tokens = await asyncio.wrap_future(future)
        self.engine.metrics.latency.observe(time.perf_counter() - start)
        data = [{"index": i, "model": m, **row} for i, (m, row) in enumerate(zip(models, rows))]
        return {"object": "list", "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _logprobs_wanted(body: CompletionBody | ChatBody) -> tuple[int | None, bool]:
    """(alternatives per token or None for no log-probs, echo) as the request asks; 400 for bad pairs."""
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None, False
    if body.echo and body.stream:
        raise APIError(400, "echo: not supported with stream", param="echo")
    return body.logprobs, body.echo
