"""``gptlab-serve``: an OpenAI-compatible HTTP server over the one inference loader.

* :mod:`gptlab.serving.protocol`: OpenAI request bodies checked into generation requests; answers
  and errors in OpenAI's shapes; chat messages in the model's prompt style.
* :mod:`gptlab.serving.engine`: the generation thread: continuous batching of concurrent requests.
* :mod:`gptlab.serving.app`: the FastAPI routes and the uvicorn server (the ``serve`` extra).
"""
