"""Test helpers shipped with pyoco-es (like ``trio.testing``): start a whole stack in-process
(``stack``), a fleet of processes to kill (``fleet``), a submit ledger and its checks (``ledger``),
faults (``faults``); the NATS cluster itself is ``pyoco_es.nats.cluster``."""
