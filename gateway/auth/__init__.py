"""Authentication: who is calling (client certificate + JWT), independent of the transport."""
