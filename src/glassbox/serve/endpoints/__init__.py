"""One module per endpoint, each with an APIRouter named ``router``.

Adding an endpoint (say /v1/embeddings) is adding a module here and listing it in
``ENDPOINTS``; serve/app.py includes them all.
"""

from glassbox.serve.endpoints import (
    chat_completions,
    completions,
    embeddings,
    health,
    metrics,
    models,
)

ENDPOINTS = (health, metrics, models, completions, chat_completions, embeddings)
