"""The FastAPI app's request handling: dependencies, admission helpers, docs, and ``routes/``."""
