"""`lmq serve-model`: the LMTP websocket model server.

`protocol` parses and validates frames, `streams` decides each stream's tokens,
`scheduler` batches all streams of a model in one multi-sequence step, `models` maps
model ids to loaded backends, `server` is the websocket endpoint, `command` the CLI.
"""
