"""One module per `fastmath` subcommand; each exposes a click command named `command`."""
