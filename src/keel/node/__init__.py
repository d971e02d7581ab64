"""``keel node``: the RabbitMQ voice-bot worker on keel's engine (README, "The voice-bot
worker")."""

from keel.node._node import Node, run_node

__all__ = ["Node", "run_node"]
