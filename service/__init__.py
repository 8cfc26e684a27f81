"""Geo-Sharing service: FastAPI app, job store, solve runner, client and GPU worker loop.

Nothing heavy is imported here: the spawned solve processes import ``service.solve_process``, and
the GPU worker and pipelines import the client and models without FastAPI's app.
"""
