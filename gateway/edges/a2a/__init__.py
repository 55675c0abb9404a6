"""A2A 1.0 at both edges of the gateway, built on the official a2a-sdk (docs/a2a.md).

mapping.py   A2A messages, parts and artifacts <-> the payload the policy sees
errors.py    the gateway's error tree -> A2A errors, in one table
cards.py     which agents our organization may reach, and their A2A cards
inbound.py   A2A in: our clients' calls become router.submit, through the SDK's handler
outbound.py  A2A out: an A2A server offered as a local agent (an AgentBackend)
port.py      what the edges use of the router, and adapters for what the core lacks
listener.py  the HTTP (JSON-RPC, HTTP+JSON, cards) and gRPC listeners, start and stop
"""

from gateway.edges.a2a.listener import A2AEdge, A2APorts

__all__ = ["A2AEdge", "A2APorts"]
