"""Entry point for ``python -m dicomfs`` and the ``dicomfs`` console script: hands over to the CLI.

Owns one thing besides: a Ctrl-C that comes while the CLI is still being imported (the first
tenth of a second or so) ends the command as one that comes later does, with status 130 and no
traceback.
"""

import sys


def main() -> None:
    try:
        from dicomfs.cli import entry
    except KeyboardInterrupt:
        sys.exit(130)
    entry()


if __name__ == "__main__":
    main()
