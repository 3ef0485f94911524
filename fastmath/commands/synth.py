"""`fastmath synth`: new questions and answers from seed questions with GPT-4 Turbo (or any OpenAI-compatible API)."""
import os
from pathlib import Path

import click

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command(name="synth")
@click.option("--seeds", required=True, type=_FILE,
              help="Seed questions: JSONL in GSM8K, MATH or fastmath format (one new question per item).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output JSONL of records (question, solution, answer, seed_id, model, usage); the journal, "
                   "rejects and report files are written beside it. Rerunning the same command resumes.")
@click.option("--num-questions", type=click.IntRange(min=1), default=None,
              help="Number of records to produce (dropped items are replaced).")
@click.option("--per-seed", type=click.IntRange(min=1), default=None,
              help="Alternative to --num-questions: this many records per seed question.")
@click.option("--model", default="gpt-4-turbo", show_default=True, help="Model name sent to the API.")
@click.option("--base-url", default=None,
              help="OpenAI-compatible endpoint [default: $OPENAI_BASE_URL or https://api.openai.com/v1]. "
                   "The key is read from $OPENAI_API_KEY.")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests in flight at once.")
@click.option("--style", type=click.Choice(["auto", "gsm8k", "math"]), default="auto", show_default=True,
              help="Prompt variant: auto picks per seed (GSM8K records -> numeric answer, MATH -> LaTeX answer).")
@click.option("--consistency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ask for k answers per question and keep it only if a strict majority agree.")
@click.option("--decontaminate", multiple=True, type=_FILE,
              help="Evaluation JSONL (e.g. GSM8K/MATH test); questions sharing a word n-gram with any of its "
                   "questions are dropped. Repeatable.")
@click.option("--max-cost", type=click.FloatRange(min=0), default=None,
              help="Stop starting requests once the spend (USD, this output in total) would reach this.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the plan of which seed each item uses.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Per-request timeout in seconds.")
@click.option("--max-retries", type=click.IntRange(min=0), default=8, show_default=True,
              help="Retries per request on 429, 5xx, timeouts and connection errors (exponential backoff).")
@click.option("--temperature", type=click.FloatRange(min=0, max=2), default=1.0, show_default=True,
              help="Sampling temperature of both calls (the paper uses 1.0).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Completion token limit per call [default: the server's].")
@click.option("--price-in", type=click.FloatRange(min=0), default=None,
              help="Override the price of input tokens, USD per million.")
@click.option("--price-out", type=click.FloatRange(min=0), default=None,
              help="Override the price of output tokens, USD per million.")
@click.option("--max-parse-retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Unparseable replies allowed per call before the item is dropped (each goes to the rejects file).")
@click.option("--dedup-threshold", type=click.FloatRange(min=0, max=1, min_open=True), default=0.7,
              show_default=True, help="Jaccard similarity of word 3-grams at which two questions are duplicates.")
@click.option("--decontam-ngram", type=click.IntRange(min=1), default=10, show_default=True,
              help="Word n-gram length for decontamination.")
@click.option("--max-items", type=click.IntRange(min=1), default=None,
              help="Cap on items tried, replacements included [default: 3 x the number of questions + 10].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show the progress bar (with --batch: a progress line per poll on stderr).")
@click.option("--batch", is_flag=True, default=False,
              help="Use the OpenAI Batch API: half the price, results within 24 h, in rounds of batch jobs "
                   "(create+verify, then solve, then top-ups). Rerunning the same command resumes or collects.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="With --batch: poll until every round is done; --no-wait submits, journals the ids and exits "
                   "(rerun the same command to collect and submit the next round).")
@click.option("--poll-interval", type=click.FloatRange(min=0.001), default=60.0, show_default=True,
              help="With --batch: seconds between polls of the batches.")
@click.option("--batch-size", type=click.IntRange(min=1, max=50_000), default=50_000, show_default=True,
              help="With --batch: requests per batch file (the API allows 50,000 and 200 MB; files are split at both).")
@click.option("--dedup", type=click.Choice(["minhash", "exact"]), default="minhash", show_default=True,
              help="Near-duplicate index: minhash (MinHash-LSH candidates verified by exact Jaccard, ~0.35 KB per "
                   "question) or exact (prefix filtering, ~8 KB per question).")
@click.option("--dry-run", is_flag=True, default=False,
              help="Print requests per stage, estimated tokens and cost at synchronous and batch prices; send nothing.")
