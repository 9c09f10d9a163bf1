"""The OpenAI-compatible API: request schemas, the routes, and what turns a request's
token streams into OpenAI's response bodies and SSE chunks (text, stop strings,
logprobs, tool calls, structured output).

It builds on the core (the dispatcher, the fleet, the settings); the core never
imports it, except ``app.py``, which mounts ``routes``.
"""
