"""The gateway's databases: engines, the writer thread, the task table."""
