"""`lmq serve-model`: the LMTP websocket model server (its own issue; not in this version)."""
