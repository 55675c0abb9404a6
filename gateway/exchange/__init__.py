"""The exchange: tasks, routes (local, outbound, inbound), agents and limits."""
