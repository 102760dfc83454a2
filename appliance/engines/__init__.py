"""How a worker serves: uvicorn's protocol and event loop on the sockets the master owns.

The master never imports this package's engine (uvicorn, uvloop, httptools, websockets): each
generation's template process does (:mod:`appliance.worker.template`), before the app, so its
workers share one copy of it and a replacement starts without importing anything.
"""
