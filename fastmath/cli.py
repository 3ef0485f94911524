"""The `fastmath` command. Subcommands live in fastmath/commands/ and are imported only when run,
so `fastmath --help` and `fastmath synth` never import torch."""
import importlib

import click

# name -> (module, one-line help shown by `fastmath --help`)
COMMANDS = {
    "train": ("fastmath.commands.train", "Packed-sequence SFT of a LLaMA-2 model (CPU, one GPU, or torchrun)."),
    "sample": ("fastmath.commands.sample", "Sample N answers per problem, grade them, report Pass@k."),
    "serve": ("fastmath.commands.serve", "Serve a model over OpenAI's HTTP API (completions, chat, tokenizer)."),
    "grade": ("fastmath.commands.grade", "Re-grade an existing samples.jsonl and write summary.json."),
    "synth": ("fastmath.commands.synth", "Synthesise new math questions and answers with GPT-4 Turbo."),
    "info": ("fastmath.commands.info", "Print versions, device, attention backend and kernel status."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, short_help = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise

            @click.command(name=name, help=short_help)
            def unavailable():
                raise click.ClickException(f"'fastmath {name}' is not available in this version yet.")

            unavailable.short_help = short_help
            return unavailable
        cmd = module.command
        cmd.short_help = short_help
        return cmd

    def invoke(self, ctx):
        # A bad checkpoint directory is the user's mistake, not a bug, and a full or failing disk is an
        # expected condition (fastmath.fsio): one sentence each, no traceback, exit status 1.
        from fastmath.fsio import StorageError, storage_cause

        try:
            return super().invoke(ctx)
        except StorageError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:
            if type(e).__name__ == "CheckpointError":  # fastmath.checkpoint, not imported here: it needs torch
                raise click.ClickException(str(e)) from None
            cause = storage_cause(e)
            if isinstance(cause, OSError) and cause.filename:  # a path not wrapped by fsio: still one sentence
                raise click.ClickException(f"{cause.filename}: {(cause.strerror or str(cause)).lower()}") from None
            raise

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastmath")
def main():
    """fastmath: train and sample LLaMA-2 math models (the Xwin-Math recipe), fast."""


if __name__ == "__main__":
    main()
