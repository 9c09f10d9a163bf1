"""`lightctl bench`: a load generator for any OpenAI-compatible endpoint.

One concern per module: ``workload`` (what to send), ``arrivals`` (when),
``client`` (one streamed request, timed), ``runner`` (the whole run: warm-up,
schedule, concurrency, multi-turn replay), ``metrics`` (pure arithmetic),
``report`` (tables, JSON, comparison) and ``plots`` (PNG).
"""
