"""llm-pool: many local and remote language models behind one HTTP API, on trio.

The one import name of the distribution.  Its subpackages live in the repository's top-level
folders (``pool/ backends/ admin/ config/``, mapped by ``[tool.setuptools.package-dir]``), so
a user's own ``config.py`` or ``pool/`` can never shadow ours, and two distributions never
write the same generic names into site-packages.
"""
