"""`fastmath train`: options are generated from fastmath.train.TrainConfig, so the CLI, config files and
the Python API cannot drift apart. Precedence: defaults < --config FILE < options given on the command line."""
from __future__ import annotations

import dataclasses

import click
from click.core import ParameterSource

from fastmath.train import TrainConfig, config_fields, load_config_file, validate


def _option(f: dataclasses.Field):
    name = "--" + f.name.replace("_", "-")
    meta = f.metadata
    help_ = meta["help"]
    if meta.get("multiple"):
        return click.option(name, f.name, multiple=True, type=meta.get("type", str), help=help_ + " (repeatable)")
    if f.type in (bool, "bool"):
        return click.option(f"{name}/--no-{f.name.replace('_', '-')}", f.name, default=f.default, show_default=True,
                            help=help_)
    kind = {"int": int, "float": float, "str": str}
    base = str(f.type).split(" |")[0]
    return click.option(name, f.name, type=kind.get(base, str), default=f.default,
                        show_default=f.default is not None, help=help_)


def _with_options(fn):
    for f in reversed(config_fields()):
        fn = _option(f)(fn)
    return fn


@click.command(name="train", context_settings={"show_default": True})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML or TOML file with any of the options below; command-line options override it")
@click.option("--resume", default=None,
              help="continue a run exactly: its directory, 'latest', or one of its checkpoints (uses its saved config; only resource options may change: --threads, --save-every, --save-minutes, --keep, --eval-every, --progress, --cache-dir, --report-to)")
@click.option("--dry-run", is_flag=True, help="print parameter count, estimated memory per GPU and steps, then exit")
@_with_options
@click.pass_context
def command(ctx, config_file, resume, dry_run, **options):
    """Packed-sequence SFT of a LLaMA-2 model on math problems (CPU, one GPU, or `torchrun` with FSDP2).

    With no arguments: trains the `tiny` preset from scratch on procedural arithmetic problems with a
    tokenizer trained on the fly, then prints held-out greedy accuracy of the trained vs the untrained model.
    """
    from fastmath.train import TrainingDiverged, check_resume_overrides, train

    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if resume:  # only options that change resources, not results (--threads, --save-every, ...)
        try:
            check_resume_overrides(given)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    values = {}
    if config_file:
        try:
            values.update(load_config_file(config_file))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    values.update(given)
    for k in ("data", "weights", "report_to"):
        if k in values:
            values[k] = list(values[k])
    try:
        cfg = TrainConfig(**values)
        validate(cfg)  # train() validates too; here so a bad option fails before a resume is looked up
        train(cfg, resume=resume, dry_run=dry_run, resume_overrides=given if resume else None)
    except TrainingDiverged as e:
        raise click.ClickException(str(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
