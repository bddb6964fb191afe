"""The ``dicomfs`` subcommands, one module each (``mount``, ``umount``, ``serve``, ``prefetch``,
``export``, ``ls``, ``cache``), and the options they share (``options``).

Each command module owns its subcommand's arguments (``add_parser``) and its ``run``; ``cli``
builds the parser from them and turns what ``run`` returns or raises into an exit status. Nothing
is imported here: ``dicomfs --version`` loads only what it needs.
"""
