"""`fastmath sample`: N samples per problem with the batched KV-cache sampler, graded, with Pass@k."""
import click


@click.command(name="sample")
@click.option("--model", default="runs/latest", show_default=True,
              help="Run directory (its final/, else its newest checkpoints/step_N/) or a checkpoint directory.")
@click.option("--data", default=None,
              help="JSONL problems (GSM8K, MATH or fastmath records). Default: the built-in held-out procedural "
                   "set (the run's difficulty and seed; 100 problems unless --problems).")
@click.option("-n", "--n", "n", type=click.IntRange(1), default=256, show_default=True,
              help="Samples per problem (under torchrun write -n: torchrun's own parser takes --n as --nnodes).")
@click.option("--temperature", type=click.FloatRange(0), default=0.7, show_default=True,
              help="Sampling temperature (0 = greedy samples).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling mass (1 = off).")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Top-k filter (0 = off).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="Most tokens generated per sample.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Noise seed: each token's noise depends only on (seed, problem, sample, step).")
@click.option("--out", default=None, help="Output folder. Default: eval/ in the run directory.")
@click.option("--greedy", is_flag=True, help="Also decode one greedy answer per problem (first-answer accuracy).")
@click.option("--problems", type=click.IntRange(1), default=None, help="Only the first K problems.")
@click.option("--template", default=None,
              help="Prompt template: vicuna, plain, or a format string with {question}. Default: the run's "
                   "training template, else vicuna.")
@click.option("--fewshot", type=click.IntRange(0), default=0, show_default=True,
              help="Prepend K solved procedural problems (for base models that were not fine-tuned).")
@click.option("--stop-at-answer/--no-stop-at-answer", default=True, show_default=True,
              help="Stop a sample after its completed 'The answer is: ...' line.")
@click.option("--kv-cache-gb", type=click.FloatRange(0, min_open=True), default=None,
              help="KV cache budget in GiB. Default: free GPU memory, or 1.5 GiB on CPU.")
@click.option("--max-slots", type=click.IntRange(1), default=None,
              help="Most sequences decoded at once. Default: 256 on CPU, 2048 on GPU (memory permitting).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Weights and KV cache dtype (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads for torch (0 = torch's default; 1 is often faster when other jobs share the cores).")
def command(model, data, n, temperature, top_p, top_k, max_new_tokens, seed, out, greedy, problems, template,
            fewshot, stop_at_answer, kv_cache_gb, max_slots, device, dtype, threads):
    """Sample N answers per problem, grade them, and report Pass@k, PassRatio@N, majority and greedy accuracy.

    Writes samples.jsonl (as problems finish), summary.json and pass_at_k.png into --out; a rerun with the same
    arguments resumes. Under torchrun, each rank samples a share of the problems and rank 0 merges.
    """
    import torch

    from fastmath.checkpoint import CheckpointError
    from fastmath.sample_io import SampleError, format_table
    from fastmath.sampler import evaluate

    if threads:
        torch.set_num_threads(threads)
    try:
        summary = evaluate(model=model, data=data, out=out, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                           max_new_tokens=max_new_tokens, seed=seed, greedy=greedy, problems=problems,
                           template=template, fewshot=fewshot, stop_at_answer=stop_at_answer,
                           kv_cache_gb=kv_cache_gb, max_slots=max_slots, device=device, dtype=dtype,
                           log=click.echo)
    except (SampleError, CheckpointError, ValueError) as e:  # bad inputs, or a prompt that cannot fit the KV budget
        raise click.ClickException(str(e)) from None
    if summary is not None:
        click.echo(format_table(summary))
