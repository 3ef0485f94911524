"""`fastmath serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the request-stream engine.

protocol.py     request models, validation, OpenAI-style error bodies (no torch)
text.py         special-token aware encoding, chat rendering, incremental detokenizer with stop hold-back
engine_loop.py  the one thread that runs the engine; per-request sinks; the queue limit
app.py          the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics,
                /tokenize, /detokenize, /tokenizer_info
process.py      `fastmath serve` in a child process on a free port, waited for and stopped (tests, benchmarks)
"""
