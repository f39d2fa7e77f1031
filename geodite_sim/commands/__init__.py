"""Sub-commands of the ``geodite-sim`` command line; each module defines ``add_parser(subparsers)``.

``add_parser`` registers its sub-parser and sets ``func(args) -> int`` as the default handler.
"""
