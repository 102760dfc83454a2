"""The master: pure decisions (:mod:`.policy`) and the effects that carry them out (:mod:`.runtime`)."""
