"""The two bench apps, the same for every peer: ``hello`` and ``cpu`` (ASGI, WSGI; JS in node/)."""
