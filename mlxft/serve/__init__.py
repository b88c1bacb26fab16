"""`mlxft serve`: an OpenAI-compatible HTTP server and a chat page, on the standard library alone.

    mlxft serve --model models/alpaca-fused            # http://127.0.0.1:8080
    mlxft serve --model builtin --adapter runs/x --api-key KEY --host 0.0.0.0

openai.py holds the request and response shapes, server.py the routes, page.py the chat page.
"""

from mlxft.serve.server import make_server

__all__ = ["make_server"]
