"""`fastmath serve`: an OpenAI-compatible server (completions, chat, models, health, metrics, tokenizer)."""
import click

_MISSING = "fastmath serve needs FastAPI and uvicorn: pip install 'fastmath[serve]'"


@click.command(name="serve")
@click.option("--base", default=None,
              help="Base checkpoint of a LoRA adapter given as --model (default: the adapter's base_model_name_or_path)")
@click.option("--model", default="runs/latest", show_default=True,
              help="Run directory (its final/, else its newest checkpoints/step_N/) or a checkpoint directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--api-key", default=None, envvar="FASTMATH_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $FASTMATH_API_KEY). "
                   "/health, /metrics and the tokenizer endpoints stay open.")
@click.option("--served-model-name", default=None,
              help="Model name clients send and /v1/models lists. Default: --model as given.")
@click.option("--template", default=None,
              help="Chat prompt template: vicuna, plain, chat (the checkpoint's own chat_template, over every "
                   "message), or a format string with {question}. Default: the run's training template, else vicuna.")
@click.option("--max-model-len", type=click.IntRange(2), default=None,
              help="Most tokens of prompt plus completion. Default: the model's max_seq_len, or its sliding_window "
                   "when it has one (a sliding-window model runs only up to its window; more is refused).")
@click.option("--max-slots", type=click.IntRange(1), default=None,
              help="Most sequences decoded at once. Default: the engine's (256 on CPU, 2048 on GPU).")
@click.option("--kv-cache-gb", type=click.FloatRange(0, min_open=True), default=None,
              help="KV cache budget in GiB. Default: free GPU memory, or 1.5 GiB on CPU.")
@click.option("--max-queue", type=click.IntRange(0), default=None,
              help="Most requests waiting for the engine; more answer 503. Default: unbounded.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the decode step (compiled before the port opens).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Weights and KV cache dtype (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for torch (0 = torch's default).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="uvicorn's log level (access lines at info).")
def command(base, model, host, port, api_key, served_model_name, template, max_model_len, max_slots, kv_cache_gb,
            max_queue, compile_, device, dtype, threads, log_level):
    """Serve a model over OpenAI's HTTP API: /v1/completions, /v1/chat/completions, /v1/models, plus /health,
    /metrics, /tokenize, /detokenize and /tokenizer_info. SIGTERM or Ctrl-C stops accepting, finishes the
    requests in flight, then exits.

    \b
    Example:
      fastmath serve --model runs/latest --port 8000
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "What is 2+3?", "max_tokens": 32}'
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise click.ClickException(_MISSING) from None
    import torch

    from fastmath.checkpoint import CheckpointError
    from fastmath.train.lora import load_model_or_adapter
    from fastmath.data import check_chat_template, check_template
    from fastmath.engine import Engine
    from fastmath.sample_io import SampleError, resolve_model, run_config
    from fastmath.serve.app import create_app
    from fastmath.tokenizer import Tokenizer

    if threads:
        torch.set_num_threads(threads)
    try:
        ckpt, run_dir = resolve_model(model)
        template = template or run_config(run_dir).get("template") or "vicuna"
        check_template(template)  # a bad template fails now, not at the first chat request
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        torch_dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                       "fp16": torch.float16, "fp32": torch.float32}[dtype]
        net, _ = load_model_or_adapter(ckpt, base=base, device=dev, dtype=torch_dtype)
        tok = Tokenizer(ckpt)
        tok.check_model_vocab(net.args.vocab_size)
        check_chat_template(tok, template)
        engine = Engine(net, tok, kv_cache_gb=kv_cache_gb, max_slots=max_slots, max_model_len=max_model_len,
                        compile=compile_)
    except (SampleError, CheckpointError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if compile_:
        _warm_up(engine, tok)
    name = served_model_name or model
    app = create_app(engine, tok, name, template=template, api_key=api_key, max_queue=max_queue)
    click.echo(f"serving {ckpt} as '{name}' on http://{host}:{port}/v1 (max_model_len {engine.max_model_len}, "
               f"template {template}{', API key required' if api_key else ''})", err=True)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish, then runs the app's
    # lifespan shutdown, which ends the engine loop.
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)).run()


def _warm_up(engine, tok) -> None:
    """Compile the decode step before the port opens, so the first client does not wait for torch.compile (the
    smallest slot bucket only; larger buckets compile when first used)."""
    import time

    from fastmath.engine import SamplingParams

    click.echo("compiling the decode step (torch.compile) ...", err=True)
    t0 = time.perf_counter()
    engine.add_request("warm-up", tok.encode("", bos=True) or [tok.eos_id], SamplingParams(n=1, temperature=0, max_new_tokens=2,
                                                               stop_at_answer=False, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    click.echo(f"compiled in {time.perf_counter() - t0:.0f} s", err=True)
