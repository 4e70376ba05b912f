"""The conductor: projector (events → KV snapshots), dispatcher (work items) and reaper."""
