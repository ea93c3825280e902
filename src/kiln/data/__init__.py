"""Token data: on-disk token files (:mod:`kiln.data.tokens`) and corpus preparation
(:mod:`kiln.data.prepare`)."""