def command(seeds, out, num_questions, per_seed, model, base_url, concurrency, style, consistency, decontaminate,
            max_cost, seed, timeout, max_retries, temperature, max_tokens, price_in, price_out, max_parse_retries,
            dedup_threshold, decontam_ngram, max_items, progress, batch, wait, poll_interval, batch_size, dedup,
            dry_run):
    """Synthesise new math questions and chain-of-thought answers from seed questions (the paper's two calls).

    Example: OPENAI_API_KEY=... fastmath synth --seeds gsm8k_train.jsonl --out synth.jsonl --num-questions 1000
    """
    from fastmath.synth.pipeline import SynthConfig, SynthError, run_synth

    cfg = SynthConfig(
        seeds=seeds, out=out, num_questions=num_questions, per_seed=per_seed, model=model,
        base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None, concurrency=concurrency, style=style,
        consistency=consistency, decontaminate=tuple(decontaminate), max_cost=max_cost, seed=seed, timeout=timeout,
        max_retries=max_retries, temperature=temperature, max_tokens=max_tokens, price_in=price_in,
        price_out=price_out, max_parse_retries=max_parse_retries, dedup_threshold=dedup_threshold,
        decontam_ngram=decontam_ngram, max_items=max_items, progress=progress, batch=batch, wait=wait,
        poll_interval=poll_interval, batch_size=batch_size, dedup=dedup,
    )
    if dry_run:
        from fastmath.synth.pipeline import preview

        try:
            estimate = preview(cfg)
        except SynthError as e:
            raise click.ClickException(str(e)) from None
        _print_preview(estimate)
        return
    try:
        report = run_synth(cfg, os.environ.get("OPENAI_API_KEY", ""))
    except SynthError as e:
        raise click.ClickException(str(e)) from None
    _print_summary(report)


def _print_summary(r):
    dropped = ", ".join(f"{k} {v}" for k, v in r["dropped"].items() if v) or "none"
    cost = f"${r['cost_usd']:.4f}" if r["cost_usd"] is not None else "unknown (no price for this model)"
    lines = [
        f"records   {r['kept']} / {r['requested']}  -> {r['output']}",
        f"dropped   {dropped}",
        f"rejects   {r['rejected_replies']['question']} question, {r['rejected_replies']['answer']} answer replies",
    ]
    if r["consistency"]["k"] > 1:
        c = r["consistency"]
        lines.append(f"consist.  k={c['k']}: {c['kept']} of {c['voted']} kept")
    lines.append(f"usage     {r['usage']['prompt_tokens']} in + {r['usage']['completion_tokens']} out tokens, "
                 f"{r['usage']['requests']} replies, cost {cost}")
    for line in lines:
        click.echo(line)
    if r["stopped"] == "submitted":
        b = r.get("batch", {})
        click.echo(f"Submitted: {b.get('submissions_live', 0)} batch files in flight; rerun the same command to "
                   "collect them and submit the next round.", err=True)
    elif r["stopped"] == "max_cost":
        click.echo(f"Stopped at --max-cost {r['max_cost_usd']}: rerun with a higher --max-cost to continue.", err=True)
    elif not r["complete"]:
        click.echo(f"Stopped after {r['items_started']} items (--max-items): fewer records than requested.", err=True)


def _print_preview(e):
    click.echo(f"dry run: {e['requests_total']} requests for {e['records']} records, model {e['model']} "
               "(nothing sent)")
    click.echo(f"{'stage':<22}{'requests':>10}{'prompt tok':>14}{'completion tok':>16}")
    for st in e["stages"]:
        click.echo(f"{st['stage']:<22}{st['requests']:>10}{st['prompt_tokens']:>14}{st['completion_tokens']:>16}")
    click.echo(f"{'total':<22}{e['requests_total']:>10}{e['prompt_tokens']:>14}{e['completion_tokens']:>16}")
    for mode in ("sync", "batch"):
        c = e["cost_usd"][mode]
        price = e["price_per_million_tokens"][mode]
        text = f"${c:,.2f}" if c is not None else "unknown (no price for this model; give --price-in/--price-out)"
        per = f" (${price[0]:g} in / ${price[1]:g} out per M tokens)" if price else ""
        click.echo(f"cost at {mode} prices: {text}{per}")
    click.echo(f"estimator: {e['estimator']}")
