"""Developer tooling around the pointflow service: the demo, its synthetic scenes and the local
multi-service stack (used by `pointflow demo`, `pointflow stack up`, the tests and the load
benchmark). A deployed service runs `pipelines` alone."""
