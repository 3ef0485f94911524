"""`fastmath sample`: N samples per problem with the engine, graded, with Pass@k. Options are generated from
fastmath.eval.config.SampleConfig, so the CLI and the Python API cannot drift apart."""
from __future__ import annotations

import dataclasses

import click

from fastmath.eval.config import sample_fields


def _option(f: dataclasses.Field):
    m = f.metadata
    name = "--" + f.name.replace("_", "-")
    if m.get("flag"):
        return click.option(name, f.name, is_flag=True, default=f.default, help=m["help"])
    if m.get("negatable"):
        return click.option(f"{name}/--no-{f.name.replace('_', '-')}", f.name, default=f.default, show_default=True,
                            help=m["help"])
    base = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
    kind = base
    if "choices" in m:
        kind = click.Choice(list(m["choices"]))
    elif "min" in m or "max" in m:
        rng = click.IntRange if base is int else click.FloatRange
        kind = rng(m.get("min"), m.get("max"), min_open=m.get("min_open", False))
    decls = m.get("decls", (name,))
    return click.option(*decls, f.name, type=kind, default=f.default, show_default=f.default is not None,
                        help=m["help"])


def _with_options(fn):
    for f in reversed(sample_fields()):
        fn = _option(f)(fn)
    return fn


@click.command(name="sample")
@_with_options
def command(**options):
    """Sample N answers per problem, grade them, and report Pass@k, PassRatio@N, majority and greedy accuracy.

    Writes samples.jsonl (as problems finish), summary.json and pass_at_k.png into --out; a rerun with the same
    arguments resumes. Under torchrun, each rank samples a share of the problems and rank 0 merges.
    """
    import torch

    from fastmath.checkpoint import CheckpointError
    from fastmath.eval import evaluate
    from fastmath.eval.config import SampleConfig
    from fastmath.sample_io import SampleError, format_table

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    try:
        summary = evaluate(SampleConfig(**options), log=click.echo)
    except (SampleError, CheckpointError, ValueError) as e:  # bad inputs, or a prompt that cannot fit the KV budget
        raise click.ClickException(str(e)) from None
    if summary is not None:
        click.echo(format_table(summary))
