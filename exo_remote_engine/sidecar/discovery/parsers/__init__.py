"""Provider and local-server listings, parsed from untrusted JSON into discovery's types.

May import: the rest of ``discovery`` (its types) and ``contract``.
"""
