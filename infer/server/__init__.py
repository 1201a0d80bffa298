"""`dspark serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

`runner.EngineRunner` drives `infer.engine.Engine` on a thread behind an asyncio API,
`app.create_app` is the FastAPI app (completions, chat, models, health, Prometheus metrics),
`chat` renders tokenizer chat templates, `metrics.ServerMetrics` holds the Prometheus series.
See docs/serving.md.
"""
