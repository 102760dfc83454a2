"""HTTP/1.1 rules the serving engine enforces, as pure functions (no sockets, no loop).

:mod:`appliance.http.rules` decides; :mod:`appliance.engines.h1` (the protocol on the event
loop) asks and acts. Keeping the decisions here lets the unit tests state every rule with
plain values, the way ``master/policy.py`` is tested.
"""

from __future__ import annotations

__all__: list[str] = []
