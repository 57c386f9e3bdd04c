"""HTTP serving: an AUTOMATIC1111-compatible /sdapi/v1, a job queue and the native /api/v1/jobs.

Needs the `server` extra (fastapi, uvicorn); nothing here is imported by the engine itself.
"""
