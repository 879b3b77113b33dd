"""The ``esfm`` command line: thin click commands over the library."""
