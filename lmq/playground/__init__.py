"""`lmq playground`: a local web page to write, run and inspect queries (runs.py runs
them and streams their trace events, server.py serves the page and its API)."""
