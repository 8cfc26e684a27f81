"""Geo-Sharing service: FastAPI app, job store, solve runner, client and GPU worker loop.

Nothing heavy is imported here: ``service.cli`` is loaded by the ``geoshare`` console script just
to register its subcommands, and the spawned solve processes import ``service.solve_process``.
"""
