"""The remote runtime: deployments that stream from OpenAI-compatible HTTP APIs.

Its workers hold no device and never import torch. Each runs an asyncio loop
with one aiohttp connection pool (``client``), turns each request into a
streamed call, parses the server-sent events incrementally (``sse``), retries
and fails over before the first token (``retry``, ``upstreams``) and maps
every upstream outcome to a typed error. An upstream outage fails requests,
never the worker: it shows as a degraded deployment, not as restarts.
"""
