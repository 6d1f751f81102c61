"""The ``ldeq-fast`` subcommands, one module each: argument parsing and printing only, the work is a library
call.  Every module has ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit code``;
:mod:`ldeq_fast.cli` builds the top-level parser from them.  Nothing in the library imports this package."""

# in the order ``ldeq-fast --help`` lists them
COMMANDS = ("bench", "fit_init", "train", "video", "predict", "track", "export")
