"""Serving: the OpenAI-compatible HTTP API and web playground, continuous batching, and the feedback store.

`batching.py` steps every active sequence of every request together through one model worker thread,
`app.py` is the FastAPI application (thin over the batcher), `feedback.py` keeps ratings and comparisons in
SQLite, `static/` is the web playground (plain JS/CSS shipped in the package), `playground.py` the terminal
one. Preference tuning on the collected feedback lives in `pocketlm/preference.py`, a Task of the one loop.
"""
