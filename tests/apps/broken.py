"""An app that raises at import, for crash-loop and reload-abort tests."""

raise RuntimeError("this app is broken on purpose")
