"""kiln's programs, above the library: the `kiln` entry point (kiln.py), the terminal chat
(repl), bench, info, pull, and the converter's and exporter's command lines. The library
(engine/ outside this folder) never imports from here."""
