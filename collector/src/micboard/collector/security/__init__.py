"""Fleet security: agent and collector NATS identities, the nats-server configuration, connect options."""
