"""`sie-server encode`: encode a corpus of files into Parquet shards, resumably.

readers (files -> rows) -> backends (rows -> results) -> writer (results -> shards + manifest),
wired together by `run.py`; `cli.py` holds the subcommand's flags.
"""
